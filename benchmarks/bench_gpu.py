#!/usr/bin/env python
"""run_clip's training pipeline against the official example's approach on a GPU: CLIP ViT-B/32 (CLIPConfig()
defaults, random weights), the same 640x480 JPEGs and captions as bench_clip.py, bf16 autocast and fp32.

Not a test: it writes figures to benchmarks/results_gpu.json and a table in BENCHMARKS.md ("GPU").

    python benchmarks/bench_gpu.py                 # about 3 minutes on one H100 (16 CPU cores)
    python benchmarks/bench_gpu.py --quick         # 2+2 layers, batch 16: a smoke run, on CPU too

Runs, each alone in this process (the GPU is not shared, so steps need not alternate), per precision:
- ours: run_clip's dataset (JPEG draft decoding, uint8 transforms), collator (normalisation once per batch,
  captions padded to the longest), fp32 clip_loss and fused AdamW, with the data loader workers run_clip picks when
  --dataloader_num_workers is not given (utils.training.default_dataloader_workers), pinned memory;
- baseline: the official example's approach (captions padded to 77, per-sample read_image and float transform,
  the model's own loss, torch's default AdamW) with its default of no workers, as its README runs it;
- baseline_workers: the same with as many workers as ours, so the model-side gain is a figure of its own.
- ours_compiled (--compile): ours with the transformer layers compiled (accelerate's compile_regions, what
  --torch_compile does), bf16 only; its compile time is recorded.
A step is timed part by part (data wait + copy to the GPU, forward, backward, clipping + optimizer), each to its
end on the GPU; peak GPU memory per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.bench_clip import TrainingLoop, build_model, clip_image_spec, count_step_flops, summarize_steps  # noqa: E402
from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    build_caption_tokenizer,
    command_line,
    markdown_table,
    median,
    now,
    replace_markdown_block,
    write_image_text_data,
)
from utils.training import default_dataloader_workers  # noqa: E402

logger = logging.getLogger("bench_gpu")
RESULTS_PATH = os.path.join(REPO_ROOT, "benchmarks", "results_gpu.json")


def describe_gpu_machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return info


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Median TFLOP/s of a size^3 matmul on random data (never zeros), after warm-up; fp32 without TF32."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t0)
    return 2 * size**3 / median(seconds) / 1e12


def _write_part(directory: str, num_images: int, seed: int) -> dict:
    return write_image_text_data(directory, num_images, seed=seed)


def write_images_in_parallel(work_dir: str, num_images: int, parts: int) -> dict:
    """bench_clip's photo-like JPEGs and captions, written by `parts` processes (one seed and folder each; ~50 ms an
    image in one process), gathered in one train.jsonl whose image paths are relative to it."""
    per_part = -(-num_images // parts)
    folders = [os.path.join(work_dir, f"part{k}") for k in range(parts)]
    with multiprocessing.get_context("fork").Pool(parts) as pool:
        infos = pool.starmap(_write_part, [(folder, per_part, k) for k, folder in enumerate(folders)])
    jsonl = os.path.join(work_dir, "train.jsonl")
    with open(jsonl, "w") as out:
        for folder, info in zip(folders, infos):
            with open(info["jsonl"]) as f:
                for line in f:
                    row = json.loads(line)
                    row["image"] = os.path.join(os.path.basename(folder), row["image"])
                    out.write(json.dumps(row) + "\n")
    return {"jsonl": jsonl, "num_images": per_part * parts, "mean_jpeg_kib": round(median([i["mean_jpeg_kib"] for i in infos]), 1),
            "caption_words_mean": round(median([i["caption_words_mean"] for i in infos]), 1)}


def measure_run(pipeline: str, precision: str, num_workers: int, device: torch.device, settings: dict, jsonl: str) -> dict:
    """One pipeline trained for warm-up + measured steps: throughput, the split of a step, peak GPU memory."""
    compiled = pipeline == "ours_compiled"
    torch.manual_seed(0)
    tokenizer = build_caption_tokenizer()
    model = build_model(settings["layers"], tokenizer).to(device)
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    steps_total = settings["warmup_steps"] + settings["measured_steps"]
    loop = TrainingLoop(pipeline.replace("_workers", ""), model, tokenizer, clip_image_spec(), jsonl,
                        settings["batch_size"], precision, device=str(device), num_workers=num_workers,
                        num_samples=steps_total * settings["batch_size"])
    t0 = time.perf_counter()
    steps = [loop.step()]
    compile_s = time.perf_counter() - t0 if compiled else None  # the first compiled step compiles
    steps += [loop.step() for _ in range(steps_total - 1)]
    result = summarize_steps(steps, settings["warmup_steps"], settings["batch_size"])
    result.update(pipeline=pipeline, precision=precision, num_workers=num_workers, compile_s=compile_s)
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if not compiled:
        result["flops"] = count_step_flops(loop.model, loop.last_batch, loop.loss_of, loop.autocast)
        result["tflops_per_s"] = result["flops"]["forward_backward"] / result["step_s"] / 1e12
    del loop, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def render_markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    rows = []
    for run in results["runs"]:
        share = run["share"]
        rows.append([
            run["precision"], run["pipeline"], run["num_workers"], f"{run['samples_per_s']:.0f}", f"{run['step_s'] * 1000:.1f}",
            f"{share['data'] * 100:.1f}%", f"{run['per_step_s']['optimizer'] * 1000:.1f}",
            f"{run['text_length_mean']:.0f}", f"{run['tflops_per_s']:.0f}" if "tflops_per_s" in run else "–",
            f"{run['peak_gpu_memory_mib']:,.0f}" if "peak_gpu_memory_mib" in run else "–",
        ])
    ratios = "; ".join(f"{precision}: ours {r['ours_over_baseline']:.2f}x the baseline as the example runs it, "
                       f"{r['ours_over_baseline_workers']:.2f}x with the same workers" for precision, r in results["ratios"].items())
    matmul = ", ".join(f"{k} {v:.0f}" for k, v in results["matmul_tflops"].items())
    return "\n".join([
        f"{m.get('gpu', m['device'])}, {m['cpus']} CPU cores, torch {m['torch']} (CUDA {m['cuda']}), transformers "
        f"{m['transformers']}; {results['when']}; `{results['command']}`. CLIP ViT-B/32 ({s['layers']}+{s['layers']} layers), batch "
        f"{s['batch_size']}, {s['warmup_steps']} warm-up + {s['measured_steps']} measured steps per run; {matmul} TFLOP/s "
        f"({s['matmul_size']}^3 matmul, random data; fp32 without TF32).\n",
        markdown_table(["precision", "pipeline", "workers", "samples/s", "step ms", "data share", "optimizer ms",
                        "text tokens", "model TFLOP/s", "peak GPU MiB"], rows) + "\n",
        ratios + ".",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2+2 layers, batch 16, few steps: a smoke run")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--measured_steps", type=int, default=30)
    parser.add_argument("--num_images", type=int, default=1024, help="distinct JPEGs; runs cycle through them")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--compile", action="store_true", help="also ours with regional torch.compile (bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_gpu"))
    parser.add_argument("--results", default=RESULTS_PATH, help="JSON file the figures go to")
    parser.add_argument("--markdown", action="store_true", help="also write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    settings = {"layers": 12, "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
                "measured_steps": args.measured_steps, "matmul_size": 8192 if device.type == "cuda" else 1024}
    if args.quick:
        settings.update(layers=2, batch_size=16, warmup_steps=1, measured_steps=3)
    machine = describe_gpu_machine(device)
    # The workers run_clip picks on an accelerator; on CPU too (the smoke run), so the worker path is exercised.
    workers = default_dataloader_workers("cuda", machine["cpus"])
    logger.info("machine %s; ours with %d data loader workers", machine, workers)
    data = write_images_in_parallel(args.work_dir, 64 if args.quick else args.num_images, parts=min(8, machine["cpus"]))
    matmul = {name: matmul_tflops(device, dtype, settings["matmul_size"]) for name, dtype in
              (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    logger.info("matmul TFLOP/s %s", matmul)
    runs, ratios = [], {}
    for precision in [p for p in args.precisions.split(",") if p]:
        variants = [("ours", workers), ("baseline", 0), ("baseline_workers", workers)]
        if args.compile and precision == "bf16":
            variants.append(("ours_compiled", workers))
        by_name = {}
        for pipeline, num_workers in variants:
            run = measure_run(pipeline, precision, num_workers, device, settings, data["jsonl"])
            logger.info("%s %s (%d workers): %.1f samples/s, step %.1f ms, data share %.1f%%, peak %s MiB, compile %s s",
                        precision, pipeline, num_workers, run["samples_per_s"], run["step_s"] * 1000, run["share"]["data"] * 100,
                        run.get("peak_gpu_memory_mib"), run["compile_s"])
            runs.append(run)
            by_name[pipeline] = run
        ratios[precision] = {
            "ours_over_baseline": by_name["ours"]["samples_per_s"] / by_name["baseline"]["samples_per_s"],
            "ours_over_baseline_workers": by_name["ours"]["samples_per_s"] / by_name["baseline_workers"]["samples_per_s"],
        }
        logger.info("%s ratios: %s", precision, {k: round(v, 2) for k, v in ratios[precision].items()})
    results = {"machine": machine, "settings": settings, "data": data, "matmul_tflops": matmul, "runs": runs, "ratios": ratios,
               "command": command_line(), "when": now(), "mode": "quick" if args.quick else "full"}
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    if args.markdown:
        replace_markdown_block("gpu", render_markdown(results))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
