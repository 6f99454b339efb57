"""What the benchmarks share: the machine's description, photo-like JPEGs and captions they write themselves,
measurements in forked processes (one peak RSS each), and the results file and Markdown tables they update.

Benchmarks are not tests: nothing here asserts, everything here measures and writes figures down.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
import traceback

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_PATH = os.path.join(REPO_ROOT, "benchmarks", "results.json")
MARKDOWN_PATH = os.path.join(REPO_ROOT, "BENCHMARKS.md")


# --- The machine and the moment ------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine, the context every figure needs."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_identity() -> str:
    """Vendor, family, model and stepping: a virtual machine's model name ("AMD EPYC") says little more."""
    fields = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip():
                break
    return ", ".join(f"{k} {v}" for k, v in fields.items())


def cpu_flags() -> list[str]:
    """The matrix-relevant ISA flags (AMX, AVX-512 bf16/VNNI): they decide what bf16 can gain."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")))
    return []


def describe_machine() -> dict:
    import PIL
    import torch
    import transformers

    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {
        "cpu_model": cpu_model(),
        "cpu_identity": cpu_identity(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(values) -> float:
    return float(statistics.median(values))


def alternate(variants: dict, rounds: int, step) -> tuple[dict, dict]:
    """`step()` under each variant in turn (a variant sets the model up and returns the context to step in), for
    `rounds` timed rounds after one that warms every variant up, the order reversed every other round. Returns each
    variant's seconds per round and its last step's result."""
    seconds, results = {name: [] for name in variants}, {}
    for index in range(rounds + 1):
        for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
            with variants[name]():
                start = time.perf_counter()
                results[name] = step()
                elapsed = time.perf_counter() - start
            if index:
                seconds[name].append(elapsed)
    return seconds, results


def seconds_ratio(slow: list[float], fast: list[float]) -> dict:
    """slow / fast per round (same round, so the same load), and their median."""
    per_round = [a / b for a, b in zip(slow, fast)]
    return {"median": median(per_round), "per_round": [round(r, 3) for r in per_round]}


def last_layer_variants(model) -> dict:
    """`alternate`'s variants for utils.towers: the model's last layer over every position ("full", the model's own
    forward) and at the pooled token alone ("pooled", the scripts' --pooled_last_layer)."""
    from utils.towers import pool_last_layers, restore_towers

    def use(switch) -> contextlib.nullcontext:
        switch(model)
        return contextlib.nullcontext()

    return {"full": functools.partial(use, restore_towers), "pooled": functools.partial(use, pool_last_layers)}


def compare_last_layers(model, step, rounds: int) -> dict:
    """`step()` (forward + backward of `model`, returning its loss) with the model's last layer over every position
    and at the pooled token alone (utils.towers), alternating in one process: GFLOP, seconds and losses of each."""
    variants = last_layer_variants(model)
    gflops = gflops_per_variant(variants, step)
    load_start = load_average()
    seconds, losses = alternate(variants, rounds, step)
    return {
        "gflops": gflops,
        "step_s": {name: median(v) for name, v in seconds.items()},
        "step_s_all": {name: [round(x, 2) for x in v] for name, v in seconds.items()},
        "speedup": seconds_ratio(seconds["full"], seconds["pooled"]),
        "loss": losses,
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


LAST_LAYER_COLUMNS = ["GFLOP, full", "GFLOP, pooled", "step s, full", "step s, pooled", "speedup", "per round"]


def last_layer_cells(result: dict) -> list:
    """A `compare_last_layers` result as table cells under LAST_LAYER_COLUMNS."""
    return [f"{result['gflops']['full']:.0f}", f"{result['gflops']['pooled']:.0f}", result["step_s"]["full"], result["step_s"]["pooled"],
            f"{result['speedup']['median']:.2f}x", " ".join(f"{x:.2f}" for x in result["speedup"]["per_round"])]


def gflops_per_variant(variants: dict, step) -> dict:
    """GFLOP of one `step()` under each variant, as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    gflops = {}
    for name, variant in variants.items():
        counter = FlopCounterMode(display=False)
        with variant(), counter:
            step()
        gflops[name] = counter.get_total_flops() / 1e9
    return gflops


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])


# --- Inputs the benchmarks write themselves ----------------------------------------------------------------


def photo_like_image(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """An image whose JPEG statistics resemble a photo's: a smooth colour field (bicubic upsampling of a few
    random colours), mid-frequency texture, a few blurred shapes with edges, and sensor-like noise. Flat or
    pure-noise images compress far better or far worse than photos, and decode at a different speed."""
    field = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, 18, (height // 12, width // 12, 3)).clip(-127, 127) + 128
    texture = np.asarray(Image.fromarray(texture.astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32) - 128
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.05, 0.45) * width, rng.uniform(0.05, 0.45) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            points = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.5))))
    noise = rng.normal(0, 5, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


_ADJECTIVES = ("small large red blue green yellow white black brown old young wooden wet sunny crowded empty tall "
               "narrow bright dark striped grey orange little busy quiet open").split()
_NOUNS = ("man woman child dog cat horse bicycle car bus train street table kitchen plate pizza building tree field "
          "beach wave boat bird kite sign window room bed laptop phone umbrella bench park river mountain road "
          "sandwich cake person group players ball fence sky clouds snow grass water shirt hat").split()
_VERBS = "sitting standing walking riding holding eating looking playing lying parked flying waiting running carrying".split()
_PREPOSITIONS = ("on", "in", "near", "next to", "under", "behind", "beside", "with", "along", "across", "in front of",
                 "at the top of")


def random_caption(rng: np.random.Generator, min_words: int = 8, max_words: int = 20) -> str:
    """A COCO-like caption of min_words..max_words words ("a small dog sitting on a wooden bench near ...")."""
    target = int(rng.integers(min_words, max_words + 1))
    words = ["a", str(rng.choice(_ADJECTIVES)), str(rng.choice(_NOUNS)), str(rng.choice(_VERBS))]
    while len(words) < target:
        words += [*str(rng.choice(_PREPOSITIONS)).split(), "the", str(rng.choice(_ADJECTIVES)), str(rng.choice(_NOUNS))]
    return " ".join(words[:target]) + "."


def caption_vocabulary() -> list[str]:
    return sorted({word for phrase in (*_ADJECTIVES, *_NOUNS, *_VERBS, *_PREPOSITIONS, "a", "the") for word in phrase.split()})


def build_caption_tokenizer():
    """A byte-level BPE `CLIPTokenizer` whose vocabulary holds every caption word as one token, as the real
    CLIP vocabulary (49,408 BPE tokens) holds these common words: a caption of n words is n + 3 tokens
    (bos, words, '.', eos). Trained offline on the caption words with the `tokenizers` BPE trainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=5000, special_tokens=specials, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([" ".join(caption_vocabulary() + ["."])] * 50, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tokenizer = CLIPTokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def write_image_text_data(directory: str, num_images: int, seed: int = 0, captions_per_image: int = 5) -> dict:
    """`num_images` photo-like 640x480 JPEGs (one in four portrait, 480x640) saved at quality 90, and a
    train.jsonl naming them with their captions. Reuses what an earlier run wrote with the same seed."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    jsonl = os.path.join(directory, "train.jsonl")
    marker = os.path.join(directory, f"done_{num_images}_{seed}.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    rng = np.random.default_rng(seed)
    rows, sizes = [], []
    for i in range(num_images):
        width, height = (480, 640) if i % 4 == 3 else (640, 480)
        name = f"images/{i:05d}.jpg"
        path = os.path.join(directory, name)
        photo_like_image(rng, width, height).save(path, quality=90)
        sizes.append(os.path.getsize(path))
        rows.append({"image": name, "captions": [random_caption(rng) for _ in range(captions_per_image)]})
    with open(jsonl, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    words = [len(c.split()) for row in rows for c in row["captions"]]
    info = {
        "jsonl": jsonl,
        "num_images": num_images,
        "image_sizes": "640x480 (3 in 4) and 480x640, JPEG quality 90",
        "mean_jpeg_kib": round(sum(sizes) / len(sizes) / 1024, 1),
        "caption_words_mean": round(sum(words) / len(words), 1),
        "caption_words_range": [min(words), max(words)],
    }
    with open(marker, "w") as f:
        json.dump(info, f)
    return info


# --- Measurements in their own processes -------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (a `timeout` that stops the benchmark stops it all)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(target, kwargs, connection):
    _die_with_parent()
    try:
        result = target(**kwargs)
        result.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
        connection.send(("ok", result))
    except BaseException:  # noqa: BLE001 - the parent reports it with the measurement's name
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_forked(target, timeout: float = 900, **kwargs) -> dict:
    """Run `target(**kwargs)` in a forked process and return its dict, with the process's peak RSS added.

    Forked, not spawned: the child inherits the imported modules (importing transformers takes ~10 s here),
    and its peak RSS is that of a fresh process that imported the same modules and then did only this. The
    parent must not have run a multi-threaded torch op before forking (OpenMP does not survive a fork).
    """
    parent_end, child_end = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(target=_child, args=(target, kwargs, child_end))
    process.start()
    child_end.close()
    if not parent_end.poll(timeout):
        process.kill()
        process.join()
        raise TimeoutError(f"{target.__name__}({kwargs}) ran past {timeout:.0f} s")
    status, payload = parent_end.recv()
    process.join()
    if status != "ok":
        raise RuntimeError(f"{target.__name__}({kwargs}) failed:\n{payload}")
    return payload


# --- Results file and Markdown -----------------------------------------------------------------------------


def update_results(benchmark: str, mode: str, sections: dict, machine: dict, path: str = RESULTS_PATH) -> dict:
    """Merge this run's sections into results.json under results[benchmark][mode][section]; sections not run
    keep their earlier figures (each section carries its own command, time and load average)."""
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results["machine"] = machine
    results.setdefault(benchmark, {}).setdefault(mode, {}).update(sections)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    return results


def stored_section(benchmark: str, mode: str, section: str, path: str = RESULTS_PATH) -> dict:
    """What results.json holds for results[benchmark][mode][section] ({} when nothing yet)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get(benchmark, {}).get(mode, {}).get(section, {})


def store_keeping_earlier(stored: dict, key: str, result: dict) -> None:
    """stored[key] = result, with the figures it replaces appended to its `earlier_runs`: every run stays in
    results.json, the tables show the latest."""
    earlier = stored.get(key)
    stored[key] = result
    if earlier:
        result["earlier_runs"] = earlier.pop("earlier_runs", []) + [earlier]


def replace_markdown_block(name: str, content: str, path: str = MARKDOWN_PATH) -> None:
    """Replace what lies between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in BENCHMARKS.md (generated
    tables), leaving the hand-written text around it; append the block if the markers are missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{content.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            if math.isnan(value):
                return "–"
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
