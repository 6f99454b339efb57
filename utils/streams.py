"""Training from a stream (--streaming): rows are read, checked and turned into samples one at a time, so memory
and disk stay flat however large the data set is.

Where the rows go (`TrainingStream.rows_for_pass`):

* shards: the stream's data sources (files, webdataset shards, Hub parquet files) are shuffled, and rows pass
  through a shuffle buffer, both seeded from (seed, pass) by `datasets`' `IterableDataset.shuffle`/`set_epoch`;
* processes: `datasets.distributed.split_dataset_by_node` gives each process whole shards when their number is a
  multiple of the process count, else every N-th row (each process then reads all rows and keeps its own);
* data loader workers: `datasets` gives each worker some of the process's shards (a worker without one idles).

The stream never ends: after its last row it starts the next pass, reshuffled. Every process therefore has a
batch at every step of --max_steps and the processes stay in step, however the rows split between them. A
resumed run replays the same passes and the Trainer skips the batches already trained on.

The DataLoader is built by `StreamLoaderMixin`, not by accelerate: accelerate would either split the stream once
more (`IterableDatasetShard`, dropping the rows the other processes do not read) or read it on process 0 alone
and send each process its batch (`dispatch_batches`, decoding every image in one process).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random

import torch
from datasets.distributed import split_dataset_by_node

from .data import UNREADABLE_COLUMN, EpochAware, SkippedSamples, Split, check_bad_fraction, sample_seed
from .images import ImageLoadError, load_image
from .text import parse_captions

logger = logging.getLogger(__name__)

# A stream's unusable fraction is judged once this many rows are read (and at the end of every pass): before,
# two bad rows out of ten would stop a run whose data is 1% bad.
BUDGET_MIN_ROWS = 200


class BadSample(ValueError):
    """A row that cannot become a sample; the message is the reason recorded in skipped_samples.jsonl."""


def sample_key(row: dict, image_column: str) -> str:
    """A name for a streamed row that does not depend on where it is read: the shard and key of a webdataset
    sample, else the image's path, else a digest of the image bytes."""
    if row.get("__key__") is not None:
        return f"{os.path.basename(row.get('__url__') or '')}/{row['__key__']}"
    if row.get(UNREADABLE_COLUMN):  # "<file> line N: why"
        return row[UNREADABLE_COLUMN].partition(": ")[0]
    value = row.get(image_column)
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    if isinstance(value, dict) and value.get("bytes"):
        return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
    return repr(value)


def key_number(key: str) -> int:
    """A stable integer for a key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class TrainingStream(EpochAware, torch.utils.data.IterableDataset):
    """A training split read as an endless, reshuffled stream of samples; subclasses turn a row into a sample
    (`make_sample`). Random choices in `make_sample` come from an RNG seeded by (seed, pass, the row's key), so a
    resumed run replays them.

    Bad rows: `make_sample` raises `BadSample` (or the row is a line of a jsonl that could not be read, its
    UNREADABLE_COLUMN set); the row is left out, recorded in `skip_log` (in the first pass;
    each process records the rows it reads) and counted: past `max_bad_fraction` of the rows read (judged after
    `BUDGET_MIN_ROWS` rows and at the end of every pass) the run stops. Without a `skip_log`, a bad row raises.
    """

    def __init__(self, split: Split, image_column: str, seed: int = 0, skip_log: SkippedSamples | None = None,
                 max_bad_fraction: float = 1.0, shuffle_buffer_size: int = 1000, process_index: int = 0,
                 num_processes: int = 1, split_name: str = "train"):
        if not split.streaming:
            raise TypeError(f"{split.origin}: a TrainingStream reads a datasets.IterableDataset (load with streaming=True)")
        self.rows, self.base_dir, self.origin = split.rows, split.base_dir, split.origin
        self.image_column, self.seed, self.split_name = image_column, seed, split_name
        self.shuffle_buffer_size = shuffle_buffer_size
        self.process_index, self.num_processes = process_index, num_processes
        # A stream gives each process different rows, so each records its own (appends to one file are safe).
        self.skip_log = None if skip_log is None else SkippedSamples(skip_log.path)
        self.max_bad_fraction = max_bad_fraction
        self._init_epoch()
        self.first_row = self._read_first_row()
        shards = self.rows.num_shards
        if num_processes == 1:
            how = f"all {shards} shards"
        elif shards % num_processes == 0:
            how = f"{shards // num_processes} of its {shards} shards"
        else:  # split_dataset_by_node's "examples" strategy
            how = (f"every {num_processes}th row of its {shards} shards (each process reads them all; a multiple of "
                   f"{num_processes} shards would split the reading too)")
        logger.info("%s: process %d of %d streams %s per pass", self.origin, process_index, num_processes, how)
        # datasets says this again at every pass of every data loader worker.
        logging.getLogger("datasets.iterable_dataset").setLevel(logging.WARNING)

    def rows_for_pass(self, pass_number: int):
        """This process's rows in pass `pass_number`: shards and buffer shuffled from (seed, pass), the same on
        every process, so the processes' parts never overlap. A new object per pass: `set_epoch` writes to memory
        that data loader workers would otherwise share."""
        rows = self.rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        if self.num_processes > 1:
            rows = split_dataset_by_node(rows, rank=self.process_index, world_size=self.num_processes)
        rows.set_epoch(pass_number)
        return rows

    def _read_first_row(self) -> dict:
        """This process's first row (unshuffled): a process with none would leave the others waiting at the first
        step, so it stops here."""
        rows = self.rows
        if self.num_processes > 1:
            rows = split_dataset_by_node(rows, rank=self.process_index, world_size=self.num_processes)
        row = next((row for row in rows if not row.get(UNREADABLE_COLUMN)), None)
        if row is None:
            raise ValueError(
                f"{self.origin} gives process {self.process_index} of {self.num_processes} no rows: it holds fewer rows "
                "than there are processes (check --max_train_samples), or no rows at all."
            )
        return row

    def make_sample(self, row: dict, rng: random.Random) -> dict | None:
        """A model-ready sample from a row; None to leave the row out without recording it; `BadSample` to skip
        and record it."""
        raise NotImplementedError

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        first_pass = pass_number = self.epoch
        read = bad = 0
        while True:
            read_in_pass = yielded_in_pass = 0
            for row in self.rows_for_pass(pass_number):
                read_in_pass += 1
                key = sample_key(row, self.image_column)
                try:
                    if row.get(UNREADABLE_COLUMN):  # a jsonl line that is not a JSON object
                        raise BadSample(row[UNREADABLE_COLUMN].partition(": ")[2])
                    sample = self.make_sample(row, random.Random(sample_seed(self.seed, pass_number, key_number(key))))
                except BadSample as err:
                    bad += 1
                    self._skip(key, row, str(err), record=pass_number == first_pass)
                    if read + read_in_pass >= BUDGET_MIN_ROWS:
                        self._check_budget(bad, read + read_in_pass)
                    continue
                if sample is not None:
                    yielded_in_pass += 1
                    yield sample
            if read_in_pass == 0:
                if worker is not None:
                    return  # a data loader worker given no shard; the process's other workers read them
                raise ValueError(f"{self.origin}: process {self.process_index} read no rows in pass {pass_number}")
            if yielded_in_pass == 0:  # else the stream would loop forever without yielding
                raise ValueError(f"{self.origin}: none of the {read_in_pass} rows process {self.process_index} read in a pass is usable")
            read += read_in_pass
            self._check_budget(bad, read)
            pass_number += 1

    def _skip(self, key: str, row: dict, reason: str, record: bool) -> None:
        if self.skip_log is None:
            raise BadSample(f"{self.origin}, row {key}: {reason}")
        if record:
            value = row.get(self.image_column)
            if not isinstance(value, str):  # image bytes; or no image: a line of the file that could not be read
                value = self.origin if row.get(UNREADABLE_COLUMN) else key
            self.skip_log.record(self.split_name, key, value, reason)

    def _check_budget(self, bad: int, read: int) -> None:
        if self.skip_log is not None:
            where = f"{self.origin} (the first rows process {self.process_index} read)"
            check_bad_fraction(bad, read, self.max_bad_fraction, where, self.skip_log.path)


class ImageTextStream(TrainingStream):
    """Rows of (image, one or more captions) -> {"pixel_values": uint8 (3, H, W), "caption": one caption}, the
    caption drawn anew in every pass: each pass shows every image once, with one of its captions (map-style
    ImageTextDataset does the same for run_clip; run_blip_caption's map-style training shows every pair)."""

    def __init__(self, split: Split, image_column: str, caption_column: str, transform, **kwargs):
        self.caption_column = caption_column
        self.transform = transform
        super().__init__(split, image_column, **kwargs)

    def make_sample(self, row: dict, rng: random.Random) -> dict:
        try:
            captions = parse_captions(row[self.caption_column])
        except ValueError as err:
            raise BadSample(f"column {self.caption_column!r}: {err}") from None
        try:
            # A training transform may let a JPEG decode at reduced scale (None: in full).
            image = load_image(row[self.image_column], self.base_dir, getattr(self.transform, "min_decode_size", None))
        except ImageLoadError as err:
            raise BadSample(str(err)) from None
        pixels = self.transform(image, rng)  # draws first, then the caption, as ImageTextDataset does
        return {"pixel_values": pixels, "caption": captions[rng.randrange(len(captions))]}

    def example_captions(self) -> list[str]:
        """The first row's captions, for checks before training (e.g. that a prompt tokenizes apart from them)."""
        return parse_captions(self.first_row[self.caption_column])


class StreamLoaderMixin:
    """Mix into a Trainer subclass (before Trainer): the DataLoader of a `TrainingStream` training set is built
    here, unprepared by accelerate, since the stream is already split between processes. The Trainer moves each
    batch to the device itself (`_prepare_inputs`); other training sets go the Trainer's usual way."""

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, TrainingStream):
            return super().get_train_dataloader()
        args = self.args
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers > 0 else None,
        )


def stream_options(training_args, data_args, run_args, skip_log: SkippedSamples) -> dict:
    """The keyword arguments every script's training stream takes from its flags."""
    return {
        "seed": training_args.seed,
        "skip_log": skip_log,
        "max_bad_fraction": run_args.max_bad_samples_fraction,
        "shuffle_buffer_size": data_args.shuffle_buffer_size,
        "process_index": training_args.process_index,
        "num_processes": training_args.world_size,
    }
