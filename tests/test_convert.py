"""The converters on small files in the exact formats COCO, the Karpathy splits and VQAv2 ship, row by row; the
files they write load through the project's own readers and find the right images from any working directory."""

import json
import logging
import os

import pytest
from PIL import Image

from utils.convert import convert_karpathy, load_json, main, relative_image_path
from utils.data import ImageTextDataset, load_splits
from utils.images import ImageTransformSpec, build_image_transform, load_image
from utils.vqa import parse_answers

SPEC = ImageTransformSpec(resize_height=8, resize_width=8)
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def save_image(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), COLORS[color]).save(path)


def dominant_channel(pixel_values):
    """0, 1 or 2: the brightest channel of a (3, H, W) image."""
    return int(pixel_values.float().mean(dim=(1, 2)).argmax())


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_captions(path):
    split = load_splits(data_files={"train": str(path)})["train"]
    return ImageTextDataset(split, "image", "captions", build_image_transform(SPEC), sample_caption=False)


# --- COCO captions -------------------------------------------------------------------------------------------


def coco_image(image_id, height=8, width=12):
    return {
        "license": 4, "file_name": f"{image_id:012d}.jpg", "coco_url": f"http://images.cocodataset.org/val2017/{image_id:012d}.jpg",
        "height": height, "width": width, "date_captured": "2013-11-14 17:02:52", "flickr_url": "http://farm7.staticflickr.com/x.jpg",
        "id": image_id,
    }


@pytest.fixture
def coco(tmp_path):
    """coco/val2017 with three images (632 red, 139 green, 285 blue) and captions_val2017.json: images listed out of
    id order, captions out of annotation-id order, one listed image (776) without captions."""
    for image_id, color in ((632, "red"), (139, "green"), (285, "blue"), (776, "red")):
        save_image(tmp_path / "coco" / "val2017" / f"{image_id:012d}.jpg", color)
    annotations = [
        {"image_id": 139, "id": 667, "caption": "A woman stands in the dining area at the table.\n"},
        {"image_id": 632, "id": 9001, "caption": "a bedroom with a bookshelf "},
        {"image_id": 139, "id": 26, "caption": "A room with chairs, a table, and a woman in it."},
        {"image_id": 285, "id": 5000, "caption": "A big brown bear sitting in the grass."},
        {"image_id": 632, "id": 301, "caption": "Bedroom scene with a bookcase, blue comforter and window."},
        {"image_id": 632, "id": 4000, "caption": "   "},
    ]
    data = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"}],
        "images": [coco_image(632), coco_image(139), coco_image(285), coco_image(776)],
        "annotations": annotations,
    }
    return write_json(tmp_path / "annotations" / "captions_val2017.json", data)


COCO_ROWS = [
    {"image": "../../coco/val2017/000000000139.jpg", "captions": ["A room with chairs, a table, and a woman in it.", "A woman stands in the dining area at the table."], "image_id": 139},
    {"image": "../../coco/val2017/000000000285.jpg", "captions": ["A big brown bear sitting in the grass."], "image_id": 285},
    {"image": "../../coco/val2017/000000000632.jpg", "captions": ["Bedroom scene with a bookcase, blue comforter and window.", "a bedroom with a bookshelf"], "image_id": 632},
]


def test_coco_captions_rows_and_loading(coco, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # relative flags, resolved from here
    with caplog.at_level(logging.WARNING, logger="utils.convert"):
        written = main(["coco-captions", "--annotations", "annotations/captions_val2017.json", "--images", "coco/val2017", "--output", "out/data/coco_val.jsonl"])
    assert written == {"out/data/coco_val.jsonl": 3}
    assert read_jsonl(tmp_path / "out" / "data" / "coco_val.jsonl") == COCO_ROWS
    assert "1 images have no caption" in caplog.text and "776" in caplog.text

    monkeypatch.chdir(tmp_path / "coco")  # the loader resolves against the file's folder, not the working directory
    dataset = load_captions(tmp_path / "out" / "data" / "coco_val.jsonl")
    assert dataset.captions == [row["captions"] for row in COCO_ROWS]
    assert [dominant_channel(dataset[i]["pixel_values"]) for i in range(3)] == [CHANNEL["green"], CHANNEL["blue"], CHANNEL["red"]]


def test_coco_captions_output_next_to_the_images(coco, tmp_path):
    output = tmp_path / "coco" / "val.jsonl"
    main(["coco-captions", "--annotations", coco, "--images", str(tmp_path / "coco" / "val2017"), "--output", str(output)])
    assert [row["image"] for row in read_jsonl(output)] == [f"val2017/{i:012d}.jpg" for i in (139, 285, 632)]


def test_missing_images_stop_before_writing_or_are_skipped(coco, tmp_path, caplog):
    os.remove(tmp_path / "coco" / "val2017" / "000000000285.jpg")
    output = tmp_path / "out" / "coco_val.jsonl"
    argv = ["coco-captions", "--annotations", coco, "--images", str(tmp_path / "coco" / "val2017"), "--output", str(output)]
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 images .* do not exist: .*000000000285\.jpg.*--skip_missing_images"):
        main(argv)
    assert not output.exists()
    with caplog.at_level(logging.WARNING, logger="utils.convert"):
        assert main(argv + ["--skip_missing_images"]) == {str(output): 2}
    assert [row["image_id"] for row in read_jsonl(output)] == [139, 632]
    assert "000000000285.jpg" in caplog.text


def test_coco_captions_wrong_files_name_the_file_and_the_key(coco, tmp_path):
    images = str(tmp_path / "coco" / "val2017")
    output = str(tmp_path / "out.jsonl")
    instances = write_json(tmp_path / "instances_val2017.json", {"images": [coco_image(139)], "annotations": [{"image_id": 139, "id": 1, "bbox": [0, 0, 1, 1]}]})
    with pytest.raises(ValueError, match=r"instances_val2017\.json: annotations\[0\] has no key 'caption' .*captions_val2017\.json"):
        main(["coco-captions", "--annotations", instances, "--images", images, "--output", output])
    karpathy = write_json(tmp_path / "dataset_coco.json", {"images": [], "dataset": "coco"})
    with pytest.raises(ValueError, match=r"dataset_coco\.json' has no list under the key 'annotations' \(found: \['dataset', 'images'\]\)"):
        main(["coco-captions", "--annotations", karpathy, "--images", images, "--output", output])
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json' is not valid JSON"):
        main(["coco-captions", "--annotations", str(tmp_path / "broken.json"), "--images", images, "--output", output])
    unknown = write_json(tmp_path / "mixed.json", {"images": [coco_image(139)], "annotations": [{"image_id": 5, "id": 1, "caption": "x"}]})
    with pytest.raises(ValueError, match=r"mixed\.json: 1 captions are for image ids that its 'images' list does not hold \(5\)"):
        main(["coco-captions", "--annotations", unknown, "--images", images, "--output", output])
    with pytest.raises(ValueError, match=r"--output .*out\.txt.* \.jsonl"):
        main(["coco-captions", "--annotations", coco, "--images", images, "--output", str(tmp_path / "out.txt")])
    with pytest.raises(FileNotFoundError, match=r"--images .*val2014.* is not a folder"):
        main(["coco-captions", "--annotations", coco, "--images", str(tmp_path / "coco" / "val2014"), "--output", output])


# --- Karpathy splits -----------------------------------------------------------------------------------------


def karpathy_image(imgid, split, filename, sentences, filepath=None, cocoid=None):
    image = {
        "filename": filename, "imgid": imgid, "split": split,
        "sentids": list(range(imgid * 5, imgid * 5 + len(sentences))),
        "sentences": [
            {"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": imgid * 5 + k}
            for k, raw in enumerate(sentences)
        ],
    }
    if filepath is not None:
        image["filepath"] = filepath
    if cocoid is not None:
        image["cocoid"] = cocoid
    return image


@pytest.fixture
def karpathy_coco(tmp_path):
    """dataset_coco.json with one image per split (train from train2014, the others from val2014)."""
    layout = [
        ("train", "train2014", "COCO_train2014_000000000009.jpg", 9, "red"),
        ("restval", "val2014", "COCO_val2014_000000000042.jpg", 42, "green"),
        ("val", "val2014", "COCO_val2014_000000000073.jpg", 73, "blue"),
        ("test", "val2014", "COCO_val2014_000000000074.jpg", 74, "red"),
    ]
    images = []
    for imgid, (split, folder, filename, cocoid, color) in enumerate(layout):
        save_image(tmp_path / "coco" / folder / filename, color)
        sentences = [f"A {color} picture number {cocoid}. ", f"Image {cocoid} of the {split} split."]
        images.append(karpathy_image(imgid, split, filename, sentences, filepath=folder, cocoid=cocoid))
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_coco_splits_rows_and_loading(karpathy_coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = main(["karpathy", "--split_json", "dataset_coco.json", "--image_root", "coco", "--output_dir", "data/karpathy_coco"])
    out = tmp_path / "data" / "karpathy_coco"
    assert written == {os.path.join("data/karpathy_coco", f"{s}.jsonl"): n for s, n in (("train", 2), ("validation", 1), ("test", 1))}
    assert read_jsonl(out / "train.jsonl") == [
        {"image": "../../coco/train2014/COCO_train2014_000000000009.jpg", "captions": ["A red picture number 9.", "Image 9 of the train split."], "image_id": 9},
        {"image": "../../coco/val2014/COCO_val2014_000000000042.jpg", "captions": ["A green picture number 42.", "Image 42 of the restval split."], "image_id": 42},
    ]
    assert read_jsonl(out / "validation.jsonl") == [
        {"image": "../../coco/val2014/COCO_val2014_000000000073.jpg", "captions": ["A blue picture number 73.", "Image 73 of the val split."], "image_id": 73},
    ]
    assert read_jsonl(out / "test.jsonl") == [
        {"image": "../../coco/val2014/COCO_val2014_000000000074.jpg", "captions": ["A red picture number 74.", "Image 74 of the test split."], "image_id": 74},
    ]
    monkeypatch.chdir(out)
    dataset = load_captions(out / "train.jsonl")
    assert [dominant_channel(dataset[i]["pixel_values"]) for i in range(2)] == [CHANNEL["red"], CHANNEL["green"]]
    assert dataset[1]["captions"] == ["A green picture number 42.", "Image 42 of the restval split."]


def test_karpathy_exclude_restval(karpathy_coco, tmp_path):
    main(["karpathy", "--split_json", karpathy_coco, "--image_root", str(tmp_path / "coco"), "--output_dir", str(tmp_path / "out"), "--exclude_restval"])
    assert [row["image_id"] for row in read_jsonl(tmp_path / "out" / "train.jsonl")] == [9]
    assert [row["image_id"] for row in read_jsonl(tmp_path / "out" / "validation.jsonl")] == [73]


def test_karpathy_flickr30k_has_no_filepath_nor_cocoid(tmp_path):
    save_image(tmp_path / "flickr30k-images" / "1000092795.jpg", "blue")
    data = {"images": [karpathy_image(0, "test", "1000092795.jpg", ["Two young guys with shaggy hair look at their hands ."])], "dataset": "flickr30k"}
    splits = convert_karpathy(data, str(tmp_path / "flickr30k-images"), str(tmp_path / "data"))
    assert splits == {
        "train": [],
        "validation": [],
        "test": [{"image": "../flickr30k-images/1000092795.jpg", "captions": ["Two young guys with shaggy hair look at their hands ."], "image_id": 0}],
    }
    next_to_the_images = convert_karpathy(data, str(tmp_path / "flickr30k-images"), str(tmp_path / "flickr30k-images"))
    assert next_to_the_images["test"][0]["image"] == "1000092795.jpg"


def test_karpathy_bad_values_and_missing_images(karpathy_coco, tmp_path):
    bad = write_json(tmp_path / "bad.json", {"images": [karpathy_image(0, "trainval", "a.jpg", ["x"], filepath="val2014")]})
    argv = ["--image_root", str(tmp_path / "coco"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"bad\.json: images\[0\]\['split'\] is 'trainval'; expected one of \['restval', 'test', 'train', 'val'\]"):
        main(["karpathy", "--split_json", bad] + argv)
    coco_captions = write_json(tmp_path / "captions_val2017.json", {"images": [coco_image(1)], "annotations": []})
    with pytest.raises(ValueError, match=r"captions_val2017\.json: images\[0\] has no key 'split' .*dataset_coco\.json"):
        main(["karpathy", "--split_json", coco_captions] + argv)
    os.remove(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000074.jpg")
    with pytest.raises(FileNotFoundError, match=r"dataset_coco\.json \(test\) names do not exist: .*COCO_val2014_000000000074\.jpg"):
        main(["karpathy", "--split_json", karpathy_coco] + argv)
    assert not (tmp_path / "out").exists()  # nothing written, not even the splits that were complete


# --- VQAv2 -------------------------------------------------------------------------------------------------------


def vqa_answers(answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]


def vqa_annotation(question_id, image_id, answers, answer_type, question_type, majority):
    return {
        "question_type": question_type, "multiple_choice_answer": majority, "answers": vqa_answers(answers),
        "image_id": image_id, "answer_type": answer_type, "question_id": question_id,
    }


def vqa_file(subtype, key, items):
    return {
        "info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017},
        "task_type": "Open-Ended", "data_type": "mscoco", "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": subtype, key: items,
    }


COUNT_ANSWERS = ["2", "2", "two", "2", "2", "3", "2", "2", "2", "2"]
COLOR_ANSWERS = ["red", "red", "red", "maroon", "red", "red", "red", "red", "dark red", "red"]


@pytest.fixture
def vqa(tmp_path):
    """val2014 images 42 (green) and 73 (red); three questions, one (73001) without an annotation, and one
    annotation (99000) without a question. The answers of 42000 are stored out of answer_id order."""
    save_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg", "green")
    save_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000073.jpg", "red")
    questions = [
        {"image_id": 73, "question": "What color is the bus?", "question_id": 73000},
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 42000},
        {"image_id": 73, "question": "Is it raining?", "question_id": 73001},
    ]
    count = vqa_annotation(42000, 42, COUNT_ANSWERS, "number", "how many", "2")
    count["answers"] = count["answers"][5:] + count["answers"][:5]
    annotations = [
        count,
        vqa_annotation(73000, 73, COLOR_ANSWERS, "other", "what color is the", "red"),
        vqa_annotation(99000, 99, ["yes"] * 10, "yes/no", "is the", "yes"),
    ]
    return (
        write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", vqa_file("val2014", "questions", questions)),
        write_json(tmp_path / "v2_mscoco_val2014_annotations.json", vqa_file("val2014", "annotations", annotations)),
    )


VQA_ROWS = [
    {
        "image": "../coco/val2014/COCO_val2014_000000000073.jpg", "question": "What color is the bus?", "question_id": 73000, "image_id": 73,
        "answers": COLOR_ANSWERS, "answer_type": "other", "question_type": "what color is the", "multiple_choice_answer": "red",
    },
    {
        "image": "../coco/val2014/COCO_val2014_000000000042.jpg", "question": "How many dogs are there?", "question_id": 42000, "image_id": 42,
        "answers": COUNT_ANSWERS, "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "2",
    },
]


def test_vqav2_rows_and_loading(vqa, tmp_path, monkeypatch, caplog):
    questions, annotations = vqa
    monkeypatch.chdir(tmp_path)
    argv = ["vqav2", "--questions", os.path.basename(questions), "--annotations", os.path.basename(annotations)]
    with caplog.at_level(logging.WARNING, logger="utils.convert"):
        written = main(argv + ["--images", "coco/val2014", "--output", "data/vqav2_val.jsonl"])
    assert written == {"data/vqav2_val.jsonl": 2}
    assert read_jsonl(tmp_path / "data" / "vqav2_val.jsonl") == VQA_ROWS
    assert "1 of 3 questions have no annotation" in caplog.text and "73001" in caplog.text
    assert "1 annotations are for questions not in" in caplog.text and "99000" in caplog.text

    monkeypatch.chdir(tmp_path / "coco")
    split = load_splits(data_files={"train": str(tmp_path / "data" / "vqav2_val.jsonl")})["train"]
    assert [parse_answers(value) for value in split.rows["answers"]] == [COLOR_ANSWERS, COUNT_ANSWERS]
    assert split.rows["answer_type"] == ["other", "number"]
    colors = [load_image(path, split.base_dir).getpixel((0, 0)) for path in split.rows["image"]]
    assert [max(range(3), key=color.__getitem__) for color in colors] == [CHANNEL["red"], CHANNEL["green"]]


def test_vqav2_test_dev_questions_alone(tmp_path):
    """test-dev2015 questions are about test2015 images; without annotations the rows have no answers."""
    save_image(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg", "blue")
    questions = write_json(
        tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        vqa_file("test-dev2015", "questions", [{"image_id": 1, "question": "Is this a bus?", "question_id": 1000}]),
    )
    output = tmp_path / "data" / "test_dev.jsonl"
    main(["vqav2", "--questions", questions, "--images", str(tmp_path / "test2015"), "--output", str(output)])
    assert read_jsonl(output) == [{"image": "../test2015/COCO_test2015_000000000001.jpg", "question": "Is this a bus?", "question_id": 1000, "image_id": 1}]
    split = load_splits(data_files={"test": str(output)})["test"]
    assert "answers" not in split.rows.column_names
    assert load_image(split.rows[0]["image"], split.base_dir).size == (12, 8)


def test_vqav2_image_name_format_and_missing_images(vqa, tmp_path):
    questions, annotations = vqa
    os.rename(tmp_path / "coco" / "val2014", tmp_path / "images")
    for name in os.listdir(tmp_path / "images"):
        os.rename(tmp_path / "images" / name, tmp_path / "images" / name.replace("COCO_val2014_", ""))
    argv = ["vqav2", "--questions", questions, "--annotations", annotations, "--images", str(tmp_path / "images"), "--output", str(tmp_path / "vqa.jsonl")]
    with pytest.raises(FileNotFoundError, match=r"2 of the 2 images .*COCO_val2014_000000000073\.jpg.*--image_name_format"):
        main(argv)
    main(argv + ["--image_name_format", "{image_id:012d}.jpg"])
    assert [row["image"] for row in read_jsonl(tmp_path / "vqa.jsonl")] == ["images/000000000073.jpg", "images/000000000042.jpg"]
    with pytest.raises(ValueError, match=r"--image_name_format '\{id\}\.jpg' does not format with image_id=73"):
        main(argv + ["--image_name_format", "{id}.jpg"])


def test_vqav2_mixed_or_wrong_files(vqa, tmp_path):
    questions, annotations = vqa
    images = str(tmp_path / "coco" / "val2014")
    output = str(tmp_path / "vqa.jsonl")
    data = load_json(annotations, "annotations", "annotations")
    data["annotations"][1]["image_id"] = 42
    moved = write_json(tmp_path / "moved.json", data)
    with pytest.raises(ValueError, match=r"moved\.json: annotations\[1\] puts question 73000 on image 42 but .*questions\[0\] on image 73"):
        main(["vqav2", "--questions", questions, "--annotations", moved, "--images", images, "--output", output])
    data = load_json(annotations, "annotations", "annotations")
    data["data_subtype"] = "train2014"
    train = write_json(tmp_path / "v2_mscoco_train2014_annotations.json", data)
    with pytest.raises(ValueError, match=r"questions\.json is for 'val2014' but .*train2014_annotations\.json for 'train2014'"):
        main(["vqav2", "--questions", questions, "--annotations", train, "--images", images, "--output", output])
    with pytest.raises(ValueError, match=r"annotations\.json' has no list under the key 'questions'"):
        main(["vqav2", "--questions", annotations, "--images", images, "--output", output])
    data = load_json(annotations, "annotations", "annotations")
    data["annotations"][0]["answers"][3] = {"answer_confidence": "yes", "answer_id": 4}
    no_answer = write_json(tmp_path / "no_answer.json", data)
    with pytest.raises(ValueError, match=r"no_answer\.json: annotations\[0\]\['answers'\]\[3\] has no key 'answer'"):
        main(["vqav2", "--questions", questions, "--annotations", no_answer, "--images", images, "--output", output])
    data = load_json(questions, "questions", "questions")
    del data["data_subtype"]
    no_subtype = write_json(tmp_path / "no_subtype.json", data)
    with pytest.raises(ValueError, match=r"no_subtype\.json has no 'data_subtype'.*--image_name_format"):
        main(["vqav2", "--questions", no_subtype, "--images", images, "--output", output])


def test_relative_image_path():
    assert relative_image_path("/data/coco/val2014/a.jpg", "/work/main/data") == "../../../data/coco/val2014/a.jpg"
    assert relative_image_path("/data/coco/val2014/a.jpg", "/data/coco") == "val2014/a.jpg"


# --- Webdataset shards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_hold_the_rows_and_their_image_bytes(tmp_path, streaming):
    """7 rows in shards of 3: the shards load (whole or streamed) as the same rows, images byte for byte."""
    rows = []
    for index in range(7):
        save_image(tmp_path / "data" / "images" / f"{index}.png", list(COLORS)[index % 3])
        rows.append({"image": f"images/{index}.png", "captions": [f"caption {index}"], "image_id": index})
    jsonl = tmp_path / "data" / "train.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    written = main(["shards", "--input", str(jsonl), "--output_dir", str(tmp_path / "shards"), "--samples_per_shard", "3"])
    assert sorted(os.path.basename(p) for p in written) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert list(written.values()) == [3, 3, 1]
    loaded = list(load_splits(data_files={"train": str(tmp_path / "shards")}, streaming=streaming)["train"].rows)
    assert [row["image_id"] for row in loaded] == list(range(7))
    for row, original in zip(loaded, rows):
        assert row["captions"] == original["captions"]
        assert row["image"]["bytes"] == (tmp_path / "data" / original["image"]).read_bytes()


def test_shards_refuse_mixed_image_types_and_missing_images(tmp_path):
    save_image(tmp_path / "a.png", "red")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.jpg")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "text": "a"}) + "\n" + json.dumps({"image": "b.jpg", "text": "b"}) + "\n")
    with pytest.raises(ValueError, match="--image_extension"):
        main(["shards", "--input", str(jsonl), "--output_dir", str(tmp_path / "mixed")])
    assert not (tmp_path / "mixed").exists()
    written = main(["shards", "--input", str(jsonl), "--output_dir", str(tmp_path / "alike"), "--image_extension", "png"])
    assert list(written.values()) == [2]
    rows = list(load_splits(data_files={"train": str(tmp_path / "alike")})["train"].rows)
    assert [load_image(row["image"]).size for row in rows] == [(12, 8), (4, 4)]  # PIL reads the format from the bytes

    jsonl.write_text(json.dumps({"image": "a.png"}) + "\n" + json.dumps({"image": "gone.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        main(["shards", "--input", str(jsonl), "--output_dir", str(tmp_path / "missing")])
    written = main(["shards", "--input", str(jsonl), "--output_dir", str(tmp_path / "missing"), "--skip_missing_images"])
    assert list(written.values()) == [1]
