"""Contrastive losses for dual encoders (CLIP, Radford et al. 2021, eq. in fig. 3; open_clip's ClipLoss).

Everything is computed in float32 whatever the autocast dtype: with fp16 logits of scale up to 100 the
softmax over a large batch loses the small terms that carry the gradient, and can overflow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def contrastive_loss(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (Q, K) against its matching column `row + offset`.

    `offset` places a process's local rows among the gathered columns (rank * local batch).
    """
    targets = torch.arange(logits.shape[0], device=logits.device) + offset
    return F.cross_entropy(logits.float(), targets)


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies.

    image_embeds, text_embeds: (B, D), L2-normalized, row i of one matching row i of the other.
    logit_scale: the multiplier itself (CLIP's `logit_scale.exp()`), not its log.

    With `gather_distributed` and more than one process, every process's features are gathered with their
    gradient kept, and this process's B rows are scored against all world_size * B columns (open_clip's
    local-loss form): the averaged gradient then equals that of one process with the whole global batch.
    """
    image_embeds = image_embeds.float()
    text_embeds = text_embeds.float()
    offset = 0
    all_image, all_text = image_embeds, text_embeds
    if gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_image, all_text = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        offset = dist.get_rank() * image_embeds.shape[0]
    logits_per_image = logit_scale * image_embeds @ all_text.T  # (B, W*B)
    logits_per_text = logit_scale * text_embeds @ all_image.T  # (B, W*B)
    return (contrastive_loss(logits_per_image, offset) + contrastive_loss(logits_per_text, offset)) / 2


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All-gather (B, D) from every process into (world_size * B, D), rank order, gradient flowing back to
    each process's own rows. Every process must pass the same B."""
    return _GatherWithGrad.apply(features)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0. Backward: each process's loss reads every process's rows, so the gradient of a
    process's own rows is the sum, over processes, of their gradients of the gathered tensor: all-reduced, then
    this process's slice. (torch.distributed.nn.functional.all_gather does the same and is deprecated.)"""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        gathered = features.new_empty((dist.get_world_size() * features.shape[0], *features.shape[1:]))
        dist.all_gather_into_tensor(gathered, features.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]
