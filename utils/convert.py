r"""Converters from the files COCO, the Karpathy splits and VQAv2 are downloaded as to the jsonl rows the scripts
read (`datasets` 4 dropped loading scripts, so `ydshieh/coco_dataset_script` no longer loads).

    python -m utils.convert coco-captions --annotations captions_val2017.json --images val2017 --output data/coco_val.jsonl
    python -m utils.convert karpathy --split_json dataset_coco.json --image_root /data/coco --output_dir data/karpathy_coco
    python -m utils.convert vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \
        --annotations v2_mscoco_val2014_annotations.json --images val2014 --output data/vqav2_val.jsonl
    python -m utils.convert shards --input data/karpathy_coco/train.jsonl --output_dir data/shards/train

Rows written (image paths are relative to the folder of the jsonl file that names them, as `utils.data` reads them):

* captions (run_clip.py, run_blip_caption.py): {"image", "captions": [...], "image_id"};
* VQA (run_vilt_vqa.py): {"image", "question", "question_id", "image_id", "answers": [10 strings], "answer_type",
  "question_type", "multiple_choice_answer"}; without --annotations (test-dev, test) the rows have no answers.

`shards` packs any of these jsonl files, images included, into webdataset .tar shards (`<key>.jpg` + `<key>.json`, the
row without its image) that the scripts read with --train_file "data/shards/train/*.tar" --streaming.

Every image a row names must exist: by default a missing one stops the conversion before anything is written,
naming the first few; --skip_missing_images leaves those rows out instead. Captions are stripped of surrounding
whitespace (COCO's carry trailing spaces and newlines); empty ones are dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
# How many missing files or unmatched ids a message names.
_SHOWN = 5


# --- Reading and checking the downloaded json files ----------------------------------------------------------


def load_json(path: str, list_key: str, expected: str) -> dict:
    """The json object in `path`, checked to hold a list under `list_key`; `expected` names the file a user
    should have passed (for the error message)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; expected {expected}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON ({err}); expected {expected}") from None
    if not isinstance(data, dict) or not isinstance(data.get(list_key), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path!r} has no list under the key {list_key!r} (found: {found}); expected {expected}")
    return data


def get_field(record, key: str, where: str, expected: str, types: type | tuple[type, ...]):
    """record[key], or a ValueError naming where the record is (file and position), the key, the keys the record
    has and the file that was expected."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object; expected {expected}")
    if key not in record:
        raise ValueError(f"{where} has no key {key!r} (its keys: {sorted(record)}); expected {expected}")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ValueError(f"{where}[{key!r}] is {value!r}, of type {type(value).__name__}; expected {expected}")
    return value


def relative_image_path(path: str, output_dir: str) -> str:
    """An image (or image folder) `path` relative to `output_dir`, both relative to the working directory or
    absolute, with "/" separators. On Windows, across drives, there is no relative path: the absolute one is kept."""
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))
    except ValueError:
        return os.path.abspath(path)
    return relative.replace(os.sep, "/")


def _join(folder: str, name: str) -> str:
    """`name` inside `folder`, a path from `relative_image_path` (computed once per folder, not per image)."""
    return name if folder == "." else f"{folder}/{name}"


def _preview(items: Iterable) -> str:
    items = list(items)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(str(item) for item in items[:_SHOWN]) + more


def _clean_captions(raw: list[str]) -> list[str]:
    return [caption.strip() for caption in raw if caption.strip()]


# --- COCO captions ---------------------------------------------------------------------------------------------

_COCO_EXPECTED = "a COCO captions file such as captions_val2017.json ({'images': [...], 'annotations': [{'image_id', 'id', 'caption'}]})"


def convert_coco_captions(data: dict, image_dir: str, output_dir: str, source: str = "annotations") -> list[dict]:
    """COCO captions json (already loaded) -> one row per image, in ascending image id, with all its captions in
    ascending annotation id: {"image": path relative to `output_dir`, "captions": [...], "image_id": id}.

    Images without any caption are left out (logged). A caption for an image the file does not list, or an image
    id listed twice, is a ValueError: the file is damaged or two files were mixed.
    """
    images = {}
    for position, image in enumerate(get_field(data, "images", source, _COCO_EXPECTED, list)):
        where = f"{source}: images[{position}]"
        image_id = get_field(image, "id", where, _COCO_EXPECTED, (int, str))
        if image_id in images:
            raise ValueError(f"{where}: image id {image_id!r} is listed twice; expected {_COCO_EXPECTED}")
        images[image_id] = get_field(image, "file_name", where, _COCO_EXPECTED, str)
    captions: dict = {}
    unknown = []
    for position, annotation in enumerate(get_field(data, "annotations", source, _COCO_EXPECTED, list)):
        where = f"{source}: annotations[{position}]"
        image_id = get_field(annotation, "image_id", where, _COCO_EXPECTED, (int, str))
        caption = get_field(annotation, "caption", where, _COCO_EXPECTED, str)
        annotation_id = get_field(annotation, "id", where, _COCO_EXPECTED, (int, str))
        if image_id not in images:
            unknown.append(image_id)
        captions.setdefault(image_id, []).append((annotation_id, caption))
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} captions are for image ids that its 'images' list does not hold "
            f"({_preview(unknown)}); the file is damaged or not {_COCO_EXPECTED}"
        )
    folder = relative_image_path(image_dir, output_dir)
    rows, uncaptioned = [], []
    for image_id in sorted(images):
        kept = _clean_captions([caption for _, caption in sorted(captions.get(image_id, []))])
        if not kept:
            uncaptioned.append(image_id)
            continue
        rows.append({"image": _join(folder, images[image_id]), "captions": kept, "image_id": image_id})
    if uncaptioned:
        logger.warning("%s: %d images have no caption and are left out: ids %s", source, len(uncaptioned), _preview(uncaptioned))
    return rows


# --- Karpathy splits -----------------------------------------------------------------------------------------

_KARPATHY_EXPECTED = (
    "a Karpathy split file such as dataset_coco.json or dataset_flickr30k.json "
    "({'images': [{'filename', 'split', 'sentences': [{'raw'}], ...}]})"
)


def convert_karpathy(
    data: dict, image_root: str, output_dir: str, include_restval: bool = True, source: str = "split json"
) -> dict[str, list[dict]]:
    """Karpathy split json (already loaded) -> {"train", "validation", "test"} rows in file order:
    {"image": path relative to `output_dir`, "captions": the sentences' "raw" text, "image_id"}.

    The image is `image_root/filepath/filename` (dataset_coco.json has "filepath", e.g. "val2014";
    dataset_flickr30k.json has none: `image_root/filename`). "restval" (30,504 COCO val2014 images outside the
    5k val and 5k test) joins train unless `include_restval` is False, when it is dropped. "image_id" is the COCO
    id ("cocoid", for scoring against the official COCO annotations) where there is one, else "imgid".
    """
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    folders: dict[str, str] = {}
    for position, image in enumerate(get_field(data, "images", source, _KARPATHY_EXPECTED, list)):
        where = f"{source}: images[{position}]"
        split = get_field(image, "split", where, _KARPATHY_EXPECTED, str)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{where}['split'] is {split!r}; expected one of {sorted(KARPATHY_SPLITS)} in {_KARPATHY_EXPECTED}")
        if split == "restval" and not include_restval:
            continue
        filename = get_field(image, "filename", where, _KARPATHY_EXPECTED, str)
        filepath = get_field(image, "filepath", where, _KARPATHY_EXPECTED, str) if "filepath" in image else ""
        raw = []
        for number, sentence in enumerate(get_field(image, "sentences", where, _KARPATHY_EXPECTED, list)):
            raw.append(get_field(sentence, "raw", f"{where}['sentences'][{number}]", _KARPATHY_EXPECTED, str))
        captions = _clean_captions(raw)
        if not captions:
            raise ValueError(f"{where} ({filename}) has no non-empty sentence; expected {_KARPATHY_EXPECTED}")
        image_id = image["cocoid"] if "cocoid" in image else image.get("imgid", position)
        if filepath not in folders:
            folders[filepath] = relative_image_path(os.path.join(image_root, filepath), output_dir)
        path = _join(folders[filepath], filename)
        splits[KARPATHY_SPLITS[split]].append({"image": path, "captions": captions, "image_id": image_id})
    return splits


# --- VQAv2 -------------------------------------------------------------------------------------------------------

_QUESTIONS_EXPECTED = (
    "a VQA questions file such as v2_OpenEnded_mscoco_val2014_questions.json "
    "({'questions': [{'image_id', 'question', 'question_id'}], 'data_subtype': ...})"
)
_ANNOTATIONS_EXPECTED = (
    "a VQA annotations file such as v2_mscoco_val2014_annotations.json "
    "({'annotations': [{'question_id', 'image_id', 'answers': [{'answer', ...}], 'answer_type', ...}]})"
)


def vqa_image_name_format(questions: dict, source: str = "questions") -> str:
    """The COCO file name pattern of the questions' images, from their "data_subtype": "val2014" ->
    "COCO_val2014_{image_id:012d}.jpg". test-dev2015 questions are about test2015 images (test-dev is a subset of
    test), so "test-dev2015" -> "COCO_test2015_...".
    """
    subtype = questions.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise ValueError(
            f"{source} has no 'data_subtype' (such as 'val2014') to name its images by; pass --image_name_format, "
            "e.g. 'COCO_val2014_{image_id:012d}.jpg'"
        )
    return "COCO_" + subtype.replace("test-dev", "test") + "_{image_id:012d}.jpg"


def convert_vqav2(
    questions: dict,
    annotations: dict | None,
    image_dir: str,
    output_dir: str,
    image_name_format: str | None = None,
    questions_source: str = "questions",
    annotations_source: str = "annotations",
) -> list[dict]:
    """VQAv2 questions json (+ annotations json, both already loaded) -> one row per question, in the questions
    file's order: {"image", "question", "question_id", "image_id"} plus, with annotations, "answers" (the ten
    annotators' answers as strings, in answer_id order), "answer_type", "question_type", "multiple_choice_answer".

    The image is `image_dir/<image_name_format.format(image_id=...)>`, by default from the questions'
    "data_subtype" (`vqa_image_name_format`). With annotations, questions that have none are left out and
    logged (and so are annotations without a question); a question id listed twice, or an annotation whose
    image_id differs from its question's, is a ValueError (mixed files).
    """
    if image_name_format is None:
        image_name_format = vqa_image_name_format(questions, questions_source)
    by_question = None
    if annotations is not None:
        subtypes = (questions.get("data_subtype"), annotations.get("data_subtype"))
        if None not in subtypes and subtypes[0] != subtypes[1]:
            raise ValueError(
                f"{questions_source} is for {subtypes[0]!r} but {annotations_source} for {subtypes[1]!r}; "
                "pass the questions and annotations of the same split"
            )
        by_question = {}
        for position, annotation in enumerate(get_field(annotations, "annotations", annotations_source, _ANNOTATIONS_EXPECTED, list)):
            where = f"{annotations_source}: annotations[{position}]"
            question_id = get_field(annotation, "question_id", where, _ANNOTATIONS_EXPECTED, (int, str))
            if question_id in by_question:
                raise ValueError(f"{where}: question id {question_id!r} is annotated twice; expected {_ANNOTATIONS_EXPECTED}")
            by_question[question_id] = (where, annotation)
    folder = relative_image_path(image_dir, output_dir)
    rows, seen, unanswered = [], set(), []
    for position, question in enumerate(get_field(questions, "questions", questions_source, _QUESTIONS_EXPECTED, list)):
        where = f"{questions_source}: questions[{position}]"
        question_id = get_field(question, "question_id", where, _QUESTIONS_EXPECTED, (int, str))
        image_id = get_field(question, "image_id", where, _QUESTIONS_EXPECTED, int)
        text = get_field(question, "question", where, _QUESTIONS_EXPECTED, str)
        if question_id in seen:
            raise ValueError(f"{where}: question id {question_id!r} is listed twice; expected {_QUESTIONS_EXPECTED}")
        seen.add(question_id)
        try:
            file_name = image_name_format.format(image_id=image_id)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"--image_name_format {image_name_format!r} does not format with image_id={image_id} ({err!r}); "
                "use a pattern with the one field {image_id}, e.g. 'COCO_val2014_{image_id:012d}.jpg'"
            ) from None
        row = {
            "image": _join(folder, file_name),
            "question": text,
            "question_id": question_id,
            "image_id": image_id,
        }
        if by_question is not None:
            if question_id not in by_question:
                unanswered.append(question_id)
                continue
            row.update(_vqa_answers(*by_question[question_id], image_id, where))
        rows.append(row)
    if unanswered:
        logger.warning(
            "%s: %d of %d questions have no annotation in %s and are left out: question ids %s",
            questions_source, len(unanswered), len(seen), annotations_source, _preview(unanswered),
        )
    if by_question is not None and len(by_question.keys() - seen):
        orphans = sorted(by_question.keys() - seen, key=str)
        logger.warning(
            "%s: %d annotations are for questions not in %s and are ignored: question ids %s",
            annotations_source, len(orphans), questions_source, _preview(orphans),
        )
    return rows


def _vqa_answers(where: str, annotation: dict, image_id: int, question_where: str) -> dict:
    """The answer fields of one annotation, checked against its question."""
    annotated_image = get_field(annotation, "image_id", where, _ANNOTATIONS_EXPECTED, int)
    if annotated_image != image_id:
        raise ValueError(
            f"{where} puts question {annotation['question_id']!r} on image {annotated_image} but {question_where} on "
            f"image {image_id}; pass the questions and annotations of the same split"
        )
    answers = get_field(annotation, "answers", where, _ANNOTATIONS_EXPECTED, list)
    if not answers:
        raise ValueError(f"{where} (question {annotation['question_id']!r}) has no answers; expected {_ANNOTATIONS_EXPECTED}")
    for number, answer in enumerate(answers):
        get_field(answer, "answer", f"{where}['answers'][{number}]", _ANNOTATIONS_EXPECTED, str)
    ordered = sorted(answers, key=lambda answer: answer.get("answer_id", 0))  # stable: file order without ids
    fields = {"answers": [answer["answer"] for answer in ordered]}
    fields["answer_type"] = get_field(annotation, "answer_type", where, _ANNOTATIONS_EXPECTED, str)
    for key in ("question_type", "multiple_choice_answer"):
        if key in annotation:
            fields[key] = get_field(annotation, key, where, _ANNOTATIONS_EXPECTED, str)
    return fields


# --- Images, writing -----------------------------------------------------------------------------------------


def find_missing_images(rows: list[dict], output_dir: str) -> list[str]:
    """Paths (as the filesystem sees them) of the row images that are not files. One directory listing per
    folder instead of one stat per image: COCO train has 118k images, often on a network disk."""
    listings: dict[str, set[str]] = {}
    missing = []
    for row in rows:
        path = os.path.normpath(os.path.join(output_dir, row["image"]))
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        # The stat only for names not listed: a case-insensitive disk may still hold them.
        if name not in listings[folder] and not os.path.isfile(path):
            missing.append(path)
    return missing


def drop_missing_images(rows: list[dict], output_dir: str, skip_missing: bool, images_flag: str, source: str) -> list[dict]:
    """`rows` whose images exist. A missing image is a FileNotFoundError naming the count, the first few and the
    flag to check, unless `skip_missing`, when those rows are left out (logged)."""
    missing = find_missing_images(rows, output_dir)
    if not missing:
        return rows
    message = f"{len(missing)} of the {len(rows)} images that {source} names do not exist: {_preview(missing)}"
    if not skip_missing:
        raise FileNotFoundError(
            f"{message}. Check {images_flag} (the folder holding the images), or pass --skip_missing_images to "
            "leave those rows out."
        )
    logger.warning("%s; their rows are left out (--skip_missing_images)", message)
    missing = set(missing)
    return [row for row in rows if os.path.normpath(os.path.join(output_dir, row["image"])) not in missing]


def write_jsonl(rows: list[dict], path: str) -> None:
    """One json object per line, UTF-8; written to a temporary file first, so an interrupted run leaves no
    half-written file under `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, path)


# --- Webdataset shards ---------------------------------------------------------------------------------------


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-empty line, one at a time."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from None


def image_extension_of(path: str) -> str:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if extension == "jpeg" else extension


def write_shards(
    jsonl_path: str,
    output_dir: str,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    image_column: str = "image",
    image_extension: str | None = None,
    skip_missing: bool = False,
) -> dict[str, int]:
    """The rows of a jsonl file -> webdataset shards `output_dir/<prefix>-000000.tar`, ... of `samples_per_shard`
    samples each; returns {shard: samples}. A sample is `<key>.<extension>`, the image file's bytes as they are
    (not re-encoded), and `<key>.json`, the row without its image column; the key is the row's position,
    zero-padded (a key has no dot: webdataset splits a file name at its first one). Image paths are relative to
    the jsonl's folder, as the scripts read them.

    Rows are read one at a time, twice: first every image is checked to exist (a missing one stops the conversion
    before anything is written, unless `skip_missing`) and to share one extension (all samples must: the loader
    names columns by extension; `image_extension` names them all alike, as PIL reads the format from the bytes);
    then the shards are written, each to a temporary file first."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples_per_shard must be >= 1, got {samples_per_shard}")
    base_dir = os.path.dirname(os.path.abspath(jsonl_path))

    def image_path(number: int, row: dict) -> str:
        value = row.get(image_column) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"{jsonl_path}, line {number}: no image path under {image_column!r} (got {value!r}); pass --image_column")
        return os.path.join(base_dir, value)

    missing, extensions = [], set()
    for number, row in read_jsonl(jsonl_path):
        path = image_path(number, row)
        if not os.path.isfile(path):
            missing.append(path)
        else:
            extensions.add(image_extension_of(path))
    if missing and not skip_missing:
        raise FileNotFoundError(
            f"{len(missing)} images that {jsonl_path} names do not exist: {_preview(missing)}. Pass --skip_missing_images "
            "to leave those rows out."
        )
    if missing:
        logger.warning("%d images that %s names do not exist; their rows are left out: %s", len(missing), jsonl_path, _preview(missing))
    if image_extension is None and len(extensions) > 1:
        raise ValueError(
            f"{jsonl_path} names images of several types ({sorted(extensions)}); the samples of a webdataset share "
            "one. Pass --image_extension (e.g. jpg) to store them all under it: the bytes keep their own format."
        )
    extension = image_extension or (extensions.pop() if extensions else "jpg")

    os.makedirs(output_dir, exist_ok=True)
    written: dict[str, int] = {}
    tar = shard_path = None
    for position, (number, row) in enumerate(read_jsonl(jsonl_path)):
        path = image_path(number, row)
        if not os.path.isfile(path):
            continue
        if tar is None or written[shard_path] == samples_per_shard:
            if tar is not None:
                _close_shard(tar, shard_path)
            shard_path = os.path.join(output_dir, f"{prefix}-{len(written):06d}.tar")
            tar, written[shard_path] = tarfile.open(shard_path + ".partial", "w"), 0
        key = f"{position:09d}"
        with open(path, "rb") as f:
            _add_member(tar, f"{key}.{extension}", f.read())
        fields = {name: value for name, value in row.items() if name != image_column}
        _add_member(tar, f"{key}.json", json.dumps(fields, ensure_ascii=False).encode("utf-8"))
        written[shard_path] += 1
    if tar is not None:
        _close_shard(tar, shard_path)
    return written


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def _close_shard(tar: tarfile.TarFile, path: str) -> None:
    tar.close()
    os.replace(path + ".partial", path)


# --- Command line ------------------------------------------------------------------------------------------


def _output_dir(output_file: str) -> str:
    if not output_file.endswith(".jsonl"):
        raise ValueError(f"--output {output_file!r} should be a .jsonl file (the scripts read json lines)")
    return os.path.dirname(os.path.abspath(output_file))


def _check_folder(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a folder; pass the folder holding the images")


def run_coco_captions(args: argparse.Namespace) -> dict[str, int]:
    output_dir = _output_dir(args.output)
    _check_folder(args.images, "--images")
    data = load_json(args.annotations, "annotations", _COCO_EXPECTED)
    rows = convert_coco_captions(data, args.images, output_dir, source=args.annotations)
    rows = drop_missing_images(rows, output_dir, args.skip_missing_images, "--images", args.annotations)
    write_jsonl(rows, args.output)
    logger.info("%s: %d images, %d captions", args.output, len(rows), sum(len(row["captions"]) for row in rows))
    return {args.output: len(rows)}


def run_karpathy(args: argparse.Namespace) -> dict[str, int]:
    _check_folder(args.image_root, "--image_root")
    data = load_json(args.split_json, "images", _KARPATHY_EXPECTED)
    splits = convert_karpathy(data, args.image_root, args.output_dir, not args.exclude_restval, source=args.split_json)
    splits = {
        split: drop_missing_images(rows, args.output_dir, args.skip_missing_images, "--image_root", f"{args.split_json} ({split})")
        for split, rows in splits.items()
    }
    written = {}
    for split, rows in splits.items():
        path = os.path.join(args.output_dir, f"{split}.jsonl")
        write_jsonl(rows, path)
        logger.info("%s: %d images, %d captions", path, len(rows), sum(len(row["captions"]) for row in rows))
        written[path] = len(rows)
    return written


def run_vqav2(args: argparse.Namespace) -> dict[str, int]:
    output_dir = _output_dir(args.output)
    _check_folder(args.images, "--images")
    questions = load_json(args.questions, "questions", _QUESTIONS_EXPECTED)
    annotations = None if args.annotations is None else load_json(args.annotations, "annotations", _ANNOTATIONS_EXPECTED)
    rows = convert_vqav2(
        questions, annotations, args.images, output_dir, args.image_name_format,
        questions_source=args.questions, annotations_source=args.annotations or "annotations",
    )
    rows = drop_missing_images(rows, output_dir, args.skip_missing_images, "--images (and --image_name_format)", args.questions)
    write_jsonl(rows, args.output)
    answered = "with answers" if annotations is not None else "without answers (no --annotations)"
    logger.info("%s: %d questions on %d images, %s", args.output, len(rows), len({row["image"] for row in rows}), answered)
    return {args.output: len(rows)}


def run_shards(args: argparse.Namespace) -> dict[str, int]:
    prefix = args.prefix or os.path.splitext(os.path.basename(args.input))[0]
    written = write_shards(args.input, args.output_dir, prefix, args.samples_per_shard, args.image_column, args.image_extension,
                           args.skip_missing_images)
    logger.info("%s: %d samples in %d shards (%s-*.tar)", args.output_dir, sum(written.values()), len(written), prefix)
    return written


def main(argv=None) -> dict[str, int]:
    """Parse, convert, write; returns {written file: number of rows}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser("coco-captions", help="COCO captions_*.json + its image folder -> one jsonl")
    coco.add_argument("--annotations", required=True, help="captions_train2017.json, captions_val2017.json, ...")
    coco.add_argument("--images", required=True, help="the folder of the images it names, e.g. val2017")
    coco.add_argument("--output", required=True, help="the jsonl file to write")
    coco.set_defaults(run=run_coco_captions)

    karpathy = commands.add_parser("karpathy", help="dataset_coco.json / dataset_flickr30k.json -> train/validation/test.jsonl")
    karpathy.add_argument("--split_json", required=True, help="dataset_coco.json, dataset_flickr30k.json, ...")
    karpathy.add_argument("--image_root", required=True, help="folder the files' filepath/filename are under (COCO: holding train2014/ and val2014/)")
    karpathy.add_argument("--output_dir", required=True, help="folder for train.jsonl, validation.jsonl, test.jsonl (one per data set)")
    karpathy.add_argument("--exclude_restval", action="store_true", help="leave the 'restval' images out of train")
    karpathy.set_defaults(run=run_karpathy)

    vqa = commands.add_parser("vqav2", help="VQAv2 questions (+ annotations) + the COCO image folder -> one jsonl")
    vqa.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
    vqa.add_argument("--annotations", default=None, help="v2_mscoco_<split>_annotations.json; leave out for test-dev/test (rows without answers)")
    vqa.add_argument("--images", required=True, help="the COCO image folder, e.g. val2014 (test2015 for test-dev2015)")
    vqa.add_argument("--output", required=True, help="the jsonl file to write")
    vqa.add_argument(
        "--image_name_format", default=None,
        help="image file name from image_id (default: from the questions' data_subtype, 'COCO_val2014_{image_id:012d}.jpg')",
    )
    vqa.set_defaults(run=run_vqav2)

    shards = commands.add_parser("shards", help="a jsonl of rows naming images -> webdataset .tar shards, images inside (for --streaming)")
    shards.add_argument("--input", required=True, help="a jsonl file as the other commands write (image paths relative to it)")
    shards.add_argument("--output_dir", required=True, help="the folder for the shards")
    shards.add_argument("--prefix", default=None, help="shard names: <prefix>-000000.tar, ... (default: the input's name)")
    shards.add_argument("--samples_per_shard", type=int, default=1000, help="samples per shard (aim for a few hundred MB per shard)")
    shards.add_argument("--image_column", default="image", help="the column holding each row's image path")
    shards.add_argument("--image_extension", default=None, help="store every image as <key>.<this> (default: the files' own extension)")
    shards.set_defaults(run=run_shards)

    for command in (coco, karpathy, vqa, shards):
        command.add_argument("--skip_missing_images", action="store_true", help="leave out rows whose image is missing instead of stopping")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    main()
