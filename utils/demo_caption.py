"""The captioning demo: the synthetic shapes data set (utils.demo) with its captions, and tiny captioners built
from configs, offline, with consistent special tokens.

    python -m utils.demo caption --output_dir demo     # data + a tiny BLIP
    python run_blip_caption.py configs/demo_caption.yaml

Special tokens are where a from-scratch captioner silently goes wrong, so the builders set them explicitly:

* BLIP (`build_tiny_blip`): a BERT word-level tokenizer plus a `[DEC]` bos token, as Salesforce's BLIP
  tokenizer has. The text decoder starts every sequence with `text_config.bos_token_id` (`generate` writes it
  over `input_ids[:, 0]`), stops at `sep_token_id` (`[SEP]`) and pads with `pad_token_id`: all three are the
  tokenizer's ids and inside the vocabulary. (`BlipTextConfig`'s default bos, 30522, is outside a plain BERT
  vocabulary.)
* BLIP-2 (`build_tiny_blip2`): a tiny OPT language model with a byte-level BPE tokenizer over the demo's words;
  like OPT's, it prepends `</s>` as bos, ends with `</s>` and pads with `<pad>`. `Blip2Processor` adds
  the `<image>` token whose `num_query_tokens` copies the Q-Former's outputs replace.
"""

from __future__ import annotations

import os
import tempfile

from .demo import build_demo_bert_tokenizer, byte_level_bpe, demo_words, write_demo_dataset

# Pixels the tiny vision towers see (the demo renders 64 x 64; the processor resizes).
TINY_IMAGE_SIZE = 32


def _tiny_vision_config(image_size: int, patch_size: int) -> dict:
    # initializer_range: BlipVisionConfig's default (1e-10) suits loading pretrained weights, not training anew.
    return {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "initializer_range": 0.02,
    }


def build_tiny_blip(directory: str, image_size: int = TINY_IMAGE_SIZE, patch_size: int = 8, seed: int = 0):
    """A tiny `BlipForConditionalGeneration` (2-layer ViT and 2-layer text decoder, width 64) and its
    `BlipProcessor`, saved in `directory`; returns (model, processor)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        build_demo_bert_tokenizer(scratch)  # writes the demo's WordPiece vocab.txt there
        # Read the vocabulary back through `vocab=`: in transformers 5 BertTokenizer ignores `vocab_file=`, so the
        # tokenizer build_demo_bert_tokenizer returns knows only its five special tokens.
        tokenizer = BertTokenizer(vocab=os.path.join(scratch, "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.model_max_length = 64
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "encoder_hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_tiny_vision_config(image_size, patch_size),
        projection_dim=64,
        image_text_hidden_size=64,
    )
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def build_demo_opt_tokenizer(words: list[str] | None = None):
    """A byte-level BPE `GPT2Tokenizer` over `words` (default: the demo's), deterministic (`utils.demo.byte_level_bpe`),
    with OPT's conventions and ids: `<pad>` 1, `</s>` 2 as bos (prepended to every text) and eos. Words carry their
    leading space ("Ġred") and `add_prefix_space` gives the first word one too, so a caption tokenizes the same
    after a prompt as alone."""
    from transformers import GPT2Tokenizer

    words = demo_words() if words is None else words
    vocab, merges = byte_level_bpe(["\u0120" + word for word in words], ["<s>", "<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(
        vocab=vocab, merges=merges, unk_token="<unk>", bos_token="</s>", eos_token="</s>", pad_token="<pad>",
        add_bos_token=True, add_prefix_space=True,
    )


def build_tiny_blip2(directory: str, image_size: int = TINY_IMAGE_SIZE, patch_size: int = 8, num_query_tokens: int = 8, seed: int = 0):
    """A tiny `Blip2ForConditionalGeneration` (2-layer ViT, 2-layer Q-Former with `num_query_tokens` queries,
    2-layer OPT, width 64) and its `Blip2Processor`, saved in `directory`; returns (model, processor)."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    torch.manual_seed(seed)
    tokenizer = build_demo_opt_tokenizer()
    tokenizer.model_max_length = 64
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    tokenizer = processor.tokenizer  # now holding the <image> token
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    config = Blip2Config(
        vision_config=_tiny_vision_config(image_size, patch_size),
        qformer_config={
            "vocab_size": 8,  # the Q-Former takes only its query embeddings here: no text vocabulary needed
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "cross_attention_frequency": 1,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64 + num_query_tokens,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def prepare_caption_demo(output_dir: str, num_train: int = 2000, seed: int = 0) -> None:
    """Data in <output_dir>/caption_data (one object per image, five captions each, in the `captions` column)
    and a tiny BLIP in <output_dir>/tiny_blip (configs/demo_caption.yaml)."""
    write_demo_dataset(os.path.join(output_dir, "caption_data"), num_train=num_train, max_objects=1, seed=seed)
    build_tiny_blip(os.path.join(output_dir, "tiny_blip"), seed=seed)
