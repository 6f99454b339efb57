"""The VQA demo: questions about the synthetic shapes scenes of `utils.demo`, each with ten human-like answers,
and a tiny ViLT to fine-tune on them offline.

    python -m utils.demo vqa --output_dir demo      # data in demo/vqa_data, a tiny ViLT in demo/tiny_vilt
    python run_vilt_vqa.py configs/demo_vqa.yaml

Five kinds of question, one of each per scene when the scene allows it: count ("how many shapes are there?"),
colour, shape, yes/no and position. Ten annotators answer every question the way people answer VQAv2: mostly
right but spelt differently ("2", "two", "Two."), sometimes with another word for the same thing ("upper left",
"round"), now and then wrong. So the labels come out of the official normalization, and a perfect model still
scores a little under 1.0 where annotators disagree.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter

from .demo import COLORS, NUMBER_WORDS, POSITIONS, SHAPES, build_demo_bert_tokenizer, write_demo_dataset
from .vqa import vqa_score_summary

logger = logging.getLogger(__name__)

NUM_ANNOTATORS = 10
# Chance that one annotator gives a wrong (but plausible) answer.
ANNOTATOR_ERROR = 0.08
# Spellings of a right answer, with weights: the plain one dominates, as in VQAv2.
_YES_NO_VARIANTS = {"yes": [("yes", 6), ("Yes", 2), ("yes.", 1), ("Yes.", 1)], "no": [("no", 6), ("No", 2), ("no.", 1), ("nope", 1)]}
_SHAPE_SYNONYMS = {"circle": "round", "square": "box", "triangle": "triangle", "cross": "plus"}
_POSITION_SYNONYMS = {
    "top left": "upper left",
    "top right": "upper right",
    "bottom left": "lower left",
    "bottom right": "lower right",
    "center": "middle",
}
ANSWER_TYPES = {"count": "number", "yes_no": "yes/no", "color": "other", "shape": "other", "position": "other"}


def _weighted(rng: random.Random, variants: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in variants], weights=[w for _, w in variants])[0]


def answer_variants(kind: str, answer: str) -> list[tuple[str, int]]:
    """How people spell `answer` (the canonical, normalized one), with weights."""
    if kind == "count":
        word = NUMBER_WORDS[int(answer)]
        return [(answer, 6), (word, 2), (word.capitalize(), 1), (f"{word.capitalize()}.", 1)]
    if kind == "yes_no":
        return _YES_NO_VARIANTS[answer]
    if kind == "color":
        return [(answer, 7), (answer.capitalize(), 2), (f"{answer}.", 1)]
    if kind == "shape":
        return [(answer, 5), (f"a {answer}", 2), (answer.capitalize(), 1), (_SHAPE_SYNONYMS[answer], 1), (f"{answer}.", 1)]
    if kind == "position":
        return [(answer, 5), (answer.capitalize(), 1), (answer.replace(" ", "-"), 2), (_POSITION_SYNONYMS[answer], 1), (f"{answer} corner", 1)]
    raise ValueError(f"unknown question kind {kind!r}")


def _wrong_answer(kind: str, answer: str, rng: random.Random) -> str:
    if kind == "count":
        count = int(answer)
        return str(count + 1 if count == 1 else count + rng.choice((-1, 1)))
    if kind == "yes_no":
        return "no" if answer == "yes" else "yes"
    pool = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}[kind]
    return rng.choice([a for a in pool if a != answer])


def human_answers(kind: str, answer: str, rng: random.Random, count: int = NUM_ANNOTATORS) -> list[str]:
    """`count` annotators' answers to a question whose true answer is `answer`."""
    variants = answer_variants(kind, answer)
    return [_wrong_answer(kind, answer, rng) if rng.random() < ANNOTATOR_ERROR else _weighted(rng, variants) for _ in range(count)]


def scene_questions(objects: list[dict], rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, question, canonical answer) for one scene: a count, a colour, a shape, a yes/no and a position
    question. Every question picks out what it asks about unambiguously (a shape named only when it is the only
    one of its kind, and so on)."""
    shapes = Counter(o["shape"] for o in objects)
    colors = Counter(o["color"] for o in objects)
    pairs = Counter((o["color"], o["shape"]) for o in objects)
    questions = [("count", rng.choice(("how many shapes are there?", "how many objects are there?")), str(len(objects)))]

    target = rng.choice(objects)
    if shapes[target["shape"]] == 1 and rng.random() < 0.5:
        questions.append(("color", f"what color is the {target['shape']}?", target["color"]))
    else:
        questions.append(("color", f"what color is the shape in the {target['position']}?", target["color"]))

    target = rng.choice(objects)
    if colors[target["color"]] == 1 and rng.random() < 0.5:
        questions.append(("shape", f"what shape is {target['color']}?", target["shape"]))
    else:
        questions.append(("shape", f"what shape is in the {target['position']}?", target["shape"]))

    if rng.random() < 0.5:  # balanced: half the pairs asked about are in the scene
        color, shape = rng.choice(list(pairs))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs])
    questions.append(("yes_no", f"is there a {color} {shape}?", "yes" if (color, shape) in pairs else "no"))

    unique = [o for o in objects if pairs[(o["color"], o["shape"])] == 1]
    if unique:
        target = rng.choice(unique)
        questions.append(("position", f"where is the {target['color']} {target['shape']}?", target["position"]))
    return questions


def write_vqa_rows(scene_file: str, output_file: str, rng: random.Random, first_question_id: int) -> int:
    """Turn the scene rows of `write_demo_dataset` into VQA rows; returns the number of questions written."""
    with open(scene_file) as f:
        scenes = [json.loads(line) for line in f]
    question_id = first_question_id
    with open(output_file, "w") as f:
        for scene in scenes:
            for kind, question, answer in scene_questions(scene["objects"], rng):
                row = {
                    "image": scene["image"],
                    "question": question,
                    "answers": human_answers(kind, answer, rng),
                    "question_id": question_id,
                    "answer_type": ANSWER_TYPES[kind],
                    "question_type": kind,
                }
                f.write(json.dumps(row) + "\n")
                question_id += 1
    return question_id - first_question_id


def majority_baselines(train_file: str, eval_file: str) -> dict[str, float]:
    """VQA accuracy on `eval_file` of two answer priors learnt from `train_file`, blind to the image:
    always the most common training answer ("majority_answer"), and the most common answer of the question's
    kind ("majority_per_question_type")."""
    from .vqa import normalize_answer

    def read(path):
        with open(path) as f:
            return [json.loads(line) for line in f]

    train, evaluation = read(train_file), read(eval_file)
    overall, by_kind = Counter(), {}
    for row in train:
        answer = Counter(normalize_answer(a) for a in row["answers"]).most_common(1)[0][0]
        overall[answer] += 1
        by_kind.setdefault(row["question_type"], Counter())[answer] += 1
    top = overall.most_common(1)[0][0]
    answers = [row["answers"] for row in evaluation]
    per_kind = [by_kind[row["question_type"]].most_common(1)[0][0] for row in evaluation]
    return {
        "majority_answer": vqa_score_summary([top] * len(answers), answers)["vqa_accuracy"],
        "majority_per_question_type": vqa_score_summary(per_kind, answers)["vqa_accuracy"],
    }


def build_demo_vilt(
    directory: str, image_size: int = 32, patch_size: int = 16, hidden_size: int = 128, num_layers: int = 4, seed: int = 0
):
    """A tiny `ViltForQuestionAnswering` with a `ViltProcessor` (resizing the shorter side to `image_size`), saved in
    `directory`. Its head has the config's default two labels, like the MLM checkpoint: fine-tuning builds the
    answer set and a new head.

    The defaults (4 layers, width 128, the 64x64 scenes resized to 32x32 and cut into 16x16 patches) make a 2x2
    grid whose cells each hold one corner's object whole: 4 image tokens, so a CPU epoch takes minutes, and each
    object is seen by one patch embedding. (Tried on the demo, 4 epochs each: 32x32 patches on 64x64 images
    learnt a little less; 16x16 patches on 64x64, and 8x8 on 32x32 at width 64, learnt no faster per epoch and
    cost more per step.)"""
    import torch
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    torch.manual_seed(seed)
    tokenizer = build_demo_bert_tokenizer(directory)
    tokenizer.model_max_length = 40  # ViLT's text positions
    config = ViltConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        image_size=image_size,
        patch_size=patch_size,
        max_position_embeddings=40,
    )
    model = ViltForQuestionAnswering(config)
    # Sides rounded down to a multiple of the patch size (ViLT-B/32 uses 32 for both).
    image_processor = ViltImageProcessor(size={"shortest_edge": image_size}, size_divisor=patch_size)
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def prepare_vqa_demo(output_dir: str, num_train: int = 2000, seed: int = 0) -> dict[str, float]:
    """Data in <output_dir>/vqa_data ({train,validation,test}.jsonl and images/), a tiny ViLT in
    <output_dir>/tiny_vilt (configs/demo_vqa.yaml). `num_train` counts training images (about five questions
    each). Returns and logs the image-blind baselines on the validation questions."""
    data_dir = os.path.join(output_dir, "vqa_data")
    # Scenes with one to three objects, so counting and "which one" questions mean something.
    scene_files = write_demo_dataset(data_dir, num_train=num_train, num_validation=200, num_test=100, max_objects=3, seed=seed)
    rng = random.Random(seed + 1)
    first_id = 0
    for split, scene_file in scene_files.items():
        count = write_vqa_rows(scene_file, scene_file, rng, first_id)  # the question rows replace the scene rows
        logger.info("%s: %d questions", split, count)
        first_id += count
    build_demo_vilt(os.path.join(output_dir, "tiny_vilt"), seed=seed)
    baselines = majority_baselines(scene_files["train"], scene_files["validation"])
    logger.info(
        "image-blind baselines on validation (vqa_accuracy): most common answer %.3f, most common answer per question type %.3f",
        baselines["majority_answer"],
        baselines["majority_per_question_type"],
    )
    return baselines
