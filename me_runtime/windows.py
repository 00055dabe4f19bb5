"""Windows for scoring sequences longer than a model's context (pure Python, no torch).

A sequence x_1 .. x_n is scored after a prefix token x_0 (usually BOS): every token x_i with
i >= 1 is scored exactly once, by a forward over a window x_a .. x_b (b - a + 1 <= max_length
tokens fed to the model) that contains x_i and at least one token before it. The first window
starts at the prefix and scores as many tokens as fit. Each later window scores the next chunk
of at most ``max_length - min_context`` tokens and fills the rest of the window with the tokens
just before the chunk, so a chunk's first token sees at least ``min_context`` tokens and the
last, shorter chunk sees more. ``min_context=1`` gives disjoint windows with the fewest
forwards (the scheme of lm-evaluation-harness' loglikelihood_rolling); a larger value trades
more forwards for more context per token (max_length // 2 is the classic half-overlapping
sliding window).

Indices below count positions in ``[prefix] + tokens`` (the prefix at 0, x_i at i).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Window(NamedTuple):
    """One forward: positions [start, end) are fed; positions [score_start, end) are scored
    (start < score_start < end, end - start <= max_length)."""

    start: int
    score_start: int
    end: int


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def rolling_windows(num_tokens: int, max_length: int, *, min_context: int = 1) -> list[Window]:
    """Windows that score tokens 1 .. num_tokens of ``[prefix] + tokens`` exactly once each.

    Args:
        num_tokens: n >= 1, the length of the sequence without its prefix.
        max_length: most tokens one forward may see (>= 2: one token of context, one scored).
        min_context: least number of tokens before the first scored token of every window
            after the first, in [1, max_length - 1].
    Returns:
        Windows in order; their scored ranges tile [1, n + 1).
    """
    _check_int("num_tokens", num_tokens, 1)
    _check_int("max_length", max_length, 2)
    _check_int("min_context", min_context, 1)
    if min_context >= max_length:
        raise ValueError(f"min_context must be < max_length ({max_length}), got {min_context}")
    total = num_tokens + 1  # the prefix is position 0
    chunk = max_length - min_context
    first_end = min(max_length, total)
    windows = [Window(0, 1, first_end)]
    scored = first_end
    while scored < total:
        end = min(scored + chunk, total)
        windows.append(Window(max(0, end - max_length), scored, end))
        scored = end
    return windows


def rolling_pairs(
    tokens: Sequence[int], prefix_token_id: int, max_length: int, *, min_context: int = 1
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists, one per window of rolling_windows(): scoring each
    continuation after its context and summing gives the log-likelihood of ``tokens`` after
    ``prefix_token_id``. Every len(context) + len(continuation) <= max_length."""
    full = [prefix_token_id, *tokens]
    return [
        (full[w.start : w.score_start], full[w.score_start : w.end])
        for w in rolling_windows(len(tokens), max_length, min_context=min_context)
    ]


def default_max_length(models) -> int:
    """The smallest max_position_embeddings among the members' (text) configs: the longest
    window every member can take."""
    lengths = []
    for model in models:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        length = getattr(config, "max_position_embeddings", None)
        if isinstance(length, int) and not isinstance(length, bool) and length > 0:
            lengths.append(length)
    if not lengths:
        raise ValueError("no member config gives max_position_embeddings; pass max_length")
    return min(lengths)


def default_prefix_token_id(models, tokenizer=None) -> int:
    """The token a whole sequence is scored after: the tokenizer's BOS token, else the one BOS
    token the members' generation configs (else configs) agree on."""
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    found = set()
    for model in models:
        bos = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
        if bos is None:
            bos = getattr(model.config, "bos_token_id", None)
        if isinstance(bos, int) and not isinstance(bos, bool):
            found.add(bos)
    if len(found) != 1:
        reason = "none is known" if not found else f"the members disagree: {sorted(found)}"
        raise ValueError(f"no single BOS token to score the first token after ({reason}); pass prefix_token_id")
    return found.pop()


__all__ = ["Window", "rolling_windows", "rolling_pairs", "default_max_length", "default_prefix_token_id"]
