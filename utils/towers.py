"""Encoders that run their last layer at the pooled token alone: CLIP's two towers; a dual encoder's vision tower
(ViT, DeiT, DINOv2, DINOv2 with registers) and text tower (BERT, RoBERTa, XLM-RoBERTa, CamemBERT, MPNet); and
ViLT.

A CLIP embedding reads one position of each tower's output: the class token of an image (position 0), the first
end-of-text token of a caption. The poolers of ViT, DeiT, DINOv2 and the BERT family (a dual encoder reads its
towers' `pooler_output`; MPNet's too) and ViLT's (its VQA head) read position 0, the class token or [CLS]. In the
last layer every other position's query, attention output, MLP and residual are computed and thrown away; only the
keys and values need every position. `pool_last_layers` makes each such encoder of a model compute that layer's keys
and values over the sequence and the rest at the pooled position alone: per encoder of L layers and a sequence of T
positions, about 10/12 of one layer's matmul FLOPs for T - 1 positions are not spent (7% of a ViT-B/32 CLIP's). The
outputs and every parameter's gradient are the same as the model's own forward gives (tests/test_towers.py checks
values and gradients against it, in float64). With dropout on, the pooled position (and a packed text tower's
positions, below) draws its dropout masks on its own, so a step's random draws differ from the model's (their distribution does not): CLIP's, ViT's, DINOv2's and
ViLT's default configs have none, the BERT family's hidden dropout is 0.1. DINOv2's stochastic depth drops a whole
sample's branch, drawn per sample as the model draws it.

The text towers go one step further: positions whose state reaches nothing are dropped from the layers before the
last. In CLIP, under the causal mask, no position after a caption's first end-of-text token reaches that token's
state; in the BERT family, padding is masked as a key in every layer and the pooler reads [CLS]. So the positions
past each caption's eos (CLIP) or its padding (BERT family) are dropped, and those layers run their projections and
MLP on the kept positions alone, packed as (N, D), with the model's own attention (implementation and mask) on them
scattered back to (B, L). Padding to the longest of a batch of 32 COCO-like captions leaves about a fifth of the
text positions as padding; larger batches more, as their longest caption grows. (MPNet's text tower is not packed.)

In transformers 5.23 RoBERTa, XLM-RoBERTa and CamemBERT copy BERT's model, encoder, layer and pooler line for line
(only the embeddings differ, and they run as the model's own), DeiT copies ViT's, and DINOv2 with registers
copies DINOv2's layer: each family shares one implementation here, and each model is tested on its own.

What the encoders no longer return: the other positions' states. `last_hidden_state` is (B, 1, D), the model's own
`last_hidden_state` at the pooled position alone (so that outputs indexed as tuples keep their places:
VisionTextDualEncoderModel reads `outputs[1]`), and the optional outputs (`output_hidden_states`,
`output_attentions`) raise. CLIP training and retrieval, and VQA, read neither. `restore_towers` puts the model's
own forwards back.

The last layer is still called through the module (`layer(...)`), so the hooks of FSDP2 and DeepSpeed ZeRO-3,
which gather a layer's parameters around its call, run as before, and under activation checkpointing it is
checkpointed as the other layers are.
"""

from __future__ import annotations

import types
from functools import partial

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.bert.modeling_bert import BertLayer, BertModel
from transformers.models.bert.modeling_bert import eager_attention_forward as bert_eager_attention
from transformers.models.camembert.modeling_camembert import CamembertLayer, CamembertModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPTextModel, CLIPVisionModel, eager_attention_forward
from transformers.models.deit.modeling_deit import DeiTLayer, DeiTModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer, Dinov2WithRegistersModel
from transformers.models.mpnet.modeling_mpnet import MPNetLayer, MPNetModel
from transformers.models.roberta.modeling_roberta import RobertaLayer, RobertaModel
from transformers.models.vilt.modeling_vilt import ViltLayer, ViltModel
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer, XLMRobertaModel

# (models, their layers) of each family that shares one implementation below.
BERT_FAMILY = (BertModel, RobertaModel, XLMRobertaModel, CamembertModel), (BertLayer, RobertaLayer, XLMRobertaLayer, CamembertLayer)
VIT_FAMILY = (ViTModel, DeiTModel), (ViTLayer, DeiTLayer)
DINOV2_FAMILY = (Dinov2Model, Dinov2WithRegistersModel), (Dinov2Layer, Dinov2WithRegistersLayer)


def pool_last_layers(model) -> list[str]:
    """Run the last layer of each tower of `model` (`vision_model`, `text_model`: CLIPModel, or a dual encoder with
    the towers named in this module's docstring) and of its ViLT encoder (`vilt`: ViltForQuestionAnswering, or a
    ViltModel itself) at the pooled position only; CLIP's text tower also runs its other layers on the positions up
    to each caption's end-of-text token alone (`_clip_text_forward`). Returns the names of the encoders changed;
    others (ELECTRA, Swin, SigLIP, a tower without a pooler, ...) are left as they are."""
    changed = []
    for name, encoder, encoder_forward, layer_forwards in _poolable(model):
        encoder.forward = types.MethodType(encoder_forward, encoder)
        for layer, layer_forward in layer_forwards:
            layer.forward = types.MethodType(layer_forward, layer)
        changed.append(name)
    return changed


def restore_towers(model) -> None:
    """Undo `pool_last_layers`: each encoder and its layers run their class's forward again."""
    for _, encoder, _, layer_forwards in _poolable(model):
        encoder.__dict__.pop("forward", None)
        for layer, _ in layer_forwards:
            layer.__dict__.pop("forward", None)


def _poolable(model):
    """(name, encoder, the encoder's forward, [(layer, its forward), ...]) for each encoder of `model` that
    `pool_last_layers` knows: its last layer at the pooled position (and CLIP text's other layers packed)."""
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    if isinstance(vision, CLIPVisionModel) and isinstance(vision.encoder.layers[-1], CLIPEncoderLayer):
        yield "vision_model", vision, _clip_vision_forward, [(vision.encoder.layers[-1], _layer_forward(_pooled_clip_layer))]
    if isinstance(text, CLIPTextModel) and all(isinstance(layer, CLIPEncoderLayer) for layer in text.encoder.layers):
        *layers, last = text.encoder.layers
        yield ("text_model", text, _clip_text_forward,
               [(layer, _layer_forward(_packed_clip_layer)) for layer in layers] + [(last, _layer_forward(_pooled_clip_layer))])
    # A dual encoder's other towers pool their first token (through their pooler, or DINOv2's final layer norm).
    models, layers = VIT_FAMILY
    if isinstance(vision, models) and vision.pooler is not None and isinstance(vision.layers[-1], layers):
        yield "vision_model", vision, _vit_forward, [(vision.layers[-1], _layer_forward(_pooled_vit_layer))]
    models, layers = DINOV2_FAMILY
    if isinstance(vision, models) and isinstance(vision.encoder.layer[-1], layers):
        yield "vision_model", vision, _dinov2_forward, [(vision.encoder.layer[-1], _layer_forward(_pooled_dinov2_layer))]
    models, layers = BERT_FAMILY
    if (isinstance(text, models) and text.pooler is not None and not text.config.is_decoder
            and isinstance(text.encoder.layer[-1], layers)):
        *layers, last = text.encoder.layer
        yield "text_model", text, _bert_forward, [(layer, _layer_forward(_packed_bert_layer)) for layer in layers] + [(last, _layer_forward(_pooled_bert_layer))]
    if isinstance(text, MPNetModel) and text.pooler is not None and isinstance(text.encoder.layer[-1], MPNetLayer):
        yield "text_model", text, _mpnet_forward, [(text.encoder.layer[-1], _layer_forward(_pooled_mpnet_layer))]
    vilt = model if isinstance(model, ViltModel) else getattr(model, "vilt", None)
    if isinstance(vilt, ViltModel) and vilt.pooler is not None and isinstance(vilt.encoder.layer[-1], ViltLayer):
        yield "vilt", vilt, _vilt_forward, [(vilt.encoder.layer[-1], _layer_forward(_pooled_vilt_layer))]


def eos_positions(tower: CLIPTextModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Where CLIPTextModel pools each caption, by its own rule: the first `eos_token_id`, or, in configs from before
    transformers PR #24773 (eos_token_id == 2), the highest token id. (B,)"""
    ids = input_ids.to(torch.int)
    if tower.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == tower.eos_token_id).int().argmax(dim=-1)


def _layer_forward(compute):
    """A layer's forward computed by `compute(layer, hidden_states, **kwargs)`; under activation checkpointing the
    layer is recomputed in the backward pass, as transformers' GradientCheckpointingLayer does for the other layers.
    `attention_mask` (the model's own 4-D mask, passed by position) is not read: `compute` takes its masks by name.

    The pooled layers (`_pooled_*_layer`) take `pool_at` (B,) and `key_mask`: (B, T) bool, True where that
    position's query may attend, None: everywhere; or (B, H, T) floats added to that query's scores (MPNet's
    position bias); and return (B, D), their output at `pool_at[b]` of each row b."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if getattr(self, "gradient_checkpointing", False) and self.training:  # MPNet's layers cannot checkpoint
            return self._gradient_checkpointing_func(partial(compute, self, **kwargs), hidden_states)
        return compute(self, hidden_states, **kwargs)

    return forward


def _attend_at(states: torch.Tensor, pool_at: torch.Tensor, key_mask: torch.Tensor | None, query, key, value, num_heads: int,
               dropout: float, scale: float) -> torch.Tensor:
    """Attention of one query per row, at position `pool_at[b]` of `states` (B, T, D), over the keys and values of every
    position; `query`, `key`, `value`: the layer's projections; `key_mask` (B, T) bool or (B, H, T) float
    (`_layer_forward`). -> (B, H * d), before the output projection."""
    batch = len(states)
    query = query(_at(states, pool_at)).view(batch, num_heads, 1, -1)
    key = key(states).view(batch, -1, num_heads, query.shape[-1]).transpose(1, 2)  # (B, H, T, d)
    value = value(states).view(batch, -1, num_heads, query.shape[-1]).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, :, None, :]
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
    return attended.reshape(batch, -1)


def _at(states: torch.Tensor, pool_at: torch.Tensor) -> torch.Tensor:
    """Row b's position `pool_at[b]`: (B, T, D) -> (B, D)."""
    return states[torch.arange(len(states), device=states.device), pool_at]


def _pack(states: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions `keep` (B, L) marks, packed: ((N, D) states, (N,) their flat indices into B * L)."""
    index = keep.flatten().nonzero()[:, 0]
    return states.flatten(0, 1).index_select(0, index), index


def _unpack(packed: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`_pack` undone: (N, D) -> (B, L, D), zeros where `keep` is False."""
    return packed.new_zeros(keep.numel(), packed.shape[-1]).index_copy(0, index, packed).view(*keep.shape, -1)


def _attend_packed(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, mask,
                   num_heads: int, eager, **kwargs) -> torch.Tensor:
    """The model's own attention (`attention.config._attn_implementation`, `eager` its eager function) on packed
    projections (N, H * d): scattered to (B, H, L, d) with zeros where nothing is kept, which `mask` (the model's own
    mask, built with `keep` as its padding mask) hides; the kept positions' outputs gathered back. -> (N, H * d)."""
    def heads(projected: torch.Tensor) -> torch.Tensor:
        return _unpack(projected, index, keep).view(*keep.shape, num_heads, -1).transpose(1, 2)

    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    attended, _ = attend(attention, heads(query), heads(key), heads(value), mask, **kwargs)
    return attended.reshape(keep.numel(), -1).index_select(0, index)  # (B, L, H, d) as the model's attention returns it


def _pooled_clip_layer(self: CLIPEncoderLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attention = self.self_attn
    normed = self.layer_norm1(hidden_states)  # (B, T, D): keys and values need every position
    attended = _attend_at(normed, pool_at, key_mask, attention.q_proj, attention.k_proj, attention.v_proj, attention.num_heads,
                          attention.dropout if self.training else 0.0, attention.scale)
    pooled = _at(hidden_states, pool_at) + attention.out_proj(attended)
    return pooled + self.mlp(self.layer_norm2(pooled))  # (B, D)


def _clip_vision_forward(self: CLIPVisionModel, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs):
    _refuse_extra_outputs(self, kwargs)
    hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))
    *layers, last = self.encoder.layers
    for layer in layers:
        hidden_states = layer(hidden_states, None)
    class_token = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    pooled = last(hidden_states, None, pool_at=class_token, key_mask=None)[:, None]
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=self.post_layernorm(pooled[:, 0]))


def _packed_clip_layer(self: CLIPEncoderLayer, packed: torch.Tensor, *, index: torch.Tensor, keep: torch.Tensor, mask) -> torch.Tensor:
    """A CLIP encoder layer on the kept positions of a batch packed as (N, D) (`_clip_text_forward`; `keep` (B, L),
    `index` from `_pack`): the projections and the MLP run on those N positions alone, the attention as the model's
    own (`_attend_packed`)."""
    attention = self.self_attn
    normed = self.layer_norm1(packed)
    attended = _attend_packed(attention, attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed), index, keep, mask,
                              attention.num_heads, eager_attention_forward, scaling=attention.scale,
                              dropout=attention.dropout if self.training else 0.0, is_causal=True)
    packed = packed + attention.out_proj(attended)
    return packed + self.mlp(self.layer_norm2(packed))  # (N, D)


def _clip_text_forward(self: CLIPTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, **kwargs):
    _refuse_extra_outputs(self, kwargs)
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    eos = eos_positions(self, input_ids)
    # A caption's embedding is its first eos token's state, and under the causal mask no later position reaches it:
    # positions past each caption's eos (its padding, mostly) are dropped, and the layers before the last run on the N
    # kept positions alone, packed as (N, D).
    length = int(eos.max()) + 1
    input_ids = input_ids[:, :length]
    if position_ids is not None:
        position_ids = position_ids[..., :length]
    keep = torch.arange(length, device=input_ids.device)[None, :] <= eos[:, None]  # (B, L)
    if attention_mask is not None:
        keep = keep & attention_mask[:, :length].bool()
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)  # (B, L, D)
    # The model's own causal mask, with `keep` as its padding mask: the kept positions see each other as they did.
    causal = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=keep.long(), past_key_values=None)
    packed, index = _pack(hidden_states, keep)
    *layers, last = self.encoder.layers
    for layer in layers:
        packed = layer(packed, None, index=index, keep=keep, mask=causal)
    hidden_states = _unpack(packed, index, keep)
    # The eos token's query sees the kept positions up to its own.
    pooled = self.final_layer_norm(last(hidden_states, None, pool_at=eos, key_mask=keep))[:, None]
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=pooled[:, 0])


def _pooled_vilt_layer(self: ViltLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attention = self.attention.attention
    normed = self.layernorm_before(hidden_states)  # (B, T, D): ViLT normalizes before attention
    attended = _attend_at(normed, pool_at, key_mask, attention.query, attention.key, attention.value, attention.num_attention_heads,
                          attention.dropout.p if self.training else 0.0, attention.attention_head_size**-0.5)
    pooled = self.attention.output(attended, None) + _at(hidden_states, pool_at)
    return self.output(self.intermediate(self.layernorm_after(pooled)), pooled)  # (B, D), the residual added in `output`


def _vilt_forward(self: ViltModel, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, pixel_mask=None,
                  inputs_embeds=None, image_embeds=None, image_token_type_idx=None, output_attentions=None,
                  output_hidden_states=None, return_dict=None, **kwargs):
    _refuse_extra_outputs(self, {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states})
    text = input_ids if input_ids is not None else inputs_embeds
    if text is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if (pixel_values is None) == (image_embeds is None):
        raise ValueError("Pass exactly one of pixel_values and image_embeds")
    batch, length = text.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, device=text.device)
    if pixel_mask is None:
        pixel_mask = torch.ones(batch, self.config.image_size, self.config.image_size, device=text.device)
    # (B, T) text then image tokens, and which of them are real (image patches are sampled per image)
    hidden_states, token_mask = self.embeddings(input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, inputs_embeds,
                                                image_embeds, image_token_type_idx=image_token_type_idx)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=token_mask)
    *layers, last = self.encoder.layer
    for layer in layers:
        hidden_states = layer(hidden_states, mask)[0]
    cls = torch.zeros(batch, dtype=torch.long, device=hidden_states.device)
    pooled = self.layernorm(last(hidden_states, mask, pool_at=cls, key_mask=token_mask.bool()))[:, None]
    pooler_output = self.pooler(pooled)  # the pooler reads position 0
    if return_dict is False:
        return pooled, pooler_output
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=pooler_output)


def _projected_attention_at(attention, normed: torch.Tensor, pool_at: torch.Tensor, key_mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    """ViT's, DeiT's and DINOv2's attention (q_proj, k_proj, v_proj, o_proj) at the pooled position: (B, D)."""
    attended = _attend_at(normed, pool_at, key_mask, attention.q_proj, attention.k_proj, attention.v_proj, attention.num_attention_heads,
                          attention.attention_dropout if training else 0.0, attention.scaling)
    return attention.o_proj(attended)


def _pooled_vit_layer(self: ViTLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attended = _projected_attention_at(self.attention, self.layernorm_before(hidden_states), pool_at, key_mask, self.training)
    pooled = self.dropout(attended) + _at(hidden_states, pool_at)
    return self.dropout(self.mlp(self.layernorm_after(pooled))) + pooled  # (B, D)


def _vit_forward(self: ViTModel, pixel_values: torch.Tensor, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None,
                 **kwargs):
    _refuse_extra_outputs(self, kwargs)
    pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    *layers, last = self.layers
    for layer in layers:
        hidden_states = layer(hidden_states, mask)
    cls = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    pooled = self.layernorm(last(hidden_states, mask, pool_at=cls, key_mask=None if attention_mask is None else attention_mask.bool()))[:, None]
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=self.pooler(pooled))


def _pooled_dinov2_layer(self: Dinov2Layer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attended = _projected_attention_at(self.attention, self.norm1(hidden_states), pool_at, key_mask, self.training)
    # Stochastic depth draws one number per sample, for (B, 1) here as for (B, 1, 1) in the model's own layer.
    pooled = self.drop_path(self.layer_scale1(attended)) + _at(hidden_states, pool_at)
    return self.drop_path(self.layer_scale2(self.mlp(self.norm2(pooled)))) + pooled  # (B, D)


def _dinov2_forward(self: Dinov2Model, pixel_values: torch.Tensor, bool_masked_pos=None, attention_mask=None, **kwargs):
    _refuse_extra_outputs(self, kwargs)
    hidden_states = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    *layers, last = self.encoder.layer
    for layer in layers:
        hidden_states = layer(hidden_states, mask)
    cls = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    pooled = self.layernorm(last(hidden_states, mask, pool_at=cls, key_mask=None if attention_mask is None else attention_mask.bool()))[:, None]
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=pooled[:, 0])  # DINOv2 pools the normed class token


def _pooled_bert_layer(self: BertLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attention = self.attention.self
    # BERT normalizes after each residual: the queries, keys and values read the layer's input itself.
    attended = _attend_at(hidden_states, pool_at, key_mask, attention.query, attention.key, attention.value, attention.num_attention_heads,
                          attention.dropout.p if self.training else 0.0, attention.scaling)
    pooled = self.attention.output(attended, _at(hidden_states, pool_at))  # LayerNorm(dense + residual)
    return self.output(self.intermediate(pooled), pooled)  # (B, D)


def _packed_bert_layer(self: BertLayer, packed: torch.Tensor, *, index: torch.Tensor, keep: torch.Tensor, mask) -> torch.Tensor:
    """A BERT-family encoder layer on the unpadded positions of a batch packed as (N, D) (`_bert_forward`), as
    `_packed_clip_layer` does for CLIP: projections, output and MLP on the N positions alone."""
    attention = self.attention.self
    attended = _attend_packed(attention, attention.query(packed), attention.key(packed), attention.value(packed), index, keep, mask,
                              attention.num_attention_heads, bert_eager_attention, dropout=attention.dropout.p if self.training else 0.0,
                              scaling=attention.scaling)
    attention_output = self.attention.output(attended, packed)  # LayerNorm(dense + residual)
    return self.output(self.intermediate(attention_output), attention_output)  # (N, D)


def _bert_forward(self: BertModel, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                  **kwargs):
    _refuse_extra_outputs(self, kwargs)
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(f"{type(self).__name__} runs its last layer at [CLS] only (utils.towers): as an encoder, without a cache")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    # Padding is masked as a key everywhere and [CLS] is what the pooler reads, so the padded positions' own states
    # reach nothing: the layers before the last run on the other positions alone, packed as (N, D).
    keep = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device) if attention_mask is None else attention_mask.bool()
    packed, index = _pack(hidden_states, keep)
    *layers, last = self.encoder.layer
    for layer in layers:
        packed = layer(packed, None, index=index, keep=keep, mask=mask)
    hidden_states = _unpack(packed, index, keep)
    cls = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    pooled = last(hidden_states, None, pool_at=cls, key_mask=None if attention_mask is None else keep)[:, None]
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=self.pooler(pooled))


def _pooled_mpnet_layer(self: MPNetLayer, hidden_states: torch.Tensor, *, pool_at: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    attention = self.attention.attn
    attended = _attend_at(hidden_states, pool_at, key_mask, attention.q, attention.k, attention.v, attention.num_attention_heads,
                          attention.dropout.p if self.training else 0.0, attention.attention_head_size**-0.5)
    pooled = self.attention.LayerNorm(self.attention.dropout(attention.o(attended)) + _at(hidden_states, pool_at))
    return self.output(self.intermediate(pooled), pooled)  # (B, D)


def _mpnet_forward(self: MPNetModel, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, output_attentions=None,
                   output_hidden_states=None, return_dict=None, **kwargs):
    _refuse_extra_outputs(self, {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states})
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    position_bias = self.encoder.compute_position_bias(hidden_states)  # (B, H, T, T), relative positions, added to the scores
    *layers, last = self.encoder.layer
    for layer in layers:
        hidden_states = layer(hidden_states, mask, position_bias)[0]
    cls = torch.zeros(len(hidden_states), dtype=torch.long, device=hidden_states.device)
    scores_bias = position_bias[:, :, 0, :]  # (B, H, T): the [CLS] query's row
    if attention_mask is not None:
        scores_bias = scores_bias.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
    pooled = last(hidden_states, mask, pool_at=cls, key_mask=scores_bias)[:, None]
    pooler_output = self.pooler(pooled)
    if return_dict is False:
        return pooled, pooler_output
    return BaseModelOutputWithPooling(last_hidden_state=pooled, pooler_output=pooler_output)


def _refuse_extra_outputs(tower, kwargs: dict) -> None:
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag):
            raise ValueError(
                f"{type(tower).__name__} runs its last layer at the pooled token only (utils.towers.pool_last_layers), "
                f"so {flag} is not available; call utils.towers.restore_towers(model) first."
            )
