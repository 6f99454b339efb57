"""Text helpers: caption values from data files, and the longest sequence a text model can take."""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

# Tokenizers that know no limit report a huge sentinel (int(1e30)) as model_max_length.
_NO_LIMIT = 1_000_000


def resolve_max_length(requested: int | None, tokenizer, text_config=None) -> int:
    """The truncation length: min(requested, the text model's position limit, the tokenizer's limit).

    The position limit matters: CLIP has 77 positions, and a longer sequence fails at the first forward, after
    all preprocessing (the official example's default of 128 does exactly that). RoBERTa-style models
    reserve positions for the padding offset, which their tokenizer's `model_max_length` (512) accounts for.
    """
    limits = []
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < _NO_LIMIT:
        limits.append(int(tokenizer_limit))
    model_limit = min(limits) if limits else None
    if requested is None:
        if model_limit is None:
            raise ValueError("neither the text model nor the tokenizer states a length limit: pass --max_seq_length")
        return model_limit
    if model_limit is not None and requested > model_limit:
        logger.warning("max_seq_length=%d exceeds the text model's limit of %d positions; using %d", requested, model_limit, model_limit)
        return model_limit
    return requested


def parse_captions(value) -> list[str]:
    """One caption column value -> a list of captions.

    Accepts a string, a list of strings (COCO has five per image), or a JSON-encoded list of strings (how a
    csv file stores a list). Any other value raises ValueError; the caller adds file and row. Strings are kept
    as they are: "NA", "None" and "null" are captions, not missing values.
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                decoded = json.loads(stripped)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, list) and all(isinstance(c, str) for c in decoded):
                return _non_empty(decoded, value)
        return _non_empty([value], value)
    if isinstance(value, (list, tuple)):
        if not all(isinstance(c, str) for c in value):
            bad = next(c for c in value if not isinstance(c, str))
            raise ValueError(f"caption list holds a {type(bad).__name__} ({bad!r}); expected strings")
        return _non_empty(list(value), value)
    raise ValueError(f"caption value {value!r} is a {type(value).__name__}; expected a string or a list of strings")


def _non_empty(captions: list[str], original) -> list[str]:
    kept = [c for c in captions if c.strip()]
    if not kept:
        raise ValueError(f"caption value {original!r} holds no non-empty caption")
    return kept
