"""utils.towers: the encoders whose last layer runs at the pooled token give the model's own outputs and
gradients, in float64: CLIP for both of CLIPTextModel's pooling rules, with padded captions and a second eos
token; a dual encoder's CLIP-vision, ViT, DeiT, DINOv2 (with and without registers) vision towers and BERT (the
real MiniLM), RoBERTa, XLM-RoBERTa, CamemBERT and MPNet text towers; ViLT with padded questions and padded images."""

import copy

import pytest
import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    CamembertConfig,
    CamembertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    MPNetConfig,
    MPNetModel,
    RobertaConfig,
    RobertaModel,
    ViltConfig,
    ViltForQuestionAnswering,
    VisionTextDualEncoderModel,
    ViTConfig,
    ViTModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from tests.helpers import count_activation_checkpoints, minilm_path

from utils.towers import eos_positions, pool_last_layers, restore_towers

EOS = 7


def tiny_clip(eos_token_id: int = EOS, attn_implementation: str = "sdpa") -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": 1, "pad_token_id": 0,
                     "eos_token_id": eos_token_id},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 3, "num_attention_heads": 4},
        projection_dim=16,
    )
    config._attn_implementation = attn_implementation
    return CLIPModel(config).double()


def captions(eos_token_id: int) -> dict:
    """Five captions of lengths 3-9 padded to 10 with id 0; eos ends each; the third holds a second eos earlier."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.zeros(5, 10, dtype=torch.long)
    attention_mask = torch.zeros(5, 10, dtype=torch.long)
    for row, length in enumerate((3, 9, 7, 5, 10)):
        input_ids[row, : length - 1] = torch.randint(8, 40, (length - 1,), generator=generator)
        input_ids[row, length - 1] = eos_token_id
        attention_mask[row, :length] = 1
    input_ids[2, 3] = eos_token_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def embeddings_and_gradients(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    outputs = model(**batch)
    # Any scalar of both embeddings reaches every parameter; a fixed projection keeps the gradients informative.
    weights = torch.linspace(-1, 1, outputs.image_embeds.numel(), dtype=torch.float64)
    loss = (outputs.image_embeds.flatten() * weights).sum() + (outputs.text_embeds ** 3).sum()
    loss.backward()
    return outputs.image_embeds.detach(), outputs.text_embeds.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("eos_token_id", [EOS, 2], ids=["first_eos", "highest_id"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_pooled_last_layer_gives_the_models_embeddings_and_gradients(eos_token_id, attn_implementation, checkpointing):
    reference = tiny_clip(eos_token_id, attn_implementation)
    pooled = copy.deepcopy(reference)
    assert pool_last_layers(pooled) == ["vision_model", "text_model"]
    batch = {**captions(eos_token_id), "pixel_values": torch.randn(5, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))}
    if eos_token_id == 2:
        batch["input_ids"][batch["input_ids"] == 2] = 45  # the highest id ends each caption under the old rule
    for model in (reference, pooled):
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()

    image, text, gradients = embeddings_and_gradients(reference, batch)
    image_pooled, text_pooled, gradients_pooled = embeddings_and_gradients(pooled, batch)

    # transformers' eager attention takes its softmax in float32 whatever the dtype: float32's precision there.
    rtol, atol = (1e-9, 1e-12) if attn_implementation == "sdpa" else (1e-5, 1e-7)
    torch.testing.assert_close(image_pooled, image, rtol=rtol, atol=atol)
    torch.testing.assert_close(text_pooled, text, rtol=rtol, atol=atol)
    assert gradients.keys() == gradients_pooled.keys()
    for name, gradient in gradients.items():
        # A key bias's true gradient is 0 (softmax ignores a shift shared by all keys): both are rounding noise.
        torch.testing.assert_close(gradients_pooled[name], gradient, rtol=rtol, atol=atol, msg=name)
    assert gradients["logit_scale"] is None  # the only parameter the loss above leaves out
    # last_hidden_state keeps the pooled position alone, as the model's own has it there.
    with torch.no_grad():
        own, mine = reference(**batch), pooled(**batch)
    eos = eos_positions(reference.text_model, batch["input_ids"])
    torch.testing.assert_close(mine.vision_model_output.last_hidden_state[:, 0], own.vision_model_output.last_hidden_state[:, 0], rtol=rtol, atol=atol)
    torch.testing.assert_close(mine.text_model_output.last_hidden_state[:, 0], own.text_model_output.last_hidden_state[torch.arange(5), eos],
                               rtol=rtol, atol=atol)
    assert mine.text_model_output.last_hidden_state.shape == (5, 1, 32)
    assert max(g.abs().max().item() for g in gradients.values() if g is not None) > 1e-3


def test_text_pooling_position_is_the_models():
    model = tiny_clip()
    batch = captions(EOS)
    # The third caption has an eos at 3 before its last one at 6: CLIP pools at the first.
    assert eos_positions(model.text_model, batch["input_ids"]).tolist() == [2, 8, 3, 4, 9]


SMALL_VISION = {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
# DINOv2: layer scale away from 1 and stochastic depth on, so that both are exercised in training mode.
DINOV2 = {**SMALL_VISION, "mlp_ratio": 2, "layerscale_value": 0.5, "drop_path_rate": 0.3}
VISION_TOWERS = {
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**SMALL_VISION, intermediate_size=64)),
    "vit": lambda: ViTModel(ViTConfig(**SMALL_VISION, intermediate_size=64)),
    "deit": lambda: DeiTModel(DeiTConfig(**SMALL_VISION, intermediate_size=64)),
    "dinov2": lambda: Dinov2Model(Dinov2Config(**DINOV2)),
    "dinov2_registers_swiglu": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINOV2, num_register_tokens=2, use_swiglu_ffn=True)),
}
# Tiny RoBERTa-family text towers, without dropout so that they can be compared in training mode. Their padding id
# is 1, and RoBERTa numbers positions from the padding: the captions are padded with it.
SMALL_TEXT = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "max_position_embeddings": 20, "pad_token_id": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TEXT_TOWERS = {
    "roberta": lambda: RobertaModel(RobertaConfig(**SMALL_TEXT)),
    "xlm_roberta": lambda: XLMRobertaModel(XLMRobertaConfig(**SMALL_TEXT)),
    "camembert": lambda: CamembertModel(CamembertConfig(**SMALL_TEXT)),
    "mpnet": lambda: MPNetModel(MPNetConfig(**SMALL_TEXT)),  # relative position bias in every layer's scores
    "minilm": lambda: AutoModel.from_pretrained(minilm_path()),  # the real all-MiniLM-L6-v2 (BERT, 6 layers)
}


def dual_encoder(vision: str, text: str = "minilm") -> VisionTextDualEncoderModel:
    """A dual encoder of the named towers, in float64."""
    torch.manual_seed(0)
    return VisionTextDualEncoderModel(vision_model=VISION_TOWERS[vision](), text_model=TEXT_TOWERS[text]()).double()


def padded_captions(text: str) -> dict:
    if text == "minilm":
        return dict(AutoTokenizer.from_pretrained(minilm_path())(["a dog", "two red boxes on a table by the sea", "a cat"], padding=True, return_tensors="pt"))
    input_ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, 4:] = attention_mask[2, 6:] = 0
    input_ids[attention_mask == 0] = SMALL_TEXT["pad_token_id"]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize(("vision", "text", "checkpointing"), [
    ("clip", "minilm", False), ("vit", "minilm", False), ("deit", "roberta", False), ("dinov2", "xlm_roberta", False),
    ("dinov2_registers_swiglu", "camembert", False), ("vit", "mpnet", False), ("dinov2", "roberta", True),
])
def test_pooled_dual_encoder_gives_the_models_embeddings_and_gradients(vision, text, checkpointing, monkeypatch):
    """A dual encoder's vision tower and its BERT-family text tower (padded captions) pool their first token:
    embeddings and gradients as the model's own forward gives. MiniLM is compared in eval mode (BERT's hidden
    dropout would draw different masks for one position than for all); the tiny towers have no dropout and are
    compared in training mode, where DINOv2's stochastic depth draws the same per-sample numbers both ways (and
    again in the recomputation under activation checkpointing, which replays the random state)."""
    checkpoints = count_activation_checkpoints(monkeypatch)
    reference = dual_encoder(vision, text).train(text != "minilm")
    if checkpointing:
        for tower in (reference.vision_model, reference.text_model):  # as run_clip enables it for a dual encoder
            tower.activation_checkpointing_enable()
    pooled = copy.deepcopy(reference)
    assert pool_last_layers(pooled) == ["vision_model", "text_model"]
    batch = {**padded_captions(text), "pixel_values": torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))}
    assert (batch["attention_mask"] == 0).any()
    torch.manual_seed(3)
    image, text_embeds, gradients = embeddings_and_gradients(reference, batch)
    torch.manual_seed(3)
    image_pooled, text_pooled, gradients_pooled = embeddings_and_gradients(pooled, batch)
    assert len(checkpoints) == (8 if checkpointing else 0)  # each tower's 2 layers, in either forward
    torch.testing.assert_close(image_pooled, image, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(text_pooled, text_embeds, rtol=1e-9, atol=1e-12)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_pooled[name], gradient, rtol=1e-9, atol=1e-12, msg=name)
    assert max(g.abs().max().item() for g in gradients.values() if g is not None) > 1e-3
    if vision.startswith("dinov2"):  # stochastic depth dropped a branch of some sample: the test reaches it
        torch.manual_seed(3)
        assert not torch.allclose(reference.vision_model.train()(batch["pixel_values"]).pooler_output,
                                  reference.vision_model.eval()(batch["pixel_values"]).pooler_output)


def test_towers_refuse_per_position_outputs_until_restored():
    dual = dual_encoder("vit").eval()
    pixel_values = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pool_last_layers(dual)
    with pytest.raises(ValueError, match="output_hidden_states.*restore_towers"):
        dual.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    restore_towers(dual)
    outputs = dual.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (2, 17, 32) and len(outputs.hidden_states) == 3


def tiny_vilt() -> ViltForQuestionAnswering:
    torch.manual_seed(0)
    config = ViltConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=16, image_size=32, patch_size=8, num_images=1, num_labels=5,
                        id2label={i: str(i) for i in range(5)}, label2id={str(i): i for i in range(5)})
    return ViltForQuestionAnswering(config).double()


def vilt_logits_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # ViLT draws the order of each image's patches at random
    logits = model(**batch).logits
    (logits * torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_pooled_vilt_gives_the_models_answers_and_gradients(checkpointing):
    """ViLT's VQA head reads the [CLS] position through the pooler: padded questions and images of two sizes (the
    smaller padded, its padding masked by pixel_mask), logits and every gradient as the model's own forward gives."""
    reference = tiny_vilt()
    pooled = copy.deepcopy(reference)
    assert pool_last_layers(pooled) == ["vilt"]
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, 50, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[0, 4:] = 0
    input_ids[0, 4:] = 0
    pixel_mask = torch.ones(3, 32, 48, dtype=torch.long)
    pixel_mask[1, :, 32:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_mask": pixel_mask,
             "pixel_values": torch.randn(3, 3, 32, 48, dtype=torch.float64, generator=generator)}
    for model in (reference, pooled):
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
    logits, gradients = vilt_logits_and_gradients(reference, batch)
    logits_pooled, gradients_pooled = vilt_logits_and_gradients(pooled, batch)
    torch.testing.assert_close(logits_pooled, logits, rtol=1e-9, atol=1e-12)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_pooled[name], gradient, rtol=1e-9, atol=1e-12, msg=name)
    assert max(g.abs().max().item() for g in gradients.values() if g is not None) > 1e-3
    with pytest.raises(ValueError, match="output_attentions"):
        pooled(**batch, output_attentions=True)
    restore_towers(pooled)
    assert pooled(**batch, output_hidden_states=True).hidden_states is not None
