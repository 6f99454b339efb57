"""Image-text retrieval metrics: recall@k both ways and mean rank, computed in chunks.

Conventions (those of the COCO/Flickr30k retrieval protocol, Karpathy & Fei-Fei 2015; open_clip's
`get_clip_metrics` uses the same ranks with one caption per image):

* image -> text: one query per image over all M captions; the query's rank is the best rank of any of its own
  captions (an image with five captions is a hit at k when any of them is in the top k).
* text -> image: one query per caption over all N images; its rank is that of the image it belongs to.
* ranks are 1-based; equal scores are ordered by index, lower index first, so a tie never favours the target
  by accident and the result does not depend on the sort algorithm.

Memory stays O(chunk_size * max(N, M)): the (N, M) similarity matrix is never built.
"""

from __future__ import annotations

import torch

DEFAULT_KS = (1, 5, 10)


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of column `target[q]` in row q of `scores` (Q, K), ties broken by column index: 1 + the columns
    that score higher + the lower-indexed columns that score the same. Two passes over `scores`; the rows where
    another column ties with the target (rare with real embeddings) get a third, on their own."""
    target_score = scores.gather(1, target[:, None])  # (Q, 1)
    # int32 counts: summing a bool row into int64 (the default) took twice as long here
    ranks = (scores > target_score).sum(dim=1, dtype=torch.int32).long() + 1
    tied = ((scores == target_score).sum(dim=1, dtype=torch.int32) > 1).nonzero()[:, 0]  # the target always equals itself
    if len(tied):
        columns = torch.arange(scores.shape[1], device=scores.device)
        equal_before = (scores[tied] == target_score[tied]) & (columns[None, :] < target[tied, None])
        ranks[tied] += equal_before.sum(dim=1)
    return ranks


def _captions_of(text_to_image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(N, most captions of one image): each image's caption indices in increasing order, padded with -1; `counts`
    (N,): each image's number of captions."""
    num_images = len(counts)
    order = torch.argsort(text_to_image, stable=True)  # grouped by image, each group in caption order
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=order.device) - starts[text_to_image[order]]
    captions = torch.full((num_images, int(counts.max()) if num_images else 0), -1, dtype=torch.long, device=order.device)
    captions[text_to_image[order], slot] = order
    return captions


def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks for every query: (image->text ranks (N,), text->image ranks (M,)).

    image_embeds: (N, D); text_embeds: (M, D); text_to_image: (M,) index of the image each caption describes.
    Scores are dot products: pass L2-normalized embeddings for cosine similarity.
    """
    image_embeds = image_embeds.float()
    text_embeds = text_embeds.float()
    text_to_image = text_to_image.long().to(image_embeds.device)
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError("text_to_image holds an index outside [0, number of images)")
    counts = torch.bincount(text_to_image, minlength=num_images)
    if num_images and counts.min() == 0:
        raise ValueError("every image needs at least one caption for image->text retrieval")
    for name, embeds in (("image", image_embeds), ("text", text_embeds)):
        bad = (~torch.isfinite(embeds).all(dim=1)).nonzero()
        if len(bad):  # NaN scores would rank by no rule
            raise ValueError(f"{len(bad)} {name} embeddings are not finite (the first: row {int(bad[0])}): the model's outputs overflowed "
                             "or diverged; ranks would be meaningless")

    captions_of = _captions_of(text_to_image, counts)  # (N, C)
    i2t = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk_size):
        scores = image_embeds[start : start + chunk_size] @ text_embeds.T  # (c, M)
        own = captions_of[start : start + len(scores)]  # (c, C)
        # The best-ranked own caption is the highest-scoring one, the lowest index among equals; its score is read
        # from `scores` itself, so that it compares with the other columns exactly.
        own_scores = scores.gather(1, own.clamp(min=0)).masked_fill(own < 0, float("-inf"))
        best = own_scores == own_scores.amax(dim=1, keepdim=True)
        best_caption = torch.where(best & (own >= 0), own, num_texts).amin(dim=1)
        i2t[start : start + len(scores)] = _rank_of(scores, best_caption).cpu()

    t2i = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk_size):
        scores = text_embeds[start : start + chunk_size] @ image_embeds.T  # (c, N)
        t2i[start : start + len(scores)] = _rank_of(scores, text_to_image[start : start + len(scores)]).cpu()
    return i2t, t2i


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`i2t_r{k}`, `t2i_r{k}` (fractions in [0, 1]), `i2t_mean_rank`, `t2i_mean_rank`,
    `i2t_median_rank`, `t2i_median_rank`; see the module docstring for the conventions."""
    i2t, t2i = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size)
    metrics = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{name}_r{k}"] = (ranks <= k).float().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.float().mean().item()
        metrics[f"{name}_median_rank"] = ranks.float().median().item()
    return metrics


def chance_recall(caption_counts: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Expected recall@k of random scores, to read the real figures against: text->image k/N; image->text
    the chance that k captions drawn at random from M include one of the image's own c_i, averaged."""
    counts = caption_counts.long().tolist()
    num_images, num_texts = len(counts), sum(counts)
    chance = {}
    for k in ks:
        misses = []
        for c in counts:
            miss = 1.0
            for j in range(min(k, num_texts)):
                miss *= max(num_texts - c - j, 0) / (num_texts - j)
            misses.append(miss)
        chance[f"i2t_r{k}"] = 1.0 - sum(misses) / max(num_images, 1)
        chance[f"t2i_r{k}"] = min(k, num_images) / max(num_images, 1)
    return chance
