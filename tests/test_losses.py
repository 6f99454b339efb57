"""clip_loss against a naive per-row loop and a float64 computation: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.losses import clip_loss, contrastive_loss


def naive_clip_loss(image, text, scale):
    """Row by row: -log softmax of the matching pair, image->text and text->image, averaged."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        logits_i2t = torch.stack([scale * (image[i] * text[j]).sum() for j in range(n)])
        logits_t2i = torch.stack([scale * (text[i] * image[j]).sum() for j in range(n)])
        total = total - torch.log_softmax(logits_i2t, 0)[i] - torch.log_softmax(logits_t2i, 0)[i]
    return total / (2 * n)


def embeddings(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    return image.requires_grad_(), text.requires_grad_()


@pytest.mark.parametrize("n,d,scale", [(1, 4, 1.0), (5, 8, 14.3), (16, 32, 100.0)])
def test_matches_naive_loop_values_and_gradients(n, d, scale):
    image, text = embeddings(n, d, seed=n)
    loss = clip_loss(image, text, torch.tensor(scale))
    loss.backward()
    grads = image.grad.clone(), text.grad.clone()
    image.grad = text.grad = None
    reference = naive_clip_loss(image, text, scale)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads[0], image.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], text.grad, rtol=1e-4, atol=1e-6)


def test_float32_even_for_half_inputs_and_close_to_float64():
    image64, text64 = embeddings(64, 16, seed=7, dtype=torch.float64)
    reference = naive_clip_loss(image64.detach(), text64.detach(), 100.0)
    for dtype in (torch.float16, torch.bfloat16):
        loss = clip_loss(image64.detach().to(dtype), text64.detach().to(dtype), torch.tensor(100.0))
        assert loss.dtype == torch.float32
        # Only the rounding of the inputs to half precision remains; the loss itself is not computed in half.
        assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    loss32 = clip_loss(image64.detach().float(), text64.detach().float(), torch.tensor(100.0))
    assert loss32.item() == pytest.approx(reference.item(), rel=1e-5)


def test_uniform_logits_give_log_batch_size():
    for n in (2, 7, 64):
        same = F.normalize(torch.ones(n, 8), dim=-1)
        assert clip_loss(same, same, torch.tensor(10.0)).item() == pytest.approx(math.log(n), rel=1e-6)
        assert contrastive_loss(torch.zeros(n, n)).item() == pytest.approx(math.log(n), rel=1e-6)


def test_logit_scale_gets_a_gradient():
    image, text = embeddings(8, 16, seed=3)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    clip_loss(image, text, log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


def test_offset_selects_the_matching_global_column():
    logits = torch.randn(3, 9)
    expected = F.cross_entropy(logits, torch.tensor([3, 4, 5]))
    assert contrastive_loss(logits, offset=3).item() == pytest.approx(expected.item())
