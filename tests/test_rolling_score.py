"""Ensemble.score_rolling_ids / score_rolling: the exact mixture log-likelihood of whole
sequences longer than one window, checked against plain Hugging Face forwards on tiny members."""
from __future__ import annotations

import math

import pytest

from me_runtime import Ensemble
from tiny_models import char_tokenizer, next_token_probs, tiny_member

V = 7
WEIGHTS = [0.7, 0.3]
PREFIX = 3


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def members():
    return [tiny_member("llama", V, seed=51, sharpness=3.0), tiny_member("qwen2", V, seed=52, sharpness=3.0)]


@pytest.fixture(scope="module")
def ensemble(members):
    return Ensemble(members, weights=WEIGHTS)


def _sequences(lengths, seed=0):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(V) for _ in range(n)] for n in lengths]


def brute_force(members, weights, seq, prefix, max_length, min_context=1):
    """sum_i log sum_m w_m p_m(x_i | context_i), one plain forward per token, with the context
    of each token derived here from the windowing rule (not from me_runtime.windows): the first
    window is [prefix] + the first max_length - 1 tokens; after it, chunks of
    max_length - min_context tokens, each scored in a full window of max_length tokens."""
    full = [prefix] + list(seq)
    chunk = max_length - min_context
    total = 0.0
    for p in range(1, len(full)):
        if p < max_length:
            start = 0
        else:
            chunk_start = max_length + (p - max_length) // chunk * chunk
            start = max(0, min(chunk_start + chunk, len(full)) - max_length)
        context = full[start:p]
        assert len(full[start : p + 1]) <= max_length
        total += math.log(sum(w * float(next_token_probs(m, context)[full[p]]) for w, m in zip(weights, members)))
    return total


def test_rolling_equals_score_ids_when_the_sequence_fits(ensemble):
    seqs = _sequences([1, 2, 9, 15])
    got = ensemble.score_rolling_ids(seqs, max_length=16, prefix_token_id=PREFIX)
    expected = ensemble.score_ids([[PREFIX]] * len(seqs), seqs)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # the default window (the members' 512 positions) holds these sequences whole too
    assert ensemble.score_rolling_ids(seqs, prefix_token_id=PREFIX) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for seq, value in zip(seqs, got):
        assert value == pytest.approx(brute_force(ensemble.models, WEIGHTS, seq, PREFIX, 16), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("max_length, min_context", [(2, 1), (5, 1), (6, 3), (6, 5)])
def test_short_windows_match_plain_forwards(ensemble, max_length, min_context):
    # lengths around the window boundaries, batched together (ragged windows, left padding)
    lengths = [1, max_length - 1, max_length, max_length + 1, 3 * max_length + 2]
    seqs = _sequences(lengths, seed=max_length * 10 + min_context)
    got = ensemble.score_rolling_ids(seqs, max_length=max_length, prefix_token_id=PREFIX, min_context=min_context)
    assert len(got) == len(seqs)
    for seq, value in zip(seqs, got):
        expected = brute_force(ensemble.models, WEIGHTS, seq, PREFIX, max_length, min_context)
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4), (len(seq), max_length, min_context)
    # one sequence alone gives the same value as in the batch
    alone = ensemble.score_rolling_ids([seqs[-1]], max_length=max_length, prefix_token_id=PREFIX, min_context=min_context)
    assert alone[0] == pytest.approx(got[-1], rel=1e-5, abs=1e-5)


def test_windowing_changes_the_score_of_a_long_sequence(ensemble):
    # A check that the windows are really applied: less context gives a different value.
    seq = _sequences([30], seed=7)[0]
    whole = ensemble.score_rolling_ids([seq], prefix_token_id=PREFIX)[0]
    windowed = ensemble.score_rolling_ids([seq], max_length=2, prefix_token_id=PREFIX)[0]
    assert abs(whole - windowed) > 1e-2  # float32 rounding differences are below 1e-4 here


def test_default_max_length_is_the_smallest_member_context(members):
    seq = _sequences([40], seed=3)[0]
    saved = members[1].config.max_position_embeddings
    try:
        members[1].config.max_position_embeddings = 9
        got = Ensemble(members, weights=WEIGHTS).score_rolling_ids([seq], prefix_token_id=PREFIX)[0]
    finally:
        members[1].config.max_position_embeddings = saved
    ens = Ensemble(members, weights=WEIGHTS)
    assert got == pytest.approx(ens.score_rolling_ids([seq], max_length=9, prefix_token_id=PREFIX)[0], rel=1e-6)
    assert got == pytest.approx(brute_force(members, WEIGHTS, seq, PREFIX, 9), rel=1e-4, abs=1e-4)


def test_default_prefix_is_the_bos_token(members):
    seqs = _sequences([4, 11], seed=5)
    # no tokenizer, no BOS in the members' configs: the caller must say
    ens = Ensemble(members, weights=WEIGHTS)
    with pytest.raises(ValueError, match="prefix_token_id"):
        ens.score_rolling_ids(seqs)
    saved = [m.generation_config.bos_token_id for m in members]
    try:
        for m in members:
            m.generation_config.bos_token_id = 5
        assert ens.score_rolling_ids(seqs, max_length=5) == pytest.approx(
            ens.score_rolling_ids(seqs, max_length=5, prefix_token_id=5), rel=1e-6
        )
        members[1].generation_config.bos_token_id = 6
        with pytest.raises(ValueError, match="disagree"):
            ens.score_rolling_ids(seqs)
    finally:
        for m, s in zip(members, saved):
            m.generation_config.bos_token_id = s


def test_score_rolling_text():
    tok = char_tokenizer()
    models = [tiny_member(arch, len(tok), seed=61 + i, sharpness=2.0) for i, arch in enumerate(("llama", "qwen2"))]
    ens = Ensemble(models, tokenizer=tok, weights=[0.5, 0.5])
    texts = ["the cat sat on the mat.", "a"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = ens.score_rolling(texts, max_length=8)
    assert got == pytest.approx(ens.score_rolling_ids(ids, max_length=8, prefix_token_id=tok.bos_token_id), rel=1e-6)
    assert got[0] == pytest.approx(brute_force(models, [0.5, 0.5], ids[0], tok.bos_token_id, 8), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        ens.score_rolling(["ok", ""])
    with pytest.raises(TypeError, match="texts"):
        ens.score_rolling("not a list")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Ensemble(models).score_rolling(["abc"])


def test_bad_arguments(ensemble):
    with pytest.raises(ValueError, match=r"token_ids\[1\] is empty"):
        ensemble.score_rolling_ids([[1, 2], []], prefix_token_id=PREFIX)
    with pytest.raises(ValueError, match="token_ids must be a non-empty list"):
        ensemble.score_rolling_ids([], prefix_token_id=PREFIX)
    for bad in (1, 0, -4):
        with pytest.raises(ValueError, match="max_length must be >= 2"):
            ensemble.score_rolling_ids([[1, 2]], max_length=bad, prefix_token_id=PREFIX)
    with pytest.raises(TypeError, match="max_length"):
        ensemble.score_rolling_ids([[1, 2]], max_length=4.5, prefix_token_id=PREFIX)
    with pytest.raises(ValueError, match="min_context must be < max_length"):
        ensemble.score_rolling_ids([[1, 2]], max_length=4, min_context=4, prefix_token_id=PREFIX)
    with pytest.raises(ValueError, match="prefix_token_id must be in"):
        ensemble.score_rolling_ids([[1, 2]], prefix_token_id=V)
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        ensemble.score_rolling_ids([[1, V]], prefix_token_id=PREFIX)


@pytest.mark.parametrize("engine", ["hf", "stacked"])
def test_windows_stay_within_max_seq_len(members, engine):
    # An Ensemble with a smaller max_seq_len scores long sequences in windows that fit it (exactly
    # as an explicit max_length would), and refuses an explicit max_length beyond it.
    ens = Ensemble(members, weights=[0.6, 0.4], engine=engine, max_seq_len=8)
    seq = _sequences([30], seed=5)[0]
    got = ens.score_rolling_ids([seq], prefix_token_id=0)[0]
    wide = Ensemble(members, weights=[0.6, 0.4], engine=engine)
    assert got == pytest.approx(wide.score_rolling_ids([seq], prefix_token_id=0, max_length=8)[0], rel=1e-6)
    assert got == pytest.approx(brute_force(members, [0.6, 0.4], seq, 0, 8), rel=1e-4)
    with pytest.raises(ValueError, match=r"max_length = 20 exceeds the Ensemble's max_seq_len"):
        ens.score_rolling_ids([seq], prefix_token_id=0, max_length=20)
