#!/usr/bin/env python
"""Visual question answering with ViLT: fine-tune `ViltForQuestionAnswering` on (image, question, answers) rows,
scored with the official VQA accuracy (vqaEval.py).

One process:
    python run_vilt_vqa.py --model_name_or_path dandelin/vilt-b32-mlm \
        --train_file vqav2_train.jsonl --validation_file vqav2_val.jsonl \
        --output_dir out --do_train --do_eval --bf16 --per_device_train_batch_size 32 --learning_rate 1e-4

Several GPUs (each question is scored exactly once):
    torchrun --nproc_per_node 8 run_vilt_vqa.py <the same flags>

Data larger than memory or disk, streamed from webdataset shards (or a Hub dataset) for a fixed number of steps:
    torchrun --nproc_per_node 8 run_vilt_vqa.py <the same flags> --train_file "shards/train-*.tar" --streaming --max_steps 20000

The embedded demo, a tiny ViLT on synthetic shapes, offline on CPU:
    python -m utils.demo vqa --output_dir demo && python run_vilt_vqa.py configs/demo_vqa.yaml

Then ask the trained folder a question: `utils.vqa_inference.answer_question("out", "photo.jpg", "what color is the bus?")`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    ViltForQuestionAnswering,
    ViltProcessor,
    set_seed,
)

from utils.arguments import DataSourceArguments, ModelSourceArguments
from utils.data import (
    EpochAware,
    SetEpochCallback,
    SkippedSamples,
    Split,
    check_bad_fraction,
    check_columns,
    check_images,
    guess_column,
    load_or_replace,
    load_requested_splits,
    log_duplicate_rows,
    sample_seed,
)
from utils.images import ImageLoadError, ImageTransformSpec, load_image, normalize_pixels
from utils.report import write_vqa_gallery
from utils.streams import BadSample, StreamLoaderMixin, TrainingStream, stream_options
from utils.text import resolve_max_length
from utils.towers import pool_last_layers
from utils.training import (
    NonFiniteGuard,
    RunArguments,
    check_disk_space,
    count_parameters,
    parse_args,
    start_run,
    train_evaluate_predict,
    write_run_report,
)
from utils.vqa import build_answer_vocab, build_soft_targets, parse_answers, soft_score_targets, vqa_score_summary

logger = logging.getLogger(__name__)

# ViltImageProcessor caps the longer edge at 1333/800 x the shorter one (COCO's typical aspect ratio).
MAX_LONGER_EDGE, MAX_SHORTER_EDGE = 1333, 800


@dataclass
class ModelArguments(ModelSourceArguments):
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A ViLT checkpoint (Hub id or folder): the MLM one gets a new answer head, a VQA one keeps its answers."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Train from scratch from this ViLT config (name or path)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --config_name: overrides such as 'num_hidden_layers=6,max_image_length=200'."}
    )
    rebuild_answer_vocab: bool = field(
        default=False,
        metadata={"help": "With a checkpoint that already has answers (id2label): replace them by the training set's, with a new output layer."},
    )
    pooled_last_layer: bool = field(
        default=True,
        metadata={"help": "Run the last layer at the [CLS] token the answer head reads, alone (the same answers and gradients; "
                          "fewer FLOPs). --pooled_last_layer false runs the model's own forward."},
    )

    def __post_init__(self):
        if bool(self.model_name_or_path) == bool(self.config_name):
            raise ValueError("Give exactly one model source: --model_name_or_path, or --config_name (from scratch).")
        if self.config_overrides and not self.config_name:
            raise ValueError("--config_overrides only applies with --config_name.")
        if self.config_name and not (self.tokenizer_name and self.image_processor_name):
            raise ValueError("Training from --config_name needs --tokenizer_name and --image_processor_name.")


@dataclass
class DataArguments(DataSourceArguments):
    test_file: str | None = field(default=None, metadata={"help": "Data for --do_predict, same formats; answers optional."})
    question_column: str | None = field(default=None, metadata={"help": "Column of questions (default: question)."})
    answers_column: str | None = field(
        default=None,
        metadata={"help": "Column of the annotators' answers: a list (of strings or {'answer': ...} dicts) or one string (default: answers, answer)."},
    )
    question_id_column: str | None = field(default=None, metadata={"help": "Column of question ids (default: question_id if present)."})
    answer_type_column: str | None = field(
        default=None, metadata={"help": "Column of answer types, for per-type accuracy (default: answer_type if present)."}
    )
    min_answer_count: int = field(
        default=9, metadata={"help": "Answer set: answers that are the majority answer of at least N training questions (9: ViLT/BUTD)."}
    )
    max_answers: int | None = field(default=None, metadata={"help": "Answer set: keep at most the N most frequent answers."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Truncate questions to this many tokens (default and cap: the model's 40)."})
    top_k_predictions: int = field(default=5, metadata={"help": "Answers with their scores per question in predictions.jsonl."})

    def __post_init__(self):
        super().__post_init__()
        if self.min_answer_count < 1:
            raise ValueError(f"--min_answer_count must be >= 1, got {self.min_answer_count}.")
        if self.max_answers is not None and self.max_answers < 1:
            raise ValueError(f"--max_answers must be >= 1 (or unset), got {self.max_answers}.")
        if self.top_k_predictions < 1:
            raise ValueError(f"--top_k_predictions must be >= 1, got {self.top_k_predictions}.")


# --- What a user adapts for their task: reading rows, images, batching, the metrics ---------------------------


@dataclass
class VQARows:
    """One split's questions, read and checked up front. `answers` is None for a split without an answers
    column (a test set to predict). `problems` maps the rows that cannot be used (an empty or non-text question,
    no answers) to the reason: they are skipped and listed, and their answers here are empty."""

    split: Split
    image_column: str
    questions: list[str]
    answers: list[list[str]] | None
    question_ids: list
    answer_types: list[str] | None
    problems: dict[int, str] = field(default_factory=dict)


def resolve_columns(split: Split, data_args: DataArguments) -> dict[str, str | None]:
    """Column names from the flags, else guessed from the first split in use. question_id and answer_type are
    optional, and so are a test split's answers: each split uses them where it has them."""
    names = split.rows.column_names
    check_columns(split, question_id_column=data_args.question_id_column, answer_type_column=data_args.answer_type_column)
    return {
        "image": data_args.image_column or guess_column(split, ("image", "image_path", "file_name", "filepath"), "image_column"),
        "question": data_args.question_column or guess_column(split, ("question",), "question_column"),
        "answers": data_args.answers_column or next((c for c in ("answers", "answer") if c in names), "answers"),
        "question_id": data_args.question_id_column or "question_id",
        "answer_type": data_args.answer_type_column or "answer_type",
    }


def read_vqa_rows(split: Split, columns: dict[str, str | None], answers_required: bool) -> VQARows:
    """Read and check every row's question, answers, id and answer type before the run starts. A row whose
    question is empty or not text, or whose answers are missing or unreadable, goes to `problems` with its column
    and reason (skipped and listed later, within --max_bad_samples_fraction). Questions such as "NA" or "null"
    are text and kept. Without a question_id column, the row number is the id."""
    problems = {}

    def problem(row, column, message):
        problems.setdefault(row, f"column {column!r}: {message}")

    questions = list(split.rows[columns["question"]])
    for row, question in enumerate(questions):
        if not isinstance(question, str) or not question.strip():
            problem(row, columns["question"], f"question {question!r} is not a non-empty string")
            questions[row] = ""
    answers = None
    if columns["answers"] in split.rows.column_names:
        answers = []
        for row, value in enumerate(split.rows[columns["answers"]]):
            try:
                parsed = parse_answers(value)
            except ValueError as err:
                problem(row, columns["answers"], str(err))
                parsed = []
            if not parsed:
                problem(row, columns["answers"], "no answers; every question needs at least one")
            answers.append(parsed)
    elif answers_required:
        check_columns(split, answers_column=columns["answers"])
    names = split.rows.column_names
    question_ids = list(split.rows[columns["question_id"]]) if columns["question_id"] in names else list(range(len(questions)))
    # A csv is read as text: an id written as a whole number is the number (VQAv2's are), "007" stays text.
    question_ids = [int(q) if isinstance(q, str) and q.isdigit() and str(int(q)) == q else q for q in question_ids]
    answer_types = None
    if columns["answer_type"] in names and answers is not None:
        answer_types = list(split.rows[columns["answer_type"]])
        for row, answer_type in enumerate(answer_types):
            if not isinstance(answer_type, str):
                problem(row, columns["answer_type"], f"answer type {answer_type!r} is not a string")
                answer_types[row] = ""
    if answers is not None:
        for row in problems:
            answers[row] = []  # a skipped row adds nothing to the answer set
    return VQARows(split, columns["image"], questions, answers, question_ids, answer_types, problems)


def vilt_resize_size(height: int, width: int, shortest_edge: int, size_divisor: int | None) -> tuple[int, int]:
    """The (H, W) that `ViltImageProcessor.resize` gives: the shorter edge becomes `shortest_edge`, the longer
    one is capped at 1333/800 x that, both rounded half up, then down to a multiple of `size_divisor`. A side
    that this makes 0 (an extreme aspect ratio, where the processor raises) is kept at one `size_divisor`."""
    longer = int(MAX_LONGER_EDGE / MAX_SHORTER_EDGE * shortest_edge)
    if height < width:
        new_height, new_width = shortest_edge, width * (shortest_edge / height)
    else:
        new_height, new_width = height * (shortest_edge / width), shortest_edge
    if max(new_height, new_width) > longer:
        scale = longer / max(new_height, new_width)
        new_height, new_width = new_height * scale, new_width * scale
    new_height, new_width = int(new_height + 0.5), int(new_width + 0.5)
    if size_divisor:
        new_height, new_width = new_height // size_divisor * size_divisor, new_width // size_divisor * size_divisor
    smallest = size_divisor or 1
    return max(new_height, smallest), max(new_width, smallest)


class ViltImageTransform:
    """RGB `PIL.Image` -> uint8 (3, H, W), resized as ViltImageProcessor does; sizes differ between images
    and the collator pads them. With `draft` (training), `min_decode_size` lets a JPEG decode at reduced scale
    while both sides stay >= shortest_edge, which the resize never exceeds. A class so data loader workers can
    pickle it."""

    def __init__(self, spec: ImageTransformSpec, size_divisor: int | None, draft: bool = False):
        if spec.resize_shortest_edge and size_divisor and spec.resize_shortest_edge < size_divisor:
            raise ValueError(f"the image processor's shortest_edge {spec.resize_shortest_edge} is below its size_divisor {size_divisor}")
        self.spec = spec
        self.size_divisor = size_divisor
        self.draft = draft

    @property
    def min_decode_size(self) -> tuple[int, int] | None:
        edge = self.spec.resize_shortest_edge
        return (edge, edge) if self.draft and edge else None

    def __call__(self, image) -> torch.Tensor:
        pixels = F.pil_to_tensor(image)
        if not self.spec.resize_shortest_edge:
            return pixels
        size = vilt_resize_size(pixels.shape[-2], pixels.shape[-1], self.spec.resize_shortest_edge, self.size_divisor)
        return F.resize(pixels, list(size), interpolation=self.spec.interpolation, antialias=True)


class VQADataset(EpochAware, torch.utils.data.Dataset):
    """The rows in `keep` (default: all) -> {"pixel_values": uint8 (3, H, W), "question", "example_index", and
    with targets the sparse soft scores "label_ids"/"label_scores"}. `targets` holds one `soft_score_targets`
    per row of `rows`. `example_index` is the position in this dataset: the evaluation gathers it to find each
    prediction's question. With a `skip_log` (training), an image that fails to decode although its header
    passed the up-front check (a truncated file) is recorded and replaced by another row, drawn from (seed,
    epoch, index) so a resumed run draws the same one and batch sizes stay equal across processes; otherwise it
    raises."""

    def __init__(self, rows: VQARows, transform: ViltImageTransform, targets: list | None = None, keep: list[int] | None = None,
                 skip_log: SkippedSamples | None = None, split_name: str = "train", seed: int = 0):
        self.rows = rows
        self.images = rows.split.rows.select_columns([rows.image_column])
        self.transform = transform
        self.targets = targets
        self.keep = list(range(len(rows.questions))) if keep is None else keep
        self.skip_log, self.split_name, self.seed = skip_log, split_name, seed
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.keep)

    def row(self, index: int) -> int:
        """The row of the data file behind `index`."""
        return self.keep[index]

    def image_value(self, index: int):
        return self.images[self.keep[index]][self.rows.image_column]

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        on_error = self.record_decode_error if self.skip_log is not None else None
        index, image = load_or_replace(self.load_image, index, len(self), rng, on_error)
        row = self.keep[index]
        sample = {"pixel_values": self.transform(image), "question": self.rows.questions[row], "example_index": index}
        if self.targets is not None:
            sample["label_ids"], sample["label_scores"] = self.targets[row]
        return sample

    def load_image(self, index: int):
        return load_image(self.image_value(index), self.rows.split.base_dir, getattr(self.transform, "min_decode_size", None))

    def record_decode_error(self, index: int, err: Exception) -> None:
        self.skip_log.record(self.split_name, self.row(index), self.image_value(index), str(err))


def check_streamed_row(row: dict, columns: dict[str, str | None]) -> list[str]:
    """A streamed row's answers, or `BadSample` for what `read_vqa_rows` lists as a problem of a whole split: an
    empty or non-text question, no or unreadable answers, an answer type that is not text."""
    question = row[columns["question"]]
    if not isinstance(question, str) or not question.strip():
        raise BadSample(f"column {columns['question']!r}: question {question!r} is not a non-empty string")
    try:
        answers = parse_answers(row[columns["answers"]])
    except ValueError as err:
        raise BadSample(f"column {columns['answers']!r}: {err}") from None
    if not answers:
        raise BadSample(f"column {columns['answers']!r}: no answers; every question needs at least one")
    answer_type = row.get(columns["answer_type"], "")
    if not isinstance(answer_type, str):
        raise BadSample(f"column {columns['answer_type']!r}: answer type {answer_type!r} is not a string")
    return answers


class VQAStream(TrainingStream):
    """A streamed training split (--streaming) -> the samples VQADataset gives, row by row: a row that
    `check_streamed_row` refuses, or whose image does not decode, is skipped and recorded; a question none of whose
    answers is in the answer set is left out, as `build_vqa_datasets` leaves it out of a whole training split."""

    def __init__(self, split: Split, columns: dict[str, str | None], transform: ViltImageTransform, label2id: dict[str, int], **kwargs):
        self.columns, self.transform, self.label2id = columns, transform, label2id
        super().__init__(split, columns["image"], **kwargs)

    def make_sample(self, row: dict, rng: random.Random) -> dict | None:
        label_ids, label_scores = soft_score_targets(check_streamed_row(row, self.columns), self.label2id)
        if not label_ids:
            return None
        try:
            image = load_image(row[self.image_column], self.base_dir, getattr(self.transform, "min_decode_size", None))
        except ImageLoadError as err:
            raise BadSample(str(err)) from None
        return {"pixel_values": self.transform(image), "question": row[self.columns["question"]], "example_index": -1,
                "label_ids": label_ids, "label_scores": label_scores}


def streamed_answers(split: Split, columns: dict[str, str | None]):
    """Each streamed training question's answers, for the answer set: one pass over the text columns (shards are
    read whole, images undecoded). Rows `check_streamed_row` refuses add nothing; training records them."""
    logger.info("Building the answer set from one pass over the answers of %s", split.origin)
    names = [columns[c] for c in ("question", "answers", "answer_type") if columns[c] in split.rows.column_names]
    for row in split.rows.select_columns(names):
        try:
            yield check_streamed_row(row, columns)
        except BadSample:
            continue


def find_unusable_rows(rows: VQARows, decode: bool, skip_log: SkippedSamples, split_name: str, workers: int = 16) -> set[int]:
    """Rows with a problem found by `read_vqa_rows`, or whose image fails `check_image` (a header check, or with
    `decode` a full decode), recorded in `skip_log`. Each image file is checked once: VQAv2 asks about five
    questions per image."""
    images = rows.split.rows.select_columns([rows.image_column])
    image_problems = check_images(images, rows.image_column, rows.split.base_dir, decode, workers)
    bad = set()
    for row, image_problem in enumerate(image_problems):
        problem = rows.problems.get(row) or image_problem
        if problem is not None:
            skip_log.record(split_name, row, images[row][rows.image_column], problem)
            bad.add(row)
    if bad:
        logger.warning("%s: skipped %d of %d questions (see %s)", rows.split.origin, len(bad), len(image_problems), skip_log.path)
    return bad


def build_vqa_datasets(rows: dict[str, VQARows], transform: ViltImageTransform, label2id: dict[str, int],
                       skip_log: SkippedSamples, max_bad_fraction: float, seed: int = 0, jpeg_draft: bool = False) -> dict[str, VQADataset]:
    """Split name -> VQADataset with soft-score targets over `label2id`.

    A training question none of whose answers is in the answer set would have an all-zero target, teaching only
    "none of these": training drops it (BUTD, ViLT). Validation and test keep every such question: it scores 0,
    as in the official evaluation. Questions whose image is unusable are left out of every split and listed in
    `skip_log` (evaluation images are decoded in full up front, so the metrics cover a known set of questions);
    past `max_bad_fraction` of a split, the run stops. With `jpeg_draft`, training images may decode at reduced
    scale (see ViltImageTransform); evaluation images decode in full."""
    datasets_ = {}
    for split, split_rows in rows.items():
        is_train = split == "train"
        unusable = find_unusable_rows(split_rows, decode=not is_train, skip_log=skip_log, split_name=split)
        check_bad_fraction(len(unusable), len(split_rows.questions), max_bad_fraction, split_rows.split.origin, skip_log.path)
        usable = [i for i in range(len(split_rows.questions)) if i not in unusable]
        targets = None
        if split_rows.answers is not None:
            targets = [soft_score_targets(answers, label2id) for answers in split_rows.answers]
            answerable = [i for i in usable if targets[i][0]]
            if is_train:
                logger.info("train: dropped %d of %d questions with no answer in the answer set", len(usable) - len(answerable), len(usable))
                if not answerable:
                    raise ValueError("No training question has an answer in the answer set: check --answers_column and the model's answers.")
                usable = answerable
            else:
                logger.info("%s: %d questions, %d with no answer in the answer set (they score 0)", split, len(usable), len(usable) - len(answerable))
        split_transform = ViltImageTransform(transform.spec, transform.size_divisor, draft=True) if is_train and jpeg_draft else transform
        datasets_[split] = VQADataset(
            split_rows, split_transform, targets, keep=usable, skip_log=skip_log if is_train else None, split_name=split, seed=seed
        )
    return datasets_


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, H_i, W_i) images -> (B, 3, H, W) padded at the bottom and right, and pixel_mask (B, H, W),
    1 on image pixels, 0 on padding (int64, as ViltImageProcessor)."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    pixels = torch.zeros(len(images), 3, height, width, dtype=images[0].dtype)
    mask = torch.zeros(len(images), height, width, dtype=torch.int64)
    for i, image in enumerate(images):
        pixels[i, :, : image.shape[-2], : image.shape[-1]] = image
        mask[i, : image.shape[-2], : image.shape[-1]] = 1
    return pixels, mask


@dataclass
class VQACollator:
    """Pads each batch's images to its largest and builds `pixel_mask` (per batch, not per preprocessing
    chunk); normalizes once per batch, padding left at 0 as ViltImageProcessor leaves it; tokenizes questions
    padded to the longest, cut at `max_length`; dense soft-score `labels` (B, num_labels)."""

    tokenizer: object
    max_length: int
    image_spec: ImageTransformSpec
    num_labels: int

    def __call__(self, examples: list[dict]) -> dict:
        pixels, pixel_mask = pad_images([e["pixel_values"] for e in examples])
        pixel_values = normalize_pixels(pixels, self.image_spec).masked_fill_(pixel_mask[:, None] == 0, 0.0)
        tokens = self.tokenizer(
            [e["question"] for e in examples], padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {**tokens, "pixel_values": pixel_values, "pixel_mask": pixel_mask}
        batch["example_index"] = torch.tensor([e["example_index"] for e in examples])
        if "label_ids" in examples[0]:
            batch["labels"] = build_soft_targets([e["label_ids"] for e in examples], [e["label_scores"] for e in examples], self.num_labels)
        return batch


def compute_vqa_metrics(predicted_ids: np.ndarray, example_index: np.ndarray, dataset: VQADataset, id2label: dict) -> dict:
    """Official VQA accuracy of the top answers, overall and per answer type, on every question of `dataset`
    (those whose answers are outside the answer set included: they score 0, as in vqaEval.py)."""
    if sorted(example_index.tolist()) != list(range(len(dataset))):
        raise RuntimeError(
            f"evaluation returned {len(example_index)} predictions for {len(dataset)} questions, not one per question; "
            "the per-process results were not gathered as expected"
        )
    rows, row_of = dataset.rows, [dataset.row(int(i)) for i in example_index]
    predictions = [id2label[int(i)] for i in predicted_ids]
    answers = [rows.answers[r] for r in row_of]
    answer_types = None if rows.answer_types is None else [rows.answer_types[r] for r in row_of]
    return vqa_score_summary(predictions, answers, answer_types)


class VQATrainer(StreamLoaderMixin, Trainer):
    """The Trainer, evaluating by the official VQA accuracy: each process keeps its top-k answer ids and scores
    per question with the question's `example_index`; the loop gathers them (every question once), then the
    metrics are computed against the raw answers. (And a training stream's DataLoader, for --streaming.)"""

    def __init__(self, *args, top_k: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        # ViLT's forward takes **kwargs, so the Trainer assumes it normalizes its loss by num_items_in_batch and
        # skips the division by the gradient accumulation steps (and multiplies by the world size under DDP).
        # ViLT ignores num_items_in_batch: its loss is a per-batch mean (BCE x num_labels).
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "example_index"}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        example_index = inputs.pop("example_index")
        loss, logits, _ = super().prediction_step(model, inputs, prediction_loss_only=False, ignore_keys=ignore_keys)
        scores, ids = logits.float().sigmoid().topk(min(self.top_k, logits.shape[-1]), dim=-1)  # (B, k) each
        return loss, (ids, scores), example_index.to(logits.device)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=False, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        dataset = dataloader.dataset
        if dataset.rows.answers is not None:
            ids, _ = output.predictions
            metrics = compute_vqa_metrics(ids[:, 0], output.label_ids, dataset, self.model.config.id2label)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})
        self.last_prediction = output  # for predictions.jsonl and the gallery
        return output


def prediction_records(prediction, dataset: VQADataset, id2label: dict) -> list[dict]:
    """One record per question, in data order: question_id, image (its path, when it has one), question,
    prediction, the top-k answers with their scores (sigmoid of the logits), and the annotators' answers (None
    when the split has none). `prediction` is the evaluation loop's output: top-k (ids, scores) and indices."""
    ids, scores = prediction.predictions
    rows = dataset.rows
    records = []
    for position in np.argsort(prediction.label_ids, kind="stable"):
        row = dataset.row(int(prediction.label_ids[position]))
        image = dataset.images[row][rows.image_column]
        image = image if isinstance(image, str) else (image.get("path") if isinstance(image, dict) else None)
        top = [{"answer": id2label[int(i)], "score": round(float(s), 5)} for i, s in zip(ids[position], scores[position])]
        records.append({
            "question_id": rows.question_ids[row],
            "image": image,
            "question": rows.questions[row],
            "prediction": top[0]["answer"],
            "top_k": top,
            "answers": rows.answers[row] if rows.answers is not None else None,
        })
    return records


def write_predictions(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_gallery(path: str, records: list[dict], dataset: VQADataset, metrics: dict, size: int) -> None:
    """The first `size` questions with their image, top answers and the annotators' answers, grouped by answer
    type, worst first. All records go in, so the page says of how many questions it shows `size`; only the
    shown ones get their image value (a record has just the path, and None for an image held in the data)."""
    rows = dataset.rows
    types = rows.answer_types
    items = [
        {**record, "image": dataset.image_value(index) if index < size else record["image"], "image_name": record["image"],
         "answer_type": types[dataset.row(index)] if types is not None else None}
        for index, record in enumerate(records)
    ]
    summary = {k: v for k, v in metrics.items() if "vqa_accuracy" in k or k.endswith("_loss")}
    write_vqa_gallery(path, items, max_items=size, summary=summary, image_base_dir=rows.split.base_dir)
    logger.info("Wrote %s", path)


# --- Model, processor and answer set -----------------------------------------------------------------------------


def has_answer_set(config) -> bool:
    """Whether a config carries real answer labels (a VQA checkpoint), not the default LABEL_0, LABEL_1..."""
    labels = (config.id2label or {}).items()
    return bool(labels) and any(label != f"LABEL_{i}" for i, label in labels)


def load_model_and_processor(model_args: ModelArguments, train_answers: list[list[str]] | None, data_args: DataArguments):
    """The model with its answer set in id2label/label2id, and a ViltProcessor. A checkpoint's own answers are
    kept unless --rebuild_answer_vocab; otherwise the answer set is built from the training answers."""
    hub = model_args.hub_kwargs()
    source = model_args.model_name_or_path or model_args.config_name
    config = AutoConfig.from_pretrained(source, **hub)
    if config.model_type != "vilt":
        raise ValueError(f"{source!r} is a {config.model_type!r} model; this script fine-tunes ViLT (model_type 'vilt').")
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)

    rebuild = model_args.rebuild_answer_vocab or not has_answer_set(config)
    if not rebuild:
        logger.info("Keeping the %d answers of %s (pass --rebuild_answer_vocab to build them from the data)", config.num_labels, source)
    else:
        if train_answers is None:
            raise ValueError(
                f"{source!r} has no answer set (id2label) to predict from: fine-tune it with --do_train, which builds "
                "one from the training answers, or pass a checkpoint fine-tuned for VQA."
            )
        vocab = build_answer_vocab(train_answers, min_count=data_args.min_answer_count, max_answers=data_args.max_answers)
        if not vocab:
            raise ValueError(
                f"No answer is the majority answer of >= {data_args.min_answer_count} training questions: "
                "lower --min_answer_count."
            )
        config.id2label = dict(enumerate(vocab))
        config.label2id = {answer: i for i, answer in enumerate(vocab)}
        logger.info("Answer set: %d answers from the training set (min count %d); most frequent: %s", len(vocab), data_args.min_answer_count, vocab[:10])

    if model_args.model_name_or_path:
        model = ViltForQuestionAnswering.from_pretrained(source, config=config, ignore_mismatched_sizes=rebuild, **hub)
        if rebuild:  # a new answer set needs a new output layer, even where its size matches the old one
            output_layer = model.classifier[-1]
            torch.nn.init.normal_(output_layer.weight, std=config.initializer_range)
            torch.nn.init.zeros_(output_layer.bias)
    else:
        model = ViltForQuestionAnswering(config)

    if model_args.tokenizer_name or model_args.image_processor_name:
        processor = ViltProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model_args.image_processor_name or source, **hub),
            tokenizer=AutoTokenizer.from_pretrained(model_args.tokenizer_name or source, **hub),
        )
    else:
        processor = ViltProcessor.from_pretrained(source, **hub)
    return model, processor


# --- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments and logging.
    model_args, data_args, run_args, training_args = parse_args((ModelArguments, DataArguments, RunArguments, TrainingArguments), argv)
    if training_args.use_cpu:
        # Tiny gradients leave denormal floats in AdamW's state, and CPU arithmetic on them is slow: flushing them
        # to zero makes the optimizer step of the demo model 7x faster, with no effect on what is learnt.
        torch.set_flush_denormal(True)
    resume_from = start_run(training_args, run_args, model_args, data_args)

    # 2. Data: every requested split, columns and values checked before anything heavy happens.
    splits = load_requested_splits(data_args, training_args, model_args.cache_dir, data_args.image_column or "image")
    columns = resolve_columns(next(iter(splits.values())), data_args)
    rows = {}
    for split, data in splits.items():
        check_columns(data, image_column=columns["image"], question_column=columns["question"])
        if data.streaming:  # the training split, checked row by row as it trains (duplicates are not counted)
            check_columns(data, answers_column=columns["answers"])
            continue
        log_duplicate_rows(data, [c for c in (columns["image"], columns["question"], columns["answers"]) if c in data.rows.column_names], split)
        rows[split] = read_vqa_rows(data, columns, answers_required=split != "test")
    train_answers = None
    if "train" in splits:
        train_answers = streamed_answers(splits["train"], columns) if splits["train"].streaming else rows["train"].answers

    # 3. Model, processor and answer set; seeded first, as a new answer head is initialized at random.
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args, train_answers, data_args)
    if model_args.pooled_last_layer and pool_last_layers(model):
        logger.info("Last layer computed at the [CLS] token only (--pooled_last_layer false to turn off)")
    trainable, total = count_parameters(model)
    logger.info("%s: %.1fM parameters, %.1fM trainable, %d answers", type(model).__name__, total / 1e6, trainable / 1e6, model.config.num_labels)
    check_disk_space(training_args.output_dir, model, training=training_args.do_train)

    # 4. Preprocessing: images resized as the model's image processor does, padded per batch; questions cut at
    # the model's 40 text positions; targets are soft scores over the answer set.
    image_processor = processor.image_processor
    image_spec = ImageTransformSpec.from_image_processor(image_processor)
    transform = ViltImageTransform(image_spec, getattr(image_processor, "size_divisor", None))
    max_length = resolve_max_length(data_args.max_seq_length, processor.tokenizer, model.config)
    # Unusable images are left out and listed in skipped_samples.jsonl, within --max_bad_samples_fraction.
    skip_log = SkippedSamples.for_run(training_args, resuming=resume_from is not None)
    datasets_ = build_vqa_datasets(rows, transform, model.config.label2id, skip_log, run_args.max_bad_samples_fraction,
                                   training_args.seed, jpeg_draft=data_args.jpeg_draft)
    if "train" in splits and splits["train"].streaming:
        datasets_["train"] = VQAStream(
            splits["train"], columns, ViltImageTransform(image_spec, transform.size_divisor, draft=data_args.jpeg_draft),
            model.config.label2id, **stream_options(training_args, data_args, run_args, skip_log)
        )

    # 5. Trainer.
    trainer = VQATrainer(
        model=model,
        args=training_args,
        train_dataset=datasets_.get("train"),
        eval_dataset=datasets_.get("validation"),
        data_collator=VQACollator(processor.tokenizer, max_length, image_spec, model.config.num_labels),
        processing_class=processor,
        callbacks=[NonFiniteGuard()] + ([SetEpochCallback(datasets_["train"])] if "train" in datasets_ else []),
        top_k=data_args.top_k_predictions,
    )

    # 6. Train, evaluate, predict; every split's metrics land in <split>_results.json and all_results.json, the
    # test split's answers in predictions.jsonl, and each evaluated split's first questions in a gallery.
    def after_split(split, split_metrics):
        if not trainer.is_world_process_zero():
            return
        records = prediction_records(trainer.last_prediction, datasets_[split], model.config.id2label)
        if split == "test":
            write_predictions(os.path.join(training_args.output_dir, "predictions.jsonl"), records)
        if data_args.gallery_size:
            path = os.path.join(training_args.output_dir, f"gallery_{split}.html")
            write_gallery(path, records, datasets_[split], split_metrics, data_args.gallery_size)

    metrics = train_evaluate_predict(trainer, datasets_, resume_from, skip_log, after_split)

    # 7. What the run leaves to look at: the curves, and a model card with the command and the metrics.
    write_run_report(trainer, "run_vilt_vqa.py", argv, data_args, datasets_, metrics, tasks="visual-question-answering",
                     tags=["vilt", "vqa"])
    return metrics


if __name__ == "__main__":
    main()
