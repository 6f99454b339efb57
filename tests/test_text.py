"""Caption parsing and the truncation length; batches pad to the longest caption, never past the limit."""

import pytest
import torch

from run_clip import ClipCollator
from tests.helpers import minilm_path
from utils.demo import build_demo_clip_tokenizer
from utils.images import ImageTransformSpec
from utils.text import parse_captions, resolve_max_length


@pytest.fixture(scope="module")
def clip_tokenizer():
    tokenizer = build_demo_clip_tokenizer()
    tokenizer.model_max_length = 77
    return tokenizer


def test_parse_captions_shapes():
    assert parse_captions("a red circle") == ["a red circle"]
    assert parse_captions(["a", "b"]) == ["a", "b"]
    assert parse_captions('["a dog", "a cat"]') == ["a dog", "a cat"]
    assert parse_captions("[not json") == ["[not json"]
    for word in ("NA", "None", "null", "nan"):
        assert parse_captions(word) == [word]
    assert parse_captions(["", "  ", "kept"]) == ["kept"]


@pytest.mark.parametrize("bad", [None, 3.5, float("nan"), {"caption": "x"}, ["ok", 3], "", "   ", []])
def test_parse_captions_rejects_what_is_not_text(bad):
    with pytest.raises(ValueError):
        parse_captions(bad)


def test_max_length_is_capped_by_the_position_limit(clip_tokenizer):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(max_position_embeddings=77)
    assert resolve_max_length(128, clip_tokenizer, config) == 77  # the official example's default overflows
    assert resolve_max_length(None, clip_tokenizer, config) == 77
    assert resolve_max_length(20, clip_tokenizer, config) == 20


def test_max_length_for_the_pretrained_minilm():
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = AutoConfig.from_pretrained(minilm_path())
    assert resolve_max_length(None, tokenizer, config) == min(config.max_position_embeddings, tokenizer.model_max_length)
    assert resolve_max_length(4096, tokenizer, config) == 512


def test_collator_pads_to_longest_and_never_past_the_limit(clip_tokenizer):
    spec = ImageTransformSpec(resize_height=8, resize_width=8)
    collate = ClipCollator(clip_tokenizer, max_length=12, image_spec=spec)
    pixels = torch.zeros(3, 8, 8, dtype=torch.uint8)
    short = collate([{"pixel_values": pixels, "caption": "a red circle"}, {"pixel_values": pixels, "caption": "a blue square in the top left"}])
    lengths = short["attention_mask"].sum(1)
    assert short["input_ids"].shape[1] == lengths.max() < 12  # padded to the longest, not to max_length
    assert lengths.min() < lengths.max()
    long = collate([{"pixel_values": pixels, "caption": " ".join(["red"] * 200)}])
    assert long["input_ids"].shape[1] == 12
    assert long["input_ids"][0, -1] == clip_tokenizer.eos_token_id  # truncation keeps the end token CLIP pools at
    assert short["pixel_values"].dtype == torch.float32


def test_collator_flattens_every_caption_for_evaluation(clip_tokenizer):
    spec = ImageTransformSpec(resize_height=8, resize_width=8)
    collate = ClipCollator(clip_tokenizer, max_length=16, image_spec=spec)
    pixels = torch.zeros(3, 8, 8, dtype=torch.uint8)
    batch = collate([{"pixel_values": pixels, "captions": ["a", "b", "c"]}, {"pixel_values": pixels, "captions": ["d"]}])
    assert batch["caption_counts"].tolist() == [3, 1]
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 2


def test_demo_tokenizer_has_no_unknown_tokens_for_any_text(clip_tokenizer):
    """The trap: a tiny CLIP BPE's unknown token is its end token, on which CLIP pools."""
    import random

    rng = random.Random(0)
    text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x800), rng.randrange(0x800, 0xD7FF),
                                   rng.randrange(0x10000, 0x10FFFF)])) for _ in range(3000))
    ids = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert clip_tokenizer.unk_token_id not in ids
    assert clip_tokenizer.unk_token_id == clip_tokenizer.eos_token_id  # why it matters


def test_demo_tokenizer_is_the_same_on_every_build(clip_tokenizer):
    again = build_demo_clip_tokenizer()
    assert again.get_vocab() == clip_tokenizer.get_vocab()
    assert again("a red circle in the top left")["input_ids"] == clip_tokenizer("a red circle in the top left")["input_ids"]
    assert len(clip_tokenizer("a red circle")["input_ids"]) == 5  # whole words: bos, a, red, circle, eos


def test_demo_bert_tokenizer_knows_the_demo_words(tmp_path):
    from utils.demo import build_demo_bert_tokenizer

    tokenizer = build_demo_bert_tokenizer(str(tmp_path))
    assert tokenizer.tokenize("A red circle in the top left?") == ["a", "red", "circle", "in", "the", "top", "left", "?"]
    assert tokenizer.unk_token not in tokenizer.tokenize("purple cross, bottom right")
