"""See what was learned: training curves, HTML galleries of predictions, and a model card section.

What the training scripts call after training and evaluation (on the main process only):

    from utils.report import (LazyImages, append_to_model_card, build_model_card_section, plot_training_curves,
                              write_caption_gallery)

    png = plot_training_curves(trainer.state.log_history, os.path.join(output_dir, "training_curves.png"))
    write_caption_gallery(os.path.join(output_dir, "gallery.html"), LazyImages(rows, "image", base_dir),
                          names, predictions, references, per_image_cider, summary=eval_metrics)
    section = build_model_card_section(["python", *sys.argv], "COCO Karpathy val, 5000 images", metrics, png)
    append_to_model_card(output_dir, section)

A gallery is one self-contained HTML file: thumbnails are embedded as base64 JPEG (160 px by default), the
style and the few lines of JavaScript that sort tables on a header click are inline, so the file opens from
disk or a mail attachment with no server. Every piece of text from the data or the model goes through
`html.escape`. Galleries show a fair sample, the first `max_items` items in data order, and order them worst
first where the task has a per-item score; the page header says how many of how many are shown.

Reporting runs after hours of training, so it degrades instead of failing where it can: `plot_training_curves`
returns None when there is nothing to plot, and an image that does not decode becomes a grey placeholder.
Inputs that do not fit together (lists of different lengths) still raise ValueError, before any image is read.
Nothing runs at import; matplotlib is imported on the first plot, and only its Agg canvas is used (no pyplot,
no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .images import ImageLoadError, load_image, to_rgb

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 160  # longest side, pixels
SMALL_THUMBNAIL_SIZE = 96  # the retrieved images of a text->image row
JPEG_QUALITY = 80
SMALL_IMAGE_JPEG_QUALITY = 95  # an image the browser enlarges: its JPEG blocks would be enlarged too

# --- Training curves -----------------------------------------------------------------------------------------

# Entries of `state.log_history` that are bookkeeping, not curves.
_NOT_CURVES = re.compile(r"(^|_)(runtime|samples_per_second|steps_per_second|total_flos|epoch|step)$|^num_input_tokens_seen$")
# Panels, in this order for the training-side keys; eval metrics follow in the order they first appear. A key
# goes to the first panel whose pattern matches its name without the "eval_" prefix; the rest get one each.
_PANELS = (
    ("loss", re.compile(r"(^|_)loss$")),
    ("learning rate", re.compile(r"(^|_)learning_rate$")),
    ("gradient norm", re.compile(r"(^|_)grad_norm$")),
    ("logit scale", re.compile(r"(^|_)logit_scale$")),
    ("recall@k", re.compile(r"(^|_)r\d+$|recall")),
    ("rank (lower is better)", re.compile(r"(^|_)(mean|median)_rank$")),
    ("BLEU", re.compile(r"^bleu_\d$")),
    ("accuracy", re.compile(r"accuracy")),
)
_TRAINING_KEYS = ("loss", "learning_rate", "grad_norm", "logit_scale")


def _as_number(value) -> float | None:
    """A float for an int/float/numpy scalar, None for anything else (strings, bools, None, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def collect_curves(log_history: list[dict], extra_keys: tuple = ()) -> dict[str, tuple[list[float], list[float], int]]:
    """key -> (steps, finite values, number of non-finite values dropped), for the keys worth plotting.

    Plotted: the training loss, learning rate, gradient norm and `logit_scale` (under any prefix), every
    `eval_*` metric except runtime and throughput, and `extra_keys`. Entries without a numeric `step`, and
    values that are not numbers, are skipped; NaN and inf are dropped from the line and counted.
    """
    curves: dict[str, tuple[list[float], list[float], int]] = {}
    for entry in log_history or []:
        if not isinstance(entry, dict):
            continue
        step = _as_number(entry.get("step"))
        if step is None or not math.isfinite(step):
            continue
        for key, raw in entry.items():
            if not isinstance(key, str) or _NOT_CURVES.search(key):
                continue
            wanted = key.startswith("eval_") or key in extra_keys or key in _TRAINING_KEYS or key.endswith("_logit_scale")
            value = _as_number(raw)
            if not wanted or value is None:
                continue
            steps, values, dropped = curves.setdefault(key, ([], [], 0))
            if math.isfinite(value):
                steps.append(step)
                values.append(value)
            else:
                curves[key] = (steps, values, dropped + 1)
    return {k: v for k, v in curves.items() if v[0] or v[2]}


def group_curves(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Keys -> [(panel title, keys)]: losses together, recalls together, ranks, BLEU, accuracies; others alone."""
    panels: dict[str, list[str]] = {}
    for key in keys:
        name = key[len("eval_"):] if key.startswith("eval_") else key
        title = next((title for title, pattern in _PANELS if pattern.search(name)), name)
        panels.setdefault(title, []).append(key)
    fixed = [title for title, _ in _PANELS[:4] if title in panels]
    return [(title, panels[title]) for title in fixed + [t for t in panels if t not in fixed]]


def _curve_label(key: str) -> str:
    if key == "loss":
        return "train"
    if key == "eval_loss":
        return "eval"
    return key[len("eval_"):] if key.startswith("eval_") else key


def plot_training_curves(log_history: list[dict], path: str, extra_keys: tuple = ()) -> str | None:
    """Write a PNG of the Trainer's `state.log_history`, one small panel per group of metrics over steps.

    Panels: loss (train and eval together), learning rate, gradient norm, logit scale, then the eval metrics
    grouped (recalls together, ranks, BLEU-1..4, accuracies; every other metric alone). `extra_keys` names
    further keys of the history to plot (e.g. a custom `self.log` value). A legend entry says how many
    non-finite values were dropped (a loss that went NaN shows up there). Returns `path`, or None, writing
    nothing, when the history holds no curve; never raises on odd histories (missing keys, one point,
    strings, NaN).
    """
    curves = collect_curves(log_history, tuple(extra_keys))
    panels = [(title, keys) for title, keys in group_curves(list(curves)) if any(curves[k][0] for k in keys)]
    if not panels:
        logger.info("No training curves to plot: the log history holds no numeric loss, learning rate or metric")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.9 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            steps, values, dropped = curves[key]
            if not steps:
                continue
            label = _curve_label(key) + (f" ({dropped} non-finite dropped)" if dropped else "")
            # Evaluations are few: mark each point. A training curve gets markers only when it is short.
            marker = "o" if key.startswith("eval_") or len(steps) <= 20 else None
            linestyle = "--" if "t2i" in key else "-"  # the two retrieval directions apart
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, linestyle=linestyle, label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("step", fontsize=8)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        if len(keys) > 1 or any(curves[k][2] for k in keys):
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    logger.info("Wrote the training curves (%d panels) to %s", len(panels), path)
    return path


# --- HTML building blocks ------------------------------------------------------------------------------------


class LazyImages(Sequence):
    """Images decoded only when a gallery shows them: `rows[i][column]` (or `rows[i]` without a column) through
    `utils.images.load_image`, relative paths resolved against `base_dir`. For an evaluation set of thousands
    of images, of which a gallery shows fifty:

        LazyImages(dataset.images, dataset.image_column, dataset.base_dir)   # an ImageTextDataset's rows
    """

    def __init__(self, rows, column: str | None = None, base_dir: str | None = None):
        self.rows, self.column, self.base_dir = rows, column, base_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Image.Image | None:
        value = self.rows[index]
        value = value if self.column is None else value[self.column]
        return None if value is None else load_image(value, self.base_dir)


def _encode_thumbnail(image, size: int, quality: int) -> tuple[str, int, int]:
    """(data URI, width, height) of the image shrunk to `size` px on its longest side (never enlarged)."""
    image = to_rgb(image if isinstance(image, Image.Image) else load_image(image))
    thumbnail = image.copy()
    thumbnail.thumbnail((size, size), Image.Resampling.LANCZOS)
    if max(thumbnail.size) < size:
        quality = max(quality, SMALL_IMAGE_JPEG_QUALITY)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), *thumbnail.size


def image_to_data_uri(image, size: int = THUMBNAIL_SIZE, quality: int = JPEG_QUALITY) -> str:
    """A `data:image/jpeg;base64,...` URI of the image shrunk to `size` px on its longest side (never enlarged).
    `image` is a PIL image or anything `utils.images.load_image` decodes (a path, bytes, a datasets value)."""
    return _encode_thumbnail(image, size, quality)[0]


def thumbnail_html(image, size: int = THUMBNAIL_SIZE, alt: str = "") -> str:
    """An <img> with the image embedded, or a grey placeholder when there is no image or it does not decode.

    Every thumbnail is shown `size` px on its longest side, so a gallery's columns line up and names under
    the images do not wrap letter by letter. An image smaller than that is embedded at its own size and
    enlarged by the browser with crisp pixels and saved at a higher JPEG quality (a 32 px training image
    stays readable, the file stays small).
    """
    if image is not None:
        try:
            uri, width, height = _encode_thumbnail(image, size, JPEG_QUALITY)
            scale = size / max(width, height)
            css = "thumb" + (" enlarged" if scale > 1 else "")
            return (f'<img class="{css}" src="{uri}" alt="{html.escape(alt)}" '
                    f'width="{max(1, round(width * scale))}" height="{max(1, round(height * scale))}">')
        except (ImageLoadError, OSError, ValueError) as err:
            logger.warning("Gallery: no thumbnail for %s: %s", alt or "an image", err)
    return f'<div class="thumb missing" style="width:{size}px;height:{size}px">no image</div>'


class _Thumbnails:
    """Thumbnails of a sequence of images, each decoded and encoded once per size however often it is shown."""

    def __init__(self, images, names: Sequence[str]):
        self.images, self.names, self.cache = images, names, {}

    def __call__(self, index: int, size: int = THUMBNAIL_SIZE) -> str:
        if (index, size) not in self.cache:
            try:
                image = self.images[index]
            except (ImageLoadError, OSError, ValueError) as err:
                logger.warning("Gallery: image %s does not load: %s", self.names[index], err)
                image = None
            self.cache[index, size] = thumbnail_html(image, size, alt=str(self.names[index]))
        return self.cache[index, size]


def format_value(value) -> str:
    """A metric for display: 4 significant digits for floats, as is for ints, escaped text otherwise."""
    number = _as_number(value)
    if number is None:
        return html.escape(str(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{number:.4g}"


def text_cell(text, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{html.escape(str(text))}</td>"


def number_cell(value: float | None, text: str | None = None, css: str = "num") -> str:
    """A right-aligned cell the sort script orders by `data-value` (missing values sort last)."""
    number = _as_number(value)
    if number is None or math.isnan(number):
        sort_value = "NaN"
    else:
        sort_value = repr(number) if math.isfinite(number) else ("Infinity" if number > 0 else "-Infinity")  # JS parseFloat spelling
    shown = text if text is not None else ("–" if number is None else format_value(value))
    return f'<td class="{css}" data-value="{sort_value}">{shown}</td>'


def render_table(headers: list[tuple[str, bool]], rows: list[list[str]], sorted_by: int | None = None, ascending: bool = True,
                 row_classes: list[str] | None = None, widths: list[str] | None = None) -> str:
    """A table of `rows` (lists of <td> strings from `text_cell`/`number_cell`/raw HTML). `headers` is
    [(label, sortable)]: a sortable column re-sorts on click by its cells' `data-value`. `sorted_by` marks
    the column the rows already come sorted by; `widths` (CSS widths per column) keep several tables of a
    page aligned. Each row is a `<tr class="item">` (tests count them)."""
    head = []
    for column, (label, sortable) in enumerate(headers):
        attributes = ' class="sortable"' if sortable else ""
        if column == sorted_by:
            attributes += f' aria-sort="{"ascending" if ascending else "descending"}"'
        if widths and widths[column]:
            attributes += f' style="width:{widths[column]}"'
        head.append(f"<th{attributes}>{html.escape(label)}</th>")
    body = []
    for i, cells in enumerate(rows):
        css = "item" + (f" {row_classes[i]}" if row_classes and row_classes[i] else "")
        body.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    return '<table class="gallery"><thead><tr>' + "".join(head) + "</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def html_list(items: list[str], ordered: bool = False, css: str = "", item_classes: list[str] | None = None) -> str:
    """<ul>/<ol> of already-rendered (escaped) HTML items, each <li> with its class from `item_classes`."""
    tag = "ol" if ordered else "ul"
    attribute = f' class="{css}"' if css else ""
    classes = item_classes or [""] * len(items)
    lis = "".join(f'<li class="{c}">{item}</li>' if c else f"<li>{item}</li>" for item, c in zip(items, classes))
    return f"<{tag}{attribute}>{lis}</{tag}>"


_CSS = """
:root { --border: #d0d7de; --muted: #57606a; --good: #1a7f37; --good-bg: #dafbe1; --bad: #cf222e; --bad-bg: #ffebe9; --mid-bg: #fff8c5; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #f6f8fa; }
header { background: #fff; border-bottom: 1px solid var(--border); padding: 18px 28px 14px; }
h1 { font-size: 21px; margin: 0 0 10px; }
h2 { font-size: 17px; margin: 28px 0 4px; }
.summary { display: flex; flex-wrap: wrap; gap: 6px; margin: 0; padding: 0; list-style: none; }
.summary li { background: #f6f8fa; border: 1px solid var(--border); border-radius: 999px; padding: 2px 11px; font-size: 13px; }
.summary b { font-variant-numeric: tabular-nums; }
.note, .caption-note { color: var(--muted); margin: 8px 0 0; }
main { padding: 4px 28px 40px; max-width: 1400px; }
nav.toc { margin: 14px 0 0; } nav.toc a { margin-right: 14px; }
table.gallery { border-collapse: separate; border-spacing: 0; width: 100%; background: #fff; border: 1px solid var(--border);
                border-radius: 6px; margin-top: 10px; }
th, td { padding: 8px 10px; border-bottom: 1px solid #eaeef2; vertical-align: top; text-align: left; }
tbody tr:last-child td { border-bottom: none; }
th { background: #f6f8fa; font-weight: 600; font-size: 13px; white-space: nowrap; position: sticky; top: 0; z-index: 1; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable::after { content: " \\2195"; color: #8c959f; }
th[aria-sort="ascending"]::after { content: " \\25B2"; color: #1f2328; }
th[aria-sort="descending"]::after { content: " \\25BC"; color: #1f2328; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; font-weight: 600; }
td.index { color: var(--muted); font-variant-numeric: tabular-nums; }
td.image { width: 1%; }
img.thumb { display: block; border-radius: 4px; }
img.thumb.enlarged { image-rendering: pixelated; }
.thumb.missing { display: flex; align-items: center; justify-content: center; background: #eaeef2; color: var(--muted);
                 border-radius: 4px; font-size: 12px; }
.name { color: var(--muted); font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; max-width: 160px; }
ul, ol { margin: 0; padding-left: 20px; }
li { margin: 1px 0; }
.prediction { font-size: 15px; font-weight: 600; }
.score { color: var(--muted); font-variant-numeric: tabular-nums; font-size: 12px; margin-left: 6px; }
li.hit, span.hit { color: var(--good); font-weight: 600; }
li.hit::marker { content: "\\2713  "; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
figure.tile { margin: 0; padding: 4px; width: 108px; border: 2px solid transparent; border-radius: 6px; text-align: center;
              font-size: 12px; }
figure.tile img.thumb { margin: 0 auto; }
figure.tile.hit { border-color: var(--good); background: var(--good-bg); }
figure.tile figcaption { color: var(--muted); overflow-wrap: anywhere; line-height: 1.3; margin-top: 3px; }
td.query { width: 28%; }
td.query .name { max-width: none; }
.tiles { flex-wrap: nowrap; }
.question { font-size: 14px; }
.question + .prediction::before { content: "\\2192  "; color: var(--muted); font-weight: 400; }
figure.tile.hit figcaption { color: var(--good); }
tr.good td.num { color: var(--good); } tr.bad td.num { color: var(--bad); }
tr.good td:first-child { box-shadow: inset 4px 0 var(--good); } tr.bad td:first-child { box-shadow: inset 4px 0 var(--bad); }
tr.partial td:first-child { box-shadow: inset 4px 0 #d4a72c; }
.bar { display: inline-block; height: 8px; background: #8c959f; border-radius: 2px; vertical-align: middle; margin-left: 6px; }
li.hit .bar { background: var(--good); }
.answers { color: var(--muted); }
.answers .hit { color: var(--good); }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 24px; }
"""

# Sorts a table's rows by the clicked column's data-value; missing values (NaN) go last either way.
_SORT_JS = """
document.querySelectorAll("table.gallery").forEach(function (table) {
  table.querySelectorAll("th.sortable").forEach(function (th) {
    th.addEventListener("click", function () {
      var column = th.cellIndex, body = table.tBodies[0];
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = parseFloat(a.cells[column].dataset.value), y = parseFloat(b.cells[column].dataset.value);
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        return ascending ? x - y : y - x;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    });
  });
});
"""


def render_page(title: str, body: str, summary: dict | None = None, note: str = "") -> str:
    """A complete HTML document: a header with the title, the summary metrics and a note, then `body`."""
    chips = "".join(f"<li>{html.escape(str(k))}: <b>{format_value(v)}</b></li>" for k, v in (summary or {}).items())
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<header>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        + (f'<ul class="summary">{chips}</ul>\n' if chips else "")
        + (f'<p class="note">{html.escape(note)}</p>\n' if note else "")
        + f"</header>\n<main>\n{body}\n</main>\n<footer>Written by utils/report.py. Click a column marked \u2195 to sort.</footer>\n"
        f"<script>{_SORT_JS}</script>\n</body>\n</html>\n"
    )


def write_html(path: str, page: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    logger.info("Wrote %s (%.1f MB)", path, os.path.getsize(path) / 1e6)
    return path


def _check_lengths(**named: Sequence) -> int:
    lengths = {name: len(values) for name, values in named.items() if values is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"gallery inputs must have one entry per item, got lengths {lengths}")
    return next(iter(lengths.values()), 0)


def _names(image_names: Sequence | None, count: int) -> list[str]:
    return [f"#{i}" for i in range(count)] if image_names is None else [str(n) for n in image_names]


def _image_cell(thumbnails: _Thumbnails, index: int) -> str:
    return f'<td class="image">{thumbnails(index)}<div class="name">{html.escape(thumbnails.names[index])}</div></td>'


def _showing(shown: int, total: int, what: str) -> str:
    return f"Showing {shown} of {total} {what}" + (" (the first in data order)" if shown < total else "")


# --- Retrieval -----------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device, in any dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _rank_class(rank: int | None, top_k: int) -> str:
    """Row colour: right at rank 1 (good), within the top k shown (partial), further down (bad)."""
    return "good" if rank == 1 else "partial" if rank is not None and rank <= top_k else "bad"


def write_retrieval_gallery(
    path: str,
    images: Sequence,
    image_names: Sequence[str] | None,
    captions: list[str],
    text_to_image: Sequence[int],
    image_embeds,
    text_embeds,
    top_k: int = 5,
    max_items: int = 50,
    summary: dict | None = None,
    title: str = "Image-text retrieval",
) -> str:
    """Both retrieval directions for the first `max_items` images, scored by dot product as `utils.retrieval`
    scores them (pass L2-normalized embeddings), equal scores ordered by index.

    image -> text: per image, its thumbnail, its own captions, the `top_k` retrieved captions with scores
    (its own ones marked), and the rank of its best own caption. text -> image: the first caption of each of
    those images, its `top_k` retrieved images with scores (the right one framed), and its rank.

    images: N images, as PIL images or any sequence (e.g. `LazyImages`): only shown ones are read.
    captions: all M captions; text_to_image: (M,) the image index of each; embeds: (N, D) and (M, D) arrays
    or tensors.
    """
    image_embeds, text_embeds = _to_numpy(image_embeds), _to_numpy(text_embeds)
    if hasattr(text_to_image, "detach"):
        text_to_image = text_to_image.detach().cpu().numpy()
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    num_images, num_texts = len(image_embeds), len(text_embeds)
    _check_lengths(images=images, image_names=image_names, image_embeds=image_embeds)
    _check_lengths(captions=captions, text_to_image=text_to_image, text_embeds=text_embeds)
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image holds an index outside [0, {num_images}): every caption must name one of the images")
    names = _names(image_names, num_images)
    thumbnails = _Thumbnails(images, names)
    shown = list(range(min(max_items, num_images)))
    k = min(top_k, num_texts, num_images) if num_texts and num_images else 0

    # image -> text: (n, M) scores for the shown images only.
    rows, row_classes = [], []
    scores = image_embeds[shown] @ text_embeds.T if shown and num_texts else np.zeros((len(shown), num_texts))
    for row, image in enumerate(shown):
        order = np.argsort(-scores[row], kind="stable")  # best first, lower index first among equals
        own = text_to_image[order] == image
        rank = int(np.argmax(own)) + 1 if own.any() else None
        top = order[: min(top_k, num_texts)]
        retrieved = [f'{html.escape(str(captions[t]))}<span class="score">{scores[row, t]:.3f}</span>' for t in top]
        marks = ["hit" if text_to_image[t] == image else "miss" for t in top]
        truths = [html.escape(str(captions[t])) for t in np.flatnonzero(text_to_image == image)]
        rows.append([
            _image_cell(thumbnails, image),
            f"<td>{html_list(truths)}</td>",
            f"<td>{html_list(retrieved, ordered=True, item_classes=marks)}</td>",
            number_cell(rank),
        ])
        row_classes.append(_rank_class(rank, k))
    image_section = render_table(
        [("image", False), ("its captions", False), (f"top {top_k} retrieved captions (\u2713 = its own)", False), ("rank", True)],
        rows, row_classes=row_classes,
    )

    # text -> image: the first caption of each shown image.
    queries = [int(np.flatnonzero(text_to_image == image)[0]) for image in shown if (text_to_image == image).any()]
    rows, row_classes = [], []
    scores = text_embeds[queries] @ image_embeds.T if queries else np.zeros((0, num_images))
    for row, t in enumerate(queries):
        order = np.argsort(-scores[row], kind="stable")
        target = int(text_to_image[t])
        rank = int(np.flatnonzero(order == target)[0]) + 1
        tiles = "".join(
            f'<figure class="tile{" hit" if i == target else ""}">{thumbnails(int(i), SMALL_THUMBNAIL_SIZE)}'
            f"<figcaption>{html.escape(names[i])}<br>{'&#10003; ' if i == target else ''}{scores[row, i]:.3f}</figcaption></figure>"
            for i in order[:top_k]
        )
        rows.append([
            f'<td class="query"><div class="prediction">{html.escape(str(captions[t]))}</div>'
            f'<div class="name">of {html.escape(names[target])}</div></td>',
            f'<td><div class="tiles">{tiles}</div></td>',
            number_cell(rank),
        ])
        row_classes.append(_rank_class(rank, k))
    text_section = render_table([("caption", False), (f"top {top_k} retrieved images (framed = right one)", False), ("rank", True)],
                                rows, row_classes=row_classes)

    body = (
        f'<section id="image-to-text"><h2>Image \u2192 text</h2><p class="caption-note">Each image searched among all '
        f"{num_texts} captions; rank: where its best own caption came.</p>{image_section}</section>\n"
        f'<section id="text-to-image"><h2>Text \u2192 image</h2><p class="caption-note">The first caption of each image above, '
        f"searched among all {num_images} images; rank: where its image came.</p>{text_section}</section>"
    )
    note = _showing(len(shown), num_images, "images") + f"; {num_texts} captions. Scores are dot products of the embeddings."
    return write_html(path, render_page(title, body, summary, note))


# --- Captioning ----------------------------------------------------------------------------------------------


def write_caption_gallery(
    path: str,
    images: Sequence,
    image_names: Sequence[str] | None,
    predictions: list[str],
    references: list[list[str]],
    per_image_cider: list[float],
    max_items: int = 50,
    summary: dict | None = None,
    title: str = "Image captioning",
) -> str:
    """Per image: thumbnail, generated caption, reference captions and its CIDEr-D (`score_captions(...)
    .per_image["cider"]`), for the first `max_items` images, worst CIDEr first; a click on a header re-sorts."""
    count = _check_lengths(images=images, image_names=image_names, predictions=predictions, references=references,
                           per_image_cider=per_image_cider)
    names = _names(image_names, count)
    thumbnails = _Thumbnails(images, names)
    shown = list(range(min(max_items, count)))
    shown.sort(key=lambda i: _sort_key(per_image_cider[i]))
    rows, row_classes = [], []
    for i in shown:
        refs = [html.escape(str(r)) for r in references[i]]
        rows.append([
            number_cell(i, css="index"),
            _image_cell(thumbnails, i),
            text_cell(predictions[i], "prediction"),
            f"<td>{html_list(refs)}</td>",
            number_cell(per_image_cider[i], text=_format_score(per_image_cider[i])),
        ])
        cider = _as_number(per_image_cider[i])
        row_classes.append("" if cider is None else "bad" if cider < 0.25 else "good" if cider >= 1.0 else "partial")
    table = render_table([("#", True), ("image", False), ("generated caption", False), ("references", False), ("CIDEr-D", True)],
                         rows, sorted_by=4, row_classes=row_classes)
    note = _showing(len(shown), count, "images") + ", worst CIDEr-D first."
    return write_html(path, render_page(title, f'<section id="captions">{table}</section>', summary, note))


def _sort_key(value) -> tuple[int, float]:
    """Ascending with missing or NaN scores last."""
    number = _as_number(value)
    return (1, 0.0) if number is None or math.isnan(number) else (0, number)


def _format_score(value) -> str:
    number = _as_number(value)
    return "–" if number is None or math.isnan(number) else f"{number:.3f}"


# --- VQA -----------------------------------------------------------------------------------------------------


def _answer_and_score(entry) -> tuple[str, float | None]:
    if isinstance(entry, dict):
        return str(entry.get("answer", "")), _as_number(entry.get("score"))
    answer, score = entry
    return str(answer), _as_number(score)


def write_vqa_gallery(
    path: str,
    items: list[dict],
    max_items: int = 50,
    summary: dict | None = None,
    title: str = "Visual question answering",
    image_base_dir: str | None = None,
) -> str:
    """Questions grouped by answer type, worst accuracy first within each group.

    Each item: `image` (PIL image, or a path or datasets value, decoded only if shown, relative paths against
    `image_base_dir`; None for none), `question`, `prediction`, `top_k`
    ([(answer, score)] or [{"answer", "score"}], best first, as predictions.jsonl writes them), `answers` (the
    annotators'; None when unknown), optional `accuracy` (official VQA accuracy, computed from `answers` when
    the item has no such key; None when unknown), `answer_type` (None puts it in "all questions"); optional
    `image_name`, `question_id`. A top-k answer that the annotators' answers give credit to (VQA accuracy > 0)
    is marked. Pass the whole split: only the first `max_items` are read, and the header says of how many.
    """
    from .vqa import vqa_accuracy

    for i, item in enumerate(items[:max_items]):
        missing = [key for key in ("question", "prediction") if key not in item]
        if missing:
            raise ValueError(f"VQA gallery item {i} has no {missing}; its keys are {sorted(item)}")
    shown = [
        item if "accuracy" in item else {**item, "accuracy": vqa_accuracy(str(item["prediction"]), item["answers"]) if item.get("answers") else None}
        for item in items[:max_items]
    ]
    names = [str(item.get("image_name") or item.get("question_id") or f"#{i}") for i, item in enumerate(shown)]
    thumbnails = _Thumbnails(LazyImages([item.get("image") for item in shown], base_dir=image_base_dir), names)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(shown):
        groups.setdefault(str(item.get("answer_type") or "all questions"), []).append(i)

    sections, toc = [], []
    for group_number, (group, members) in enumerate(sorted(groups.items())):
        members.sort(key=lambda i: _sort_key(shown[i].get("accuracy")))
        rows, row_classes = [], []
        for i in members:
            item = shown[i]
            answers = [str(a) for a in item.get("answers") or []]
            top, marks = [], []
            for answer, score in (_answer_and_score(e) for e in item.get("top_k") or [(item["prediction"], None)]):
                credit = bool(answers) and vqa_accuracy(answer, answers) > 0
                bar = f'<span class="bar" style="width:{max(0.0, min(1.0, score)) * 60:.0f}px"></span>' if score is not None else ""
                shown_score = f'<span class="score">{score:.3f}</span>' if score is not None else ""
                top.append(f"{html.escape(answer)}{shown_score}{bar}")
                marks.append("hit" if credit else "miss")
            human = Counter(answers).most_common()
            human_html = ", ".join(
                f'<span class="{"hit" if vqa_accuracy(str(item["prediction"]), [a]) > 0 else ""}">{html.escape(a)}</span>'
                + (f" \u00d7{n}" if n > 1 else "")
                for a, n in human
            ) or "–"
            accuracy = _as_number(item.get("accuracy"))
            rows.append([
                _image_cell(thumbnails, i),
                f'<td><div class="question">{html.escape(str(item["question"]))}</div>'
                f'<div class="prediction">{html.escape(str(item["prediction"]))}</div></td>',
                f"<td>{html_list(top, ordered=True, item_classes=marks)}</td>",
                f'<td class="answers">{human_html}</td>',
                number_cell(accuracy, text=_format_score(accuracy)),
            ])
            row_classes.append("" if accuracy is None else "good" if accuracy >= 1.0 else "bad" if accuracy == 0 else "partial")
        known = [a for a in (_as_number(shown[i].get("accuracy")) for i in members) if a is not None]
        # Of the shown questions only: the header's per-type metric is the split's, and differs when capped.
        mean = f", their mean accuracy {sum(known) / len(known):.3f}" if known else ""
        anchor = f"group-{group_number}"
        toc.append(f'<a href="#{anchor}">{html.escape(group)} ({len(members)})</a>')
        table = render_table([("image", False), ("question / prediction", False), ("top answers (\u2713 = credited)", False),
                              ("human answers", False), ("accuracy", True)], rows, sorted_by=4, row_classes=row_classes,
                             widths=["1%", "30%", "30%", "27%", "12%"])
        sections.append(f'<section class="answer-type" id="{anchor}"><h2>{html.escape(group)} '
                        f'<span class="score">{len(members)} questions shown{mean}</span></h2>{table}</section>')
    body = (f'<nav class="toc">{"".join(toc)}</nav>\n' if len(groups) > 1 else "") + "\n".join(sections)
    note = _showing(len(shown), len(items), "questions") + ", grouped by answer type, worst first."
    return write_html(path, render_page(title, body, summary, note))


# --- Model card ----------------------------------------------------------------------------------------------

# Values of these flags never go into a model card: it is meant to be published.
_SECRET_FLAG = re.compile(r"^--?[\w.-]*(token|api_key|access_key|password|secret)$", re.IGNORECASE)


def redact_command(command: list[str]) -> list[str]:
    """The command with the values of secret-looking flags (`--hub_token`, `--*_api_key`, ...) replaced."""
    redacted, hide_next = [], False
    for arg in map(str, command):
        if hide_next:
            redacted.append("<redacted>")
            hide_next = False
        elif "=" in arg and _SECRET_FLAG.match(arg.split("=", 1)[0]):
            redacted.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            redacted.append(arg)
            hide_next = bool(_SECRET_FLAG.match(arg))
    return redacted


def build_model_card_section(
    command: list[str], data_description: str, metrics: dict, curves_png: str | None, relative_to: str | None = None
) -> str:
    """Markdown for the README.md model card the Trainer writes: the command that trained the model (secret
    flag values redacted), the data, a metrics table and the training curves image.

    The image is linked relative to `relative_to`, the README's folder (default: the PNG's own folder, i.e.
    the PNG sits next to README.md), so the link works on the Hub and in a local copy alike.
    """
    lines = ["", "## Training run", "", "Command:", "", "```bash", shlex.join(redact_command(command)), "```", ""]
    if data_description:
        lines += ["Data: " + data_description.strip(), ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            number = _as_number(value)
            shown = str(value) if number is None else str(int(value)) if isinstance(value, (int, np.integer)) else f"{number:.4g}"
            lines.append(f"| {_markdown_cell(key)} | {_markdown_cell(shown)} |")
        lines.append("")
    if curves_png:
        link = os.path.relpath(curves_png, relative_to or os.path.dirname(os.path.abspath(curves_png))).replace(os.sep, "/")
        lines += ["Training curves:", "", f"![training curves]({link})", ""]
    return "\n".join(lines)


def _markdown_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def append_to_model_card(output_dir: str, section: str) -> str:
    """Append `section` to output_dir/README.md (created if the Trainer wrote none); returns its path."""
    path = os.path.join(output_dir, "README.md")
    with open(path, "a", encoding="utf-8") as f:
        f.write(section if section.endswith("\n") else section + "\n")
    return path
