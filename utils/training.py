"""What every training script does the same way: arguments from flags or a config file, logging, resuming,
parameter groups and freezing. The task logic stays in the scripts."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainerCallback

logger = logging.getLogger(__name__)

CONFIG_EXTENSIONS = (".json", ".yaml", ".yml")


def parse_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse the dataclasses from flags, or from a .json/.yaml config file given as the first argument, in
    which case any further flags override the file's values (`run_clip.py config.yaml --learning_rate 1e-4`).
    Without --dataloader_num_workers, TrainingArguments get `default_dataloader_workers`' number, not 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith(CONFIG_EXTENSIONS) and not argv[0].startswith("-"):
        argv = config_to_argv(argv[0]) + argv[1:]
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if not any(a == "--dataloader_num_workers" or a.startswith("--dataloader_num_workers=") for a in argv):
        for args in parsed:
            if isinstance(args, transformers.TrainingArguments):
                args.dataloader_num_workers = default_dataloader_workers(
                    args.device.type, len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                )
                if args.device.type == "mps" and args.dataloader_num_workers > 1 and args.dataloader_multiprocessing_context is None:
                    args.dataloader_multiprocessing_context = "fork"  # as TrainingArguments sets it for MPS
    return parsed


def default_dataloader_workers(device_type: str, cpus: int, local_processes: int = 1) -> int:
    """Data loader workers when --dataloader_num_workers is not given (the Trainer's default is 0: decoding in the
    training process, between steps). On CPU, 0: workers would take the cores the model's threads use, and data
    is about 1% of a ViT-B/32 step there. On an accelerator, the step is 50x or more faster and one worker decodes
    ~670 images/s (JPEG draft decoding; ~420 in full): min(8, the process's share of the cores minus one, at least
    1), so decoding overlaps the step. BENCHMARKS.md ("Fast paths") has the figures."""
    if device_type == "cpu":
        return 0
    return max(1, min(8, cpus // max(local_processes, 1) - 1))


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
    # transformers lets its records also reach the root logger when CI=1 is set; with our root handler above,
    # every line would then print twice.
    transformers.utils.logging.disable_propagation()


def log_arguments(*dataclasses) -> None:
    for args in dataclasses:
        logger.info("%s %s", type(args).__name__, {k: v for k, v in vars(args).items() if not k.startswith("_")})


@dataclass
class RunArguments:
    """How a run treats its output folder and bad data (shared by the three scripts)."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a finished run found in output_dir."})
    max_bad_samples_fraction: float = field(
        default=0.05,
        metadata={"help": "Skip unreadable samples (listed in output_dir/skipped_samples.jsonl) up to this fraction of a split; past it, stop."},
    )

    def __post_init__(self):
        if not 0 <= self.max_bad_samples_fraction <= 1:
            raise ValueError(f"--max_bad_samples_fraction must be in [0, 1], got {self.max_bad_samples_fraction}.")


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint folder counts only if the Trainer finished writing it: trainer_state.json, written last, is
    there and parses, and the weights are there. A folder half-written when a run was killed does not."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return any(name.startswith(("model.safetensors", "pytorch_model")) or name.startswith("global_step") for name in os.listdir(path))


def find_checkpoint_to_resume(training_args) -> str | None:
    """The checkpoint to resume from: the one named by --resume_from_checkpoint, else the last complete one in
    output_dir, so that running a killed command again continues where it stopped."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    candidates = sorted(
        (int(m.group(1)), m.string) for m in (_CHECKPOINT.fullmatch(n) for n in os.listdir(training_args.output_dir)) if m
    )
    for _, name in reversed(candidates):
        path = os.path.join(training_args.output_dir, name)
        if is_complete_checkpoint(path):
            logger.info("Resuming from %s, the last complete checkpoint in output_dir", path)
            return path
        logger.warning("Ignoring %s: an incomplete checkpoint (the run was stopped while writing it)", path)
    return None


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
FINISHED_RUN_FILES = ("all_results.json", "train_results.json")


def check_output_dir(training_args, run_args: RunArguments, resuming: bool) -> None:
    """Before any long work: never overwrite a finished run silently, and fail now, not at the first
    checkpoint, when output_dir cannot be written or its disk is full."""
    output_dir = training_args.output_dir
    if training_args.do_train and not resuming and not run_args.overwrite_output_dir and os.path.isdir(output_dir):
        finished = [name for name in FINISHED_RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
        if finished:
            raise ValueError(
                f"output_dir {output_dir!r} already holds a finished run ({finished[0]}). Pass --overwrite_output_dir "
                "to replace it, or choose another --output_dir."
            )
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"output_dir {output_dir!r} is not writable: {err}. Choose another --output_dir.") from None


def start_run(training_args, run_args: RunArguments, *arg_groups) -> str | None:
    """What every script does first: logging, the arguments in the log, the checkpoint to resume from (None for
    a fresh run) and the output folder's checks. Also the two TrainingArguments every script needs set its way."""
    training_args.remove_unused_columns = False  # the collators read fields the models' forward does not take
    training_args.logging_nan_inf_filter = False  # a non-finite loss must stop the run, not vanish in an average
    if training_args.torch_compile:
        # Compile each repeated layer once and reuse it (accelerate's regional compilation, which the Trainer's
        # compile plugin reads from this variable): on ViT-B/32 the same step time as compiling the whole model, a
        # third of the cold compile time, and a 3 s recompile instead of 73 s when the caption length first changes
        # (BENCHMARKS.md, "Fast paths"). Set it to 0 to compile the whole model.
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")
    setup_logging(training_args)
    log_arguments(*arg_groups, run_args)
    logger.info("Training arguments %s", training_args)
    if training_args.torch_compile:
        regional = os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"]
        logger.info("torch.compile, %s compilation (ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=%s)",
                    "whole-model" if regional in ("0", "false", "False") else "regional", regional)
    resume_from = find_checkpoint_to_resume(training_args)
    check_output_dir(training_args, run_args, resuming=resume_from is not None)
    return resume_from


def check_disk_space(output_dir: str, model: torch.nn.Module, training: bool) -> None:
    """Fail before training when output_dir's disk cannot hold one checkpoint (weights, and for training the
    optimizer's two moments), rather than at hour six."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    needed = parameters * (3 if training else 1)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise ValueError(
            f"output_dir {output_dir!r} has {free / 2**30:.2f} GiB free, but one checkpoint of this model needs about "
            f"{needed / 2**30:.2f} GiB. Free space or choose another --output_dir."
        )


class NonFiniteGuard(TrainerCallback):
    """Stop the run with a clear message at the first logged non-finite loss, and before any checkpoint whose
    weights are not finite, so the last checkpoint on disk is a good one. (Needs logging_nan_inf_filter off,
    or the Trainer hides non-finite losses in its running average.)"""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
            if bad is not None:
                raise RuntimeError(
                    f"Non-finite weights ({bad}) after step {state.global_step}: stopping before saving a checkpoint. "
                    f"The last good checkpoint is {state.best_model_checkpoint or 'the last checkpoint-* in output_dir'}. "
                    "Lower the learning rate, or use bf16 instead of fp16."
                )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise RuntimeError(
                    f"Non-finite {key} ({value}) at step {state.global_step}: stopping. The checkpoints in "
                    f"{args.output_dir} were saved before it. Lower the learning rate, or use bf16 instead of fp16."
                )


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


def keep_tensorboard_logs_in_output_dir(trainer) -> None:
    """With --report_to tensorboard, have the event files land in output_dir/runs/<date>_<host> whether or not
    the run trains. transformers 5 has no --logging_dir; its TensorBoardCallback picks that folder when training
    begins, so an evaluation-only run would write to ./runs of the working directory instead. The
    TENSORBOARD_LOGGING_DIR environment variable, when set, still wins."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())


def train_evaluate_predict(trainer, datasets_: dict, resume_from: str | None, skip_log=None, after_split=None) -> dict:
    """The end of every script: train when --do_train (resuming from `resume_from`), save the model, the processor
    and the state; then score the validation split when --do_eval and the test split when --do_predict. Each
    stage's metrics land in <stage>_results.json and all_results.json; all of them are returned.

    `after_split(split, metrics)` runs after each scored split, on every process (the trainer's gathered
    predictions are still at hand), for what a script writes of it: predictions, a gallery."""
    args = trainer.args
    keep_tensorboard_logs_in_output_dir(trainer)
    metrics = {}
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_model()  # the model and its processor, reloadable by the Auto classes
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
        skipped = skip_log.count() if skip_log is not None else 0  # reads the list: once
        if skipped:
            logger.warning("%d samples were skipped; reasons in %s", skipped, skip_log.path)
    for split, prefix, run in (("validation", "eval", args.do_eval), ("test", "predict", args.do_predict)):
        if not run:
            continue
        if split == "validation":
            split_metrics = trainer.evaluate()
        else:
            split_metrics = trainer.predict(datasets_[split], metric_key_prefix=prefix).metrics
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
        if after_split is not None:
            after_split(split, split_metrics)
    return metrics


def describe_data(data_args, datasets_: dict) -> str:
    """The data line of a model card: each split used, where it came from and how many examples of it (after
    unusable rows were left out and --max_*_samples applied), e.g. "train: data/train.jsonl (5000 examples);
    validation: data/val.jsonl (1000 examples)". `data_args` has the scripts' common fields (dataset_name,
    dataset_config_name, train_file, validation_file, test_file)."""
    parts = []
    for split, dataset in datasets_.items():
        if data_args.dataset_name:
            config = f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else ""
            origin = f"{data_args.dataset_name}{config}, split {split}"
        else:
            origin = getattr(data_args, f"{split}_file")
        # A stream (--streaming) has no length: it is read as it trains.
        size = f"{len(dataset)} examples" if hasattr(dataset, "__len__") else "streamed"
        parts.append(f"{split}: {origin} ({size})")
    return "; ".join(parts)


def write_run_report(trainer, script: str, argv: list[str] | None, data_args, datasets_: dict, metrics: dict, tasks: str,
                     tags: list[str]) -> None:
    """What a finished run leaves to look at, from the main process: training_curves.png from the log history
    and, after training, the model card with the command, the data (`describe_data`), the metrics table and
    the curves."""
    from .report import append_to_model_card, build_model_card_section, plot_training_curves

    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    curves = plot_training_curves(trainer.state.log_history, os.path.join(output_dir, "training_curves.png"))
    if trainer.args.do_train:
        trainer.create_model_card(
            model_name=os.path.basename(os.path.normpath(output_dir)), tasks=tasks,
            dataset=data_args.dataset_name or data_args.train_file, tags=tags,
        )
        command = ["python", script, *(sys.argv[1:] if argv is None else argv)]
        append_to_model_card(output_dir, build_model_card_section(command, describe_data(data_args, datasets_), metrics, curves))
