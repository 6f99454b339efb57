"""utils/report.py: the training-curve PNG, the three HTML galleries and the model card section."""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import item_rows, needs_chromium, run_chromium, sort_values
from utils.report import (
    LazyImages,
    append_to_model_card,
    build_model_card_section,
    collect_curves,
    group_curves,
    plot_training_curves,
    write_caption_gallery,
    write_retrieval_gallery,
    write_vqa_gallery,
)
from utils.vqa import vqa_accuracy

XSS = "<script>alert('x')</script> & \"quoted\""
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;"
PALETTE = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 210, 40), (140, 60, 180), (245, 140, 30)]


def make_images(count: int, size: tuple[int, int] = (400, 300)) -> list[Image.Image]:
    """Distinct pictures: a coloured disc on a grey background, one colour and position per image."""
    from PIL import ImageDraw

    images = []
    for i in range(count):
        image = Image.new("RGB", size, (225, 225, 225))
        x = 60 + (i * 97) % (size[0] - 120)
        ImageDraw.Draw(image).ellipse((x - 50, 100, x + 50, 200), fill=PALETTE[i % len(PALETTE)])
        images.append(image)
    return images


def fake_history(steps: int = 1000, eval_every: int = 100) -> list[dict]:
    """A Trainer log_history as run_clip.py writes it: training logs every 10 steps, evaluations, a summary."""
    history = []
    for step in range(10, steps + 1, 10):
        history.append({
            "loss": 3 * math.exp(-step / 300), "grad_norm": 2.5, "learning_rate": 5e-5 * (1 - step / steps),
            "logit_scale": 2.66 + step / 1000, "epoch": step / 50, "step": step,
        })
        if step % eval_every == 0:
            history.append({
                "eval_loss": 2.5 * math.exp(-step / 400), "eval_i2t_r1": 1 - math.exp(-step / 300), "eval_i2t_r5": 0.99,
                "eval_t2i_r1": 0.5, "eval_i2t_mean_rank": 3.0, "eval_t2i_median_rank": 1.0,
                "eval_runtime": 3.2, "eval_samples_per_second": 100.0, "eval_steps_per_second": 4.0, "epoch": step / 50, "step": step,
            })
    history.append({"train_runtime": 100.0, "train_samples_per_second": 50.0, "train_loss": 0.5, "total_flos": 1e12,
                    "epoch": 20.0, "step": steps})
    return history


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- Training curves -----------------------------------------------------------------------------------------


def test_plot_training_curves_writes_a_png(tmp_path):
    path = plot_training_curves(fake_history(), str(tmp_path / "curves" / "training_curves.png"))
    assert path == str(tmp_path / "curves" / "training_curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    # Six panels on two rows of three at 100 dpi: about 1260 x 580.
    assert 800 <= width <= 2000 and 400 <= height <= 1500, image.size
    assert pixels.std() > 10, "the image is blank"


def test_training_curves_grouped_and_bookkeeping_left_out():
    curves = collect_curves(fake_history())
    assert set(curves) == {
        "loss", "learning_rate", "grad_norm", "logit_scale", "eval_loss", "eval_i2t_r1", "eval_i2t_r5", "eval_t2i_r1",
        "eval_i2t_mean_rank", "eval_t2i_median_rank",
    }
    assert len(curves["loss"][0]) == 100 and len(curves["eval_loss"][0]) == 10
    assert group_curves(list(curves)) == [
        ("loss", ["loss", "eval_loss"]),
        ("learning rate", ["learning_rate"]),
        ("gradient norm", ["grad_norm"]),
        ("logit scale", ["logit_scale"]),
        ("recall@k", ["eval_i2t_r1", "eval_i2t_r5", "eval_t2i_r1"]),
        ("rank (lower is better)", ["eval_i2t_mean_rank", "eval_t2i_median_rank"]),
    ]
    caption_and_vqa = ["eval_bleu_1", "eval_bleu_4", "eval_cider", "eval_rouge_l", "eval_vqa_accuracy", "eval_vqa_accuracy_yes_no"]
    assert group_curves(caption_and_vqa) == [
        ("BLEU", ["eval_bleu_1", "eval_bleu_4"]),
        ("cider", ["eval_cider"]),
        ("rouge_l", ["eval_rouge_l"]),
        ("accuracy", ["eval_vqa_accuracy", "eval_vqa_accuracy_yes_no"]),
    ]


@pytest.mark.parametrize(
    "history",
    [[], None, [{"train_runtime": 3.0, "train_loss": 1.0, "epoch": 1.0, "step": 5}], [{"loss": "nan?", "step": 1}], [{"loss": 1.0}]],
    ids=["empty", "none", "summary-only", "string-loss", "no-step"],
)
def test_plot_training_curves_returns_none_when_nothing_to_plot(tmp_path, history):
    path = tmp_path / "curves.png"
    assert plot_training_curves(history, str(path)) is None
    assert not path.exists()


def test_plot_training_curves_survives_odd_histories(tmp_path):
    history = [
        {"loss": float("nan"), "learning_rate": 1e-4, "step": 1},
        {"loss": 2.0, "learning_rate": "1e-4", "grad_norm": float("inf"), "step": 2},
        {"loss": True, "note": "resumed", "step": "3"},
        "not a dict",
        {"eval_accuracy": 0.5, "eval_label": "x", "step": 2},  # a single evaluation point
        {"my_temperature": 0.07, "step": 2},
    ]
    curves = collect_curves(history, extra_keys=("my_temperature",))
    assert curves["loss"] == ([2.0], [2.0], 1)  # the NaN is dropped and counted, the bool and string skipped
    assert curves["grad_norm"] == ([], [], 1)
    assert set(curves) == {"loss", "learning_rate", "grad_norm", "eval_accuracy", "my_temperature"}
    path = plot_training_curves(history, str(tmp_path / "odd.png"), extra_keys=("my_temperature",))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300


# --- Retrieval gallery ---------------------------------------------------------------------------------------


def test_retrieval_gallery_marks_hits_for_identity_embeddings(tmp_path):
    """Two captions per image, each embedded exactly as its image: both own captions come first."""
    images = make_images(3)
    text_to_image = [0, 0, 1, 1, 2, 2]
    image_embeds = torch.eye(3, 4)
    text_embeds = image_embeds[text_to_image]
    captions = [f"caption {t} of image {i}" for t, i in enumerate(text_to_image)]
    page = read(write_retrieval_gallery(str(tmp_path / "g.html"), images, None, captions, text_to_image, image_embeds, text_embeds, top_k=3))

    rows = item_rows(page, "image-to-text")
    assert len(rows) == 3
    for image, row in enumerate(rows):
        marks = re.findall(r'<li class="(hit|miss)">', row)
        assert marks == ["hit", "hit", "miss"], (image, marks)
        hits = re.findall(r'<li class="hit">(caption \d of image \d)', row)
        assert hits == [f"caption {2 * image} of image {image}", f"caption {2 * image + 1} of image {image}"]
    assert sort_values(rows) == [1.0, 1.0, 1.0]

    rows = item_rows(page, "text-to-image")
    assert len(rows) == 3  # one query per shown image: its first caption
    for image, row in enumerate(rows):
        tiles = re.findall(r'<figure class="tile( hit)?">', row)
        assert tiles == [" hit", "", ""], (image, tiles)
        assert f"caption {2 * image} of image {image}" in row


def test_retrieval_gallery_ranks_misses_like_utils_retrieval(tmp_path):
    """Captions of images 0 and 1 swapped: each image's top caption is the other's; ranks equal utils.retrieval's."""
    from utils.retrieval import retrieval_ranks

    image_embeds = torch.eye(4)
    text_embeds = image_embeds[[1, 0, 2, 3]]
    text_to_image = torch.arange(4)
    captions = ["a", "b", "c", "d"]
    page = read(write_retrieval_gallery(str(tmp_path / "g.html"), make_images(4), [f"img{i}" for i in range(4)],
                                        captions, text_to_image, image_embeds, text_embeds, top_k=2))
    i2t_rows, t2i_rows = item_rows(page, "image-to-text"), item_rows(page, "text-to-image")
    # Image 0: caption 1 scores 1 (a miss), then its own caption 0 first among the zeros.
    marks = [re.findall(r'<li class="(hit|miss)">', row) for row in i2t_rows]
    assert marks == [["miss", "hit"], ["miss", "hit"], ["hit", "miss"], ["hit", "miss"]]
    i2t, t2i = retrieval_ranks(image_embeds, text_embeds, text_to_image)
    assert sort_values(i2t_rows) == i2t.float().tolist() == [2.0, 2.0, 1.0, 1.0]
    assert sort_values(t2i_rows) == t2i.float().tolist()
    i2t_section = page.split('id="image-to-text"')[1].split("</section>")[0]
    assert re.findall(r'<tr class="item ([a-z]+)">', i2t_section) == ["partial", "partial", "good", "good"]


def test_retrieval_gallery_caps_rows_embeds_images_and_escapes(tmp_path):
    count = 10
    text_to_image = [i // 2 for i in range(2 * count)]
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.nn.functional.normalize(torch.randn(count, 8, generator=generator), dim=-1)
    text_embeds = torch.nn.functional.normalize(image_embeds[text_to_image] + 0.3 * torch.randn(2 * count, 8, generator=generator), dim=-1)
    captions = [f"caption {t}" for t in range(2 * count)]
    captions[1] = XSS
    names = [f"img{i}.jpg" for i in range(count)]
    names[0] = "<b>bold</b>.jpg"
    path = write_retrieval_gallery(str(tmp_path / "g.html"), make_images(count), names, captions, text_to_image, image_embeds.numpy(),
                                   text_embeds, top_k=5, max_items=4, summary={"<img src=x onerror=alert(1)>": 0.5, "eval_i2t_r1": 0.25})
    page = read(path)
    assert len(item_rows(page, "image-to-text")) == 4
    assert len(item_rows(page, "text-to-image")) == 4
    assert "Showing 4 of 10 images" in page
    assert page.count("<script") == 1  # the page's own sort script only
    assert ESCAPED_XSS in page and "&lt;b&gt;bold&lt;/b&gt;.jpg" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>bold</b>" not in page and "<img src=x" not in page
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 4 + 4 * 5  # one per shown image, five per text query
    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (160, 120)


def test_retrieval_gallery_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="one entry per item"):
        write_retrieval_gallery(str(tmp_path / "g.html"), make_images(2), None, ["a", "b", "c"], [0, 1], torch.eye(2), torch.eye(2))
    with pytest.raises(ValueError, match="text_to_image"):
        write_retrieval_gallery(str(tmp_path / "g.html"), make_images(2), None, ["a", "b"], [0, 2], torch.eye(2), torch.eye(2))


# --- Caption gallery -----------------------------------------------------------------------------------------


def test_caption_gallery_worst_first_capped_and_escaped(tmp_path):
    count = 8
    cider = [0.9, 0.1, float("nan"), 2.5, 0.0, 1.2, 0.4, 0.05]
    predictions = [f"prediction {i}" for i in range(count)]
    predictions[3] = XSS
    references = [[f"reference {i}a", f"reference {i}b"] for i in range(count)]
    path = write_caption_gallery(str(tmp_path / "c.html"), make_images(count), None, predictions, references, cider,
                                 max_items=6, summary={"cider": 0.7})
    page = read(path)
    rows = item_rows(page)
    assert len(rows) == 6 and "Showing 6 of 8 images" in page
    values = sort_values(rows)
    assert values[:5] == [0.0, 0.1, 0.9, 1.2, 2.5] and math.isnan(values[5])  # the first six, worst first, NaN last
    assert "prediction 4" in rows[0] and "reference 4a" in rows[0] and "reference 4b" in rows[0]
    assert "prediction 6" not in page and "prediction 7" not in page
    assert page.count("data:image/jpeg;base64,") == 6
    assert page.count("<script") == 1 and ESCAPED_XSS in page
    assert 'aria-sort="ascending"' in page  # the CIDEr column is marked as the current sort


# --- VQA gallery ---------------------------------------------------------------------------------------------


def vqa_items() -> list[dict]:
    images = make_images(3)
    items = []
    specs = [  # (answer type, prediction, annotators' answers)
        ("yes/no", "yes", ["yes"] * 10),
        ("yes/no", "no", ["yes"] * 8 + ["no"] * 2),
        ("number", "2", ["2"] * 2 + ["3"] * 8),
        ("number", "3", ["3"] * 10),
        ("number", "4", ["3"] * 10),
        ("other", "red", ["blue"] * 10),
        ("other", "blue", ["blue"] * 10),
    ]
    for i, (answer_type, prediction, answers) in enumerate(specs):
        # Both spellings of the top answers: (answer, score) pairs and predictions.jsonl's dicts.
        top_k = [(prediction, 0.7), (answers[-1], 0.2)]
        if i % 2:
            top_k = [{"answer": answer, "score": score} for answer, score in top_k]
        items.append({
            "image": images[i % 3], "question": f"question {i}?", "prediction": prediction, "top_k": top_k, "answers": answers,
            "accuracy": vqa_accuracy(prediction, answers), "answer_type": answer_type, "question_id": 100 + i,
        })
    items.append({"image": None, "question": XSS, "prediction": "cat", "top_k": [("cat", 0.9)], "answers": None,
                  "accuracy": None, "answer_type": "other"})
    return items


def test_vqa_gallery_grouped_worst_first(tmp_path):
    page = read(write_vqa_gallery(str(tmp_path / "v.html"), vqa_items(), summary={"vqa_accuracy": 0.5}))
    sections = re.findall(r'<section class="answer-type" id="(group-\d)"><h2>([^<]+?) <span', page)
    assert [name for _, name in sections] == ["number", "other", "yes/no"]
    counts = {name: len(item_rows(page, anchor)) for anchor, name in sections}
    assert counts == {"number": 3, "other": 3, "yes/no": 2}
    # Mean over the shown questions with a known accuracy: number (0.6 + 1 + 0) / 3, other (0 + 1) / 2.
    assert "number <span class=\"score\">3 questions shown, their mean accuracy 0.533</span>" in page
    assert "other <span class=\"score\">3 questions shown, their mean accuracy 0.500</span>" in page
    for anchor, name in sections:
        values = sort_values(item_rows(page, anchor))
        known = [v for v in values if not math.isnan(v)]
        assert known == sorted(known), (name, values)
        assert all(math.isnan(v) for v in values[len(known):]), "unknown accuracy goes last"
    number_rows = item_rows(page, sections[0][0])
    assert "question 4?" in number_rows[0] and "question 3?" in number_rows[-1]  # 0.0 first, 1.0 last
    # "2" gets credit from two annotators (0.6); the second-ranked "3" is credited too.
    assert re.findall(r'<li class="(hit|miss)">', number_rows[1]) == ["hit", "hit"]
    assert re.findall(r'<li class="(hit|miss)">', number_rows[0]) == ["miss", "hit"]
    assert page.count("<script") == 1 and ESCAPED_XSS in page
    assert page.count("data:image/jpeg;base64,") == 7 and "no image" in page


def test_vqa_gallery_reads_image_paths_against_a_base_dir(tmp_path):
    make_images(1)[0].save(tmp_path / "scene.png")
    items = [{"image": "scene.png", "question": "q?", "prediction": "a", "top_k": [("a", 0.5)], "answers": ["a"], "accuracy": 1.0,
              "answer_type": None}]
    page = read(write_vqa_gallery(str(tmp_path / "v.html"), items, image_base_dir=str(tmp_path)))
    assert page.count("data:image/jpeg;base64,") == 1 and "all questions" in page


def test_vqa_gallery_caps_items_and_names_missing_keys(tmp_path):
    page = read(write_vqa_gallery(str(tmp_path / "v.html"), vqa_items(), max_items=4))
    assert len(item_rows(page)) == 4 and "Showing 4 of 8 questions" in page
    with pytest.raises(ValueError, match="prediction"):
        write_vqa_gallery(str(tmp_path / "v.html"), [{"question": "why?"}])


def test_vqa_gallery_computes_missing_accuracies_from_the_answers(tmp_path):
    """An item without an `accuracy` key is scored from its `answers` (the official VQA accuracy); without answers
    its accuracy is unknown and it goes last."""
    items = [{k: v for k, v in item.items() if k != "accuracy"} for item in vqa_items()]
    page = read(write_vqa_gallery(str(tmp_path / "v.html"), items))
    rows = {re.search(r'<div class="question">([^<]+)</div>', row).group(1): sort_values([row])[0] for row in item_rows(page)}
    for item in vqa_items()[:-1]:
        assert rows[item["question"]] == pytest.approx(item["accuracy"], abs=1e-12), item["question"]
    assert math.isnan(rows[ESCAPED_XSS])


def test_thumbnails_are_shown_at_the_gallery_size_small_images_enlarged(tmp_path):
    """A 400x300 image is embedded shrunk to 160x120; a 40x30 one is embedded as it is and shown at 160x120 with
    crisp pixels; both take the same room on the page."""
    small, large = Image.new("RGB", (40, 30), (200, 30, 30)), make_images(1)[0]
    page = read(write_caption_gallery(str(tmp_path / "c.html"), [small, large], ["small", "large"], ["a", "b"], [["a"], ["b"]], [0.1, 0.2]))
    shown = re.findall(r'<img class="([^"]+)" src="data:image/jpeg;base64,([^"]+)" alt="(\w+)" width="(\d+)" height="(\d+)">', page)
    assert [(css, name, width, height) for css, _, name, width, height in shown] == [
        ("thumb enlarged", "small", "160", "120"), ("thumb", "large", "160", "120")]
    embedded = []
    for _, data, *_ in shown:
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumbnail:
            embedded.append(thumbnail.size)
    assert embedded == [(40, 30), (160, 120)]
    assert "img.thumb.enlarged { image-rendering: pixelated; }" in page


def test_lazy_images_decode_only_what_is_shown_and_survive_a_bad_file(tmp_path):
    make_images(1)[0].save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    read_rows = []

    class Rows(list):
        def __getitem__(self, index):
            read_rows.append(index)
            return super().__getitem__(index)

    images = LazyImages(Rows([{"file": "good.png"}, {"file": "bad.jpg"}, {"file": "absent.jpg"}]), "file", str(tmp_path))
    page = read(write_caption_gallery(str(tmp_path / "c.html"), images, ["good", "bad", "absent"], ["a", "b", "c"],
                                      [["a"], ["b"], ["c"]], [1.0, 0.5, 0.0], max_items=2))
    assert page.count("data:image/jpeg;base64,") == 1 and page.count(">no image<") == 1
    assert sorted(read_rows) == [0, 1]  # beyond max_items: never read


# --- Model card ----------------------------------------------------------------------------------------------


def test_model_card_section(tmp_path):
    png = str(tmp_path / "training_curves.png")
    command = ["python", "run_clip.py", "--output_dir", "out", "--hub_token", "hf_secret", "--tokenizer_name=tok", "--api_key=k1"]
    metrics = {"eval_i2t_r1": 0.51234567, "epoch": 20, "train_runtime": 100.5, "note": "a|b"}
    section = build_model_card_section(command, "COCO val, 5000 images", metrics, png)
    assert "```bash\npython run_clip.py --output_dir out --hub_token '<redacted>' --tokenizer_name=tok '--api_key=<redacted>'\n```" in section
    assert "hf_secret" not in section and "k1" not in section
    assert "| eval_i2t_r1 | 0.5123 |" in section and "| epoch | 20 |" in section and "| note | a\\|b |" in section
    assert "COCO val, 5000 images" in section
    assert "![training curves](training_curves.png)" in section
    assert "![training curves](plots/c.png)" in build_model_card_section(["x"], "", {}, str(tmp_path / "plots" / "c.png"), str(tmp_path))
    assert "![" not in build_model_card_section(["x"], "", {}, None)

    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# model\n")
    readme = append_to_model_card(str(tmp_path), section)
    text = read(readme)
    assert text.startswith("---\nlicense: mit\n---\n# model\n") and text.endswith(section)


# --- How a gallery looks ---------------------------------------------------------------------------------------


@needs_chromium
def test_gallery_renders_in_headless_chromium(tmp_path):
    page = write_vqa_gallery(str(tmp_path / "vqa.html"), vqa_items(), summary={"vqa_accuracy": 0.5})
    screenshot = tmp_path / "vqa.png"
    run_chromium(page, f"--screenshot={screenshot}", "--window-size=1280,1200")
    with Image.open(screenshot) as image:
        assert image.size == (1280, 1200)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10, "blank screenshot"
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 100, f"only {len(colours)} colours: the thumbnails did not render"
    # The green of a correct answer and the red of a wrong one are on screen.
    assert (np.abs(pixels.astype(int) - (0x1A, 0x7F, 0x37)).sum(-1) < 30).sum() > 50
    assert (np.abs(pixels.astype(int) - (0xCF, 0x22, 0x2E)).sum(-1) < 30).sum() > 50


@needs_chromium
def test_header_click_sorts_in_the_browser(tmp_path):
    """One click on the CIDEr header (sorted worst first) puts the best first; missing scores stay last."""
    cider = [0.5, float("nan"), 2.0, 0.1]
    path = write_caption_gallery(str(tmp_path / "c.html"), make_images(4), None, list("abcd"), [["x"]] * 4, cider)
    with open(path, encoding="utf-8") as f:
        page = f.read().replace("</body>", '<script>document.querySelectorAll("th.sortable")[1].click();</script></body>')
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    dom = run_chromium(path, "--dump-dom").stdout
    values = sort_values(item_rows(dom))
    assert values[:3] == [2.0, 0.5, 0.1] and math.isnan(values[3])
    assert 'aria-sort="descending"' in dom
