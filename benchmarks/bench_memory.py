#!/usr/bin/env python
"""Peak memory of a short run_clip training run as the data set grows: 1k and 20k samples of the same images, read
whole (map-style) and with --streaming, from a jsonl naming image files and from webdataset shards holding them.

Not a test: it writes figures to benchmarks/results_memory.json and a table of BENCHMARKS.md.

    python benchmarks/bench_memory.py            # 1k and 20k samples, 8 runs: about 10 minutes on 2 busy cores
    python benchmarks/bench_memory.py --quick    # 1k and 5k samples, fewer steps: about 4 minutes

Each configuration runs in a fresh Python process (this file with --child) with an empty datasets cache of its own
(HF_DATASETS_CACHE), no data loader workers (every byte is in the one process measured) and a fixed number of
steps, so runs differ only in the data set's size and how it is read. That process samples /proc/self/status every
10 ms: peak RSS (VmHWM), and separately the peaks of anonymous memory (RssAnon: Python objects, tensors, what the
process really holds) and file-backed pages (RssFile: memory-mapped files such as the datasets arrow cache, model
weights and libraries, which the kernel can drop and reread). The datasets cache's size on disk is measured after
the run. The samples reuse --pool distinct photo-like JPEGs, so the 20k set costs disk only in the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.common import (
    command_line,
    describe_machine,
    load_average,
    markdown_table,
    now,
    photo_like_image,
    random_caption,
    replace_markdown_block,
)

RESULTS_PATH = os.path.join(REPO_ROOT, "benchmarks", "results_memory.json")
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


# --- Inputs ------------------------------------------------------------------------------------------------------


def write_pool(directory: str, count: int, width: int, height: int, seed: int = 0) -> list[str]:
    """`count` photo-like JPEGs (quality 90) in directory/pool; their paths relative to `directory`."""
    import numpy as np

    os.makedirs(os.path.join(directory, "pool"), exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        name = f"pool/{index:04d}.jpg"
        if not os.path.exists(os.path.join(directory, name)):
            photo_like_image(rng, width, height).save(os.path.join(directory, name), quality=90)
        names.append(name)
    return names


def write_data_set(directory: str, pool: list[str], num_samples: int, seed: int = 0) -> dict[str, str]:
    """directory/train_<n>.jsonl: `num_samples` rows cycling through the pool, each with five captions of its own;
    directory/shards_<n>/: the same rows as webdataset shards of 1000 samples, images inside."""
    import numpy as np

    from utils.convert import write_shards

    jsonl = os.path.join(directory, f"train_{num_samples}.jsonl")
    shards = os.path.join(directory, f"shards_{num_samples}")
    if not os.path.exists(jsonl):
        rng = np.random.default_rng(seed)
        with open(jsonl + ".partial", "w") as f:
            for index in range(num_samples):
                row = {"image": pool[index % len(pool)], "captions": [random_caption(rng) for _ in range(5)]}
                f.write(json.dumps(row) + "\n")
        os.replace(jsonl + ".partial", jsonl)
    if not os.path.isdir(shards):
        write_shards(jsonl, shards + ".partial", prefix="train", samples_per_shard=1000)
        os.replace(shards + ".partial", shards)
    return {"files": jsonl, "shards": shards}


def folder_mib(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files if not os.path.islink(os.path.join(root, name)))
    return total / 2**20


# --- One configuration, in its own process ---------------------------------------------------------------------


def read_status() -> dict[str, float]:
    """The memory fields of /proc/self/status, in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                values[key] = int(rest.split()[0]) / 1024
    return values


def run_child(argv: list[str]) -> dict:
    """Run run_clip.main(argv) while a thread records the peak of each memory field; the run report (matplotlib
    curves, model card) is left out, as it is the same for every configuration."""
    import run_clip

    peaks = dict.fromkeys(STATUS_FIELDS, 0.0)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in read_status().items():
                peaks[key] = max(peaks[key], value)
            done.wait(0.01)

    run_clip.write_run_report = lambda *args, **kwargs: None
    sampler = threading.Thread(target=sample, daemon=True)
    start = time.time()
    sampler.start()
    metrics = run_clip.main(argv)
    done.set()
    sampler.join()
    status = read_status()
    return {
        "peak_rss_mib": round(status["VmHWM"], 1),
        "peak_anon_mib": round(peaks["RssAnon"], 1),
        "peak_file_mib": round(peaks["RssFile"], 1),
        "seconds": round(time.time() - start, 1),
        "train_loss": metrics.get("train_loss"),
    }


def measure(data_path: str, streaming: bool, model: str, steps: int, batch: int, work_dir: str) -> dict:
    """One configuration in a fresh interpreter, with its own empty datasets cache; returns its figures."""
    scratch = tempfile.mkdtemp(dir=work_dir, prefix="run_")
    cache = os.path.join(scratch, "datasets_cache")
    argv = [
        "--model_name_or_path", model, "--train_file", data_path, "--output_dir", os.path.join(scratch, "out"),
        "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-4",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
        "--logging_steps", str(steps), "--log_level", "warning", "--gallery_size", "0",
    ] + (["--streaming"] if streaming else [])
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(argv)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1200)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{data_path} (streaming={streaming}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    figures = json.loads(lines[-1][len("RESULT "):])
    figures["datasets_cache_mib"] = round(folder_mib(cache), 1)
    shutil.rmtree(scratch, ignore_errors=True)
    return figures


# --- Main ----------------------------------------------------------------------------------------------------------


def write_markdown(record: dict) -> None:
    rows = []
    by_key = {(r["data"], r["input"], r["samples"]): r for r in record["runs"]}
    for run in record["runs"]:
        smallest = by_key[(run["data"], run["input"], min(record["sizes"]))]
        growth = None if run is smallest else round(run["peak_rss_mib"] - smallest["peak_rss_mib"], 1)
        rows.append([run["data"], run["input"], f"{run['samples']:,}", run["peak_rss_mib"], growth, run["peak_anon_mib"],
                     run["peak_file_mib"], run["datasets_cache_mib"], run["seconds"], run["load_average"][0]])
    table = markdown_table(
        ["data", "read", "samples", "peak RSS MiB", "growth MiB", "peak anon MiB", "peak file-backed MiB", "datasets cache MiB",
         "wall s", "load"],
        rows,
    )
    machine = record["machine"]
    content = (
        f"### bench_memory.py, {record['mode']} mode\n\n"
        f"`{record['command']}`, {record['date']}: {machine['cpu_model']}, {machine['usable_cpus']} CPUs, "
        f"{machine['memory_gib']} GiB, torch {machine['torch']}, transformers {machine['transformers']}. run_clip, tiny CLIP "
        f"(32 px), {record['steps']} steps of batch {record['batch']}, no data loader workers, {record['pool']} distinct "
        f"{record['image_size']} JPEGs (mean {record['mean_jpeg_kib']} KiB) behind every data set. Growth: peak RSS minus "
        f"that of the {min(record['sizes']):,}-sample run read the same way.\n\n{table}\n"
    )
    replace_markdown_block("bench_memory", content)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k and 5k samples, 10 steps")
    parser.add_argument("--sizes", default=None, help="sample counts, comma-separated (default 1000,20000; quick 1000,5000)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; quick 10)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=200, help="distinct images the samples cycle through")
    parser.add_argument("--image_size", default="320x240", help="WxH of the pool's JPEGs")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_memory"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return {}

    sizes = [int(s) for s in (args.sizes or ("1000,5000" if args.quick else "1000,20000")).split(",")]
    steps = args.steps or (10 if args.quick else 30)
    width, height = (int(v) for v in args.image_size.split("x"))
    os.makedirs(args.work_dir, exist_ok=True)
    from utils.demo import build_demo_clip

    model = os.path.join(args.work_dir, "tiny_clip")
    if not os.path.isdir(model):
        build_demo_clip(model)
    pool = write_pool(args.work_dir, args.pool, width, height)
    mean_kib = sum(os.path.getsize(os.path.join(args.work_dir, p)) for p in pool) / len(pool) / 1024
    data = {n: write_data_set(args.work_dir, pool, n) for n in sizes}
    runs = []
    for kind in ("files", "shards"):
        for streaming in (False, True):
            for n in sizes:
                load = load_average()
                figures = measure(data[n][kind], streaming, model, steps, args.batch, args.work_dir)
                run = {"data": "jsonl + image files" if kind == "files" else "webdataset shards",
                       "input": "--streaming" if streaming else "whole (map-style)", "samples": n, **figures,
                       "data_on_disk_mib": round(folder_mib(data[n][kind]) if kind == "shards" else os.path.getsize(data[n][kind]) / 2**20, 1),
                       "load_average": load}
                print(json.dumps(run), flush=True)
                runs.append(run)
    record = {
        "command": command_line(), "date": now(), "mode": "quick" if args.quick else "full", "machine": describe_machine(),
        "sizes": sizes, "steps": steps, "batch": args.batch, "pool": args.pool, "image_size": args.image_size,
        "mean_jpeg_kib": round(mean_kib, 1), "runs": runs,
    }
    results = {}
    if os.path.exists(RESULTS_PATH):
        with open(RESULTS_PATH) as f:
            results = json.load(f)
    results[record["mode"]] = record
    with open(RESULTS_PATH, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    write_markdown(record)
    return record


if __name__ == "__main__":
    main()
