"""CLIP towers that run their last layer at the pooled token alone.

A CLIP embedding reads one position of each tower's output: the class token of an image (position 0), the first
end-of-text token of a caption. In the last layer every other position's query, attention output, MLP and
residual are computed and thrown away; only the keys and values need every position. `pool_last_layers` makes
each CLIP tower of a model compute that layer's keys and values over the sequence, and the rest at the pooled
position alone, so that, per ViT-B/32 tower and sequence of length T, about 10/12 of one layer's matmul FLOPs
for T - 1 positions are not spent (7% of the model's). The embeddings and every parameter's gradient are the
same as the model's own forward gives (tests/test_towers.py checks values and gradients against it).

What the towers no longer return: per-position states (`last_hidden_state` is None) and the optional outputs
(`output_hidden_states`, `output_attentions`, which raise). CLIP training and retrieval read neither.
`restore_towers` puts the model's own forwards back.

The last layer is still called through the module (`layer(...)`), so the hooks of FSDP2 and DeepSpeed ZeRO-3,
which gather a layer's parameters around its call, run as before, and under activation checkpointing it is
checkpointed as the other layers are.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextModel, CLIPVisionModel

def pool_last_layers(model) -> list[str]:
    """Run the last layer of each CLIP tower of `model` (`vision_model`, `text_model`: CLIPModel, or a dual encoder
    with a CLIP tower) at the pooled position only. Returns the names of the towers changed; other towers (ViT,
    BERT, ...) and models are left as they are."""
    changed = []
    for name, tower_forward in (("vision_model", _vision_forward), ("text_model", _text_forward)):
        tower = getattr(model, name, None)
        if not isinstance(tower, (CLIPVisionModel, CLIPTextModel)) or not isinstance(tower.encoder.layers[-1], CLIPEncoderLayer):
            continue
        tower.forward = types.MethodType(tower_forward, tower)
        last = tower.encoder.layers[-1]
        last.forward = types.MethodType(_pooled_layer_forward, last)
        changed.append(name)
    return changed


def restore_towers(model) -> None:
    """Undo `pool_last_layers`: each tower and its last layer run their class's forward again."""
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if tower is not None and tower.__dict__.pop("forward", None) is not None:
            tower.encoder.layers[-1].__dict__.pop("forward", None)


def eos_positions(tower: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Where CLIPTextModel pools each caption, by its own rule: the first `eos_token_id`, or, in configs from before
    transformers PR #24773 (eos_token_id == 2), the highest token id. (B,)"""
    ids = input_ids.to(torch.int)
    if tower.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == tower.eos_token_id).int().argmax(dim=-1)


def _pooled_layer_forward(
    self: CLIPEncoderLayer,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pool_at: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The encoder layer's output at position `pool_at[b]` of each row b: (B, D). `key_mask` (B, T), True where
    that position's query may attend; None: everywhere. `attention_mask` (the 4-D mask of the other layers) is
    not read: `key_mask` is its row at `pool_at`. Checkpointed as transformers' GradientCheckpointingLayer does."""
    if self.gradient_checkpointing and self.training:
        return self._gradient_checkpointing_func(partial(_pooled_layer, self, pool_at=pool_at, key_mask=key_mask), hidden_states)
    return _pooled_layer(self, hidden_states, pool_at=pool_at, key_mask=key_mask)


def _pooled_layer(self: CLIPEncoderLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    batch, _, width = hidden_states.shape
    attention = self.self_attn
    rows = torch.arange(batch, device=hidden_states.device)
    normed = self.layer_norm1(hidden_states)  # (B, T, D): keys and values need every position
    heads = (batch, -1, attention.num_heads, attention.head_dim)
    query = attention.q_proj(normed[rows, pool_at]).view(batch, attention.num_heads, 1, attention.head_dim)
    key = attention.k_proj(normed).view(heads).transpose(1, 2)  # (B, H, T, d)
    value = attention.v_proj(normed).view(heads).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=attention.dropout if self.training else 0.0, scale=attention.scale
    )  # (B, H, 1, d)
    pooled = hidden_states[rows, pool_at] + attention.out_proj(attended.reshape(batch, width))
    return pooled + self.mlp(self.layer_norm2(pooled))  # (B, D)


def _refuse_extra_outputs(tower, kwargs: dict) -> None:
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag):
            raise ValueError(
                f"{type(tower).__name__} runs its last layer at the pooled token only (utils.towers.pool_last_layers), "
                f"so {flag} is not available; call utils.towers.restore_towers(model) first."
            )


def _vision_forward(self: CLIPVisionModel, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs):
    _refuse_extra_outputs(self, kwargs)
    hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))
    *layers, last = self.encoder.layers
    for layer in layers:
        hidden_states = layer(hidden_states, None)
    class_token = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    pooled = last(hidden_states, None, pool_at=class_token)
    return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=self.post_layernorm(pooled))


def _text_forward(self: CLIPTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, **kwargs):
    _refuse_extra_outputs(self, kwargs)
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
    causal = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, past_key_values=None)
    *layers, last = self.encoder.layers
    for layer in layers:
        hidden_states = layer(hidden_states, causal, is_causal=True)
    eos = eos_positions(self, input_ids)
    # The eos token's query sees the positions up to its own that the padding mask keeps.
    key_mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= eos[:, None]  # (B, T)
    if attention_mask is not None:
        key_mask = key_mask & attention_mask.bool()
    pooled = last(hidden_states, causal, pool_at=eos, key_mask=key_mask)
    return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=self.final_layer_norm(pooled))
