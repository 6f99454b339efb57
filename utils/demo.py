"""The embedded demo: a synthetic, learnable image-text data set and tiny models, made offline and
deterministically.

Scenes are coloured shapes placed in the cells of a 2x2 grid or the centre, on a noisy background. Captions
name colour, shape and position, so a model has to learn all three to retrieve or write them; the scene's
objects are stored with every row, from which questions and answers for VQA are derived.

    python -m utils.demo clip --output_dir demo        # data + a tiny CLIP, then the command to train it

Nothing here downloads anything: tokenizers are trained on the demo's own words (plus every byte, so no
text ever maps to an unknown token) and models are built from configs with random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
# Centre of each position as a fraction of the canvas.
_POSITION_CENTERS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_TEMPLATES = (
    "a {color} {shape} in the {position}",
    "{color} {shape}, {position}",
    "there is a {color} {shape} at the {position}",
    "the {position} has a {color} {shape}",
    "a picture of a {color} {shape} in the {position}",
)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    position: str


def _phrase(position: str) -> str:
    return position  # "top left", "center": both read well after "in the" / "at the"


def render_scene(objects: list[ShapeObject], rng: random.Random, size: int = 64) -> Image.Image:
    """Draw the objects with jittered size and position on a noisy grey background."""
    shade = rng.randint(200, 245)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for _ in range(size // 2):  # speckle noise so colour alone is not the background
        x, y = rng.randrange(size), rng.randrange(size)
        tone = rng.randint(150, 255)
        draw.point((x, y), fill=(tone, tone, tone))
    for obj in objects:
        cx, cy = _POSITION_CENTERS[obj.position]
        cx = (cx + rng.uniform(-0.05, 0.05)) * size
        cy = (cy + rng.uniform(-0.05, 0.05)) * size
        r = rng.uniform(0.13, 0.18) * size
        jitter = rng.randint(-20, 20)
        fill = tuple(max(0, min(255, c + jitter)) for c in COLORS[obj.color])
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif obj.shape == "cross":
            w = r / 2.5
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    return image.filter(ImageFilter.SMOOTH)


def describe(objects: list[ShapeObject]) -> list[str]:
    """Five captions for a scene: one per template for a single object; for several, a count phrase and a
    listing by position."""
    if len(objects) == 1:
        obj = objects[0]
        return [t.format(color=obj.color, shape=obj.shape, position=_phrase(obj.position)) for t in _TEMPLATES]
    parts = [f"a {o.color} {o.shape} in the {o.position}" for o in objects]
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    count = NUMBER_WORDS.get(len(objects), str(len(objects)))
    shapes = sorted({o.shape for o in objects})
    return [
        listing,
        f"{count} shapes: {listing}",
        f"there are {count} shapes, " + ", ".join(f"{o.color} {o.shape}" for o in objects),
        "a picture of " + listing,
        f"{count} objects: " + " and ".join(shapes),
    ]


def all_single_objects() -> list[ShapeObject]:
    return [ShapeObject(s, c, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def sample_scene(rng: random.Random, max_objects: int) -> list[ShapeObject]:
    count = rng.randint(1, max_objects)
    positions = rng.sample(POSITIONS[:4] if count > 1 else POSITIONS, count)
    return [ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in positions]


def write_demo_dataset(
    output_dir: str,
    num_train: int = 2000,
    num_validation: int = 100,
    num_test: int = 100,
    max_objects: int = 1,
    image_size: int = 64,
    image_format: str = "png",
    seed: int = 0,
) -> dict[str, str]:
    """Write images and train/validation/test .jsonl files; return split -> file path.

    Rows: {"image": relative path, "captions": [five strings], "objects": [{shape, color, position}]}.
    With one object per image, validation and test scenes are distinct (shape, colour, position) combinations,
    so every caption describes exactly one of their images and retrieval recall can reach 1.0.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    files = {}
    combos = all_single_objects()
    for split, count in (("train", num_train), ("validation", num_validation), ("test", num_test)):
        if max_objects == 1 and split != "train":
            if count > len(combos):
                raise ValueError(f"{split} can hold at most {len(combos)} distinct single-object scenes, got {count}")
            scenes = [[obj] for obj in rng.sample(combos, count)]
        else:
            scenes = [sample_scene(rng, max_objects) for _ in range(count)]
        path = os.path.join(output_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for index, objects in enumerate(scenes):
                name = f"images/{split}_{index:05d}.{image_format}"
                render_scene(objects, rng, image_size).save(os.path.join(output_dir, name))
                row = {"image": name, "captions": describe(objects), "objects": [asdict(o) for o in objects]}
                f.write(json.dumps(row) + "\n")
        files[split] = path
    return files


def demo_corpus() -> list[str]:
    """Sentences in the demo's words, for training a tokenizer on them."""
    return [t.format(color=c, shape=s, position=p) for t in _TEMPLATES for c in COLORS for s in SHAPES for p in POSITIONS]


def demo_words() -> list[str]:
    """Every word and punctuation mark the demo's texts use, sorted."""
    words = set()
    for objects in ([o] for o in all_single_objects()):
        for caption in describe(objects):
            words.update(caption.replace(",", " ,").replace(":", " :").split())
    extra = "picture shapes objects there are is has of at the in and what which where how many color colour shape yes no"
    words.update(extra.split())
    words.update(NUMBER_WORDS.values())
    words.update("?.,:;'!-")
    return sorted(words)


def byte_level_bpe(words: list[str], special_tokens: list[str], end_of_word_suffix: str = "") -> tuple[dict, list]:
    """A deterministic byte-level BPE vocabulary and merge list: the special tokens, all 256 byte symbols
    (also with `end_of_word_suffix`, where the tokenizer marks word ends), then each word built by merging
    left to right. Every text encodes without an unknown token, and the ids are the same on every run
    (`train_new_from_iterator` breaks frequency ties differently from run to run).
    `words` are in byte-level form (ASCII letters stand for themselves)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *alphabet, *([c + end_of_word_suffix for c in alphabet] if end_of_word_suffix else [])]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in sorted(set(words)):
        symbols = list(word)
        symbols[-1] += end_of_word_suffix
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((current, symbol))
            current = merged
    return vocab, merges


def build_demo_clip_tokenizer():
    """A small byte-level BPE `CLIPTokenizer` over the demo's words (see `byte_level_bpe`)."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab, merges = byte_level_bpe(demo_words(), specials, end_of_word_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_demo_bert_tokenizer(directory: str):
    """A word-level `BertTokenizer` (WordPiece vocabulary of the demo's words and every ASCII character, as
    whole words and as ## continuations), saved in `directory` and returned."""
    from transformers import BertTokenizer

    words = set(demo_words())
    ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words | set(ascii_chars)) + ["##" + c for c in ascii_chars]
    vocab = list(dict.fromkeys(v.lower() if not v.startswith("[") else v for v in vocab))
    os.makedirs(directory, exist_ok=True)
    vocab_file = os.path.join(directory, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=vocab_file, do_lower_case=True)  # transformers 5 ignores vocab_file=
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_demo_clip(directory: str, image_size: int = 32, seed: int = 0):
    """A tiny `CLIPModel` (2+2 layers, width 64) with its processor, saved in `directory`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = build_demo_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            # Pooling happens at the first eos token: the ids must be the tokenizer's.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=64,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer.model_max_length = 32
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def prepare_clip_demo(output_dir: str, num_train: int = 2000, seed: int = 0) -> None:
    """Data in <output_dir>/clip_data, a tiny CLIP in <output_dir>/tiny_clip (configs/demo_clip.yaml)."""
    write_demo_dataset(os.path.join(output_dir, "clip_data"), num_train=num_train, seed=seed)
    build_demo_clip(os.path.join(output_dir, "tiny_clip"), seed=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["clip", "caption", "vqa"], help="which demo to prepare")
    parser.add_argument("--output_dir", default="demo", help="folder for the data and the tiny model")
    parser.add_argument("--num_train", type=int, default=2000, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.task == "clip":
        prepare = prepare_clip_demo
    elif args.task == "caption":
        from .demo_caption import prepare_caption_demo as prepare
    else:
        from .demo_vqa import prepare_vqa_demo as prepare
    prepare(args.output_dir, num_train=args.num_train, seed=args.seed)
    logger.info("wrote the %s demo data and tiny model under %s", args.task, args.output_dir)


if __name__ == "__main__":
    main()
