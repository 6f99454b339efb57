"""What a finished run of each script leaves to look at and to use, on short real runs of tiny models: the caption
and VQA galleries against predictions.jsonl and in headless Chromium (thumbnails decoded and shown whole, nothing
wider than the window, a header click sorts), the model card of all three scripts, TensorBoard event files that
hold the curves of the log history, and the README's usage snippets run as written on the output folders."""

from __future__ import annotations

import glob
import html
import json
import math
import os
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_blip_caption
import run_clip
import run_vilt_vqa
from tests.helpers import (
    build_tiny_vit,
    item_rows,
    minilm_path,
    needs_chromium,
    read_json,
    run_chromium,
    sort_values,
    write_jsonl,
)
from utils.caption_metrics import score_captions
from utils.demo import build_demo_clip, write_demo_dataset
from utils.demo_caption import build_tiny_blip
from utils.demo_vqa import build_demo_vilt, human_answers, write_vqa_rows
from utils.images import ImageTransformSpec, build_image_transform, load_image
from utils.report import collect_curves
from utils.text import resolve_max_length
from utils.vqa import vqa_accuracy

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--use_cpu", "--dataloader_num_workers", "0", "--save_strategy", "no"]


@dataclass
class Run:
    """One finished run: the script, its flags, what main() returned, its data folder (the README snippets' working
    directory: the output folder is `out` there, as the snippets name it) and the number of training examples the
    model card should report."""

    script: str
    argv: list[str]
    metrics: dict
    data_dir: Path
    train_examples: int

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "out"


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def readme_snippet(name: str) -> str:
    """The ```python block that follows `<!-- snippet: NAME ... -->` in README.md, as written."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- snippet: {re.escape(name)}\b[^\n]*-->\n```python\n(.*?)```", text, flags=re.S)
    assert match, f"README.md has no ```python block right after <!-- snippet: {name} ... -->"
    return match.group(1)


def run_snippet(name: str, workdir: Path, monkeypatch) -> dict:
    """Execute the README's snippet in `workdir` (where `out` is the trained folder); its variables."""
    monkeypatch.chdir(workdir)
    namespace = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile(readme_snippet(name), f"README.md <!-- snippet: {name} -->", "exec"), namespace)
    return namespace


def snippet_files(name: str, extension: str = ".jpg") -> list[str]:
    """The image files a snippet opens, in the order it names them."""
    return re.findall(rf'"([\w./-]+{re.escape(extension)})"', readme_snippet(name))


def copy_image(source: str, target: Path) -> None:
    """A demo image saved under the name a snippet uses (JPEG by its extension)."""
    with Image.open(source) as image:
        image.convert("RGB").save(target)


# --- Three short runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Run:
    """run_clip.py, reporting to TensorBoard, logging every step and evaluating every second step."""
    root = tmp_path_factory.mktemp("clip_run")
    data = write_demo_dataset(str(root / "data"), num_train=16, num_validation=8, num_test=8, image_size=48, seed=1)
    build_demo_clip(str(root / "tiny_clip"))
    argv = [
        "--model_name_or_path", str(root / "tiny_clip"), "--train_file", data["train"], "--validation_file", data["validation"],
        "--test_file", data["test"], "--output_dir", str(root / "data" / "out"), "--do_train", "--do_eval", "--do_predict",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--gallery_size", "5",
        *COMMON, "--report_to", "tensorboard", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2",
    ]
    return Run("run_clip.py", argv, run_clip.main(argv), root / "data", train_examples=16)


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory) -> Run:
    """run_blip_caption.py with the README snippet's image as the first test image and its generation flags."""
    root = tmp_path_factory.mktemp("caption_run")
    data = write_demo_dataset(str(root / "data"), num_train=12, num_validation=6, num_test=6, image_size=32, seed=1)
    rows = read_rows(data["test"])
    (image,) = snippet_files("blip-caption")
    copy_image(os.path.join(root / "data", rows[0]["image"]), root / "data" / image)
    write_jsonl(data["test"], [{**rows[0], "image": image}] + rows)
    build_tiny_blip(str(root / "tiny_blip"))
    argv = [
        "--model_name_or_path", str(root / "tiny_blip"), "--train_file", data["train"], "--validation_file", data["validation"],
        "--test_file", data["test"], "--output_dir", str(root / "data" / "out"), "--do_train", "--do_eval", "--do_predict",
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--logging_steps", "1",
        "--num_beams", "3", "--max_new_tokens", "20", "--use_java", "false", "--gallery_size", "4", *COMMON, "--report_to", "none",
    ]
    train_pairs = sum(len(row["captions"]) for row in read_rows(data["train"]))
    return Run("run_blip_caption.py", argv, run_blip_caption.main(argv), root / "data", train_examples=train_pairs)


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory) -> Run:
    """run_vilt_vqa.py with the README snippet's image and question as the first test question."""
    root = tmp_path_factory.mktemp("vqa_run")
    scenes = write_demo_dataset(str(root / "data"), num_train=16, num_validation=6, num_test=6, max_objects=3, image_size=48, seed=1)
    rng = random.Random(1)
    first_id = 0
    for path in scenes.values():
        first_id += write_vqa_rows(path, path, rng, first_id)
    (image,) = snippet_files("vilt-answer")
    question = re.search(r'answer_question\("out", "[^"]+", "([^"]+)"', readme_snippet("vilt-answer")).group(1)
    rows = read_rows(scenes["test"])
    copy_image(os.path.join(root / "data", rows[0]["image"]), root / "data" / image)
    readme_row = {"image": image, "question": question, "answers": human_answers("color", "red", rng), "question_id": first_id,
                  "answer_type": "other", "question_type": "color"}
    write_jsonl(scenes["test"], [readme_row] + rows)
    build_demo_vilt(str(root / "tiny_vilt"), image_size=32, patch_size=16, hidden_size=32, num_layers=2)
    argv = [
        "--model_name_or_path", str(root / "tiny_vilt"), "--train_file", scenes["train"], "--validation_file", scenes["validation"],
        "--test_file", scenes["test"], "--output_dir", str(root / "data" / "out"), "--do_train", "--do_eval", "--do_predict",
        "--max_steps", "3", "--min_answer_count", "1", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--logging_steps", "1", "--top_k_predictions", "3", "--gallery_size", "12", *COMMON, "--report_to", "none",
    ]
    return Run("run_vilt_vqa.py", argv, run_vilt_vqa.main(argv), root / "data", train_examples=len(read_rows(scenes["train"])))


@pytest.fixture(scope="module")
def dual_encoder_run(tmp_path_factory) -> Run:
    """run_clip.py's second way in: a VisionTextDualEncoderModel from a tiny ViT and the real MiniLM, one step."""
    root = tmp_path_factory.mktemp("dual_encoder_run")
    data = write_demo_dataset(str(root / "data"), num_train=8, num_validation=4, num_test=4, image_size=48, seed=2)
    argv = [
        "--vision_model_name_or_path", build_tiny_vit(str(root / "tiny_vit")), "--text_model_name_or_path", minilm_path(),
        "--train_file", data["train"], "--output_dir", str(root / "data" / "out"), "--do_train", "--max_steps", "1",
        "--per_device_train_batch_size", "8", *COMMON, "--report_to", "none",
    ]
    return Run("run_clip.py", argv, run_clip.main(argv), root / "data", train_examples=8)


@pytest.fixture
def snippet_dir(request):
    """The data folder of the run named by the test's parameter, with `out` there being the trained folder."""
    return request.getfixturevalue(request.param).data_dir


# --- Galleries of real runs ----------------------------------------------------------------------------------


def test_caption_gallery_shows_the_runs_first_images_worst_cider_first(caption_run):
    """gallery_test.html holds --gallery_size rows: the first test images, each with its thumbnail, the caption
    and references of predictions.jsonl and the per-image CIDEr-D of the whole split, ordered worst first."""
    page = (caption_run.output_dir / "gallery_test.html").read_text(encoding="utf-8")
    predictions = read_rows(caption_run.output_dir / "predictions.jsonl")
    rows = item_rows(page)
    assert len(rows) == 4 and f"Showing 4 of {len(predictions)} images" in page
    cider = score_captions([p["prediction"] for p in predictions], [p["references"] for p in predictions], use_java=False).per_image["cider"]
    indices = [int(float(re.search(r'class="index" data-value="([^"]+)"', row).group(1))) for row in rows]
    assert sorted(indices) == [0, 1, 2, 3]
    for index, row in zip(indices, rows):
        prediction = predictions[index]
        assert f'<td class="prediction">{html.escape(prediction["prediction"])}</td>' in row
        assert all(f"<li>{html.escape(reference)}</li>" in row for reference in prediction["references"])
        assert row.count("data:image/jpeg;base64,") == 1 and f'<div class="name">{prediction["image"]}</div>' in row
    assert sort_values(rows) == pytest.approx([cider[i] for i in indices], abs=1e-12)
    assert sort_values(rows) == sorted(sort_values(rows))


def test_vqa_gallery_groups_the_runs_first_questions_by_answer_type(vqa_run):
    """gallery_test.html holds the first --gallery_size questions of predictions.jsonl, grouped by the data's
    answer_type, each with its thumbnail, the top-k answers and scores, the human answers and its VQA accuracy,
    worst first within a group; the header says of how many questions."""
    page = (vqa_run.output_dir / "gallery_test.html").read_text(encoding="utf-8")
    predictions = read_rows(vqa_run.output_dir / "predictions.jsonl")
    rows = read_rows(vqa_run.data_dir / "test.jsonl")
    assert f"Showing 12 of {len(predictions)} questions" in page and len(predictions) > 12
    shown = {(p["image"], p["question"]): (p, row["answer_type"]) for p, row in zip(predictions[:12], rows)}
    sections = re.findall(r'<section class="answer-type" id="(group-\d+)"><h2>([^<]+?) <span', page)
    assert sorted(name for _, name in sections) == sorted({answer_type for _, answer_type in shown.values()})
    seen = set()
    for anchor, answer_type in sections:
        group_rows = item_rows(page, anchor)
        assert len(group_rows) == sum(t == answer_type for _, t in shown.values())
        for row in group_rows:
            image = re.search(r'<div class="name">([^<]+)</div>', row).group(1)
            question = html.unescape(re.search(r'<div class="question">([^<]+)</div>', row).group(1))
            prediction, expected_type = shown[image, question]
            assert expected_type == answer_type and (image, question) not in seen
            seen.add((image, question))
            assert row.count("data:image/jpeg;base64,") == 1
            listed = re.findall(r'<li class="(?:hit|miss)">([^<]+)<span class="score">([0-9.]+)</span>', row)
            assert [(html.unescape(a), float(s)) for a, s in listed] == [(t["answer"], round(t["score"], 3)) for t in prediction["top_k"]]
            assert sort_values([row]) == [pytest.approx(vqa_accuracy(prediction["prediction"], prediction["answers"]), abs=1e-12)]
        values = sort_values(group_rows)
        assert values == sorted(values), (answer_type, values)
    assert len(seen) == 12


def measure_page(page: Path, *clicks: str) -> dict:
    """Load a gallery in headless Chromium at 1200 px wide, click the header cells matching the CSS selectors
    `clicks`, and read back what was on screen: per thumbnail whether it decoded and its displayed size, per image
    name its number of lines, the page's width, and every gallery row's sort value per table."""
    script = """<script>
window.addEventListener("load", function () {
  CLICKS.forEach(function (selector) { document.querySelector(selector).click(); });
  var thumbs = Array.prototype.map.call(document.querySelectorAll("img.thumb"), function (img) {
    var box = img.getBoundingClientRect();
    return {decoded: img.complete && img.naturalWidth > 0, width: box.width, height: box.height};
  });
  var names = Array.prototype.map.call(document.querySelectorAll(".name"), function (el) {
    return el.getBoundingClientRect().height / parseFloat(getComputedStyle(el).lineHeight);
  });
  var tables = Array.prototype.map.call(document.querySelectorAll("table.gallery"), function (table) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (row) {
      var cells = row.querySelectorAll("td[data-value]");
      return cells[cells.length - 1].dataset.value + "|" + row.textContent.replace(/\\s+/g, " ");
    });
  });
  var result = {thumbs: thumbs, names: names, pageWidth: document.documentElement.scrollWidth, windowWidth: window.innerWidth,
                tables: tables};
  var out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>""".replace("CLICKS", json.dumps(list(clicks)))
    probe = page.with_name(page.stem + "_probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = run_chromium(str(probe), "--dump-dom", "--window-size=1200,1600").stdout
    probe.unlink()
    match = re.search(r'<pre id="measured">(.*?)</pre>', dom, flags=re.S)
    assert match, "the probe script did not run: " + dom[-500:]
    return json.loads(html.unescape(match.group(1)))


@needs_chromium
@pytest.mark.parametrize("run_name", ["caption_run", "vqa_run", "clip_run"])
def test_gallery_of_a_run_in_chromium_shows_every_thumbnail_whole(run_name, request):
    """Every embedded thumbnail decodes in the browser and is shown at the gallery size (160 px on its longest side
    for a row's image, 96 px for a retrieved one, although the runs' images are 32 and 48 px); no image name wraps
    onto more than two lines; nothing is wider than a 1200 px window."""
    run = request.getfixturevalue(run_name)
    measured = measure_page(run.output_dir / "gallery_validation.html")
    thumbs = measured["thumbs"]
    assert thumbs and all(t["decoded"] for t in thumbs), thumbs
    assert {round(max(t["width"], t["height"])) for t in thumbs} <= {160, 96}, thumbs
    assert max(measured["names"]) <= 2.05, measured["names"]
    assert measured["pageWidth"] <= measured["windowWidth"], measured


@needs_chromium
def test_vqa_gallery_of_a_run_sorts_one_group_on_a_click(vqa_run):
    """A click on the accuracy header of an answer type (one whose accuracies differ) re-sorts that table best
    first; the rows stay in their group and the other groups keep their order."""
    page = vqa_run.output_dir / "gallery_test.html"
    before = measure_page(page)["tables"]
    value = lambda row: float(row.split("|")[0])  # noqa: E731
    varied = [g for g, rows in enumerate(before) if len({value(row) for row in rows}) > 1]
    assert len(before) >= 2 and varied, before
    group = varied[0]
    after = measure_page(page, f"#group-{group} th.sortable")["tables"]
    assert after[:group] + after[group + 1:] == before[:group] + before[group + 1:]
    assert sorted(after[group]) == sorted(before[group])
    values = [value(row) for row in after[group]]
    assert values == sorted(values, reverse=True) and [value(row) for row in before[group]] == sorted(values), values


@needs_chromium
def test_caption_gallery_of_a_run_sorts_by_index_on_a_click(caption_run):
    """From worst CIDEr first, a click on "#" puts the images back in data order."""
    page = caption_run.output_dir / "gallery_test.html"
    (table,) = measure_page(page, "th.sortable")["tables"]
    indices = [int(re.match(r"\s*(\d+)", row.split("|", 1)[1]).group(1)) for row in table]
    assert indices == [0, 1, 2, 3]


# --- Model cards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_name", ["clip_run", "caption_run", "vqa_run"])
def test_model_card_records_command_data_metrics_and_curves(run_name, request):
    """The model card's "Training run" section: the command as typed, each split's file with its number of
    examples, a table of every metric in all_results.json (4 significant digits) and the training curves PNG."""
    run = request.getfixturevalue(run_name)
    card = (run.output_dir / "README.md").read_text(encoding="utf-8")
    assert card.count("\n## Training run\n") == 1
    section = card.split("\n## Training run\n", 1)[1]
    assert f"```bash\npython {run.script} {shlex.join(run.argv)}\n```" in section
    splits = {"train": run.train_examples, "validation": len(read_rows(run.data_dir / "validation.jsonl")),
              "test": len(read_rows(run.data_dir / "test.jsonl"))}
    data = "; ".join(f"{split}: {run.data_dir / f'{split}.jsonl'} ({count} examples)" for split, count in splits.items())
    assert f"\nData: {data}\n" in section
    table = dict(re.findall(r"^\| (\w+) \| ([^|]+) \|$", section, flags=re.M))
    assert table.pop("metric") == "value"  # the header row
    results = read_json(run.output_dir / "all_results.json")
    assert sorted(table) == sorted(results)
    for key, value in results.items():
        assert float(table[key]) == pytest.approx(value, rel=5e-4, abs=1e-12), key
    assert "![training curves](training_curves.png)" in section
    with Image.open(run.output_dir / "training_curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] >= 800 and curves.size[1] >= 250


# --- TensorBoard ---------------------------------------------------------------------------------------------


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = glob.glob(os.path.join(log_dir, "*"))  # runs/<date>_<host>: one per run
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_curves_of_the_log_history(clip_run):
    """Under output_dir/runs, every curve of training_curves.png (train loss, learning rate, gradient norm,
    logit_scale, each eval metric) at the steps and with the float32 values of trainer_state.json's log history;
    the evaluation after training adds one point at the last step, with the values of eval_results.json."""
    scalars = tensorboard_scalars(str(clip_run.output_dir / "runs"))
    history = read_json(clip_run.output_dir / "trainer_state.json")["log_history"]
    curves = collect_curves(history)
    assert {"loss", "learning_rate", "grad_norm", "logit_scale", "eval_loss", "eval_i2t_r1", "eval_t2i_mean_rank"} <= set(curves)
    final = read_json(clip_run.output_dir / "eval_results.json")
    last_step = read_json(clip_run.output_dir / "trainer_state.json")["global_step"]
    for key, (steps, values, _) in curves.items():
        expected = [(int(step), float(np.float32(value))) for step, value in zip(steps, values)]
        if key.startswith("eval_"):
            expected.append((last_step, float(np.float32(final[key]))))
        tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
        assert scalars.get(tag) == expected, (tag, scalars.get(tag), expected)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4, 4]


def test_evaluation_only_run_logs_to_tensorboard_in_its_output_dir(clip_run, tmp_path, monkeypatch):
    """transformers picks TensorBoard's folder when training begins; without training it would write to
    ./runs of the working directory. The scripts keep it in output_dir/runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "eval_only"
    metrics = run_clip.main([
        "--model_name_or_path", str(clip_run.output_dir), "--validation_file", str(clip_run.data_dir / "validation.jsonl"),
        "--output_dir", str(out), "--do_eval", "--per_device_eval_batch_size", "8", *COMMON, "--report_to", "tensorboard",
    ])
    assert not (tmp_path / "runs").exists()
    scalars = tensorboard_scalars(str(out / "runs"))
    assert scalars["eval/loss"] == [(0, float(np.float32(metrics["eval_loss"])))]


# --- The README's snippets, as written, on the trained folders -------------------------------------------------


def clip_scores_as_evaluated(model_dir, image_paths: list[str], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit scale, (images, texts) cosine similarities) through run_clip.py's own preprocessing and `embed`."""
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    spec = ImageTransformSpec.from_image_processor(processor.image_processor)
    transform = build_image_transform(spec)
    max_length = resolve_max_length(None, processor.tokenizer, getattr(model.config, "text_config", model.config))
    collator = run_clip.ClipCollator(processor.tokenizer, max_length, spec)
    examples = [{"pixel_values": transform(load_image(path)), "captions": texts if i == 0 else []} for i, path in enumerate(image_paths)]
    batch = collator(examples)
    batch.pop("caption_counts")
    with torch.no_grad():
        image_embeds, text_embeds = run_clip.embed(model, batch)
    return model.logit_scale.exp().detach(), image_embeds @ text_embeds.T


@pytest.mark.parametrize("snippet_dir", ["clip_run"], indirect=True)
def test_readme_clip_zero_shot_snippet(snippet_dir, monkeypatch):
    """The pipeline's probabilities are the softmax of the scaled similarities the evaluation computes."""
    (image,) = snippet_files("clip-zero-shot")
    copy_image(str(snippet_dir / "images" / "test_00000.png"), snippet_dir / image)
    scores = run_snippet("clip-zero-shot", snippet_dir, monkeypatch)["scores"]
    labels = [s["label"] for s in scores]
    assert len(labels) == 2 and sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)
    logit_scale, similarity = clip_scores_as_evaluated(snippet_dir / "out", [str(snippet_dir / image)], labels)
    expected = (logit_scale * similarity[0]).softmax(-1)
    assert [s["score"] for s in scores] == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize("snippet_dir", ["clip_run", "dual_encoder_run"], indirect=True)
def test_readme_clip_search_snippet(snippet_dir, monkeypatch):
    """For a CLIPModel and a VisionTextDualEncoderModel folder alike, the snippet's similarities are those the
    evaluation ranks by, and its rankings follow them both ways."""
    images = snippet_files("clip-search")
    assert len(images) >= 2
    for i, name in enumerate(images):
        copy_image(str(snippet_dir / "images" / f"test_{i:05d}.png"), snippet_dir / name)
    namespace = run_snippet("clip-search", snippet_dir, monkeypatch)
    similarity = namespace["similarity"]
    _, expected = clip_scores_as_evaluated(snippet_dir / "out", [str(snippet_dir / name) for name in images], namespace["texts"])
    assert similarity.shape == (len(images), len(namespace["texts"]))
    assert torch.allclose(similarity, expected, atol=1e-4), (similarity, expected)
    assert torch.equal(namespace["texts_for_image"][:, 0], similarity.argmax(dim=1))
    assert torch.equal(namespace["images_for_text"][:, 0], similarity.argmax(dim=0))
    assert namespace["images_for_text"].shape == (len(namespace["texts"]), len(images))


@pytest.mark.parametrize("snippet_dir", ["caption_run"], indirect=True)
def test_readme_caption_snippet_gives_the_runs_caption(snippet_dir, monkeypatch):
    """The README's image is the run's first test image: the snippet captions it as predictions.jsonl does."""
    caption = run_snippet("blip-caption", snippet_dir, monkeypatch)["caption"]
    first = read_rows(snippet_dir / "out" / "predictions.jsonl")[0]
    assert first["image"] == snippet_files("blip-caption")[0]
    assert isinstance(caption, str) and caption.strip() and caption == first["prediction"]


@pytest.mark.parametrize("snippet_dir", ["vqa_run"], indirect=True)
def test_readme_vqa_snippet_gives_the_runs_answers(snippet_dir, monkeypatch):
    """The README's image and question are the run's first test question: the snippet's top answers and scores
    are those of predictions.jsonl."""
    answers = run_snippet("vilt-answer", snippet_dir, monkeypatch)["answers"]
    first = read_rows(snippet_dir / "out" / "predictions.jsonl")[0]
    assert first["image"] == snippet_files("vilt-answer")[0]
    assert [a["answer"] for a in answers] == [t["answer"] for t in first["top_k"]]
    assert [a["score"] for a in answers] == pytest.approx([t["score"] for t in first["top_k"]], abs=1e-4)
    assert all(math.isfinite(a["score"]) for a in answers)


def test_readme_snippets_are_all_tested():
    """Every snippet marker in README.md has a test here, so a new snippet cannot go in untested."""
    names = re.findall(r"<!-- snippet: ([\w-]+)", (REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert sorted(names) == ["blip-caption", "clip-search", "clip-zero-shot", "vilt-answer"]
    source = Path(__file__).read_text(encoding="utf-8")
    assert all(f'run_snippet("{name}"' in source for name in names)


def test_snippet_lookup_names_a_missing_marker():
    with pytest.raises(AssertionError, match="no-such-snippet"):
        readme_snippet("no-such-snippet")

