"""Retrieval recall and ranks against a brute-force reference: several captions per image, ties."""

import pytest
import torch

from utils.retrieval import retrieval_metrics, retrieval_ranks


def brute_force_ranks(image, text, text_to_image):
    """Sort every query's candidates by (score descending, index ascending) and read off positions."""
    sims = (image.double() @ text.double().T).tolist()
    i2t, t2i = [], []
    for i, row in enumerate(sims):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        i2t.append(min(order.index(j) for j in range(len(row)) if text_to_image[j] == i) + 1)
    for j in range(len(text)):
        column = [sims[i][j] for i in range(len(image))]
        order = sorted(range(len(column)), key=lambda i: (-column[i], i))
        t2i.append(order.index(int(text_to_image[j])) + 1)
    return torch.tensor(i2t), torch.tensor(t2i)


def quantized_case(num_images, seed, levels=3):
    """Embeddings with few distinct values, so equal scores are frequent."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 6, (num_images,), generator=g)
    text_to_image = torch.repeat_interleave(torch.arange(num_images), counts)
    image = torch.randint(0, levels, (num_images, 4), generator=g).float()
    text = torch.randint(0, levels, (len(text_to_image), 4), generator=g).float()
    return image, text, text_to_image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_ranks_match_brute_force_with_ties_and_several_captions(seed, chunk_size):
    image, text, text_to_image = quantized_case(num_images=9, seed=seed)
    i2t, t2i = retrieval_ranks(image, text, text_to_image, chunk_size=chunk_size)
    ref_i2t, ref_t2i = brute_force_ranks(image, text, text_to_image)
    assert torch.equal(i2t, ref_i2t)
    assert torch.equal(t2i, ref_t2i)


def test_recall_values_from_ranks():
    image, text, text_to_image = quantized_case(num_images=30, seed=11, levels=4)
    metrics = retrieval_metrics(image, text, text_to_image, ks=(1, 5, 10), chunk_size=7)
    ref_i2t, ref_t2i = brute_force_ranks(image, text, text_to_image)
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx((ref_i2t <= k).double().mean().item())
        assert metrics[f"t2i_r{k}"] == pytest.approx((ref_t2i <= k).double().mean().item())
    assert metrics["i2t_mean_rank"] == pytest.approx(ref_i2t.double().mean().item())
    assert metrics["t2i_mean_rank"] == pytest.approx(ref_t2i.double().mean().item())


def test_all_equal_scores_rank_by_index():
    """With every score equal, the tie rule alone decides: caption j ranks j+1."""
    image = torch.ones(3, 2)
    text = torch.ones(6, 2)
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    i2t, t2i = retrieval_ranks(image, text, text_to_image)
    assert i2t.tolist() == [1, 3, 5]
    assert t2i.tolist() == [1, 1, 2, 2, 3, 3]


def test_hit_when_any_caption_is_in_top_k():
    image = torch.eye(3)
    # Image 0's first caption is far off, its second one matches exactly.
    text = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metrics = retrieval_metrics(image, text, torch.tensor([0, 0, 1, 2]))
    assert metrics["i2t_r1"] == 1.0
    assert metrics["t2i_r1"] == pytest.approx(3 / 4)


def test_perfect_and_reversed_retrieval():
    n = 12
    image = torch.eye(n)
    perfect = retrieval_metrics(image, image.clone(), torch.arange(n))
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 1.0 and perfect["t2i_mean_rank"] == 1.0


def test_rejects_images_without_captions_and_bad_indices():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 5]))


def test_rejects_embeddings_that_are_not_finite():
    text = torch.eye(3)
    text[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"1 text embeddings are not finite \(the first: row 2\)"):
        retrieval_metrics(torch.eye(3), text, torch.arange(3))


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_ranks_match_brute_force_with_captions_in_any_order(chunk_size):
    """Captions listed out of image order (as a shuffled file holds them), several per image, with ties."""
    image, text, text_to_image = quantized_case(num_images=12, seed=7)
    order = torch.randperm(len(text), generator=torch.Generator().manual_seed(0))
    text, text_to_image = text[order], text_to_image[order]
    i2t, t2i = retrieval_ranks(image, text, text_to_image, chunk_size=chunk_size)
    ref_i2t, ref_t2i = brute_force_ranks(image, text, text_to_image)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)


def test_chance_recall_matches_random_scores():
    from utils.retrieval import chance_recall

    counts = torch.tensor([5, 5, 4, 6, 5, 5, 3, 5, 5, 5])
    text_to_image = torch.repeat_interleave(torch.arange(10), counts)
    g = torch.Generator().manual_seed(0)
    totals = {}
    trials = 400
    for _ in range(trials):
        metrics = retrieval_metrics(torch.randn(10, 8, generator=g), torch.randn(len(text_to_image), 8, generator=g), text_to_image)
        for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
            totals[key] = totals.get(key, 0.0) + metrics[key] / trials
    chance = chance_recall(counts, ks=(1, 5))
    for key, value in totals.items():
        assert value == pytest.approx(chance[key], abs=0.03), key
    assert chance["t2i_r5"] == 0.5
