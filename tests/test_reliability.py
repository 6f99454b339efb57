"""Bad data never costs a run, a killed run resumes, nothing is overwritten silently (run_clip.py).

Each case has a defined outcome: converted and used, skipped (counted and listed in
output_dir/skipped_samples.jsonl), or a clear stop before training that names the file, row or flag.
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import run_clip
from tests.helpers import read_json, write_jsonl
from utils.demo import build_demo_clip, write_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability") / "clip"
    build_demo_clip(str(path))
    return str(path)


def png_bomb(path, width=60000, height=60000):
    """A valid PNG header claiming 3.6 gigapixels (PIL refuses above 2 x MAX_IMAGE_PIXELS)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def gradient(width, height):
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, x[::-1], 255 - x], -1).astype(np.uint8))


def write_bad_images(folder):
    """name -> (file, expected outcome)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    good = gradient(40, 30)
    good.save(folder / "good.png"); cases["good"] = ("good.png", "used")
    good.convert("L").save(folder / "gray.png"); cases["grayscale"] = ("gray.png", "used")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png"); cases["palette"] = ("palette.png", "used")
    good.convert("RGBA").save(folder / "rgba.png"); cases["rgba"] = ("rgba.png", "used")
    good.convert("CMYK").save(folder / "cmyk.jpg"); cases["cmyk"] = ("cmyk.jpg", "used")
    Image.fromarray((np.asarray(good.convert("L"), dtype=np.uint16) * 257)).save(folder / "deep.png"); cases["16-bit"] = ("deep.png", "used")
    exif = good.getexif(); exif[0x0112] = 6
    good.save(folder / "rotated.jpg", exif=exif); cases["exif-rotated"] = ("rotated.jpg", "used")
    Image.new("RGB", (1, 1), "red").save(folder / "pixel.png"); cases["1x1"] = ("pixel.png", "used")
    gradient(5, 4).save(folder / "small.png"); cases["smaller than crop"] = ("small.png", "used")
    cases["missing"] = ("missing.jpg", "skipped")
    (folder / "empty.jpg").write_bytes(b""); cases["zero bytes"] = ("empty.jpg", "skipped")
    (folder / "text.jpg").write_text("this is not a JPEG"); cases["text named .jpg"] = ("text.jpg", "skipped")
    png_bomb(folder / "bomb.png"); cases["decompression bomb"] = ("bomb.png", "skipped")
    buffer = io.BytesIO(); gradient(300, 300).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2]); cases["truncated JPEG"] = ("truncated.jpg", "skipped")
    return cases


TEXT_CASES = {
    "empty": ("", "skipped"),
    "whitespace only": ("   \t", "skipped"),
    "NA": ("NA", "used"),
    "None": ("None", "used"),
    "null": ("null", "used"),
    "10,000 characters": ("red " * 2500, "used"),
    "right-to-left and emoji": ("דוגמה עם 😀 emoji", "used"),
}


def base_args(clip_dir, output_dir, *extra):
    return ["--model_name_or_path", clip_dir, "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
            "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
            "--save_strategy", "no", *extra]


def skipped_rows(output_dir):
    path = os.path.join(output_dir, "skipped_samples.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_every_bad_image_and_text_case_has_its_outcome(clip_dir, tmp_path):
    data = tmp_path / "data"
    images = write_bad_images(data / "images")
    rows, expected = [], {}
    for name, (file, outcome) in images.items():
        rows.append({"image": f"images/{file}", "caption": f"an image: {name}"})
        expected[len(rows) - 1] = outcome
    for name, (caption, outcome) in TEXT_CASES.items():
        rows.append({"image": "images/good.png", "caption": caption})
        expected[len(rows) - 1] = outcome
    write_jsonl(data / "train.jsonl", rows)
    # Validation: the good images only plus the unreadable ones, which are decoded up front and left out.
    write_jsonl(data / "validation.jsonl", [r for i, r in enumerate(rows) if i < len(images)])
    out = tmp_path / "out"
    metrics = run_clip.main(base_args(
        clip_dir, out, "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
        "--do_train", "--do_eval", "--num_train_epochs", "2", "--max_bad_samples_fraction", "0.5",
    ))
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["eval_loss"])
    skipped = skipped_rows(out)
    train_skipped = {r["row"] for r in skipped if r["split"] == "train"}
    assert train_skipped == {row for row, outcome in expected.items() if outcome == "skipped"}
    # The truncated JPEG passes the header check and is caught when decoded in the data loader: recorded there.
    truncated_row = list(images).index("truncated JPEG")
    assert any(r["row"] == truncated_row and "truncated" in r["reason"].lower() for r in skipped if r["split"] == "train")
    validation_skipped = {r["row"] for r in skipped if r["split"] == "validation"}
    assert validation_skipped == {i for i, (_, outcome) in enumerate(images.values()) if outcome == "skipped"}
    used = sum(1 for _, outcome in images.values() if outcome == "used")
    assert metrics["eval_samples_per_second"] > 0
    assert read_json(out / "eval_results.json")["eval_t2i_r10"] == 1.0 and used <= 10  # all used images ranked


def test_non_string_caption_is_skipped_and_listed(clip_dir, tmp_path):
    """(In its own file: a JSON column mixing numbers and strings is read through pandas, which also turns the
    string "null" into a missing value; that row would then be skipped and listed too, never used as NaN.)"""
    data = tmp_path / "data"
    write_bad_images(data / "images")
    write_jsonl(data / "train.jsonl", [{"image": "images/good.png", "caption": 42}] + [{"image": "images/good.png", "caption": "ok"}] * 9)
    run_clip.main(base_args(clip_dir, tmp_path / "out", "--train_file", str(data / "train.jsonl"), "--do_train",
                            "--max_steps", "1", "--max_bad_samples_fraction", "0.2"))
    [row] = skipped_rows(tmp_path / "out")
    assert row["row"] == 0 and "42 is a int" in row["reason"]


def test_too_many_bad_samples_stop_before_training(clip_dir, tmp_path):
    data = tmp_path / "data"
    write_bad_images(data / "images")
    write_jsonl(data / "train.jsonl", [{"image": "images/missing.jpg", "caption": "x"}] * 3 + [{"image": "images/good.png", "caption": "y"}] * 7)
    with pytest.raises(ValueError, match=r"3 of 10 rows of .*train.jsonl \(30.0%\) are unusable, more than --max_bad_samples_fraction 0.05; .*skipped_samples.jsonl"):
        run_clip.main(base_args(clip_dir, tmp_path / "out", "--train_file", str(data / "train.jsonl"), "--do_train"))


def test_csv_with_bytes_that_are_not_utf8_names_the_line(clip_dir, tmp_path):
    (tmp_path / "train.csv").write_bytes(b"image,caption\na.png,fine\nb.png,caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"train.csv', line 3: bytes b'\\xe9' are not UTF-8"):
        run_clip.main(base_args(clip_dir, tmp_path / "out", "--train_file", str(tmp_path / "train.csv"), "--do_train"))


def test_a_finished_run_is_never_overwritten_silently(clip_dir, tmp_path):
    data = write_demo_dataset(str(tmp_path / "data"), num_train=8, num_validation=4, num_test=1, image_size=32)
    out = tmp_path / "out"
    args = base_args(clip_dir, out, "--train_file", data["train"], "--do_train", "--max_steps", "1")
    run_clip.main(args)
    with pytest.raises(ValueError, match="already holds a finished run .*--overwrite_output_dir"):
        run_clip.main(args)
    run_clip.main([*args, "--overwrite_output_dir"])


def test_unwritable_output_dir_is_reported_before_training(clip_dir, tmp_path):
    data = write_demo_dataset(str(tmp_path / "data"), num_train=4, num_validation=4, num_test=1, image_size=32)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        run_clip.main(base_args(clip_dir, tmp_path / "a_file" / "out", "--train_file", data["train"], "--do_train"))


def test_non_finite_loss_stops_the_run_naming_the_step(clip_dir, tmp_path):
    data = write_demo_dataset(str(tmp_path / "data"), num_train=16, num_validation=4, num_test=1, image_size=32)
    with pytest.raises(RuntimeError, match=r"Non-finite (loss|weights).* step \d+"):
        run_clip.main(base_args(clip_dir, tmp_path / "out", "--train_file", data["train"], "--do_train", "--max_steps", "6",
                                "--optim", "sgd", "--learning_rate", "1e30", "--max_grad_norm", "0", "--logging_steps", "1"))


def test_killed_run_resumes_to_the_same_weights(clip_dir, tmp_path):
    """kill -9 mid-training, run the same command again: it resumes from the last complete checkpoint (a
    half-written one is ignored) and ends with the weights of an uninterrupted run."""
    data = write_demo_dataset(str(tmp_path / "data"), num_train=40, num_validation=4, num_test=1, image_size=32)
    def command(output_dir):
        return [sys.executable, os.path.join(REPO, "run_clip.py"), *base_args(
            clip_dir, output_dir, "--train_file", data["train"], "--do_train", "--max_steps", "12", "--save_strategy", "steps",
            "--save_steps", "2", "--learning_rate", "1e-3", "--augment", "--dataloader_num_workers", "1")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-6" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "train_results.json").exists()
    (out / "checkpoint-1000").mkdir()  # what a kill during a save leaves: a folder without trainer_state.json
    (out / "checkpoint-1000" / "config.json").write_text("{}")
    resumed = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Ignoring" in resumed.stdout + resumed.stderr and "checkpoint-1000" in resumed.stdout + resumed.stderr
    straight, again = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) < 1e-6


@pytest.mark.parametrize("ci", ["", "1"])
def test_each_log_line_prints_once(ci):
    """transformers sends its records on to the root logger when CI=1; the scripts' root handler must then not
    print every line a second time (CI logs would hold each one twice)."""
    code = (
        "import logging, sys\n"
        "from transformers import TrainingArguments, logging as hf_logging\n"
        "from utils.training import setup_logging\n"
        "setup_logging(TrainingArguments(output_dir='unused', use_cpu=True, report_to='none'))\n"
        "hf_logging.get_logger('transformers.trainer').info('marker-line')\n"
        "logging.getLogger('run_clip').info('marker-line')\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("marker-line") == 2
