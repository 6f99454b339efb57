"""The flags every script shares: where the model and the data come from. Each script subclasses these with its
own fields (and redeclares a field where its help text says something task-specific)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelSourceArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A checkpoint to fine-tune: a Hub id or a folder."})
    config_name: str | None = field(default=None, metadata={"help": "Train from scratch from this config (name or path)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --config_name: overrides such as 'num_hidden_layers=6,hidden_size=512'."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model's repository to run."})

    def hub_kwargs(self) -> dict:
        """What every from_pretrained call of a run passes."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "trust_remote_code": self.trust_remote_code}


@dataclass
class DataSourceArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "csv/json/jsonl (also .gz/.bz2/.xz)/parquet file, an image folder with metadata.jsonl, or webdataset .tar shards (a file, "
                          "a folder of them, or a glob such as 'shards/train-*.tar')."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same formats."})
    test_file: str | None = field(default=None, metadata={"help": "Test data for --do_predict, same formats."})
    image_column: str | None = field(default=None, metadata={"help": "Column of image paths or images (default: image, image_path, file_name)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    gallery_size: int = field(default=50, metadata={"help": "Examples shown in output_dir/gallery_<split>.html after evaluation (0: none)."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training data as a stream (Hub or local, never copied into the datasets cache), so memory "
                          "and disk do not grow with its size; needs --max_steps. Evaluation splits are still read whole."},
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With --streaming: rows held in the shuffle buffer of each process and data loader worker (shard order "
                          "is shuffled too)."},
    )
    jpeg_draft: bool = field(
        default=True,
        metadata={"help": "Training only: decode JPEGs at 1/2, 1/4 or 1/8 scale when still at least the size the resize needs "
                          "(faster, pixels within ~1/255 on average); evaluation always decodes in full."},
    )

    def __post_init__(self):
        if not (self.dataset_name or self.train_file or self.validation_file or self.test_file):
            raise ValueError("No data: pass --dataset_name or --train_file/--validation_file/--test_file.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 (or unset), got {getattr(self, name)}.")
        if self.gallery_size < 0:
            raise ValueError(f"--gallery_size must be >= 0, got {self.gallery_size}.")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1 (1: shard order only), got {self.shuffle_buffer_size}.")

    def data_files(self) -> dict[str, str | None]:
        return {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}

    def sample_limits(self) -> dict[str, int | None]:
        return {"train": self.max_train_samples, "validation": self.max_eval_samples, "test": self.max_predict_samples}
