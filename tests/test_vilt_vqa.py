"""run_vilt_vqa.py: ViLT preprocessing against ViltImageProcessor, the answer set and the drop/keep rules, the
loss scale, end to end through main(argv) (train, eval, predict, reload, answer a question), an overfit run, and
evaluation scored once per question under two processes.

The models are tiny ViLTs built from configs; the data are the demo's shapes scenes with ten human-like answers per
question, some images resized so that batches mix sizes."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import run_vilt_vqa
from run_vilt_vqa import (
    DataArguments,
    ModelArguments,
    VQACollator,
    ViltImageTransform,
    build_vqa_datasets,
    compute_vqa_metrics,
    load_model_and_processor,
    read_vqa_rows,
    resolve_columns,
    vilt_resize_size,
)
from tests.helpers import (
    assert_finite_metrics,
    copy_with_dropout,
    count_activation_checkpoints,
    max_weight_difference,
    read_json,
    write_jsonl,
)
from utils.data import SkippedSamples, load_splits
from utils.demo import write_demo_dataset
from utils.demo_vqa import build_demo_vilt, human_answers, write_vqa_rows
from utils.images import ImageTransformSpec, load_image
from utils.vqa import vqa_accuracy
from utils.vqa_inference import answer_question, load_vqa_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Sizes that resize to four different shapes at shortest_edge 32, size_divisor 16 (16x48, 32x32, 48x16, 32x48).
ODD_SIZES = [(40, 70), (64, 64), (90, 45), (40, 62), (33, 47)]


def vqa_data(root, num_train, num_validation, num_test, seed):
    """Demo scenes turned into VQA rows; every third image resized to another aspect ratio."""
    scenes = write_demo_dataset(str(root), num_train=num_train, num_validation=num_validation, num_test=num_test,
                                max_objects=3, image_size=48, seed=seed)
    rng = random.Random(seed)
    first_id = 0
    for split, path in scenes.items():
        first_id += write_vqa_rows(path, path, rng, first_id)
    for index, name in enumerate(sorted(os.listdir(root / "images"))):
        if index % 3 == 0:
            path = root / "images" / name
            height, width = ODD_SIZES[index % len(ODD_SIZES)]
            Image.open(path).resize((width, height)).save(path)
    return scenes


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_assets")
    data = vqa_data(root / "data", num_train=16, num_validation=8, num_test=6, seed=1)
    # The validation answers in VQAv2's layout: {"answer", "answer_confidence", "answer_id"} dicts.
    rows = read_rows(data["validation"])
    for row in rows:
        row["answers"] = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(row["answers"])]
    write_jsonl(data["validation"], rows)
    model_dir = str(root / "tiny_vilt")
    build_demo_vilt(model_dir, image_size=32, patch_size=16, hidden_size=32, num_layers=2)
    return {"data": data, "model": model_dir, "root": root}


def common_args(assets, output_dir, *extra):
    return [
        "--model_name_or_path", assets["model"],
        "--train_file", assets["data"]["train"],
        "--validation_file", assets["data"]["validation"],
        "--test_file", assets["data"]["test"],
        "--output_dir", str(output_dir),
        "--min_answer_count", "1",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no",
        *extra,
    ]


# --- Images and batches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shortest_edge,size_divisor", [(32, 16), (64, 32), (48, None)])
def test_resize_size_matches_vilt_image_processor(shortest_edge, size_divisor):
    """Output sizes, including extreme aspect ratios where the 1333/800 cap on the longer side applies."""
    from transformers import ViltImageProcessor

    processor = ViltImageProcessor(size={"shortest_edge": shortest_edge}, size_divisor=size_divisor)
    for height, width in ODD_SIZES + [(60, 200), (200, 60), (81, 80), (80, 81), (57, 91), (300, 299)]:
        image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
        expected = tuple(processor(image, return_tensors="pt")["pixel_values"].shape[-2:])
        assert vilt_resize_size(height, width, shortest_edge, size_divisor) == expected, (height, width)
    # Where a side would round to 0 the processor raises; the script keeps one patch row instead.
    assert min(vilt_resize_size(4, 2000, shortest_edge, size_divisor)) == (size_divisor or 1)


def test_collator_matches_vilt_processor_on_images_of_different_sizes(assets):
    """Per-sample uint8 resize + per-batch pad, normalize and pixel_mask equal ViltImageProcessor on the same batch;
    questions are cut at the model's 40 text positions; labels are float soft scores (B, num_labels)."""
    from transformers import ViltProcessor

    processor = ViltProcessor.from_pretrained(assets["model"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ODD_SIZES]
    spec = ImageTransformSpec.from_image_processor(processor.image_processor)
    transform = ViltImageTransform(spec, processor.image_processor.size_divisor)
    max_length = run_vilt_vqa.resolve_max_length(None, processor.tokenizer, run_vilt_vqa.AutoConfig.from_pretrained(assets["model"]))
    assert max_length == 40
    collator = VQACollator(processor.tokenizer, max_length, spec, num_labels=3)
    questions = ["what color is the circle?", "is there a red square?", " ".join(["shape"] * 60), "where?", "how many shapes are there?"]
    examples = [
        {"pixel_values": transform(image), "question": q, "example_index": i, "label_ids": [i % 3], "label_scores": [0.6]}
        for i, (image, q) in enumerate(zip(images, questions))
    ]
    batch = collator(examples)
    expected = processor.image_processor(images, return_tensors="pt")
    assert len({tuple(e["pixel_values"].shape) for e in examples}) >= 4  # really different sizes
    assert batch["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.equal(batch["pixel_mask"], expected["pixel_mask"])
    assert batch["pixel_mask"].dtype == torch.int64 and (batch["pixel_mask"] == 0).any()
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    assert (batch["pixel_values"][batch["pixel_mask"][:, None].expand_as(batch["pixel_values"]) == 0] == 0).all()

    tokens = processor.tokenizer(questions, padding="longest", truncation=True, max_length=40, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 40 and torch.equal(batch["input_ids"], tokens["input_ids"])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (5, 3)
    assert batch["labels"][0].tolist() == pytest.approx([0.6, 0, 0]) and batch["labels"][4].tolist() == pytest.approx([0, 0.6, 0])
    assert batch["example_index"].tolist() == [0, 1, 2, 3, 4]


# --- The answer set, targets and the drop/keep rules ---------------------------------------------------------------


def small_split(tmp_path, name, rows):
    """A jsonl of `rows`; rows without an image get a.png, a small real image next to the file."""
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / f"{name}.jsonl"
    for row in rows:
        row.setdefault("image", "a.png")
    write_jsonl(path, rows)
    return str(path)


def test_answer_set_targets_and_drop_keep_rules(assets, tmp_path, caplog):
    """Answer set from the training answers after normalization (majority answer of >= min_answer_count questions);
    training drops the question with no answer in it and says so; evaluation keeps it, and it scores 0."""
    ten = lambda *answers: list(answers) + [answers[-1]] * (10 - len(answers))  # noqa: E731
    train = small_split(tmp_path, "train", [
        {"question": "q0", "answers": ten("Two", "2", "two.", "2")},  # normalizes to "2"
        {"question": "q1", "answers": ten("2")},
        {"question": "q2", "answers": ten("yes", "Yes")},
        {"question": "q3", "answers": ten("yes.")},
        {"question": "q4", "answers": ten("red", "red", "blue")},  # majority "blue" (7 of 10), once only
        {"question": "q5", "answers": "no"},  # a single answer: target 1.0
        {"question": "q6", "answers": ["no"]},
    ])
    validation = small_split(tmp_path, "validation", [
        {"question": "v0", "answers": ten("2"), "answer_type": "number"},
        {"question": "v1", "answers": ten("purple"), "answer_type": "other"},  # outside the answer set
        {"question": "v2", "answers": ten("no", "no", "no", "yes"), "answer_type": "yes/no"},
    ])
    data_args = DataArguments(train_file=train, validation_file=validation, min_answer_count=2)
    splits = load_splits(data_files={"train": train, "validation": validation})
    columns = resolve_columns(splits["train"], data_args)
    rows = {s: read_vqa_rows(splits[s], columns, answers_required=True) for s in ("train", "validation")}
    assert rows["train"].answers[5] == ["no"] and rows["validation"].answers[0] == ["2"] * 10

    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=assets["model"]), rows["train"].answers, data_args)
    # Counts 2, 2, 2; "blue" is the majority of one question only; ties sorted alphabetically.
    assert model.config.id2label == {0: "2", 1: "no", 2: "yes"}
    assert model.config.label2id == {"2": 0, "no": 1, "yes": 2}
    assert model.classifier[-1].out_features == 3

    caplog.set_level("INFO", logger="run_vilt_vqa")
    transform = ViltImageTransform(ImageTransformSpec(resize_shortest_edge=32), 16)
    datasets_ = build_vqa_datasets(rows, transform, model.config.label2id, SkippedSamples(str(tmp_path / "skipped.jsonl")), 0.0)
    assert datasets_["train"].keep == [0, 1, 2, 3, 5, 6]  # q4 dropped: neither "red" nor "blue" is an answer
    assert "dropped 1 of 7 questions" in caplog.text
    train_targets = [datasets_["train"].targets[r] for r in datasets_["train"].keep]
    assert train_targets[0] == ([0], [1.0])  # 4+ annotators said "2" (spelt four ways)
    assert train_targets[2] == ([2], [1.0])
    assert train_targets[4] == ([1], [1.0]) and train_targets[5] == ([1], [1.0])  # single answers
    assert len(datasets_["validation"]) == 3  # all kept
    assert "validation: 3 questions, 1 with no answer in the answer set" in caplog.text

    # Predicting "2", anything, "yes": 1.0, 0 (its answer cannot be predicted), and 1.0 (7 of 10 said "yes").
    metrics = compute_vqa_metrics(np.array([0, 2, 2]), np.array([0, 1, 2]), datasets_["validation"], model.config.id2label)
    assert metrics["vqa_accuracy"] == pytest.approx(2 / 3)
    assert metrics["vqa_accuracy_other"] == 0.0 and metrics["vqa_accuracy_number"] == 1.0 and metrics["vqa_accuracy_yes_no"] == 1.0
    # Predicting "no" where 3 of 10 said it: 0.9, the official (7 x 1 + 3 x 2/3) / 10. Order of arrival is free.
    metrics = compute_vqa_metrics(np.array([1, 0, 2]), np.array([2, 0, 1]), datasets_["validation"], model.config.id2label)
    assert metrics["vqa_accuracy_yes_no"] == pytest.approx(0.9) and metrics["vqa_accuracy"] == pytest.approx(1.9 / 3)
    with pytest.raises(RuntimeError, match="not one per question"):
        compute_vqa_metrics(np.array([0, 2, 1, 0]), np.array([0, 1, 2, 0]), datasets_["validation"], model.config.id2label)

    capped = DataArguments(train_file=train, min_answer_count=1, max_answers=2)
    model, _ = load_model_and_processor(ModelArguments(model_name_or_path=assets["model"]), rows["train"].answers, capped)
    assert model.config.id2label == {0: "2", 1: "no"}


def test_checkpoint_answers_kept_unless_rebuilt(assets, tmp_path):
    """A checkpoint with an answer set keeps it, head included; --rebuild_answer_vocab replaces it with the
    training answers and a new output layer (even of the same size); without training, no answer set is an error."""
    from transformers import ViltForQuestionAnswering

    model = ViltForQuestionAnswering.from_pretrained(assets["model"], num_labels=3, ignore_mismatched_sizes=True)
    model.config.id2label = {0: "cat", 1: "dog", 2: "yes"}
    model.config.label2id = {"cat": 0, "dog": 1, "yes": 2}
    finetuned = str(tmp_path / "finetuned")
    model.save_pretrained(finetuned)
    train_answers = [["red"] * 10, ["blue"] * 10, ["green"] * 10]
    data_args = DataArguments(train_file="unused.jsonl", min_answer_count=1)
    with_processor = {"tokenizer_name": assets["model"], "image_processor_name": assets["model"]}

    kept, _ = load_model_and_processor(ModelArguments(model_name_or_path=finetuned, **with_processor), train_answers, data_args)
    assert kept.config.id2label == {0: "cat", 1: "dog", 2: "yes"}
    assert torch.equal(kept.classifier[-1].weight, model.classifier[-1].weight)

    rebuilt, _ = load_model_and_processor(
        ModelArguments(model_name_or_path=finetuned, rebuild_answer_vocab=True, **with_processor), train_answers, data_args
    )
    assert rebuilt.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert not torch.equal(rebuilt.classifier[-1].weight, model.classifier[-1].weight)
    assert torch.equal(rebuilt.classifier[0].weight, model.classifier[0].weight)

    with pytest.raises(ValueError, match="has no answer set"):
        load_model_and_processor(ModelArguments(model_name_or_path=assets["model"]), None, data_args)
    with pytest.raises(ValueError, match="lower --min_answer_count"):
        load_model_and_processor(ModelArguments(model_name_or_path=assets["model"]), train_answers, DataArguments(train_file="x.jsonl"))


def test_bad_rows_are_found_before_the_run_with_their_column(tmp_path):
    """Rows that cannot be used are found when the file is read, each with its column and reason (skipped and listed
    later: see tests/test_reliability.py); a column that is not there stops the run, naming the columns there are."""
    train = small_split(tmp_path, "train", [
        {"question": "q0", "answers": ["a"]}, {"question": "q1", "answers": []}, {"question": "  ", "answers": ["a"]},
        {"question": "null", "answers": ["b"]},
    ])
    split = load_splits(data_files={"train": train})["train"]
    columns = resolve_columns(split, DataArguments(train_file=train))
    rows = read_vqa_rows(split, columns, answers_required=True)
    assert rows.problems == {
        1: "column 'answers': no answers; every question needs at least one",
        2: "column 'question': question '  ' is not a non-empty string",
    }
    assert rows.answers == [["a"], [], [], ["b"]] and rows.questions[3] == "null"
    with pytest.raises(ValueError, match=r"--answers_column 'label' is not a column of .*train.jsonl; its columns are \['question', 'answers', 'image'\]"):
        read_vqa_rows(split, {**columns, "answers": "label"}, answers_required=True)
    with pytest.raises(ValueError, match="--answer_type_column 'kind' is not a column"):
        resolve_columns(split, DataArguments(train_file=train, answer_type_column="kind"))


def test_csv_answers_and_ids_that_look_like_numbers(tmp_path):
    """A csv is read as text: a single answer "2" is the answer "2" (VQA counts), an id written as a whole number is
    that number, as VQAv2's ids are, and one with a leading zero stays text."""
    path = tmp_path / "train.csv"
    path.write_text("image,question,answers,question_id\nimages/0.png,how many?,2,458752000\nimages/0.png,what?,yes,007\n")
    split = load_splits(data_files={"train": str(path)})["train"]
    rows = read_vqa_rows(split, resolve_columns(split, DataArguments(train_file=str(path))), answers_required=True)
    assert rows.problems == {}
    assert rows.answers == [["2"], ["yes"]]
    assert rows.question_ids == [458752000, "007"]


def test_unusable_images_are_skipped_and_listed(assets, tmp_path):
    """A missing training image and a corrupt validation image: both questions are left out, listed in
    skipped_samples.jsonl, and the accuracy covers the rest; past --max_bad_samples_fraction the run stops."""
    image_dir = os.path.join(os.path.dirname(assets["data"]["train"]), "images")
    os.symlink(image_dir, tmp_path / "images")
    (tmp_path / "images_bad").mkdir()
    (tmp_path / "images_bad" / "broken.png").write_bytes(open(os.path.join(image_dir, "train_00000.png"), "rb").read()[:60])
    train, validation = read_rows(assets["data"]["train"]), read_rows(assets["data"]["validation"])[:24]
    train[3]["image"] = "images/missing.png"
    validation[2]["image"] = "images_bad/broken.png"
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", validation)
    args = [
        "--model_name_or_path", assets["model"], "--train_file", str(tmp_path / "train.jsonl"),
        "--validation_file", str(tmp_path / "validation.jsonl"), "--do_train", "--do_eval", "--max_steps", "2",
        "--min_answer_count", "1", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no",
    ]
    out = tmp_path / "out"
    metrics = run_vilt_vqa.main(args + ["--output_dir", str(out)])
    skipped = read_rows(out / "skipped_samples.jsonl")
    assert [(s["split"], s["row"], s["image"]) for s in skipped] == [
        ("train", 3, "images/missing.png"), ("validation", 2, "images_bad/broken.png")
    ]
    assert "does not exist" in skipped[0]["reason"]
    assert metrics["eval_samples_per_second"] > 0 and 0 <= metrics["eval_vqa_accuracy"] <= 1
    with pytest.raises(ValueError, match="max_bad_samples_fraction"):
        run_vilt_vqa.main(args + ["--output_dir", str(tmp_path / "strict"), "--max_bad_samples_fraction", "0.01"])


# --- The Trainer ----------------------------------------------------------------------------------------------------


def test_loss_is_averaged_over_gradient_accumulation(assets, tmp_path):
    """ViLT's forward takes **kwargs, which makes the Trainer skip the division by the accumulation steps unless
    the script says otherwise: the same 8 questions, as one batch of 8 or two of 4, must log the same loss."""
    common = ["--do_train", "--max_steps", "1", "--learning_rate", "0", "--do_eval", "false", "--max_train_samples", "8"]
    one = run_vilt_vqa.main(common_args(assets, tmp_path / "one", *common))
    two = run_vilt_vqa.main(common_args(assets, tmp_path / "two", *common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"))
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)


def test_end_to_end_train_eval_predict_reload_answer(assets, tmp_path):
    """Train, evaluate and predict through main(argv); the accuracy is the official one recomputed from
    predictions.jsonl; the folder reloads, and answer_question on it gives the scores the script predicted."""
    out = tmp_path / "out"
    metrics = run_vilt_vqa.main(common_args(assets, out, "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--top_k_predictions", "3"))
    types = ["number", "other", "yes_no"]
    keys = [f"{p}_vqa_accuracy{t}" for p in ("eval", "predict") for t in [""] + [f"_{t}" for t in types]]
    assert_finite_metrics(metrics, keys + ["eval_loss", "predict_loss", "train_loss"])
    assert all(0.0 <= metrics[k] <= 1.0 for k in keys)
    assert read_json(out / "all_results.json")["eval_vqa_accuracy"] == metrics["eval_vqa_accuracy"]
    for split in ("validation", "test"):
        page = (out / f"gallery_{split}.html").read_text()
        assert read_rows(assets["data"][split])[0]["question"] in page and "data:image/jpeg;base64" in page
    assert (out / "training_curves.png").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "## Training run" in card and "eval_vqa_accuracy" in card
    assert not (out / "skipped_samples.jsonl").exists()

    test_rows = read_rows(assets["data"]["test"])
    predictions = read_rows(out / "predictions.jsonl")
    assert [p["question_id"] for p in predictions] == [r["question_id"] for r in test_rows]
    for prediction, row in zip(predictions, test_rows):
        assert prediction["image"] == row["image"] and prediction["question"] == row["question"]
        assert prediction["answers"] == row["answers"]
        assert len(prediction["top_k"]) == 3 and prediction["prediction"] == prediction["top_k"][0]["answer"]
        assert prediction["top_k"][0]["score"] >= prediction["top_k"][1]["score"] >= prediction["top_k"][2]["score"]
    official = np.mean([vqa_accuracy(p["prediction"], p["answers"]) for p in predictions])
    assert metrics["predict_vqa_accuracy"] == pytest.approx(official, abs=1e-12)

    model, processor = load_vqa_model(str(out))
    config = read_json(out / "config.json")
    assert model.config.id2label == {int(k): v for k, v in config["id2label"].items()}
    assert set(model.config.id2label.values()) >= {p["prediction"] for p in predictions}
    image_dir = os.path.dirname(assets["data"]["test"])
    for prediction in predictions[:3]:
        image = os.path.join(image_dir, prediction["image"])
        answers = answer_question(model, image, prediction["question"], top_k=3, processor=processor)
        assert [a["score"] for a in answers] == pytest.approx([a["score"] for a in prediction["top_k"]], abs=1e-4)
    by_folder = answer_question(str(out), os.path.join(image_dir, predictions[0]["image"]), predictions[0]["question"], top_k=1)
    assert by_folder[0]["score"] == pytest.approx(predictions[0]["top_k"][0]["score"], abs=1e-4)


def test_from_config_with_test_set_without_answers(assets, tmp_path):
    """The third way in (a config, a tokenizer and an image processor), and a test set with no answers column:
    predictions are written, no accuracy is claimed."""
    test_file = tmp_path / "test.jsonl"
    rows = read_rows(assets["data"]["test"])
    write_jsonl(test_file, [{k: v for k, v in row.items() if k not in ("answers", "answer_type")} for row in rows])
    # The images' paths are relative to the data file's folder.
    os.symlink(os.path.join(os.path.dirname(assets["data"]["test"]), "images"), tmp_path / "images")
    out = tmp_path / "out"
    args = common_args(assets, out, "--do_train", "--do_predict", "--max_steps", "2")
    args = [a for a in args if a != "--model_name_or_path" and a != assets["model"]]
    args += ["--config_name", assets["model"], "--tokenizer_name", assets["model"], "--image_processor_name", assets["model"]]
    args[args.index("--test_file") + 1] = str(test_file)
    metrics = run_vilt_vqa.main(args)
    assert not any(k.startswith("predict_vqa_accuracy") for k in metrics)
    predictions = read_rows(out / "predictions.jsonl")
    assert len(predictions) == len(rows) and all(p["answers"] is None for p in predictions)


def test_overfit_reaches_the_best_possible_accuracy(tmp_path):
    """Trained and evaluated on the same 12 questions, the accuracy goes from chance to the best any answer of the
    answer set can score (below 1.0 only where annotators disagree), and the loss falls."""
    data = vqa_data(tmp_path / "data", num_train=4, num_validation=1, num_test=1, seed=5)
    rows = read_rows(data["train"])[:12]
    write_jsonl(data["train"], rows)
    model_dir = str(tmp_path / "vilt")
    build_demo_vilt(model_dir, image_size=32, patch_size=16, hidden_size=128, num_layers=4)  # wider than `assets`: faster to fit
    args = [
        "--model_name_or_path", model_dir, "--train_file", data["train"], "--validation_file", data["train"],
        "--min_answer_count", "1", "--do_train", "--do_eval",
        "--per_device_train_batch_size", "12", "--per_device_eval_batch_size", "12",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no",
    ]
    before = run_vilt_vqa.main(args + ["--output_dir", str(tmp_path / "before"), "--max_steps", "1", "--learning_rate", "0"])
    after = run_vilt_vqa.main(args + [
        "--output_dir", str(tmp_path / "out"), "--max_steps", "130", "--learning_rate", "2e-3", "--warmup_steps", "5", "--logging_steps", "10",
    ])
    labels = set(read_json(tmp_path / "out" / "config.json")["label2id"])
    best = np.mean([max(vqa_accuracy(label, row["answers"]) for label in labels) for row in rows])
    assert before["eval_vqa_accuracy"] < 0.5
    assert after["eval_vqa_accuracy"] >= best - 0.05, (after["eval_vqa_accuracy"], best)
    assert after["eval_loss"] < before["eval_loss"] / 4, (before["eval_loss"], after["eval_loss"])


def test_two_processes_score_each_question_once(assets, tmp_path):
    """torchrun with two CPU processes on 7 questions (the sampler pads the last batch with a repeat): the same
    accuracy and the same per-question predictions as one process, each question exactly once. Half the questions
    are given the one-process prediction as their answers, so a misaligned gather would change the accuracy."""
    out = tmp_path / "trained"
    run_vilt_vqa.main(common_args(assets, out, "--do_train", "--max_steps", "2"))
    os.symlink(os.path.join(os.path.dirname(assets["data"]["validation"]), "images"), tmp_path / "images")
    questions = tmp_path / "questions.jsonl"
    write_jsonl(questions, read_rows(assets["data"]["test"])[:7])
    args = [
        "--model_name_or_path", str(out), "--validation_file", str(questions), "--test_file", str(questions),
        "--per_device_eval_batch_size", "2", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
    ]
    first = run_vilt_vqa.main(args + ["--do_predict", "--output_dir", str(tmp_path / "first")])
    assert "predict_vqa_accuracy" in first
    rows = read_rows(questions)
    for row, prediction in zip(rows[::2], read_rows(tmp_path / "first" / "predictions.jsonl")[::2]):
        row["answers"] = [prediction["prediction"]] * 10
    write_jsonl(questions, rows)

    single = run_vilt_vqa.main(args + ["--do_eval", "--do_predict", "--output_dir", str(tmp_path / "one")])
    assert single["eval_vqa_accuracy"] >= 4 / 7
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               os.path.join(REPO_ROOT, "run_vilt_vqa.py"), *args, "--do_eval", "--do_predict",
               "--output_dir", str(tmp_path / "two"), "--log_level", "info", "--log_level_replica", "info"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("***** Running Evaluation *****") == 2  # both ranks evaluated
    double = read_json(tmp_path / "two" / "all_results.json")
    for key in [k for k in single if "vqa_accuracy" in k]:
        assert double[key] == pytest.approx(single[key], abs=1e-12), key
    one_lines, two_lines = read_rows(tmp_path / "one" / "predictions.jsonl"), read_rows(tmp_path / "two" / "predictions.jsonl")
    assert [p["question_id"] for p in two_lines] == [p["question_id"] for p in one_lines] == [r["question_id"] for r in rows]
    for a, b in zip(one_lines, two_lines):
        assert [t["score"] for t in b["top_k"]] == pytest.approx([t["score"] for t in a["top_k"]], abs=1e-4)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_answers_vary_like_people():
    """Ten answers per question, spelt in several ways that the official normalization merges."""
    from utils.vqa import normalize_answer

    rng = random.Random(0)
    answers = human_answers("count", "2", rng)
    assert len(answers) == 10
    many = [a for _ in range(50) for a in human_answers("count", "2", rng)]
    assert {"2", "two", "Two."} <= set(many)
    assert sum(normalize_answer(a) == "2" for a in many) > 0.85 * len(many)


def test_activation_checkpointing_takes_the_same_step(assets, tmp_path, monkeypatch):
    """--activation_checkpointing (formerly --gradient_checkpointing) recomputes each layer in the backward pass:
    one step lands on the same weights, with dropout on (the recompute replays the random state)."""
    model = copy_with_dropout(assets["model"], tmp_path / "model")
    checkpoints = count_activation_checkpoints(monkeypatch)
    losses = {}
    for name, flags in (("plain", []), ("checkpointed", ["--activation_checkpointing"])):
        args = common_args(assets, tmp_path / name, "--do_train", "--max_steps", "1", "--learning_rate", "0.1", "--optim", "sgd", *flags)
        args[args.index("--model_name_or_path") + 1] = model
        losses[name] = run_vilt_vqa.main(args)["train_loss"]
        assert bool(checkpoints) == (name == "checkpointed")
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=1e-6)
    assert max_weight_difference(tmp_path / "plain", tmp_path / "checkpointed") < 1e-6


def test_training_jpegs_may_decode_at_reduced_scale_and_evaluation_ones_in_full(tmp_path):
    """With jpeg_draft, a training JPEG decodes at the strongest reduction that keeps both sides >= shortest_edge
    (which the resize never exceeds); evaluation images decode in full, so they equal ViltImageProcessor's."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    rows = {"question": "what is it?", "answers": ["red"] * 10, "image": "a.jpg"}
    paths = {split: small_split(tmp_path, split, [dict(rows)]) for split in ("train", "validation")}
    data_args = DataArguments(train_file=paths["train"], validation_file=paths["validation"], min_answer_count=1)
    splits = load_splits(data_files=paths)
    columns = resolve_columns(splits["train"], data_args)
    vqa_rows = {split: read_vqa_rows(data, columns, answers_required=True) for split, data in splits.items()}
    transform = ViltImageTransform(ImageTransformSpec(resize_shortest_edge=32), size_divisor=16)
    datasets_ = build_vqa_datasets(vqa_rows, transform, {"red": 0}, SkippedSamples(None), 0.0, jpeg_draft=True)
    assert datasets_["train"].transform.min_decode_size == (32, 32) and datasets_["validation"].transform.min_decode_size is None
    full = load_image(str(tmp_path / "a.jpg"))
    reduced = load_image(str(tmp_path / "a.jpg"), min_size=(32, 32))
    assert reduced.size == (50, 35)  # halved: a quarter would leave 25 x 17
    assert torch.equal(datasets_["train"][0]["pixel_values"], transform(reduced))
    assert torch.equal(datasets_["validation"][0]["pixel_values"], transform(full))
