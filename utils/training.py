"""What every training script does the same way: arguments from flags or a config file, logging, resuming,
parameter groups and freezing. The task logic stays in the scripts."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable

import datasets
import torch
import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)

CONFIG_EXTENSIONS = (".json", ".yaml", ".yml")


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse the dataclasses from flags, or from a .json/.yaml config file given as the first argument, in
    which case any further flags override the file's values (`run_clip.py config.yaml --learning_rate 1e-4`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith(CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        argv = config_to_argv(argv[0]) + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def config_to_argv(path: str) -> list[str]:
    """A flat config file -> the flags it stands for (later flags override earlier ones)."""
    with open(path) as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):  # e.g. an inline DeepSpeed config
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def setup_logging(training_args) -> None:
    """Log at INFO from the main process and at WARNING from the others, for our modules and HF's."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # The main process logs at INFO unless --log_level says otherwise; the others at WARNING.
    if training_args.log_level == "passive" and training_args.should_log:
        training_args.log_level = "info"
    level = training_args.get_process_log_level()
    logging.getLogger().setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def log_arguments(*dataclasses) -> None:
    for args in dataclasses:
        logger.info("%s %s", type(args).__name__, {k: v for k, v in vars(args).items() if not k.startswith("_")})


def find_checkpoint_to_resume(training_args) -> str | None:
    """The checkpoint to resume from: the one named by --resume_from_checkpoint, else the last complete one in
    output_dir when training would otherwise start over in a folder that already holds checkpoints."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info("Resuming from %s, the last checkpoint in output_dir", last)
        return last
    return None


def freeze(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def build_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    learning_rate: float,
    lr_by_prefix: dict[str, float] | None = None,
) -> list[dict]:
    """Optimizer groups by (learning rate, decay): parameters whose name starts with a prefix of
    `lr_by_prefix` take its learning rate, the rest `learning_rate`; names outside `decay_names` (biases,
    norms, temperatures) get no weight decay. Frozen parameters are left out; empty groups are dropped."""
    lr_by_prefix = {p: lr for p, lr in (lr_by_prefix or {}).items() if lr is not None}
    groups: dict[tuple[float, bool], list] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        lr = next((lr for prefix, lr in lr_by_prefix.items() if name.startswith(prefix)), learning_rate)
        groups.setdefault((lr, name in decay_names), []).append(parameter)
    return [
        {"params": params, "lr": lr, "weight_decay": weight_decay if decay else 0.0}
        for (lr, decay), params in groups.items()
    ]
