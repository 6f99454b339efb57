"""Loading image-text data: Hub datasets, local csv/json/jsonl files, image folders with metadata.jsonl.

Image values are kept undecoded (paths, or `datasets` Image values with `decode=False`) and decoded by
`utils.images.load_image` in the data loader, so one bad file is reported with its name instead of
failing inside `datasets`; relative paths resolve against the folder of the data file that names them.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass

import datasets
import torch
from transformers import TrainerCallback

from .images import load_image
from .text import parse_captions

logger = logging.getLogger(__name__)

DATA_FILE_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class Split:
    """One split of raw data: the rows, the folder relative image paths resolve against, a name for messages."""

    rows: datasets.Dataset
    base_dir: str | None
    origin: str


def load_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_files: dict[str, str | None] | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
) -> dict[str, Split]:
    """Load the requested splits, keyed "train", "validation", "test".

    `data_files` maps split -> a csv/json/jsonl/parquet file or an image folder (holding the images and a
    metadata.jsonl/csv naming a `file_name` per row). Local files take precedence over `dataset_name` split
    by split, so a Hub training set can be evaluated on a local file.
    """
    data_files = {k: v for k, v in (data_files or {}).items() if v}
    splits: dict[str, Split] = {}
    if dataset_name:
        hub = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        for split, aliases in SPLIT_ALIASES.items():
            found = next((a for a in aliases if a in hub), None)
            if found is not None:
                splits[split] = Split(hub[found], None, f"{dataset_name}[{found}]")
    for split, path in data_files.items():
        splits[split] = _load_local(path, cache_dir)
    if image_column:
        for split in splits.values():
            feature = split.rows.features.get(image_column)
            if isinstance(feature, datasets.Image) and feature.decode:
                split.rows = split.rows.cast_column(image_column, datasets.Image(decode=False))
    return splits


def _load_local(path: str, cache_dir: str | None) -> Split:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        rows = datasets.load_dataset("imagefolder", data_dir=path, split="train", cache_dir=cache_dir)
        return Split(rows, path, path)
    extension = os.path.splitext(path)[1].lower()
    builder = DATA_FILE_EXTENSIONS.get(extension)
    if builder is None:
        raise ValueError(f"data file {path!r}: expected a .csv, .json, .jsonl or .parquet file, or an image folder with metadata.jsonl")
    # keep_default_na/na_filter: pandas would otherwise read captions such as "NA", "None" or "null" as NaN.
    kwargs = {"keep_default_na": False, "na_filter": False} if builder == "csv" else {}
    rows = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, **kwargs)
    return Split(rows, os.path.dirname(path), path)


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


class ImageTextDataset(EpochAware, torch.utils.data.Dataset):
    """Rows of (image, one or more captions) -> model-ready samples.

    Training (`sample_caption=True`) yields {"pixel_values": uint8 (3, H, W), "caption": str}, drawing one of
    the row's captions per epoch from (seed, epoch, index). Evaluation yields {"pixel_values", "captions": all
    of them}.
    """

    def __init__(self, split: Split, image_column: str, caption_column: str, transform, sample_caption: bool, seed: int = 0):
        self.images = split.rows.select_columns([image_column])
        self.image_column = image_column
        self.captions = parse_caption_column(split, caption_column)
        self.base_dir = split.base_dir
        self.origin = split.origin
        self.transform = transform
        self.sample_caption = sample_caption
        self.seed = seed
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        image = load_image(self.images[index][self.image_column], self.base_dir)
        pixels = self.transform(image, rng)
        captions = self.captions[index]
        if not self.sample_caption:
            return {"pixel_values": pixels, "captions": captions}
        return {"pixel_values": pixels, "caption": captions[rng.randrange(len(captions))]}
