"""Exact CE by drafting (generate(method="ce", draft_tokens=k)): the sequence distribution is CE's
for every transform, the tokens are CE's greedy tokens at temperature 0, a request's tokens do not
depend on the batch, on k or on the drafter schedule, and caches are rolled back exactly."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from me_runtime import Ensemble
from me_runtime.decode import Batch, RowPositions
from me_runtime.drafting import DraftController, DraftingDecoder
from me_runtime.stacked_engine import StackedEngine
from me_kernels import SamplingParams

from _sampling_testlib import chi2_check, exact_probs
from tiny_models import next_token_probs, other_architecture_members, tiny_member

ENGINES = ["hf", "stacked"]
VOCAB = 6
WEIGHTS = [0.5, 0.3, 0.2]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def members():
    # dissimilar members over a tiny vocabulary: every sequence of 3 tokens has visible mass
    return [tiny_member("llama", VOCAB, seed=20 + i, sharpness=3.0) for i in range(3)]


def _ensemble(members, engine):
    return Ensemble(members, weights=WEIGHTS, engine=engine, max_seq_len=64)


def _ce_sequence_probs(members, prompt, length, **params) -> dict[tuple, float]:
    """Exact probability of every continuation of `length` tokens under CE: at each prefix the
    transforms applied to the mixture sum_m w_m p_m (float64, full forwards, no cache)."""
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    probs: dict[tuple, float] = {}

    def walk(prefix: tuple, mass: float):
        if len(prefix) == length:
            probs[prefix] = mass
            return
        with torch.no_grad():
            mix = sum(wi * next_token_probs(m, list(prompt) + list(prefix)) for wi, m in zip(w, members))
        p = exact_probs(torch.log(mix).numpy(), **params)
        for tok in np.nonzero(p > 0)[0]:
            walk(prefix + (int(tok),), mass * float(p[tok]))

    walk((), 1.0)
    return probs


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.8),
    dict(top_k=2),
    dict(min_p=0.3),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_sequence_distribution_is_ce(members, engine, params):
    """Chi-square of 3-token continuations (one batch of requests with distinct seeds, drafting
    k = 2 every round) against CE's exact sequence distribution."""
    prompt, length, n = [1, 2], 3, 1200
    exact = _ce_sequence_probs(members, prompt, length, **params)
    cells = {seq: i for i, seq in enumerate(sorted(exact))}
    ens = _ensemble(members, engine)
    outs = ens.generate_ids([prompt] * n, method="ce", max_new_tokens=length, seed=list(range(n)), draft_tokens=2,
                            draft_adaptive=False, **params)
    seqs = [tuple(g.token_ids) for g in outs]
    assert all(s in cells for s in seqs), "drew a continuation of CE probability 0"
    chi2_check([cells[s] for s in seqs], np.array([exact[s] for s in sorted(exact)]), f"{engine} {params}")
    # the drafts were really tested (and some rejected: the members are dissimilar)
    drafted, accepted = sum(g.drafted for g in outs), sum(g.accepted for g in outs)
    assert drafted >= n * length * 0.9 and 0 < accepted < drafted


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("draft_member", [None, 1])
def test_greedy_tokens_are_ce_greedy_tokens(members, engine, draft_member):
    ens = _ensemble(members, engine)
    prompts = [[1, 2, 3], [4, 5, 0, 1, 2], [3]]
    ce = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=12, seed=0)
    for k in (1, 3):
        got = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=12, seed=0, draft_tokens=k,
                               draft_member=draft_member, draft_adaptive=False)
        assert [g.token_ids for g in got] == [g.token_ids for g in ce]
        assert all(g.members == [-1] * len(g.token_ids) for g in got)


def test_greedy_on_the_demo_members():
    from me_runtime.demo import demo_members

    ens = Ensemble.from_pretrained(demo_members(), engine="auto")
    prompts = ["def add(a, b):", "The history of"]
    ce = ens.generate(prompts, method="ce", temperature=0.0, max_new_tokens=16, seed=0)
    for draft_member in (None, 0):
        got = ens.generate(prompts, method="ce", temperature=0.0, max_new_tokens=16, seed=0, draft_tokens=3,
                           draft_member=draft_member, draft_adaptive=False)
        assert [g.token_ids for g in got] == [g.token_ids for g in ce]
        assert sum(g.accepted for g in got) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_tokens_do_not_depend_on_batch_rounds_or_k(members, engine):
    """Every random number of position s is keyed by (seed, s): alone or in a batch, with any k,
    adaptive or not, a request gets the same tokens."""
    ens = _ensemble(members, engine)
    prompts = [[1, 2, 3], [4, 5], [0, 1, 2, 3, 4, 5, 1]]
    opts = dict(method="ce", temperature=0.8, top_p=0.9, max_new_tokens=15)
    batch = ens.generate_ids(prompts, seed=[7, 8, 9], draft_tokens=3, draft_adaptive=False, **opts)
    for i, prompt in enumerate(prompts):
        for k, adaptive in ((1, False), (4, False), (2, True)):
            alone = ens.generate_ids([prompt], seed=[7 + i], draft_tokens=k, draft_adaptive=adaptive, **opts)[0]
            assert alone.token_ids == batch[i].token_ids, (i, k, adaptive)


@pytest.mark.triton_kernels
@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9)])
def test_drafting_on_the_triton_kernels(members, params, monkeypatch):
    """The kernels (verify_draft's Triton kernel included) draw the CPU ops' numbers: the same
    tokens, drafts and acceptances on the interpreted kernels as on the CPU path."""
    ens = _ensemble(members, "stacked")
    opts = dict(method="ce", max_new_tokens=5, seed=[3, 4], draft_tokens=2, draft_adaptive=False, **params)
    on_kernels = ens.generate_ids([[1, 3], [4, 0, 2]], **opts)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    on_cpu = ens.generate_ids([[1, 3], [4, 0, 2]], **opts)
    assert [(g.token_ids, g.drafted, g.accepted) for g in on_kernels] == [
        (g.token_ids, g.drafted, g.accepted) for g in on_cpu]


def test_both_engines_give_the_same_tokens(members):
    """Both engines keep each row's own position (rows accept different runs), and agree."""
    opts = dict(method="ce", temperature=0.9, top_k=4, max_new_tokens=10, seed=3, draft_tokens=2)
    prompts = [[1, 2, 3], [4, 5], [0], [5, 4, 3, 2]]
    hf_ens = _ensemble(members, "hf")
    assert hf_ens._engine.per_row_positions
    hf = hf_ens.generate_ids(prompts, **opts)
    st = _ensemble(members, "stacked").generate_ids(prompts, **opts)
    assert [g.token_ids for g in hf] == [g.token_ids for g in st]
    assert [(g.drafted, g.accepted) for g in hf] == [(g.drafted, g.accepted) for g in st]
    assert len({(g.drafted, g.accepted) for g in hf}) > 1, "every row accepted alike: no per-row positions exercised"


@pytest.mark.parametrize("engine", ENGINES)
def test_weights_one_hot_accepts_every_fixed_draft(members, engine):
    """With all weight on the drafter, p == q: every draft is accepted."""
    ens = Ensemble(members, weights=[0.0, 1.0, 0.0], engine=engine, max_seq_len=64)
    out = ens.generate_ids([[1, 2]], method="ce", max_new_tokens=9, seed=1, draft_tokens=3, draft_member=1,
                           draft_adaptive=False)[0]
    assert out.accepted == out.drafted > 0
    ce = ens.generate_ids([[1, 2]], method="single", member=1, temperature=0.0, max_new_tokens=9)[0]
    greedy = ens.generate_ids([[1, 2]], method="ce", temperature=0.0, max_new_tokens=9, draft_tokens=3,
                              draft_member=1, draft_adaptive=False)[0]
    assert greedy.token_ids == ce.token_ids


# ---------------------------------------------------------------------------------------------
# Rollback: after rounds with rejections, every member's cache equals a fresh recompute
# ---------------------------------------------------------------------------------------------


def _run_rounds(ens, prompts, rounds, **params):
    engine = ens._engine
    batch = Batch(prompts, [11, 12], 20, torch.device("cpu"))
    dec = DraftingDecoder(engine, ens._weights_tensor(), batch, params=SamplingParams(**params), draft_tokens=3,
                          draft_member=None, max_new_tokens=20, adaptive=False)
    dec.first_members()
    engine.begin(batch)
    rejected = 0
    for _ in range(rounds):
        dec.round()
        rejected += sum(a < d for a, d in zip(dec.round_accepted, dec.round_drafted))
    assert rejected > 0, "no rejection happened: the test would not exercise the rollback"
    return engine, batch, dec


def _row_columns(runner, row: int) -> list[int]:
    """The cache columns that hold row `row`'s tokens, in order (hf engine)."""
    if runner.runs is None:
        return list(range(runner.cache_len - runner.seen[row], runner.cache_len))
    return [c for start, stop in runner.runs[row] for c in range(start, stop)]


@torch.no_grad()
def test_rollback_hf_caches_equal_a_fresh_recompute(members):
    """Each row of each member's cache holds exactly the keys / values of the tokens it claims
    to have read (rows at their own positions: compared row by row, column by column)."""
    ens = _ensemble(members, "hf")
    with torch.inference_mode():
        engine, batch, dec = _run_rounds(ens, [[1, 2, 3], [4, 5]], 4)
        assert dec.gen[0] != dec.gen[1], "rows in lock-step: the test would not exercise per-row rollbacks"
        for runner in engine.runners:
            fresh = type(runner)(runner.model, batch.device)
            read = [s - n for s, n in zip(runner.seen, batch.prompt_lens)]
            fresh.catch_up(batch, RowPositions(read, torch.tensor(read)))
            assert fresh.seen == runner.seen
            for row in range(batch.size):
                got_cols, want_cols = _row_columns(runner, row), _row_columns(fresh, row)
                assert len(got_cols) == len(want_cols) == runner.seen[row]
                for got, want in zip(runner.cache.layers, fresh.cache.layers):
                    torch.testing.assert_close(got.keys[row, :, got_cols], want.keys[row, :, want_cols], rtol=1e-5,
                                               atol=1e-5)
                    torch.testing.assert_close(got.values[row, :, got_cols], want.values[row, :, want_cols],
                                               rtol=1e-5, atol=1e-5)
        engine.end()


@torch.no_grad()
def test_rollback_stacked_caches_equal_a_fresh_recompute(members):
    ens = _ensemble(members, "stacked")
    with torch.inference_mode():
        engine, batch, dec = _run_rounds(ens, [[1, 2, 3], [4, 5]], 4)
        got_kv = engine.caches[0].kv.clone()
        consumed = [row[:] for row in engine.consumed]
        fresh = StackedEngine(members, torch.device("cpu"), VOCAB, 64)
        fresh.begin(batch)
        for m in range(engine.num_members):  # each (member, row) reads exactly what its cache claims
            for r, slot in enumerate(engine.slots):
                t = consumed[m][slot] - batch.prompt_lens[r]
                if consumed[m][slot] > 0:
                    fresh._catch_up(0, batch, t, torch.tensor([r]), torch.tensor([m]), [r], [m])
        for m in range(engine.num_members):
            for r, slot in enumerate(engine.slots):
                n = consumed[m][slot]
                assert fresh.consumed[m][fresh.slots[r]] == n
                row, fresh_row = m * engine.caches[0].slots + slot, m * fresh.caches[0].slots + fresh.slots[r]
                torch.testing.assert_close(got_kv[:, row, :n], fresh.caches[0].kv[:, fresh_row, :n], rtol=1e-5,
                                           atol=1e-5)
        fresh.end()
        engine.end()


# ---------------------------------------------------------------------------------------------
# The controller and bad input
# ---------------------------------------------------------------------------------------------


def test_controller_drafts_when_it_pays():
    ctl = DraftController(4, num_members=3)
    assert ctl.choose([100], [5]) == 1  # exploration: one draft first ...
    ctl.observe(draft_seconds=1.0, drafts=1, verify_seconds=3.0)  # drafts cost a third of a verification
    assert ctl.choose([100], [99]) == 0  # ... then a one-position round
    ctl.observe(draft_seconds=0.0, drafts=0, verify_seconds=3.0)  # memory-bound: J does not matter
    assert ctl.choose([100], [99]) == 4  # near-certain acceptance: draft the most
    assert ctl.choose([100], [5]) == 0  # near-certain rejection: plain verification steps
    assert ctl.choose([100], [60]) >= 1
    # a verification whose cost grows with the positions it reads (a compute-bound CPU) makes long
    # rounds expensive: fewer drafts pay
    cpu = DraftController(4, num_members=3)
    cpu.observe(draft_seconds=1.0, drafts=1, verify_seconds=2.0 * 3)  # J = 2 costs 2x ...
    cpu.observe(draft_seconds=0.0, drafts=0, verify_seconds=3.0)  # ... a J = 1 verification
    assert cpu.verify_cost(3) == pytest.approx(9.0)
    assert cpu.choose([100], [90]) < ctl.choose([100], [90])
    fixed = DraftController(2, num_members=3, adaptive=False)
    assert fixed.choose([100], [0]) == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(draft_tokens=-1), ValueError, "draft_tokens must be >= 0"),
    (dict(draft_tokens=1.5), TypeError, "draft_tokens must be an int"),
    (dict(draft_tokens=True), TypeError, "draft_tokens must be an int"),
    (dict(draft_tokens=2, draft_member=3), ValueError, r"draft_member must be in \[0, 3\)"),
    (dict(draft_tokens=2, draft_member=-1), ValueError, r"draft_member must be in \[0, 3\)"),
    (dict(draft_tokens=2, draft_member="0"), TypeError, "draft_member must be None or an int"),
    (dict(draft_member=0), ValueError, "draft_member needs draft_tokens > 0"),
    (dict(draft_tokens=2, method="me"), ValueError, "draft_tokens > 0 needs method='ce'"),
    (dict(draft_tokens=2, method="single"), ValueError, "draft_tokens > 0 needs method='ce'"),
    (dict(draft_tokens=2, draft_adaptive=1), TypeError, "draft_adaptive must be a bool"),
])
def test_bad_drafting_arguments(members, kwargs, error, match):
    ens = _ensemble(members, "hf")
    opts = dict(method="ce", max_new_tokens=3, seed=0) | kwargs
    with pytest.raises(error, match=match):
        ens.generate_ids([[1, 2]], **opts)
    assert ens.generate_ids([[1, 2]], method="ce", max_new_tokens=2, seed=0, draft_tokens=1)[0].token_ids


def test_zero_and_one_new_tokens(members):
    ens = _ensemble(members, "stacked")
    assert ens.generate_ids([[1]], method="ce", max_new_tokens=0, draft_tokens=3)[0].token_ids == []
    one = ens.generate_ids([[1]], method="ce", max_new_tokens=1, seed=2, draft_tokens=3, temperature=0.0)[0]
    ce = ens.generate_ids([[1]], method="ce", max_new_tokens=1, seed=2, temperature=0.0)[0]
    assert one.token_ids == ce.token_ids and one.drafted == 1


# ---------------------------------------------------------------------------------------------
# Other architectures (hf engine: sliding-window and hybrid caches), errors mid-generation
# ---------------------------------------------------------------------------------------------

# hf-engine caches: sliding windows (rollbacks past the window), hybrid layers, learned positions
DRAFTING_ARCHITECTURES = ["mistral-sliding-window", "gemma2-hybrid-sliding", "gpt2-learned-positions"]


@pytest.mark.parametrize("name", DRAFTING_ARCHITECTURES)
def test_other_architectures_greedy_is_ce_and_rows_finish(name):
    models = other_architecture_members(name)
    ens = Ensemble(models, engine="hf")
    prompts = [[1, 3, 5, 7, 9, 11, 4], [3], [4, 4, 0], [6, 7]]
    ce = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=14)
    got = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=14, draft_tokens=3,
                           draft_adaptive=False)
    assert [(g.token_ids, g.finish_reason) for g in got] == [(g.token_ids, g.finish_reason) for g in ce]
    opts = dict(method="ce", temperature=0.9, max_new_tokens=14, draft_tokens=2, draft_adaptive=False)
    batch = ens.generate_ids(prompts, seed=[5, 6, 7, 8], **opts)
    for i, prompt in enumerate(prompts):
        assert ens.generate_ids([prompt], seed=5 + i, **opts)[0].token_ids == batch[i].token_ids


@pytest.mark.parametrize("engine", ENGINES)
def test_interrupted_drafting_leaves_the_ensemble_usable(members, engine, monkeypatch):
    import me_kernels

    ens = _ensemble(members, engine)
    opts = dict(method="ce", top_p=0.9, max_new_tokens=8, seed=[1, 2], draft_tokens=3, draft_adaptive=False)
    expected = ens.generate_ids([[1, 2], [3]], **opts)
    original, calls = me_kernels.verify_draft, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(me_kernels, "verify_draft", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ens.generate_ids([[1, 2], [3]], **opts)
    monkeypatch.setattr(me_kernels, "verify_draft", original)
    assert [g.token_ids for g in ens.generate_ids([[1, 2], [3]], **opts)] == [g.token_ids for g in expected]


def test_a_drafter_with_nan_logits_is_named(members):
    import copy

    broken = copy.deepcopy(members[1])
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    ens = Ensemble([members[0], broken], engine="hf")
    with pytest.raises(RuntimeError, match="drafter's \\(member 1\\) logits|no finite value or a NaN"):
        ens.generate_ids([[1, 2]], method="ce", max_new_tokens=6, seed=0, draft_tokens=2, draft_member=1,
                         draft_adaptive=False)
    assert ens.generate_ids([[1, 2]], method="single", member=0, max_new_tokens=3, seed=0)[0].token_ids


def test_chunked_verification_reads_long_prompts_in_chunks(members, monkeypatch):
    """The first round's verification reads whole prompts: in chunks without logits, then the
    drafted positions in a forward of their own (tiny CHUNK_TOKENS forces many chunks)."""
    import me_runtime.stacked_engine as se

    ens = _ensemble(members, "stacked")
    prompts = [[(3 * i) % VOCAB for i in range(23)], [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]
    want = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=9)
    monkeypatch.setattr(se, "CHUNK_TOKENS", 4)
    got = ens.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=9, draft_tokens=3,
                           draft_adaptive=False)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def _drafting_rounds(ens, rounds: int = 4) -> list[list[int]]:
    """Each row's generated count after each of `rounds` fixed-k drafting rounds over ragged rows."""
    with torch.inference_mode():
        batch = Batch([[1, 2, 3], [4, 5], [0], [5, 4, 3, 2]], [1, 2, 3, 4], 24, torch.device("cpu"))
        dec = DraftingDecoder(ens._engine, ens._weights_tensor(), batch, params=SamplingParams(), draft_tokens=3,
                              draft_member=None, max_new_tokens=24, adaptive=False)
        assert dec.per_row == ens._engine.per_row_positions
        dec.first_members()
        ens._engine.begin(batch)
        counts = []
        for _ in range(rounds):
            dec.round()
            counts.append(list(dec.gen))
        ens._engine.end()
    return counts


@pytest.mark.parametrize("engine", ENGINES)
def test_rows_keep_their_own_positions_on_both_engines(members, engine):
    """Each row emits its own accepted run (rows reach different positions), on both engines."""
    ens = _ensemble(members, engine)
    assert ens._engine.per_row_positions
    spreads = [max(gen) - min(gen) for gen in _drafting_rounds(ens)]
    assert max(spreads) > 0, spreads


@pytest.mark.parametrize("name", ["mistral-sliding-window", "gemma2-hybrid-sliding"])
def test_hf_rows_advance_in_lock_step_with_sliding_window_members(name):
    """Members whose caches cannot hold holes past a window: drafting keeps every row at one
    position (every round emits the fewest tokens any row got)."""
    ens = Ensemble(other_architecture_members(name), engine="hf")
    assert not ens._engine.per_row_positions
    for gen in _drafting_rounds(ens):
        assert max(gen) == min(gen) > 0
