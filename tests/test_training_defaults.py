"""The defaults utils.training.parse_args sets where the Trainer's do not fit these scripts."""

import pytest
from transformers import TrainingArguments

from utils.training import default_dataloader_workers, parse_args


@pytest.mark.parametrize("device,cpus,processes,expected", [
    ("cpu", 2, 1, 0),     # workers would take the model's cores; data is ~1% of a CPU step
    ("cpu", 64, 1, 0),
    ("cuda", 2, 1, 1),    # at least one, so decoding overlaps the step
    ("cuda", 16, 1, 8),   # capped: 8 x ~670 images/s
    ("cuda", 16, 8, 1),   # eight processes on 16 cores: two cores each, one for the process itself
    ("cuda", 96, 8, 8),
    ("mps", 10, 1, 8),
])
def test_default_dataloader_workers(device, cpus, processes, expected):
    assert default_dataloader_workers(device, cpus, processes) == expected


def test_the_default_applies_only_when_the_flag_is_not_given(tmp_path, monkeypatch):
    import utils.training

    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    (args,) = parse_args((TrainingArguments,), base)
    assert args.dataloader_num_workers == 0  # on CPU
    monkeypatch.setattr(utils.training, "default_dataloader_workers", lambda *args: 5)  # as on an accelerator
    (args,) = parse_args((TrainingArguments,), base)
    assert args.dataloader_num_workers == 5
    (args,) = parse_args((TrainingArguments,), [*base, "--dataloader_num_workers", "3"])
    assert args.dataloader_num_workers == 3
    (args,) = parse_args((TrainingArguments,), [*base, "--dataloader_num_workers=2"])
    assert args.dataloader_num_workers == 2


@pytest.mark.parametrize("script,config", [
    ("run_clip", "demo_clip.yaml"), ("run_blip_caption", "demo_caption.yaml"), ("run_vilt_vqa", "demo_vqa.yaml"),
])
def test_demo_configs_parse_with_their_scripts_flags(script, config):
    """The configs the README runs name only flags their script has, with values it accepts (a renamed flag
    would otherwise surface only when a user runs the demo)."""
    import importlib
    import os

    module = importlib.import_module(script)
    groups = [getattr(module, name) for name in ("ModelArguments", "DataArguments", "CaptionArguments") if hasattr(module, name)]
    from utils.training import RunArguments

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", config)
    parsed = parse_args((*groups, RunArguments, TrainingArguments), [path])
    training_args = parsed[-1]
    assert training_args.do_train and training_args.output_dir.startswith("demo/")
