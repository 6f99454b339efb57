"""Every data format loads, image paths resolve against the data file's folder, bad columns are named."""

import bz2
import gzip
import json
import lzma
import os

import datasets
import pytest
from PIL import Image

from utils.data import UNREADABLE_COLUMN, ImageTextDataset, check_columns, guess_column, load_splits, parse_caption_column, sample_seed
from utils.images import ImageTransformSpec, build_image_transform

SPEC = ImageTransformSpec(resize_height=16, resize_width=16)


@pytest.fixture
def folder(tmp_path):
    """data/ holds the data files, data/images/ the images: paths in the files are relative to data/."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20, 10), color).save(data / "images" / f"{i}.png")
    return data


def rows():
    return [
        {"image": "images/0.png", "caption": "NA"},
        {"image": "images/1.png", "caption": "null"},
        {"image": "images/2.png", "caption": "a blue box"},
    ]


def load_one(path, **kwargs):
    return load_splits(data_files={"train": str(path)}, **kwargs)["train"]


def as_dataset(split, caption_column="caption", image_column="image"):
    return ImageTextDataset(split, image_column, caption_column, build_image_transform(SPEC), sample_caption=False)


def test_csv_keeps_na_captions_as_text(folder, monkeypatch, tmp_path):
    path = folder / "train.csv"
    path.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows()))
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    dataset = as_dataset(load_one(path))
    assert dataset.captions == [["NA"], ["null"], ["a blue box"]]
    sample = dataset[2]
    assert sample["pixel_values"].shape == (3, 16, 16)
    assert sample["pixel_values"][2].float().mean() > 200  # blue channel of a blue image


def test_csv_with_a_json_list_of_captions(folder):
    path = folder / "train.csv"
    path.write_text('image,captions\nimages/0.png,"[""a red box"", ""a square""]"\n')
    assert as_dataset(load_one(path), caption_column="captions").captions == [["a red box", "a square"]]


def test_jsonl_and_json_with_lists_of_captions(folder):
    records = [{"image": r["image"], "captions": [r["caption"], "another"]} for r in rows()]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "train.json").write_text(json.dumps(records))
    for name in ("train.jsonl", "train.json"):
        dataset = as_dataset(load_one(folder / name), caption_column="captions")
        assert dataset.captions[0] == ["NA", "another"]
        assert dataset[1]["captions"] == ["null", "another"]
        assert dataset[1]["pixel_values"][1].float().mean() > 100  # green


@pytest.mark.parametrize("streaming", [False, True])
def test_csv_columns_are_text_whatever_the_first_rows_hold(tmp_path, streaming):
    """pandas types a csv column from each block of rows it reads (10,000 here): answers "2" in the first block and
    "yes" in a later one stopped the run at that block. Every column is read as the text it is."""
    path = tmp_path / "train.csv"
    lines = [f"images/{i % 3}.png,{i},2" for i in range(10_050)] + ["images/0.png,a red box,yes"]
    path.write_text("image,caption,answer\n" + "\n".join(lines) + "\n")
    split = load_one(path, streaming=streaming)
    assert all(feature == datasets.Value("string") for feature in split.rows.features.values())
    rows = list(split.rows)
    assert (rows[0]["caption"], rows[0]["answer"]) == ("0", "2")
    assert (rows[-1]["caption"], rows[-1]["answer"]) == ("a red box", "yes")


def test_jsonl_stream_keeps_each_row_as_written(tmp_path):
    """Streamed, datasets typed a jsonl's columns from its first block (1 MiB here) and cast the rest: a later row
    with a key of its own, or a caption string where that block held lists, stopped the run there. Each row now
    keeps its values as written ("null" and "42" are text), columns are those of the first rows, and a line that
    is not JSON becomes a row that says so, which training streams skip and record (test_streaming.py)."""
    path = tmp_path / "train.jsonl"
    rows = [{"image": "images/0.png", "captions": [f"a red box {i}", "a box"], "source": "coco"} for i in range(15_000)]
    rows[14_000] = {"image": "images/1.png", "captions": "one caption", "source": "42", "extra": "late"}
    rows[14_001] = {"image": "images/2.png", "captions": "null"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert path.stat().st_size > 1 << 20  # past the first block the old stream typed from
    split = load_one(path, streaming=True)
    assert list(split.rows.features) == ["image", "captions", "source", UNREADABLE_COLUMN]
    streamed = list(split.rows)
    assert len(streamed) == 15_000 and streamed[0] == {**rows[0], UNREADABLE_COLUMN: None}
    assert streamed[14_000] == {"image": "images/1.png", "captions": "one caption", "source": "42", UNREADABLE_COLUMN: None}
    assert streamed[14_001] == {"image": "images/2.png", "captions": "null", "source": None, UNREADABLE_COLUMN: None}
    path.write_text(json.dumps(rows[0]) + "\n\n" + "{not json\n" + "[1, 2]\n")
    first, *unreadable = load_one(path, streaming=True).rows
    assert first == {**rows[0], UNREADABLE_COLUMN: None}
    assert [row[UNREADABLE_COLUMN].split(" (")[0] for row in unreadable] == ["train.jsonl line 3: not JSON",
                                                                             "train.jsonl line 4: a JSON list, not an object of columns"]
    assert all(row["image"] is None and row["captions"] is None for row in unreadable)
    path.write_text("{not json\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl'?: neither JSON Lines \(line 1 is not JSON\) nor one JSON document"):
        list(load_one(path, streaming=True).rows)
    path.write_text(json.dumps(rows[0], indent=2))  # one object over several lines: one row, as read whole
    assert list(load_one(path, streaming=True).rows) == [{**rows[0], UNREADABLE_COLUMN: None}]
    assert list(load_one(path).rows) == [rows[0]]


def test_a_jsonl_line_that_is_not_json_stops_a_whole_load_naming_it(tmp_path):
    """Read whole, datasets' json builder logged pyarrow's reason and raised only "An error occurred while
    generating the dataset"; the error now names the file and the line (streamed, the line is skipped instead)."""
    row = json.dumps({"image": "images/0.png", "captions": ["a red box"]})
    (tmp_path / "train.jsonl").write_text(f"{row}\n{row}\n" + '{"image": "images/1.png", "capt\n' + f"{row}\n")
    with pytest.raises(ValueError, match=r"train.jsonl'?, line 3: not JSON"):
        load_one(tmp_path / "train.jsonl")


COMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def write_compressed(path, text: str, suffix: str) -> str:
    with COMPRESSORS[suffix](f"{path}{suffix}", "wt", encoding="utf-8") as f:
        f.write(text)
    return f"{path}{suffix}"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_compressed_data_files_read_as_the_file_inside(folder, suffix, streaming):
    """train.jsonl.gz (.bz2, .xz) reads as train.jsonl would: each value as written ("42" stays text among lists),
    images found next to the file; a csv too, its "NA" kept as text."""
    captions = ["a red box", ["a green box", "a square"], "42"]
    records = [{"image": f"images/{i}.png", "captions": c} for i, c in enumerate(captions)]
    path = write_compressed(folder / "train.jsonl", "".join(json.dumps(r) + "\n" for r in records), suffix)
    split = load_one(path, streaming=streaming)
    assert [r["captions"] for r in split.rows] == captions
    if not streaming:
        assert as_dataset(split, caption_column="captions")[1]["pixel_values"][1].float().mean() > 100  # green
    path = write_compressed(folder / "train.csv", "image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows()), suffix)
    assert [r["caption"] for r in load_one(path, streaming=streaming).rows] == ["NA", "null", "a blue box"]


def test_compressed_files_are_checked_as_plain_ones(folder):
    """The checks before loading read the file inside: bytes that are not UTF-8 name their line, an empty file is
    named, a bad JSON line is skipped and recorded when streamed; a compressed parquet file is refused."""
    path = folder / "train.csv.gz"
    path.write_bytes(gzip.compress("image,caption\nimages/0.png,café\n".encode("latin-1")))
    with pytest.raises(ValueError, match=r"train.csv.gz'?, line 2: bytes b'\\xe9' are not UTF-8"):
        load_one(path)
    with pytest.raises(ValueError, match=r"train.jsonl.gz'? holds no rows"):
        load_one(write_compressed(folder / "train.jsonl", "\n", ".gz"))
    path = write_compressed(folder / "train.jsonl", json.dumps(rows()[0]) + "\n{not json\n" + json.dumps(rows()[2]) + "\n", ".gz")
    streamed = list(load_one(path, streaming=True).rows)
    assert [r["caption"] for r in streamed] == ["NA", None, "a blue box"]
    assert streamed[1][UNREADABLE_COLUMN].startswith("train.jsonl.gz line 2: not JSON")
    with pytest.raises(ValueError, match=r"train.parquet.gz'?: expected a .csv, .json, .jsonl or .parquet file \(the first three also compressed"):
        load_one(write_compressed(folder / "train.parquet", "", ".gz"))


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("compressed", [False, True], ids=["", "gz"])
def test_a_jsonl_loaded_by_name_keeps_each_value_as_written(tmp_path, streaming, compressed):
    """--dataset_name (a Hub data set; here a local folder, which datasets reads the same way): datasets types a
    column whose values change type as `Json`, which read the caption "42" back as 42 and "null" as None. Read
    whole, the column is now re-read from the data set's files, as a local file's is; streamed, the files go
    through our reader, as a local file does."""
    captions = ["one caption", ["a box"], "42", ["two boxes"], "null", "true"]
    folder = tmp_path / "by_name"
    folder.mkdir()
    text = "".join(json.dumps({"image": f"images/{i}.png", "captions": c}) + "\n" for i, c in enumerate(captions))
    if compressed:
        write_compressed(folder / "train.jsonl", text, ".gz")
    else:
        (folder / "train.jsonl").write_text(text)
    split = load_splits(dataset_name=str(folder), streaming=streaming)["train"]
    assert [row["captions"] for row in split.rows] == captions


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("image,caption,caption\nimages/0.png,a,b\n")
    with pytest.raises(ValueError, match=r"train.csv'?: the header names the columns \['caption'\] more than once"):
        load_one(tmp_path / "train.csv")


@pytest.mark.parametrize("streaming", [False, True])
def test_image_folder_metadata_reads_as_its_file_does(folder, streaming):
    """An image folder's metadata.jsonl keeps each row's types (a caption string in one row, a list in another) and
    its metadata.csv keeps "NA" and "null" as captions, as the same files do on their own; `file_name` becomes the
    image column, relative to the folder."""
    images = folder / "images"
    captions = ["NA", ["null", "a green box"], "a blue box"]
    with open(images / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            f.write(json.dumps({"file_name": f"{i}.png", "caption": caption}) + "\n")
    split = load_one(images, streaming=streaming)
    assert [r["image"] for r in split.rows] == ["0.png", "1.png", "2.png"]
    assert [r["caption"] for r in split.rows] == captions
    if not streaming:
        dataset = as_dataset(split)
        assert dataset.captions == [["NA"], ["null", "a green box"], ["a blue box"]]
        assert dataset[1]["pixel_values"][1].float().mean() > 100  # green
    os.remove(images / "metadata.jsonl")
    (images / "metadata.csv").write_text("file_name,caption\n0.png,NA\n1.png,null\n2.png,a blue box\n")
    split = load_one(images, streaming=streaming)
    assert [r["caption"] for r in split.rows] == ["NA", "null", "a blue box"]
    assert [r["image"] for r in split.rows] == ["0.png", "1.png", "2.png"]


def test_image_folder_metadata_needs_file_name(folder):
    (folder / "images" / "metadata.jsonl").write_text(json.dumps({"path": "0.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl: an image folder's metadata names each row's image in a 'file_name' column"):
        load_one(folder / "images")


def test_parquet_with_embedded_image_bytes(folder, tmp_path):
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": (folder / "images" / "0.png").read_bytes(), "path": None}], "caption": ["a red box"]}
    ).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "train.parquet"))
    os.remove(folder / "images" / "0.png")  # the bytes travel inside the parquet file
    dataset = as_dataset(load_one(tmp_path / "train.parquet", image_column="image"))
    assert dataset[0]["pixel_values"][0].float().mean() > 200


def test_missing_column_lists_the_columns_there_are(folder):
    (folder / "train.jsonl").write_text(json.dumps({"img": "images/0.png", "text": "x"}) + "\n")
    split = load_one(folder / "train.jsonl")
    with pytest.raises(ValueError, match=r"--image_column 'image' is not a column of .*train.jsonl; its columns are \['img', 'text'\]"):
        check_columns(split, image_column="image")
    assert guess_column(split, ("captions", "caption", "text"), "caption_column") == "text"
    with pytest.raises(ValueError, match="--image_column is not set"):
        guess_column(split, ("image",), "image_column")


def test_bad_caption_value_names_file_row_and_column(folder):
    (folder / "train.jsonl").write_text(
        json.dumps({"image": "a.png", "caption": "ok"}) + "\n" + json.dumps({"image": "b.png", "caption": ""}) + "\n"
    )
    with pytest.raises(ValueError, match=r"train.jsonl, row 1, column 'caption'"):
        parse_caption_column(load_one(folder / "train.jsonl"), "caption")


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(ValueError, match="train.txt"):
        load_one(tmp_path / "train.txt")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_one(tmp_path / "nope.jsonl")


def test_caption_draw_depends_on_seed_epoch_and_index_only(folder):
    records = [{"image": "images/0.png", "captions": [f"caption {k}" for k in range(5)]}] * 3
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    split = load_one(folder / "train.jsonl")
    dataset = ImageTextDataset(split, "image", "captions", build_image_transform(SPEC), sample_caption=True, seed=7)
    draws = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        draws[epoch] = [dataset[i]["caption"] for i in range(3)]
    dataset.set_epoch(2)
    assert [dataset[i]["caption"] for i in range(3)] == draws[2]  # replays after a "resume"
    assert len({tuple(d) for d in draws.values()}) > 1  # and changes across epochs
    assert sample_seed(7, 2, 1) != sample_seed(7, 1, 2)


def test_requested_splits_are_loaded_limited_and_checked(folder):
    """Only the splits the run asks for are read, each cut to its --max_*_samples; a split asked for but not
    given stops the run naming the flag and the fix."""
    from transformers import TrainingArguments

    from utils.arguments import DataSourceArguments
    from utils.data import load_requested_splits

    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    data_args = DataSourceArguments(train_file=str(path), validation_file=str(folder / "absent.jsonl"), max_train_samples=2)
    train_only = TrainingArguments(output_dir=str(folder / "out"), do_train=True, use_cpu=True, report_to="none")
    splits = load_requested_splits(data_args, train_only)
    assert list(splits) == ["train"] and len(splits["train"].rows) == 2  # the absent validation file is not read
    predict = TrainingArguments(output_dir=str(folder / "out"), do_predict=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="--do_predict needs a test split: pass --test_file"):
        load_requested_splits(data_args, predict)
    nothing = TrainingArguments(output_dir=str(folder / "out"), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="Nothing to do"):
        load_requested_splits(data_args, nothing)
    with pytest.raises(ValueError, match="--max_eval_samples must be >= 1"):
        DataSourceArguments(train_file=str(path), max_eval_samples=0)


def test_skipped_samples_list_restarts_with_a_fresh_run_and_caps_the_log(tmp_path, caplog):
    """A resumed run adds to output_dir/skipped_samples.jsonl, a fresh run starts it anew; every skip is listed,
    but each process logs only the first SkippedSamples.MAX_LOGGED one by one."""
    import logging
    from types import SimpleNamespace

    from utils.data import SkippedSamples

    args = SimpleNamespace(output_dir=str(tmp_path), process_index=0)
    first = SkippedSamples.for_run(args, resuming=False)
    first.record("train", 0, "a.png", "missing")
    assert SkippedSamples.for_run(args, resuming=True).count() == 1
    fresh = SkippedSamples.for_run(args, resuming=False)
    assert fresh.count() == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        for row in range(SkippedSamples.MAX_LOGGED + 5):
            fresh.record("train", row, f"{row}.png", "missing")
    assert fresh.count() == SkippedSamples.MAX_LOGGED + 5
    one_by_one = [r for r in caplog.records if r.getMessage().startswith("Skipping train row")]
    assert len(one_by_one) == SkippedSamples.MAX_LOGGED
    assert any("all are listed in" in r.getMessage() for r in caplog.records)
    other_rank = SkippedSamples.for_run(SimpleNamespace(output_dir=str(tmp_path), process_index=1), resuming=False)
    assert other_rank.count() == SkippedSamples.MAX_LOGGED + 5  # only the main process clears and writes
