"""Loading image-text data: Hub datasets, local csv/json/jsonl files, image folders with metadata.jsonl, webdataset
.tar shards; whole (map-style) or, with --streaming, the training split as a stream (utils.streams).

Image values are kept undecoded (paths, or `datasets` Image values with `decode=False`) and decoded by
`utils.images.load_image` in the data loader, so one bad file is reported with its name instead of
failing inside `datasets`; relative paths resolve against the folder of the data file that names them.

Values are read as the file holds them, row by row, never as a type guessed from the first rows and forced on
the rest (which `datasets` does for csv blocks, json streams, webdataset .json keys and image folders' metadata):
a csv is text, json values and webdataset .json keys are `datasets.Json`, and the scripts' row checks judge each
row, skipping a bad one by name.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import random
from dataclasses import dataclass

import datasets
import fsspec
import torch
from datasets.utils.file_utils import xopen
from transformers import TrainerCallback

from .images import ImageLoadError, load_image
from .text import parse_captions

logger = logging.getLogger(__name__)

DATA_FILE_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Compressed csv/json/jsonl files are read as the file inside (train.jsonl.gz: a .jsonl file), decompressed as read.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
SHARD_EXTENSION = ".tar"
# A webdataset sample is the files that share a key (000123.jpg, 000123.json); these become the scripts' columns.
WEBDATASET_TEXT_FIELDS = ("txt", "text")
WEBDATASET_JSON_FIELDS = ("json", "jsn")
IMAGE_FOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
WEBDATASET_KEY_SAMPLES = 5
JSON_BATCH_ROWS = 10_000
JSON_STREAM_KEY_ROWS = 1000
# In a jsonl stream, a line that cannot be read becomes a row whose only value is here: "<file> line N: why". The
# training stream skips and records it (utils.streams), as it does a row whose image will not decode.
UNREADABLE_COLUMN = "__unreadable__"
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class Split:
    """One split of raw data: the rows, the folder relative image paths resolve against, a name for messages.
    `rows` is a `datasets.IterableDataset` for a training split read with --streaming."""

    rows: datasets.Dataset | datasets.IterableDataset
    base_dir: str | None
    origin: str

    @property
    def streaming(self) -> bool:
        return isinstance(self.rows, datasets.IterableDataset)


def load_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str | None] | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
    streaming: bool = False,
) -> dict[str, Split]:
    """Load the requested splits, keyed "train", "validation", "test".

    `data_files` maps split -> a csv/json/jsonl/parquet file, an image folder (holding the images and a
    metadata.jsonl/csv naming a `file_name` per row) or webdataset shards (`find_shards`). Local files take
    precedence over `dataset_name` split by split, so a Hub training set can be evaluated on a local file.

    With `streaming`, the training split is a `datasets.IterableDataset` read on demand: nothing is downloaded or
    written to the datasets cache up front. So are a Hub dataset's other splits (a whole Hub dataset would be
    downloaded); local evaluation files are read whole, with every check. Webdataset samples become columns
    (`webdataset_columns`) either way.
    """
    data_files = {k: v for k, v in (data_files or {}).items() if v}
    splits: dict[str, Split] = {}
    if dataset_name:
        hub = load_hub(dataset_name, dataset_config_name, cache_dir, streaming)
        for split, aliases in SPLIT_ALIASES.items():
            found = next((a for a in aliases if a in hub), None)
            if found is not None:
                splits[split] = Split(hub[found], None, f"{dataset_name}[{found}]")
    for split, path in data_files.items():
        splits[split] = _load_local(path, cache_dir, streaming and split == "train")
    for split in splits.values():
        if split.streaming and split.rows.features is None:
            split.rows = split.rows._resolve_features()  # csv streams learn their columns from the first rows
        shards = is_webdataset(split.rows)
        split.rows = webdataset_columns(split.rows)
        for name, feature in split.rows.features.items():
            # Undecoded: utils.images.load_image decodes, so a bad file is skipped with its name. Streams and shards
            # always; other whole data sets for the image column the script names.
            if isinstance(feature, datasets.Image) and feature.decode and (split.streaming or shards or name == image_column):
                split.rows = split.rows.cast_column(name, datasets.Image(decode=False))
    return splits


def load_requested_splits(data_args, training_args, cache_dir: str | None = None, image_column: str | None = None) -> dict[str, Split]:
    """The splits the run asks for (train with --do_train, validation with --do_eval, test with --do_predict),
    each cut to its --max_*_samples; a requested split that the data lacks stops the run here, naming the flag.
    `data_args` is a utils.arguments.DataSourceArguments.

    With --streaming the training split stays a stream (cut with `take`); streamed evaluation splits (a Hub
    dataset's), which must be scored exactly once and are decoded up front, are read into memory (each cut first
    to its limit)."""
    wanted = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    if not any(wanted.values()):
        raise ValueError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    if data_args.streaming and training_args.do_train:
        check_streaming_schedule(training_args)
    requested_files = {split: path for split, path in data_args.data_files().items() if wanted[split]}
    splits = load_splits(
        data_args.dataset_name, data_args.dataset_config_name, requested_files, cache_dir, image_column, streaming=data_args.streaming
    )
    limits = data_args.sample_limits()
    requested = {}
    for split, needed in wanted.items():
        if not needed:
            continue
        if split not in splits:
            flag = {"train": "do_train", "validation": "do_eval", "test": "do_predict"}[split]
            raise ValueError(f"--{flag} needs a {split} split: pass --{split}_file or a --dataset_name that has one.")
        data = splits[split]
        if data.streaming:
            if limits[split] is not None:
                data.rows = data.rows.take(limits[split])
            if split != "train":
                data.rows = read_stream(data.rows)
                logger.info("%s: read %d rows of %s into memory (evaluation is exact; cap it with --max_*_samples)", split, len(data.rows), data.origin)
        elif limits[split] is not None and limits[split] < len(data.rows):
            data.rows = data.rows.select(range(limits[split]))
        requested[split] = data
    return requested


def check_streaming_schedule(training_args) -> None:
    """A stream has no length: the run is as long as --max_steps says, and "epoch" schedules never fire."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError(
            f"--streaming reads the training data as a stream of unknown length, so --num_train_epochs cannot be "
            f"counted; got --max_steps {training_args.max_steps}. Pass --max_steps N, the number of optimizer steps to train."
        )
    for flag in ("eval_strategy", "save_strategy", "logging_strategy"):
        if str(getattr(training_args, flag)) in ("epoch", "IntervalStrategy.EPOCH", "SaveStrategy.EPOCH"):
            raise ValueError(f"--{flag} epoch: with --streaming an epoch has no end before --max_steps; pass --{flag} steps.")


def read_stream(rows: datasets.IterableDataset) -> datasets.Dataset:
    """An (evaluation-sized) stream read into an in-memory data set, keeping its features."""
    return datasets.Dataset.from_list(list(rows), features=rows.features)


def find_shards(path: str) -> list[str] | None:
    """The webdataset shards `path` names, sorted: a .tar file, a folder holding .tar files (and no metadata file,
    which would make it an image folder), or a glob such as 'shards/train-*.tar'. None if it names no shards."""
    if glob.has_magic(path):
        matches = sorted(os.path.abspath(p) for p in glob.glob(path))
        if not matches:
            raise FileNotFoundError(f"data file pattern {path!r} matches no file")
        others = [p for p in matches if not p.endswith(SHARD_EXTENSION)]
        if others:
            raise ValueError(f"data file pattern {path!r} matches {others[0]!r}: a pattern must name webdataset {SHARD_EXTENSION} shards only")
        return matches
    if os.path.isfile(path) and path.lower().endswith(SHARD_EXTENSION):
        return [os.path.abspath(path)]
    if os.path.isdir(path):
        names = os.listdir(path)
        if not any(name.startswith("metadata.") for name in names):
            shards = sorted(os.path.join(os.path.abspath(path), n) for n in names if n.endswith(SHARD_EXTENSION))
            return shards or None
    return None


def webdataset_columns(rows):
    """Webdataset samples (files sharing a key: `000123.jpg`, `000123.txt`, `000123.json`) as the columns the
    scripts read: the keys of the .json file become columns of their own (`captions`, `question`, `answers`...),
    each value as that sample's file holds it (`datasets.Json`); the single image file becomes `image` and the
    .txt file `text`; `__key__` and `__url__` (the shard) stay. The .json keys are those of every sample for a
    whole data set, of the first samples for a stream. Rows that are not webdataset samples are returned as they
    are. Lazy for a stream; for a whole data set the other columns are renamed, not copied."""
    if not is_webdataset(rows):
        return rows
    features = rows.features
    json_field = next((f for f in WEBDATASET_JSON_FIELDS if isinstance(features.get(f), (dict, datasets.Json))), None)
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    for name in images:  # read as stored: decoded by load_image, and a stream's map would otherwise decode them
        rows = rows.cast_column(name, datasets.Image(decode=False))
    keys = _json_keys(rows, json_field) if json_field else []
    renames = {}
    if len(images) == 1 and "image" not in keys and "image" not in features:
        renames[images[0]] = "image"
    text = next((f for f in WEBDATASET_TEXT_FIELDS if f in features), None)
    if text and "text" not in keys and text != "text":
        renames[text] = "text"
    clashes = set(keys) & (set(features) - {json_field})
    if clashes:
        raise ValueError(f"webdataset samples: the .{json_field} keys {sorted(clashes)} clash with the files of the same names")
    if isinstance(rows, datasets.Dataset):
        if json_field:  # the keys' columns written to the cache beside the shards' copy, the rest joined unchanged
            lifted = rows.select_columns([json_field]).map(
                _json_key_columns, batched=True, batch_size=JSON_BATCH_ROWS, fn_kwargs={"json_field": json_field, "keys": keys},
                remove_columns=[json_field], features=datasets.Features({key: datasets.Json() for key in keys}))
            rows = datasets.concatenate_datasets([rows.remove_columns(json_field), lifted], axis=1)
        return rows.rename_columns(renames)
    columns = {renames.get(name, name): feature for name, feature in rows.features.items() if name != json_field}
    columns.update({key: datasets.Json() for key in keys})
    return rows.map(_lift_webdataset_fields, fn_kwargs={"json_field": json_field, "keys": keys, "renames": renames},
                    remove_columns=[json_field, *renames] if json_field else list(renames), features=datasets.Features(columns))


def _json_keys(rows, json_field: str) -> list[str]:
    """The keys of the samples' .json files, in order of first appearance: over every sample of a whole data set,
    over the first WEBDATASET_KEY_SAMPLES of a stream (as many as datasets types them from)."""
    if isinstance(rows, datasets.Dataset):
        samples = (s for batch in rows.select_columns([json_field]).iter(batch_size=JSON_BATCH_ROWS) for s in batch[json_field])
    else:
        samples = (row[json_field] for row in itertools.islice(rows, WEBDATASET_KEY_SAMPLES))
    keys = {}
    for sample in samples:
        keys.update(dict.fromkeys(sample or {}))
    return list(keys)


def _json_key_columns(batch: dict, json_field: str, keys: list[str]) -> dict:
    samples = [sample or {} for sample in batch[json_field]]
    return {key: [_json_text(sample.get(key)) for sample in samples] for key in keys}


def _json_text(value) -> str:
    """`value` as JSON text to store in a `datasets.Json` column. Handed a Python string, Json would store one that
    parses as JSON as that JSON: the caption "null" would read back as None, "42" as 42; encoded first, it reads
    back as written."""
    return json.dumps(value, ensure_ascii=False)


def load_webdataset(shards: list[str], cache_dir: str | None, streaming: bool):
    """Webdataset shards as rows, the samples' .json typed as `datasets.Json` (`json_typed`): every sample keeps
    the types it was written with, and the scripts' row checks judge each one (a bad one is skipped by name);
    `webdataset_columns` then makes its keys columns. Left to infer them, the builder would type each key from the
    first five samples and cast every later sample to that type: a caption written as a string where those held
    lists would train as a list of its characters. Whole (map-style), the shards are copied into the datasets cache
    once; streamed, they are read in place."""
    inferred = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True).features
    return datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", cache_dir=cache_dir, streaming=streaming,
                                 features=json_typed(inferred))


def load_hub(name: str, config: str | None, cache_dir: str | None, streaming: bool):
    """A Hub data set's splits, read as its local twin is: webdataset shards get their samples' .json typed as
    `datasets.Json` (`load_webdataset`; the features a stream of a few samples infers), plain .json/.jsonl files
    go through our reader (`stream_json` streamed, `restore_json_columns` whole). Its builder, looked up once,
    says which it is."""
    builder = datasets.load_dataset_builder(name, config, cache_dir=cache_dir)
    if builder.name == "webdataset":
        first = next(iter(builder.as_streaming_dataset().values()), None)
        if first is not None and first.features is not None:
            return datasets.load_dataset(name, config, cache_dir=cache_dir, streaming=streaming, features=json_typed(first.features))
    files = hub_json_files(builder)
    if streaming and files:
        return datasets.IterableDatasetDict({split: stream_json(paths) for split, paths in files.items()})
    splits = datasets.load_dataset(name, config, cache_dir=cache_dir, streaming=streaming)
    return splits if streaming else restore_hub_json_columns(splits, name, files)


def hub_json_files(builder: datasets.DatasetBuilder) -> dict[str, list[str]] | None:
    """A data set's files per split when they are .json/.jsonl files, plain or compressed (`COMPRESSIONS`; local
    paths or hf:// URLs), else None."""
    if builder.name != "json" or not builder.config.data_files:
        return None
    files = {str(split): list(paths) for split, paths in builder.config.data_files.items()}
    ours = all(data_file_kind(path)[0] in (".json", ".jsonl") for paths in files.values() for path in paths)
    return files if ours else None  # .zst, .zip, ...: datasets reads them as it always did


def restore_hub_json_columns(splits: datasets.DatasetDict, name: str, files: dict[str, list[str]] | None) -> datasets.DatasetDict:
    """`restore_json_columns` for a Hub data set in json/jsonl files, read whole: its mixed-type columns re-read
    from its files (a second read of those files, only when such a column exists)."""
    if not files or not any(isinstance(f, datasets.Json) for rows in splits.values() for f in rows.features.values()):
        return splits
    logger.info("%s: re-reading the columns whose values change type (%s) from its files", name, ", ".join(files))
    return datasets.DatasetDict({split: restore_json_columns(rows, files[split]) if split in files else rows for split, rows in splits.items()})


def json_typed(features: datasets.Features) -> datasets.Features:
    """Webdataset features with the samples' .json typed as `datasets.Json`, a whole object (stored as JSON text,
    read back exactly as written), instead of each key typed from the first samples."""
    return datasets.Features({
        name: datasets.Json() if name in WEBDATASET_JSON_FIELDS and isinstance(feature, dict) else feature
        for name, feature in features.items()
    })


def is_webdataset(rows) -> bool:
    return rows.features is not None and {"__key__", "__url__"} <= set(rows.features)


def _lift_webdataset_fields(row: dict, json_field: str | None, keys: list[str], renames: dict[str, str]) -> dict:
    lifted = {renames[name]: value for name, value in row.items() if name in renames}
    if json_field:  # a stream's map hands its values on as they are (Json is not applied to them)
        sample = row[json_field] or {}
        lifted.update({key: sample.get(key) for key in keys})
    return lifted


def _load_local(path: str, cache_dir: str | None, streaming: bool = False) -> Split:
    shards = find_shards(path)
    if shards is not None:
        return Split(load_webdataset(shards, cache_dir, streaming), os.path.dirname(shards[0]), path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        metadata = next((os.path.join(path, name) for name in IMAGE_FOLDER_METADATA if os.path.isfile(os.path.join(path, name))), None)
        if metadata is not None:
            return _load_image_folder(metadata, cache_dir, streaming)
        rows = datasets.load_dataset("imagefolder", data_dir=path, split="train", cache_dir=cache_dir, streaming=streaming)
        return Split(rows, path, path)
    extension, compression = data_file_kind(path)
    builder = DATA_FILE_EXTENSIONS.get(extension)
    if builder is None or (compression and builder == "parquet"):
        raise ValueError(
            f"data file {path!r}: expected a .csv, .json, .jsonl or .parquet file (the first three also compressed: "
            f"{', '.join(COMPRESSIONS)}), an image folder with metadata.jsonl, or webdataset .tar shards"
        )
    if builder in ("csv", "json"):
        check_utf8(path)
        check_has_rows(path, builder)
    kwargs = {}
    if builder == "csv":
        # Every column as text: pandas would type each column from each block of rows it reads, so answers "2" and
        # "3" in the first block and "yes" in a later one stopped the run there (mid-stream, if far down);
        # keep_default_na/na_filter: else captions such as "NA", "None" or "null" would read as NaN.
        kwargs = {"features": csv_text_features(path), "keep_default_na": False, "na_filter": False}
    if builder == "json" and streaming:
        return Split(stream_json(path), os.path.dirname(path), path)
    try:
        rows = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, streaming=streaming, **kwargs)
    except datasets.exceptions.DatasetGenerationError:
        if builder == "json":  # pyarrow's reason went to the log, the exception says only that generation failed
            for _ in _json_records(path):  # raises a ValueError naming the first line that is not a JSON object
                pass
        raise
    if streaming:  # read as it trains; restore_json_columns would read the whole file
        return Split(rows, os.path.dirname(path), path)
    if len(rows) == 0:
        raise ValueError(f"data file {path!r} holds no rows. Pass a file with data, or leave the flag out.")
    if builder == "json":
        rows = restore_json_columns(rows, path)
    return Split(rows, os.path.dirname(path), path)


def stream_json(paths: str | list[str]) -> datasets.IterableDataset:
    """.jsonl (or .json) files as a stream of rows, each value as the file holds it (`datasets.Json`), read a line at
    a time; several files are the stream's shards. Its columns are the keys of its first JSON_STREAM_KEY_ROWS rows:
    a later row's other keys are left out, a key it lacks is None. datasets' json stream typed each column from the
    first block of the file and cast the rest to it: a later row with a new key, or with a caption string where that
    block held lists, stopped the run there. A line that is not a JSON object (a truncated last line, say) becomes
    a row holding only UNREADABLE_COLUMN ("<file> line N: why"), which a training stream skips and records: the run
    goes on."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    keys = {}
    records = itertools.chain.from_iterable(_json_records(path, unreadable_lines=True) for path in paths)
    for record in itertools.islice(records, JSON_STREAM_KEY_ROWS):
        if not isinstance(record, UnreadableLine):
            keys.update(dict.fromkeys(record))
    columns = tuple(keys)  # a tuple: a list in gen_kwargs would be split into shards (as `paths` is)
    features = datasets.Features({**{name: datasets.Json() for name in columns}, UNREADABLE_COLUMN: datasets.Value("string")})
    return datasets.IterableDataset.from_generator(_json_rows, features=features, gen_kwargs={"paths": paths, "columns": columns})


def _json_rows(paths: list[str], columns: tuple[str, ...]):
    for path in paths:
        for record in _json_records(path, unreadable_lines=True):
            if isinstance(record, UnreadableLine):
                where = f"{os.path.basename(path)} line {record.number}"
                yield {**dict.fromkeys(columns, _json_text(None)), UNREADABLE_COLUMN: f"{where}: {record.reason}"}
            else:
                yield {**{name: _json_text(record.get(name)) for name in columns}, UNREADABLE_COLUMN: None}


@dataclass
class UnreadableLine:
    number: int
    reason: str


def _json_records(path: str, unreadable_lines: bool = False):
    """The objects of a JSON Lines file one line at a time, or of a JSON document (an array of objects, or one
    object spread over lines: read whole, as datasets reads them). A line that is not a JSON object raises a
    ValueError naming it, or with `unreadable_lines` is given as an `UnreadableLine`."""
    with open_data_file(path, "r", encoding="utf-8") as f:
        first_line = next((line for line in f if line.strip()), "").strip()
        f.seek(0)
        if first_line.startswith("[") or not _is_json(first_line):  # "[": an array, even one on a single line
            try:
                document = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"data file {path!r}: neither JSON Lines (line 1 is not JSON) nor one JSON document ({err})") from None
            records = enumerate(document if isinstance(document, list) else [document], start=1)
            where = "item"
        else:
            records = ((number, _json_line(line)) for number, line in enumerate(f, start=1) if line.strip())
            where = "line"
        for number, record in records:
            if isinstance(record, json.JSONDecodeError):
                reason = f"not JSON ({record})"
            elif not isinstance(record, dict):
                reason = f"a JSON {type(record).__name__}, not an object of columns"
            else:
                yield record
                continue
            if unreadable_lines and where == "line":
                yield UnreadableLine(number, reason)
            else:
                raise ValueError(f"data file {path!r}, {where} {number}: {reason}")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_line(line: str):
    """The line's JSON value, or the error that reading it raised."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return err


def _load_image_folder(metadata: str, cache_dir: str | None, streaming: bool) -> Split:
    """An image folder (images and a metadata file naming each row's image in `file_name`) as its metadata file,
    read as any data file of its kind is, `file_name` becoming the `image` column: paths relative to the folder.
    The imagefolder builder would read a metadata.jsonl with pyarrow alone (a caption written as a string in one
    row and as a list in another stops it, mid-stream if far down) and a metadata.csv with pandas' defaults (a
    caption "NA" or "null" becomes missing), and lists every file of the folder first."""
    folder = os.path.dirname(metadata)
    split = _load_local(metadata, cache_dir, streaming)
    rows = split.rows if split.rows.features is not None else split.rows._resolve_features()
    columns = list(rows.features)
    if "file_name" not in columns:
        raise ValueError(f"{metadata}: an image folder's metadata names each row's image in a 'file_name' column; its columns are {columns}")
    if "image" in columns:
        raise ValueError(f"{metadata}: holds both 'file_name' and 'image': rename one (the folder's images become the 'image' column)")
    return Split(rows.rename_column("file_name", "image"), folder, metadata)


def data_file_kind(path: str) -> tuple[str, str | None]:
    """(the extension of the data inside, its compression or None): "train.jsonl.gz" -> (".jsonl", "gzip")."""
    root, extension = os.path.splitext(path)
    compression = COMPRESSIONS.get(extension.lower())
    if compression:
        extension = os.path.splitext(root)[1]
    return extension.lower(), compression


def open_data_file(path: str, mode: str = "rb", **kwargs):
    """A data file opened for reading, decompressed as it is read when its name says it is compressed; a local
    path, or a Hub data set's file (hf://). Use it in a `with` block."""
    compression = data_file_kind(path)[1]
    if compression is None:
        return xopen(path, mode, **kwargs)
    return fsspec.open(path, mode, compression=compression, **kwargs)


def csv_text_features(path: str) -> datasets.Features:
    """A string feature for each column of a csv file's header."""
    with open_data_file(path, "r", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"data file {path!r}: the header names the columns {repeated} more than once")
    return datasets.Features({name: datasets.Value("string") for name in header})


def check_utf8(path: str) -> None:
    """Text data files must be UTF-8: name the first line that is not, rather than fail deep inside pandas."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_data_file(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"data file {path!r}, line {number}: bytes {line[err.start:err.end]!r} are not UTF-8. "
                    "Re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None


def check_has_rows(path: str, builder: str) -> None:
    """An empty file, a csv with a header only or a .json holding `[]` stops here with its name: `datasets` would
    fail on it with StopIteration or "corresponds to no data", naming neither the file nor the cause."""
    needed = 2 if builder == "csv" else 1  # a csv's first line is its header
    lines = 0
    with open_data_file(path, "rb") as f:
        for line in f:
            lines += bool(line.strip())
            if lines >= needed:
                break
        f.seek(0)
        start = b"".join(f.read(4096).split())
    if lines >= needed and start not in (b"[]", b"{}"):
        return
    what = "a header but no rows" if builder == "csv" and lines else "no rows"
    raise ValueError(f"data file {path!r} holds {what}. Pass a file with data, or leave the flag out.")


def restore_json_columns(rows: datasets.Dataset, path: str | list[str]) -> datasets.Dataset:
    """Re-read the columns `datasets` typed as `Json` (values of mixed types: a number among captions, strings among
    lists of answers) from the file itself. `Json` keeps a string that parses as JSON as that JSON, so the caption
    "null" came back as None, "42" as 42 and "true" as True: captions are text, whatever they spell."""
    columns = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Json)]
    if not columns:
        return rows
    encoded = {name: [] for name in columns}  # JSON text, so decoding gives back exactly the value in the file
    try:
        for record in itertools.chain.from_iterable(map(_json_records, [path] if isinstance(path, str) else path)):
            for name in columns:  # a record at a time: only these columns' text is held
                encoded[name].append(_json_text(record.get(name)))
    except ValueError:
        return rows  # a layout we do not read ourselves: keep what `datasets` read
    if len(encoded[columns[0]]) != len(rows):
        return rows
    order = rows.column_names
    for name in columns:
        rows = rows.remove_columns(name).add_column(name, encoded[name], feature=datasets.Json())
    return rows.select_columns(order)


def check_columns(split: Split, **flag_to_column: str | None) -> None:
    """Raise a ValueError naming the flag, the file and the columns there are, for any column not present."""
    columns = split.rows.column_names
    for flag, column in flag_to_column.items():
        if column is not None and column not in columns:
            raise ValueError(
                f"--{flag} {column!r} is not a column of {split.origin}; its columns are {columns}. "
                f"Pass --{flag} with one of them."
            )


def guess_column(split: Split, candidates: tuple[str, ...], flag: str) -> str:
    """The first of `candidates` that is a column, for a flag left unset; else a ValueError listing columns."""
    for name in candidates:
        if name in split.rows.column_names:
            return name
    raise ValueError(
        f"--{flag} is not set and none of {list(candidates)} is a column of {split.origin}; "
        f"its columns are {split.rows.column_names}. Pass --{flag}."
    )


def parse_caption_column(split: Split, caption_column: str) -> list[list[str]]:
    """Every row's captions, parsed before any training starts so a bad value stops the run at once with
    its file and row, not hours later in a data loader worker."""
    parsed = []
    for row, value in enumerate(split.rows[caption_column]):
        try:
            parsed.append(parse_captions(value))
        except ValueError as err:
            raise ValueError(f"{split.origin}, row {row}, column {caption_column!r}: {err}") from None
    return parsed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed from (seed, epoch, index): random choices in data loading replay identically after
    a resume, in any worker, whatever the global RNG state."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63)


class EpochAware:
    """Mixin: an epoch counter in shared memory, so data loader workers (also persistent ones) see the epoch
    that `set_epoch` sets in the main process."""

    def _init_epoch(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())


class SetEpochCallback(TrainerCallback):
    """Tells an `EpochAware` training set which epoch starts (the Trainer counts a resumed epoch too)."""

    def __init__(self, dataset: EpochAware):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch + 1e-6) if state.epoch else 0)


# Rows whose images the up-front check reads at once.
CHECK_CHUNK_ROWS = 256


def check_images(rows: datasets.Dataset, column: str, base_dir: str | None, decode: bool, workers: int = 16) -> list[str | None]:
    """`check_image` on every row's image, in row order (None where usable). A chunk of CHECK_CHUNK_ROWS rows at a
    time, so a column of embedded images (parquet, shards read whole) is never held in memory, nor queued in the
    thread pool, whole; each image file once, however many rows name it (VQAv2 asks about five questions per
    image)."""
    from concurrent.futures import ThreadPoolExecutor

    keys, problems = [], {}
    with ThreadPoolExecutor(max_workers=workers) as pool:  # file checks wait on storage, decoding releases the GIL
        for chunk in rows.select_columns([column]).iter(batch_size=CHECK_CHUNK_ROWS):
            values = chunk[column]
            chunk_keys = [value if isinstance(value, str) else ("row", len(keys) + i) for i, value in enumerate(values)]
            new = {key: value for key, value in zip(chunk_keys, values) if key not in problems}
            problems.update(zip(new, pool.map(lambda v: check_image(v, base_dir, decode), new.values())))
            keys.extend(chunk_keys)
    return [problems[key] for key in keys]


class SkippedSamples:
    """The record of samples left out of a run: counted in the log and listed, one JSON line per sample with
    its split, row (the row number, or for a stream the sample's key), image and reason, in
    output_dir/skipped_samples.jsonl. Appends are single writes to a file opened in append mode, so data loader
    workers and several processes may share one file."""

    # Each process logs its first skips one per line; past that a web-scale set's thousands would bury the log.
    MAX_LOGGED = 20

    def __init__(self, path: str | None, write: bool = True):
        self.path = path
        self.write = write and path is not None
        self.logged = 0

    @classmethod
    def for_run(cls, training_args, resuming: bool) -> SkippedSamples:
        """output_dir/skipped_samples.jsonl, written by the main process. A resumed run adds to the list; a fresh
        one (say with --overwrite_output_dir) starts it anew rather than adding to a finished run's."""
        path = os.path.join(training_args.output_dir, "skipped_samples.jsonl")
        write = training_args.process_index == 0
        if write and not resuming and os.path.exists(path):
            os.remove(path)
        return cls(path, write)

    def record(self, split: str, row: int | str, image, reason: str) -> None:
        if self.logged < self.MAX_LOGGED:
            logger.warning("Skipping %s row %s (%s): %s", split, row, image if isinstance(image, str) else "image", reason)
            self.logged += 1
            if self.logged == self.MAX_LOGGED:
                logger.warning("Further skipped samples are not logged one by one; all are listed in %s", self.path)
        if self.write:
            line = json.dumps({"split": split, "row": row, "image": image if isinstance(image, str) else None, "reason": reason})
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def count(self) -> int:
        """Distinct (split, row) pairs listed: an image that fails to decode is listed each time it is drawn
        (every epoch, and again after a resume), but is one skipped sample."""
        if not self.path or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return len({(r["split"], r["row"]) for r in map(json.loads, f)})


def load_or_replace(load, index: int, size: int, rng: random.Random, on_error=None) -> tuple[int, object]:
    """(index, load(index)); when `load` raises ImageLoadError (an image that passed the header check before the run
    but does not decode: a truncated file), `on_error(index, err)` records it and another index in [0, size) is
    drawn from `rng`, the sample's own (seed, epoch, index) generator, so a resumed run draws the same replacement
    and batch sizes stay equal across processes. Without `on_error` the error is raised; so is a tenth failure in
    a row, which means the data, not one file, is broken."""
    for _ in range(10):
        try:
            return index, load(index)
        except ImageLoadError as err:
            if on_error is None:
                raise
            on_error(index, err)
            index = rng.randrange(size)
    raise ImageLoadError("ten images in a row failed to decode (each is listed in skipped_samples.jsonl): check the image files")


def count_duplicate_rows(rows: datasets.Dataset, columns: list[str]) -> int:
    """Rows equal, in `columns`, to an earlier row. Images stored in the data (a `datasets` Image column) compare
    by their path, without reading their bytes, where every row has one."""
    seen, duplicates = set(), 0
    for values in zip(*(_comparable_values(rows, c) for c in columns)):
        key = hashlib.blake2b(json.dumps(values, sort_keys=True, default=repr).encode(), digest_size=16).digest()
        duplicates += key in seen
        seen.add(key)
    return duplicates


def _comparable_values(rows: datasets.Dataset, column: str) -> list:
    if not isinstance(rows.features.get(column), datasets.Image):
        return list(rows[column])
    flat = rows.select_columns([column]).flatten()  # {"bytes", "path"} -> two columns
    paths = list(flat[f"{column}.path"])
    if all(paths):
        return paths
    return [path or hashlib.blake2b(data or b"").hexdigest() for path, data in zip(paths, flat[f"{column}.bytes"])]


def log_duplicate_rows(split: Split, columns: list[str], split_name: str, contrastive: bool = False) -> int:
    """Duplicate rows are kept (a repeated row may be deliberate weighting) and counted in the log. In a
    contrastive batch a duplicate is a false negative: the loss pushes apart a pair that matches."""
    duplicates = count_duplicate_rows(split.rows, columns)
    if duplicates:
        why = "; in a contrastive batch, a row and its duplicate are false negatives of each other" if contrastive else ""
        logger.warning(
            "%s: %d of %d rows repeat an earlier row (columns %s); kept%s. Remove them from the file if they are not meant.",
            split_name, duplicates, len(split.rows), columns, why,
        )
    return duplicates


def check_image(value, base_dir: str | None, decode: bool) -> str | None:
    """None if the image value is usable, else the reason. Without `decode`, only what is cheap: the file
    exists, is not empty and has an image header PIL recognises (a truncated file passes this and is caught
    when decoded); with `decode`, the whole image is decoded."""
    from PIL import Image

    try:
        if decode or not isinstance(value, (str, os.PathLike)):
            load_image(value, base_dir)
            return None
        path = value if (base_dir is None or os.path.isabs(value)) else os.path.join(base_dir, value)
        if not os.path.exists(path):
            return f"image file {path!r} does not exist"
        if os.path.getsize(path) == 0:
            return f"image file {path!r} is empty (0 bytes)"
        with Image.open(path) as image:
            image.size  # parses the header only
        return None
    except Exception as err:  # noqa: BLE001 - any failure to read is a reason to skip, reported with its text
        return str(err)


def check_bad_fraction(bad: int, total: int, max_fraction: float, origin: str, log_path: str | None) -> None:
    """Stop when more than `max_fraction` of a split is unusable: then the data, not a few files, is broken."""
    if total == 0:
        raise ValueError(f"{origin} holds no rows.")
    if bad / total > max_fraction:
        where = f"; the samples and reasons are listed in {log_path}" if log_path else ""
        raise ValueError(
            f"{bad} of {total} rows of {origin} ({bad / total:.1%}) are unusable, more than --max_bad_samples_fraction "
            f"{max_fraction:g}{where}. Fix the data or raise the fraction."
        )


class ImageTextDataset(EpochAware, torch.utils.data.Dataset):
    """Rows of (image, one or more captions) -> model-ready samples.

    Training (`sample_caption=True`) yields {"pixel_values": uint8 (3, H, W), "caption": str}, drawing one of
    the row's captions per epoch from (seed, epoch, index). Evaluation yields {"pixel_values", "captions": all
    of them}.

    Bad data: with a `skip_log`, rows whose captions do not parse, and rows whose image fails `check_image`
    (header check for training, full decode for evaluation: `decode_check`), are left out before the run
    starts and recorded; past `max_bad_fraction` the run stops. An image that still fails to decode during
    training (a truncated file) is recorded and replaced by another row drawn from the sample's seed, so batch
    sizes stay equal across processes. Without a `skip_log`, any bad value raises at once.
    """

    def __init__(
        self,
        split: Split,
        image_column: str,
        caption_column: str,
        transform,
        sample_caption: bool,
        seed: int = 0,
        skip_log: SkippedSamples | None = None,
        split_name: str = "train",
        decode_check: bool = False,
        max_bad_fraction: float = 1.0,
        check_workers: int = 16,
    ):
        self.images = split.rows.select_columns([image_column])
        self.image_column = image_column
        self.base_dir = split.base_dir
        self.origin = split.origin
        self.transform = transform
        self.sample_caption = sample_caption
        self.seed = seed
        self.skip_log = skip_log
        self.split_name = split_name
        if skip_log is None:
            self.captions = parse_caption_column(split, caption_column)
            self.rows = list(range(len(self.captions)))
        else:
            self.rows, self.captions = self._usable_rows(split, caption_column, decode_check, check_workers)
            check_bad_fraction(len(split.rows) - len(self.rows), len(split.rows), max_bad_fraction, split.origin, skip_log.path)
        self._init_epoch()

    def _usable_rows(self, split: Split, caption_column: str, decode: bool, workers: int) -> tuple[list[int], list[list[str]]]:
        image_problems = check_images(self.images, self.image_column, self.base_dir, decode, workers)
        rows, captions = [], []
        for row, (value, problem) in enumerate(zip(split.rows[caption_column], image_problems)):
            try:
                parsed = parse_captions(value)
            except ValueError as err:
                self.skip_log.record(self.split_name, row, self.images[row][self.image_column], f"column {caption_column!r}: {err}")
                continue
            if problem is not None:
                self.skip_log.record(self.split_name, row, self.images[row][self.image_column], problem)
                continue
            rows.append(row)
            captions.append(parsed)
        skipped = len(image_problems) - len(rows)
        if skipped:
            logger.warning("%s: skipped %d of %d rows (see %s)", split.origin, skipped, len(image_problems), self.skip_log.path)
        return rows, captions

    def __len__(self) -> int:
        return len(self.rows)

    def image_value(self, index: int):
        return self.images[self.rows[index]][self.image_column]

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        on_error = self.record_decode_error if self.skip_log is not None and self.sample_caption else None
        # A training transform may let a JPEG decode at reduced scale (None: in full).
        min_size = getattr(self.transform, "min_decode_size", None)
        index, image = load_or_replace(lambda i: load_image(self.image_value(i), self.base_dir, min_size), index, len(self), rng, on_error)
        pixels = self.transform(image, rng)
        captions = self.captions[index]
        if not self.sample_caption:
            return {"pixel_values": pixels, "captions": captions}
        return {"pixel_values": pixels, "caption": captions[rng.randrange(len(captions))]}

    def record_decode_error(self, index: int, err: Exception) -> None:
        self.skip_log.record(self.split_name, self.rows[index], self.image_value(index), str(err))
