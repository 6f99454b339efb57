"""Bad data never costs a run, a killed run resumes, nothing is overwritten silently: run_clip.py,
run_blip_caption.py and run_vilt_vqa.py, each case asserted for each script.

Each case has a defined outcome: converted and used; skipped (counted in the log and listed with its reason in
output_dir/skipped_samples.jsonl); or a clear stop before training that names the file, row or flag. RELIABILITY.md
holds the same cases as a table.
"""

import ast
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import run_blip_caption
import run_clip
import run_vilt_vqa
import utils.training
from tests.helpers import write_jsonl
from utils.data import load_splits
from utils.demo import build_demo_clip, write_demo_dataset
from utils.demo_caption import build_tiny_blip
from utils.demo_vqa import build_demo_vilt
from utils.vqa import vqa_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


# --- The three scripts, as the cases see them -----------------------------------------------------------------


@dataclass
class Script:
    """What differs between the scripts for these tests: the module, its model flags, how a row is written, the
    flag naming its text column, and the function that scores an evaluation (spied on to count what is scored)."""

    name: str
    module: object
    flags: list
    text_flag: str
    scorer: str

    @property
    def path(self) -> str:
        return os.path.join(REPO, f"{self.module.__name__}.py")

    def row(self, image: str, text, index: int = 0) -> dict:
        if self.name == "vqa":
            return {"image": image, "question": text, "answers": [("yes", "no")[index % 2]] * 10}
        return {"image": image, "caption": text}

    def args(self, output_dir, *extra) -> list:
        return [*self.flags, "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--seed", "0",
                "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--save_strategy", "no", *extra]

    def main(self, output_dir, *extra) -> dict:
        return self.module.main(self.args(output_dir, *extra))


SCRIPTS = ["clip", "caption", "vqa"]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_models")
    build_demo_clip(str(root / "clip"))
    build_tiny_blip(str(root / "blip"))
    build_demo_vilt(str(root / "vilt"), image_size=32, patch_size=16, hidden_size=32, num_layers=2)
    return {
        "clip": Script("clip", run_clip, ["--model_name_or_path", str(root / "clip")], "caption_column", "retrieval_metrics"),
        "caption": Script("caption", run_blip_caption, ["--model_name_or_path", str(root / "blip"), "--num_beams", "1",
                          "--max_new_tokens", "4", "--use_java", "false"], "caption_column", "compute_metrics"),
        "vqa": Script("vqa", run_vilt_vqa, ["--model_name_or_path", str(root / "vilt"), "--min_answer_count", "1"],
                      "question_column", "compute_vqa_metrics"),
    }


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Demo images with five captions each: 40 training and 8 validation rows."""
    root = tmp_path_factory.mktemp("reliability_data")
    files = write_demo_dataset(str(root), num_train=40, num_validation=8, num_test=1, image_size=32)
    rows = {}
    for split in ("train", "validation"):
        with open(files[split]) as f:
            rows[split] = [json.loads(line) for line in f]
    return rows, root


def good_rows(script: Script, scenes, split: str = "train", count: int | None = None) -> list[dict]:
    """Usable rows for `script`: all five captions per image (CLIP draws one per epoch, the caption script trains on
    each), or a question about the shape with ten answers (seven give the shape, three the colour)."""
    rows, root = scenes
    out = []
    for scene in rows[split][:count]:
        image = os.path.join(str(root), scene["image"])
        if script.name == "vqa":
            shape, color = scene["objects"][0]["shape"], scene["objects"][0]["color"]
            out.append({"image": image, "question": "what shape is it?", "answers": [shape] * 7 + [color] * 3})
        else:
            out.append({"image": image, "caption": scene["captions"]})
    return out


def skipped_rows(output_dir):
    path = os.path.join(output_dir, "skipped_samples.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def spy_on_scorer(monkeypatch, script: Script) -> list:
    """Record how many samples each evaluation scores: images (CLIP, captions) or questions (VQA)."""
    scored = []
    original = getattr(script.module, script.scorer)

    def spy(*args, **kwargs):
        scored.append(len(args[1]) if script.name == "vqa" else len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(script.module, script.scorer, spy)
    return scored


# --- Images and text: the case table ---------------------------------------------------------------------------


def png_bomb(path, width=60000, height=60000):
    """A valid PNG header claiming 3.6 gigapixels (PIL refuses above 2 x MAX_IMAGE_PIXELS)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def gradient(width, height):
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, x[::-1], 255 - x], -1).astype(np.uint8))


def truncated_jpeg(path):
    """Half a JPEG: its header reads, so the check before the run passes it; decoding fails in the data loader."""
    buffer = io.BytesIO()
    gradient(300, 300).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def write_bad_images(folder):
    """name -> (file, expected outcome); the same outcome for every script."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    good = gradient(40, 30)
    good.save(folder / "good.png"); cases["good"] = ("good.png", "used")
    good.convert("L").save(folder / "gray.png"); cases["grayscale"] = ("gray.png", "used")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png"); cases["palette"] = ("palette.png", "used")
    good.convert("RGBA").save(folder / "rgba.png"); cases["rgba"] = ("rgba.png", "used")
    good.convert("CMYK").save(folder / "cmyk.jpg"); cases["cmyk"] = ("cmyk.jpg", "used")
    Image.fromarray(np.asarray(good.convert("L"), dtype=np.uint16) * 257).save(folder / "deep.png"); cases["16-bit"] = ("deep.png", "used")
    exif = good.getexif(); exif[0x0112] = 6
    good.save(folder / "rotated.jpg", exif=exif); cases["exif-rotated"] = ("rotated.jpg", "used")
    Image.new("RGB", (1, 1), "red").save(folder / "pixel.png"); cases["1x1"] = ("pixel.png", "used")
    gradient(5, 4).save(folder / "small.png"); cases["smaller than crop"] = ("small.png", "used")
    cases["missing"] = ("missing.jpg", "skipped")
    (folder / "empty.jpg").write_bytes(b""); cases["zero bytes"] = ("empty.jpg", "skipped")
    (folder / "text.jpg").write_text("this is not a JPEG"); cases["text named .jpg"] = ("text.jpg", "skipped")
    png_bomb(folder / "bomb.png"); cases["decompression bomb"] = ("bomb.png", "skipped")
    truncated_jpeg(folder / "truncated.jpg"); cases["truncated JPEG"] = ("truncated.jpg", "skipped")
    return cases


# The text is the caption (CLIP: drawn per epoch; captioning: the training target and a reference) or the question
# (VQA). The same outcome for every script; a long text is cut at the model's token limit.
TEXT_CASES = {
    "empty": ("", "skipped"),
    "whitespace only": ("   \t", "skipped"),
    "NA": ("NA", "used"),
    "None": ("None", "used"),
    "null": ("null", "used"),
    "non-string": (42, "skipped"),
    "10,000 characters": ("red " * 2500, "used"),
    "right-to-left and emoji": ("דוגמה עם 😀 emoji", "used"),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bad_image_and_text_case_has_its_outcome(name, scripts, tmp_path, monkeypatch):
    """Training: bad rows left out before the run and listed; the truncated JPEG, whose header passes, is listed
    when the data loader fails to decode it and is replaced (training goes on). Validation: images decoded in
    full up front, the unusable ones listed, every usable one scored once. The number 42 and the string "null"
    sit in one file: "null" stays a caption (datasets would read it as JSON null)."""
    script = scripts[name]
    data = tmp_path / "data"
    images = write_bad_images(data / "images")
    rows, expected = [], {}
    for case, (file, outcome) in images.items():
        rows.append(script.row(f"images/{file}", f"a picture: {case}", len(rows)))
        expected[len(rows) - 1] = outcome
    for case, (text, outcome) in TEXT_CASES.items():
        rows.append(script.row("images/good.png", text, len(rows)))
        expected[len(rows) - 1] = outcome
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[: len(images)])
    scored = spy_on_scorer(monkeypatch, script)
    out = tmp_path / "out"
    metrics = script.main(out, "--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl"),
                          "--do_train", "--do_eval", "--num_train_epochs", "1", "--max_bad_samples_fraction", "0.5")
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["eval_loss"])
    skipped = skipped_rows(out)
    train_skipped = {r["row"] for r in skipped if r["split"] == "train"}
    assert train_skipped == {row for row, outcome in expected.items() if outcome == "skipped"}
    truncated_row = list(images).index("truncated JPEG")
    assert any(r["row"] == truncated_row and "truncated" in r["reason"].lower() for r in skipped if r["split"] == "train")
    assert any("42 is a int" in r["reason"] or "42 is not a non-empty string" in r["reason"] for r in skipped)
    validation_skipped = {r["row"] for r in skipped if r["split"] == "validation"}
    assert validation_skipped == {i for i, (_, outcome) in enumerate(images.values()) if outcome == "skipped"}
    assert scored == [sum(outcome == "used" for _, outcome in images.values())]
    assert (out / "model.safetensors").exists()


def test_vqa_answer_cases(scripts, tmp_path, caplog):
    """No answers: skipped and listed. All answers outside the answer set: left out of training, by design (an
    all-zero target teaches only "none of these"; BUTD and ViLT drop them) and counted in the log; in evaluation
    used, scoring 0. VQAv2 answer dicts and a single string: read as answers. Fewer or more than ten answers:
    scored as vqaEval.py does, the mean over the leave-one-out subsets of however many there are (a single answer,
    which has none, is an exact match after normalization)."""
    script = scripts["vqa"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    train = [{"question": f"q{i}", "answers": [answer] * 10} for i, answer in enumerate(["yes", "no"] * 3 + ["purple"])]
    train.append({"question": "q7", "answers": []})
    validation = [
        {"question": "dicts", "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question": "one string", "answers": "no"},
        {"question": "three", "answers": ["yes", "yes", "no"]},
        {"question": "twelve", "answers": ["no"] * 5 + ["yes"] * 7},
        {"question": "outside the answer set", "answers": ["purple"] * 10},
        {"question": "none", "answers": []},
    ]
    for split, rows in (("train", train), ("validation", validation)):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"image": "a.png", **row} for row in rows])
    caplog.set_level("INFO", logger="run_vilt_vqa")
    out = tmp_path / "out"
    metrics = script.main(out, "--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "validation.jsonl"),
                          "--test_file", str(tmp_path / "validation.jsonl"), "--do_train", "--do_eval", "--do_predict",
                          "--max_steps", "2", "--min_answer_count", "2", "--max_bad_samples_fraction", "0.2")
    skipped = {(r["split"], r["row"]): r["reason"] for r in skipped_rows(out)}
    assert set(skipped) == {("train", 7), ("validation", 5), ("test", 5)}
    assert all("no answers" in reason for reason in skipped.values())
    assert "train: dropped 1 of 7 questions with no answer in the answer set" in caplog.text

    def official(prediction, answers):  # vqaEval.py's loop, for answers needing no normalization
        others = [[a for j, a in enumerate(answers) if j != i] for i in range(len(answers))]
        return sum(min(1, sum(a == prediction for a in rest) / 3) for rest in others) / len(answers)

    with open(out / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["question"] for r in records] == [row["question"] for row in validation[:5]]
    assert [r["answers"] for r in records] == [["yes"] * 10, ["no"], ["yes", "yes", "no"], ["no"] * 5 + ["yes"] * 7, ["purple"] * 10]
    scores = [vqa_accuracy(r["prediction"], r["answers"]) for r in records]
    assert scores[4] == 0.0
    for record, score in zip(records, scores):
        if len(record["answers"]) > 1:
            assert score == pytest.approx(official(record["prediction"], record["answers"]))
    assert metrics["predict_vqa_accuracy"] == pytest.approx(sum(scores) / 5)
    assert metrics["eval_vqa_accuracy"] == metrics["predict_vqa_accuracy"]


# --- Files and columns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_wrong_column_names_list_the_real_ones(name, scripts, scenes, tmp_path):
    script = scripts[name]
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=4))
    with pytest.raises(ValueError, match=rf"--{script.text_flag} 'nope' is not a column of .*train.jsonl; its columns are \[.*'image'.*\]"):
        script.main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train", f"--{script.text_flag}", "nope")
    renamed = [{"picture": row["image"], "words": "a red circle"} for row in good_rows(script, scenes, count=4)]
    write_jsonl(tmp_path / "renamed.jsonl", renamed)
    with pytest.raises(ValueError, match=r"--image_column is not set and none of \[.*\] is a column of .*renamed.jsonl; its columns are \['picture', 'words'\]"):
        script.main(tmp_path / "out", "--train_file", str(tmp_path / "renamed.jsonl"), "--do_train")


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_empty_training_file_stops_naming_it(name, scripts, tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data file '.*train.jsonl' holds no rows"):
        scripts[name].main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train")


@pytest.mark.parametrize("content, message", [
    ("", "holds no rows"), ("\n\n", "holds no rows"), ("image,caption\n", "holds a header but no rows"), ("[]", "holds no rows"),
])
def test_empty_data_files_of_each_format_are_named(tmp_path, content, message):
    path = tmp_path / ("train.csv" if "image," in content else "train.json")
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"data file '{path}' {message}"):
        load_splits(data_files={"train": str(path)})


@pytest.mark.parametrize("name", SCRIPTS)
def test_validation_smaller_than_one_batch_scores_every_sample_once(name, scripts, scenes, tmp_path, monkeypatch):
    script = scripts[name]
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=8))
    write_jsonl(tmp_path / "validation.jsonl", good_rows(script, scenes, "validation", count=3))  # the batch is 4
    scored = spy_on_scorer(monkeypatch, script)
    metrics = script.main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--validation_file",
                          str(tmp_path / "validation.jsonl"), "--do_train", "--max_steps", "1", "--do_eval", "--gallery_size", "0")
    assert scored == [3] and np.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_duplicate_rows_are_kept_and_counted_in_the_log(name, scripts, scenes, tmp_path, caplog):
    """Kept: a repeated row may be deliberate weighting. Counted, and for CLIP the cost said: in a contrastive batch
    a row and its duplicate are false negatives of each other."""
    script = scripts[name]
    rows = good_rows(script, scenes, count=8)
    write_jsonl(tmp_path / "train.jsonl", rows + rows[:2])
    script.main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train", "--max_steps", "1")
    assert "train: 2 of 10 rows repeat an earlier row" in caplog.text and "kept" in caplog.text
    assert ("false negatives" in caplog.text) == (name == "clip")
    assert not skipped_rows(tmp_path / "out")


@pytest.mark.parametrize("name", SCRIPTS)
def test_too_many_bad_samples_stop_before_training(name, scripts, scenes, tmp_path):
    script = scripts[name]
    rows = good_rows(script, scenes, count=10)
    for row in rows[:3]:
        row["image"] = str(tmp_path / "missing.jpg")
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"3 of 10 rows of .*train.jsonl \(30.0%\) are unusable, more than --max_bad_samples_fraction 0.05; .*skipped_samples.jsonl"):
        script.main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train")
    assert not (tmp_path / "out" / "train_results.json").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_csv_with_bytes_that_are_not_utf8_names_the_line(name, scripts, tmp_path):
    (tmp_path / "train.csv").write_bytes(b"image,caption,question,answers\na.png,fine,q,yes\nb.png,caf\xe9 au lait,q,yes\n")
    with pytest.raises(ValueError, match=r"train.csv', line 3: bytes b'\\xe9' are not UTF-8"):
        scripts[name].main(tmp_path / "out", "--train_file", str(tmp_path / "train.csv"), "--do_train")


# --- Faults ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_killed_run_resumes_to_the_same_weights(name, scripts, scenes, tmp_path):
    """kill -9 mid-training, run the same command again: it resumes from the last complete checkpoint (a
    half-written one is ignored) and ends with the weights of an uninterrupted run. Every random draw in data
    loading must replay: the order (the Trainer's sampler), CLIP's caption per epoch and augmentation, and the
    replacement of a truncated JPEG found at decode time, all from (seed, epoch, index), in a worker process."""
    script = scripts[name]
    truncated_jpeg(tmp_path / "truncated.jpg")
    rows = good_rows(script, scenes)
    rows[5] = {**rows[5], "image": str(tmp_path / "truncated.jpg")}
    write_jsonl(tmp_path / "train.jsonl", rows)

    def args(output_dir):
        return script.args(output_dir, "--train_file", str(tmp_path / "train.jsonl"), "--do_train", "--max_steps", "12",
                           "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3", "--dataloader_num_workers", "1",
                           *(["--augment"] if name == "clip" else []))

    def command(output_dir):
        return [sys.executable, script.path, *args(output_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # The uninterrupted run in this process (one thread, as the subprocesses: see conftest.py) saves a start-up.
    script.module.main(args(tmp_path / "straight"))
    # The truncated JPEG was drawn and replaced, so the replacement's replay is part of what is compared.
    assert any("truncated" in r["reason"] for r in skipped_rows(tmp_path / "straight"))

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-6" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "train_results.json").exists()
    (out / "checkpoint-1000").mkdir()  # what a kill during a save leaves: a folder without trainer_state.json
    (out / "checkpoint-1000" / "config.json").write_text("{}")
    resumed = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Ignoring" in log and "checkpoint-1000" in log and "Resuming from" in log
    straight, again = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) < 1e-6
    # Weights as safetensors only, in the output and in every checkpoint. (The Trainer also pickles its arguments
    # into training_args.bin, which nothing reads; optimizer, scheduler and RNG states it reads with weights_only.)
    saved = [f for _, _, files in os.walk(out) for f in files]
    assert not [f for f in saved if f.endswith((".bin", ".pkl", ".pickle", ".ckpt")) and f != "training_args.bin"]
    assert (out / "checkpoint-12" / "model.safetensors").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_non_finite_loss_stops_the_run_naming_the_step(name, scripts, scenes, tmp_path):
    """The run stops at the first non-finite loss, or before saving non-finite weights: every checkpoint left on
    disk holds finite weights."""
    script = scripts[name]
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=16))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"Non-finite (loss|weights).* step \d+"):
        script.main(out, "--train_file", str(tmp_path / "train.jsonl"), "--do_train", "--max_steps", "6", "--optim", "sgd",
                    "--learning_rate", "1e30", "--max_grad_norm", "0", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1")
    for checkpoint in out.glob("checkpoint-*"):
        assert all(t.isfinite().all() for t in load_file(checkpoint / "model.safetensors").values()), checkpoint


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_finished_run_is_never_overwritten_silently(name, scripts, scenes, tmp_path):
    script = scripts[name]
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=8))
    args = ["--train_file", str(tmp_path / "train.jsonl"), "--do_train", "--max_steps", "1"]
    script.main(tmp_path / "out", *args)
    with pytest.raises(ValueError, match="already holds a finished run .*--overwrite_output_dir"):
        script.main(tmp_path / "out", *args)
    script.main(tmp_path / "out", *args, "--overwrite_output_dir")


@pytest.mark.parametrize("name", SCRIPTS)
def test_unwritable_or_full_output_dir_is_reported_before_training(name, scripts, scenes, tmp_path, monkeypatch):
    script = scripts[name]
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=4))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        script.main(tmp_path / "a_file" / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train")
    monkeypatch.setattr(utils.training.shutil, "disk_usage", lambda path: DiskUsage(total=10**12, used=10**12, free=1000))
    with pytest.raises(ValueError, match=r"has 0.00 GiB free, but one checkpoint of this model needs about"):
        script.main(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train")


# --- Safety -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_code_from_a_model_folder_does_not_run_without_trust_remote_code(name, scripts, scenes, tmp_path):
    """A folder whose config names its own code (auto_map) is refused unless --trust_remote_code is passed, which
    is off by default: the code is never imported."""
    script = scripts[name]
    assert script.module.ModelArguments.__dataclass_fields__["trust_remote_code"].default is False
    folder = tmp_path / "untrusted"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "untrusted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    classes = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor", "AutoTokenizer", "AutoImageProcessor")
    (folder / "config.json").write_text(json.dumps({"model_type": "untrusted", "auto_map": {c: f"untrusted.{c}Class" for c in classes}}))
    write_jsonl(tmp_path / "train.jsonl", good_rows(script, scenes, count=4))
    args = script.args(tmp_path / "out", "--train_file", str(tmp_path / "train.jsonl"), "--do_train")
    args[args.index("--model_name_or_path") + 1] = str(folder)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        script.module.main(args)
    assert not marker.exists()


PICKLE_MODULES = ("pickle", "_pickle", "cloudpickle", "dill", "joblib")


def unsafe_call(name: str, keywords: dict) -> str | None:
    """Why a call, by its dotted name and keyword arguments (source text), unpickles or writes weights as a
    pickle; None when it does neither."""
    if name == "torch.load" and keywords.get("weights_only") != "True":
        return "torch.load without weights_only=True"
    if name.split(".")[0] in PICKLE_MODULES and name.endswith(("load", "loads", "Unpickler")):
        return "unpickles"
    if name.endswith("read_pickle") or keywords.get("allow_pickle") == "True":
        return "unpickles"
    if name == "torch.save" or "False" in (keywords.get("safe_serialization"), keywords.get("save_safetensors")):
        return "writes a pickle instead of safetensors"
    return None


def test_nothing_unpickles_or_saves_pickled_weights():
    """Every Python file of the project, read as a syntax tree: torch.load only with weights_only=True; no
    pickle/dill/joblib loads, numpy allow_pickle or pandas read_pickle; no torch.save and no
    safe_serialization=False (weights are written as safetensors, the Trainer's default)."""
    assert unsafe_call("torch.load", {}) and unsafe_call("torch.load", {"weights_only": "True"}) is None
    assert unsafe_call("pickle.load", {}) and unsafe_call("np.load", {"allow_pickle": "True"})
    assert unsafe_call("model.save_pretrained", {"safe_serialization": "False"}) and unsafe_call("json.load", {}) is None
    problems = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "demo")]
        for path in (os.path.join(folder, f) for f in files if f.endswith(".py")):
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    reason = unsafe_call(ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords})
                    if reason:
                        problems.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {ast.unparse(node)[:80]}: {reason}")
    assert not problems, problems


# --- Logging -------------------------------------------------------------------------------------------------------


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
