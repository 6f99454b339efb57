"""Webdataset shards and --streaming: shards load as the scripts' columns, a training stream gives each process its
own rows (no row twice in a step), skips and budgets bad rows, replays its draws, resumes to the same weights;
all three scripts train and evaluate on shards, whole and streamed, and streamed under two processes (torchrun,
accelerate launch).

The shards are written here with tarfile: demo scenes, one sample per scene (`000007.png` + `000007.json` holding
the captions, a question and ten answers), each caption tagged with its sample number so a batch says which
samples it holds."""

import io
import itertools
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as F

import run_blip_caption
import run_clip
import run_vilt_vqa
from tests.helpers import assert_finite_metrics, read_json
from utils.data import SkippedSamples, load_splits
from utils.demo import build_demo_clip, write_demo_dataset
from utils.demo_caption import build_tiny_blip
from utils.demo_vqa import build_demo_vilt
from utils.streams import BadSample, ImageTextStream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_shards(folder, samples, per_shard):
    """samples: (image bytes, json fields) -> folder/shard-000.tar, ... with `per_shard` samples each."""
    os.makedirs(folder, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        with tarfile.open(os.path.join(folder, f"shard-{start // per_shard:03d}.tar"), "w") as tar:
            for index in range(start, min(start + per_shard, len(samples))):
                image, fields = samples[index]
                for name, data in ((f"{index:06d}.png", image), (f"{index:06d}.json", json.dumps(fields).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


def demo_samples(path, first_number=0):
    """The demo rows of a jsonl as shard samples: tagged captions, a question about the shape, ten answers."""
    samples = []
    with open(path) as f:
        for number, line in enumerate(f, start=first_number):
            row = json.loads(line)
            with open(os.path.join(os.path.dirname(path), row["image"]), "rb") as image:
                data = image.read()
            shape = row["objects"][0]["shape"]
            fields = {"captions": [f"#{number} {c}" for c in row["captions"]], "question": "what shape is it?",
                      "answers": [shape] * 10, "answer_type": "other", "question_id": number}
            samples.append((data, fields))
    return samples


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_assets")
    data = write_demo_dataset(str(root / "data"), num_train=32, num_validation=7, num_test=1, image_size=32, seed=3)
    train, validation = demo_samples(data["train"]), demo_samples(data["validation"], first_number=100)
    build_demo_clip(str(root / "clip"))
    build_tiny_blip(str(root / "blip"))
    build_demo_vilt(str(root / "vilt"), image_size=32, patch_size=16, hidden_size=32, num_layers=2)
    return {
        "train4": write_shards(root / "train4", train, per_shard=8),  # 4 shards: 2 processes read 2 each
        "train3": write_shards(root / "train3", train, per_shard=11),  # 3 shards: each process keeps every 2nd row
        "validation": write_shards(root / "validation", validation, per_shard=4),
        "train_samples": train, "train_samples_jsonl": data["train"],
        "clip": str(root / "clip"), "blip": str(root / "blip"), "vilt": str(root / "vilt"), "root": root,
    }


def to_tensor(image, rng):
    return F.pil_to_tensor(image)


def stream(path, **kwargs):
    split = load_splits(data_files={"train": path}, streaming=True)["train"]
    return ImageTextStream(split, "image", "captions", to_tensor, **kwargs)


def numbers(samples):
    return [int(s["caption"].split()[0][1:]) for s in samples]


def take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


# --- Loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_load_as_the_scripts_columns(assets, streaming):
    folder = assets["train4"]
    for path in (folder, os.path.join(folder, "shard-*.tar"), os.path.join(folder, "shard-001.tar")):
        split = load_splits(data_files={"train": path}, streaming=streaming)["train"]
        assert split.streaming == streaming
        assert {"image", "captions", "question", "answers", "question_id", "__key__"} <= set(split.rows.column_names)
        assert not split.rows.features["image"].decode  # decoded by load_image, so a bad file is skipped by name
        rows = list(split.rows)
        assert len(rows) == (8 if path.endswith("001.tar") else 32)
        first = rows[0]
        index = int(first["__key__"])
        assert first["captions"] == assets["train_samples"][index][1]["captions"]
        assert first["image"]["bytes"] == assets["train_samples"][index][0]


def test_each_sample_keeps_the_types_it_was_written_with(assets, tmp_path):
    """The webdataset builder types each .json key from the first five samples: a later caption written as a
    string must stay one caption (not become a list of its characters), a caption "null" and a question "42" must
    stay text (not JSON null and 42), and a later caption that is a number must be skipped by name (not stop the
    run, nor be cast)."""
    samples = [list(s) for s in assets["train_samples"][:8]]
    samples[4][1] = {**samples[4][1], "question": "42"}
    samples[5][1] = {**samples[5][1], "captions": "null"}
    samples[6][1] = {**samples[6][1], "captions": "#6 a caption on its own"}
    samples[7][1] = {**samples[7][1], "captions": 7}
    folder = write_shards(tmp_path / "mixed", samples, per_shard=8)
    # as a local file, and as a data set by name (the Hub's road: datasets reads a folder as a repository)
    for source, streaming in itertools.product(({"data_files": {"train": folder}}, {"dataset_name": folder}), (False, True)):
        rows = {int(r["__key__"]): r for r in load_splits(**source, streaming=streaming)["train"].rows}
        assert [rows[i]["captions"] for i in range(8)] == [s[1]["captions"] for s in samples]
        assert [rows[i]["question"] for i in range(8)] == [s[1]["question"] for s in samples]
        assert rows[4]["question"] == "42" and rows[5]["captions"] == "null"
    log = SkippedSamples(str(tmp_path / "skipped_samples.jsonl"))
    one_pass = take(stream(folder, skip_log=log, max_bad_fraction=0.2), 8)[:7]  # the 8th: the next pass's first
    captions = sorted(s["caption"] for s in one_pass)
    assert "null" in captions and "#6 a caption on its own" in captions
    assert sorted(numbers(s for s in one_pass if s["caption"] != "null")) == [0, 1, 2, 3, 4, 6]
    skipped = [json.loads(line) for line in open(log.path)]
    assert [r["row"] for r in skipped] == ["shard-000.tar/000007"] and "int" in skipped[0]["reason"]


def test_streaming_needs_max_steps(assets, tmp_path):
    args = ["--model_name_or_path", assets["clip"], "--train_file", assets["train4"], "--output_dir", str(tmp_path),
            "--do_train", "--streaming", "--use_cpu", "--report_to", "none"]
    with pytest.raises(ValueError, match="--max_steps"):
        run_clip.main(args)
    with pytest.raises(ValueError, match="--save_strategy epoch"):
        run_clip.main(args + ["--max_steps", "2", "--save_strategy", "epoch"])


# --- The training stream ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", ["train4", "train3"])
def test_each_process_streams_its_own_rows_and_every_row_once_a_pass(assets, shards):
    """Two processes: 4 shards are split by shard, 3 by row (each keeps every 2nd). In each pass the two parts are
    disjoint and together every row once; the next pass reshuffles; the same seed replays the same samples."""
    ranks = [stream(assets[shards], seed=5, shuffle_buffer_size=4, process_index=r, num_processes=2) for r in range(2)]
    parts = []
    for rank in ranks:
        first = numbers(take(rank, 16))
        parts.append(first)
    assert sorted(parts[0] + parts[1]) == list(range(32))  # 16 rows each, here: the two parts do not overlap

    single = stream(assets[shards], seed=5, shuffle_buffer_size=4)
    two_passes = take(single, 64)
    assert sorted(numbers(two_passes[:32])) == sorted(numbers(two_passes[32:])) == list(range(32))
    assert numbers(two_passes[:32]) != numbers(two_passes[32:])  # reshuffled
    replay = take(stream(assets[shards], seed=5, shuffle_buffer_size=4), 64)
    assert [s["caption"] for s in replay] == [s["caption"] for s in two_passes]  # order and caption draws
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(replay, two_passes))
    other_seed = take(stream(assets[shards], seed=6, shuffle_buffer_size=4), 32)
    assert numbers(other_seed) != numbers(two_passes[:32])


def test_data_loader_workers_share_the_process_part(assets):
    """Two workers of one of two processes: together they stream the process's rows, each row once a pass."""
    part = stream(assets["train4"], seed=1, process_index=1, num_processes=2)
    expected = sorted(numbers(take(part, 16)))
    loader = torch.utils.data.DataLoader(part, batch_size=4, num_workers=2, collate_fn=lambda batch: batch)
    seen = numbers([sample for batch in take(loader, 4) for sample in batch])
    assert sorted(seen) == expected


def test_bad_rows_are_skipped_recorded_once_and_budgeted(assets, tmp_path):
    samples = [list(s) for s in assets["train_samples"][:20]]
    samples[3][0] = samples[3][0][: len(samples[3][0]) // 2]  # a truncated png
    samples[7][0] = b"not an image"
    samples[11][1] = {**samples[11][1], "captions": ["", " "]}
    folder = write_shards(tmp_path / "bad", samples, per_shard=10)
    log = SkippedSamples(str(tmp_path / "skipped_samples.jsonl"))
    lenient = stream(folder, skip_log=log, max_bad_fraction=0.2)
    two_passes = numbers(take(lenient, 34))
    assert sorted(two_passes[:17]) == sorted(set(range(20)) - {3, 7, 11})
    skipped = [json.loads(line) for line in open(log.path)]
    assert sorted(r["row"] for r in skipped) == ["shard-000.tar/000003", "shard-000.tar/000007", "shard-001.tar/000011"]
    assert "captions" in next(r["reason"] for r in skipped if r["row"].endswith("11"))
    strict = stream(folder, skip_log=SkippedSamples(str(tmp_path / "strict.jsonl")), max_bad_fraction=0.1)
    with pytest.raises(ValueError, match="max_bad_samples_fraction"):
        take(strict, 20)


def test_unreadable_jsonl_lines_are_skipped_and_recorded(assets, tmp_path):
    """A jsonl line that is not a JSON object (here one in the middle, and the last, cut short as a killed writer
    leaves it) is skipped and recorded by its line number, and budgeted as a bad image is: the run goes on."""
    data = os.path.dirname(assets["train_samples_jsonl"])
    lines = [json.dumps({**json.loads(line), "captions": [f"#{n} a scene"]}) for n, line in enumerate(open(assets["train_samples_jsonl"]))][:12]
    lines[5] = '{"image": "images/x.png", "captions": ["cut'
    lines[11] = lines[11][: len(lines[11]) // 2]
    path = os.path.join(data, "unreadable.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines))  # no newline after the last line
    log = SkippedSamples(str(tmp_path / "skipped_samples.jsonl"))
    lenient = stream(path, skip_log=log, max_bad_fraction=0.2)
    two_passes = numbers(take(lenient, 20))
    assert sorted(two_passes[:10]) == sorted(set(range(12)) - {5, 11}) and sorted(two_passes[10:]) == sorted(two_passes[:10])
    skipped = [json.loads(line) for line in open(log.path)]
    assert {r["row"] for r in skipped} == {"unreadable.jsonl line 6", "unreadable.jsonl line 12"} and len(skipped) == 2  # first pass only
    assert all(r["reason"].startswith("not JSON (") and r["image"] == path for r in skipped)
    strict = stream(path, skip_log=SkippedSamples(str(tmp_path / "strict.jsonl")), max_bad_fraction=0.1)
    with pytest.raises(ValueError, match="max_bad_samples_fraction"):
        take(strict, 20)
    with pytest.raises(BadSample, match=r"unreadable.jsonl, row unreadable.jsonl line \d+: not JSON"):
        take(stream(path), 20)  # without a skip log, the first one stops the stream, naming it


# --- The scripts ----------------------------------------------------------------------------------------------


def common_args(assets, output_dir, *extra):
    return [
        "--validation_file", assets["validation"], "--output_dir", str(output_dir), "--do_train", "--do_eval",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no", "--logging_steps", "1",
        *extra,
    ]


def script_args(assets, script):
    return {
        "clip": ["--model_name_or_path", assets["clip"]],
        "blip": ["--model_name_or_path", assets["blip"], "--num_beams", "1", "--max_new_tokens", "6", "--use_java", "false"],
        "vilt": ["--model_name_or_path", assets["vilt"], "--min_answer_count", "1"],
    }[script]


SCRIPTS = {"clip": run_clip, "blip": run_blip_caption, "vilt": run_vilt_vqa}
EVAL_KEYS = {"clip": ["eval_i2t_r1", "eval_t2i_r5", "eval_loss"], "blip": ["eval_cider", "eval_bleu_4", "eval_loss"],
             "vilt": ["eval_vqa_accuracy", "eval_loss"]}


@pytest.mark.parametrize("script", ["clip", "blip", "vilt"])
@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_scripts_train_and_evaluate_on_shards(assets, tmp_path, script, streaming):
    extra = ["--streaming"] if streaming else []
    metrics = SCRIPTS[script].main(common_args(assets, tmp_path, "--train_file", assets["train3"], *script_args(assets, script), *extra))
    assert_finite_metrics(metrics, ["train_loss"] + EVAL_KEYS[script])
    history = read_json(tmp_path / "trainer_state.json")["log_history"]
    assert len([h for h in history if "loss" in h]) == 2
    assert ("train3 (streamed)" in (tmp_path / "README.md").read_text()) == streaming  # the model card's data line


def test_vqa_stream_skips_the_rows_a_whole_split_skips(assets, tmp_path):
    """An empty question, no answers, a question or answer type that is not text: skipped, recorded, and kept out of
    the answer set; a question whose answers are all outside the answer set is left out unrecorded, as in a whole
    split. (Each shard sample keeps the types its .json holds, so a number where text belongs reaches the checks.)"""
    samples = [list(s) for s in assets["train_samples"][:8]]
    samples[1][1] = {**samples[1][1], "question": " "}
    samples[2][1] = {**samples[2][1], "answers": []}
    samples[4][1] = {**samples[4][1], "answers": ["giraffe"] * 10}
    samples[5][1] = {**samples[5][1], "question": 42}
    samples[6][1] = {**samples[6][1], "answer_type": 3}
    split = load_splits(data_files={"train": write_shards(tmp_path / "vqa", samples, per_shard=8)}, streaming=True)["train"]
    columns = {"image": "image", "question": "question", "answers": "answers", "question_id": "question_id", "answer_type": "answer_type"}
    answers = list(run_vilt_vqa.streamed_answers(split, columns))
    assert len(answers) == 4 and ["giraffe"] * 10 in answers
    label2id = {shape: i for i, shape in enumerate(sorted({a[0] for a in answers} - {"giraffe"}))}
    log = SkippedSamples(str(tmp_path / "skipped.jsonl"))
    vqa = run_vilt_vqa.VQAStream(split, columns, lambda image: F.pil_to_tensor(image), label2id, skip_log=log, max_bad_fraction=0.8)
    first_pass = take(vqa, 4)[:3]  # the 4th: the next pass's first, so the first pass was read to its end
    assert {s["question"] for s in first_pass} == {"what shape is it?"} and all(s["label_ids"] for s in first_pass)
    reasons = {r["row"][-1]: r["reason"] for r in map(json.loads, open(log.path))}
    assert sorted(reasons) == ["1", "2", "5", "6"]
    assert "question" in reasons["1"] and "no answers" in reasons["2"]
    assert "question 42 is not" in reasons["5"] and "answer type 3 is not a string" in reasons["6"]


def test_streamed_run_resumes_to_the_same_weights(assets, tmp_path):
    """4 steps straight, against 2 steps, then a second run that resumes from checkpoint-2: the Trainer skips the
    2 batches already seen and the stream replays the rest, so the weights agree."""
    def args(output_dir):
        return ["--model_name_or_path", assets["clip"], "--train_file", assets["train4"], "--streaming", "--shuffle_buffer_size", "8",
                "--output_dir", str(output_dir), "--do_train", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "0.01",
                "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"]

    run_clip.main(args(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.rename(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    run_clip.main(args(resumed))
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed / "model.safetensors")
    start = load_file(os.path.join(assets["clip"], "model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# --- Two processes (torchrun or accelerate launch, gloo on CPU) ------------------------------------------------------------------------

# Runs a script under torchrun with its collator recording the captions of each training batch, per process.
RECORDING_DRIVER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import {module} as script
collate = script.{collator}.__call__
def recording(self, examples):
    if "caption" in examples[0]:
        with open(os.path.join({out!r}, "batches_rank" + os.environ["RANK"] + ".jsonl"), "a") as f:
            f.write(json.dumps([e["caption"] for e in examples]) + "\\n")
    return collate(self, examples)
script.{collator}.__call__ = recording
script.main()
"""


def launch(script_path, args, launcher="torchrun", timeout=300):
    """Two processes through torchrun, or through `accelerate launch` (whose multi-process launcher with the script's
    --use_cpu runs gloo; its --cpu flag would start one process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    result = subprocess.run([*command, script_path, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process 0 of 2 streams" in result.stdout + result.stderr  # two processes, each reading its part


@pytest.mark.parametrize("script,module,collator", [("clip", "run_clip", "ClipCollator"), ("blip", "run_blip_caption", "CaptionCollator")])
def test_two_processes_stream_different_rows_at_every_step(assets, tmp_path, script, module, collator):
    """Streamed from 4 shards for 3 steps of 4 rows a process: no row twice, in a step or across steps (24 of the
    32 rows), and the evaluation after it runs."""
    driver = tmp_path / "driver.py"
    driver.write_text(RECORDING_DRIVER.format(repo=REPO, module=module, collator=collator, out=str(tmp_path)))
    launch(str(driver), common_args(assets, tmp_path / "out", "--train_file", assets["train4"], *script_args(assets, script),
                                      "--streaming", "--max_steps", "3", "--shuffle_buffer_size", "4"))
    batches = [[json.loads(line) for line in open(tmp_path / f"batches_rank{rank}.jsonl")] for rank in range(2)]
    assert [len(b) for b in batches] == [3, 3]
    seen = [int(caption.split()[0][1:]) for rank in batches for batch in rank for caption in batch]
    assert len(seen) == 24 and len(set(seen)) == 24
    assert_finite_metrics(read_json(tmp_path / "out" / "all_results.json"), ["train_loss"] + EVAL_KEYS[script])


def test_vqa_two_processes_streamed_under_accelerate_launch(assets, tmp_path):
    """accelerate launch, 3 shards, so each process keeps every 2nd row; each builds the answer set from the whole
    stream, so the answer heads agree (DDP would refuse parameters of different shapes)."""
    launch(os.path.join(REPO, "run_vilt_vqa.py"),
           common_args(assets, tmp_path, "--train_file", assets["train3"], *script_args(assets, "vilt"), "--streaming"),
           launcher="accelerate")
    assert_finite_metrics(read_json(tmp_path / "all_results.json"), ["train_loss"] + EVAL_KEYS["vilt"])
