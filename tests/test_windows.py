"""me_runtime.windows: the windows of the rolling scorer (pure Python, no models)."""
from __future__ import annotations

import pytest

from me_runtime.windows import Window, rolling_pairs, rolling_windows


def _check_tiling(n, max_length, min_context):
    windows = rolling_windows(n, max_length, min_context=min_context)
    scored = []
    for w in windows:
        assert isinstance(w, Window)
        assert 0 <= w.start < w.score_start < w.end <= n + 1
        assert w.end - w.start <= max_length
        scored.extend(range(w.score_start, w.end))
    # every token 1..n scored exactly once, in order
    assert scored == list(range(1, n + 1))
    return windows


@pytest.mark.parametrize(
    "max_length, min_context",
    [(m, c) for m in (2, 3, 5, 8, 64) for c in (1, 2, 4, 32, 63) if c < m],
)
def test_windows_tile_every_token_once_within_max_length(max_length, min_context):
    chunk = max_length - min_context
    # lengths around every boundary: one window, exactly full, one more token, whole chunks
    lengths = {1, 2, max_length - 2, max_length - 1, max_length, max_length + 1}
    lengths |= {max_length - 1 + k * chunk + d for k in (1, 2, 3) for d in (-1, 0, 1)}
    for n in sorted(x for x in lengths if x >= 1):
        windows = _check_tiling(n, max_length, min_context)
        first = windows[0]
        assert (first.start, first.score_start) == (0, 1)
        assert first.end == min(max_length, n + 1)  # the first window scores as much as fits
        for w in windows[1:]:
            # as much context as fits: the window is full, and the chunk's first token sees
            # at least min_context tokens
            assert w.end - w.start == max_length
            assert w.score_start - w.start >= min_context
            assert w.end - w.score_start <= chunk
        for w in windows[1:-1]:
            assert w.end - w.score_start == chunk  # the fewest windows: every middle chunk full


def test_windows_fit_in_one_when_the_sequence_fits():
    assert rolling_windows(9, 10) == [Window(0, 1, 10)]
    assert rolling_windows(10, 10) == [Window(0, 1, 10), Window(1, 10, 11)]
    # disjoint windows (min_context 1): each later window scores max_length - 1 tokens
    assert rolling_windows(20, 6) == [Window(0, 1, 6), Window(5, 6, 11), Window(10, 11, 16), Window(15, 16, 21)]
    # half-overlapping windows; the last short chunk gets the longer context
    assert rolling_windows(11, 6, min_context=3) == [Window(0, 1, 6), Window(3, 6, 9), Window(6, 9, 12)]
    assert rolling_windows(10, 6, min_context=3) == [Window(0, 1, 6), Window(3, 6, 9), Window(5, 9, 11)]


def test_rolling_pairs_rebuild_the_sequence():
    tokens = [10, 11, 12, 13, 14, 15, 16]
    pairs = rolling_pairs(tokens, 99, 4)
    # disjoint chunks of 3 scored tokens; the last, short chunk keeps 3 tokens of context
    assert pairs == [([99], [10, 11, 12]), ([12], [13, 14, 15]), ([13, 14, 15], [16])]
    full = [99] + tokens
    for max_length, min_context in ((2, 1), (3, 1), (4, 2), (5, 4), (8, 1), (8, 7), (9, 3)):
        rebuilt = []
        for context, cont in rolling_pairs(tokens, 99, max_length, min_context=min_context):
            assert context and cont and len(context) + len(cont) <= max_length
            start = len(rebuilt) + 1
            assert full[start - len(context) : start] == context  # the tokens right before
            rebuilt += cont
        assert rebuilt == tokens


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_tokens"):
        rolling_windows(0, 8)
    with pytest.raises(ValueError, match="max_length"):
        rolling_windows(5, 1)
    with pytest.raises(ValueError, match="min_context"):
        rolling_windows(5, 8, min_context=0)
    with pytest.raises(ValueError, match="min_context must be < max_length"):
        rolling_windows(5, 8, min_context=8)
    with pytest.raises(TypeError, match="max_length"):
        rolling_windows(5, 8.0)
    with pytest.raises(TypeError, match="max_length"):
        rolling_windows(5, True)
    with pytest.raises(ValueError, match="num_tokens"):
        rolling_pairs([], 1, 8)
