"""The compiled CPU kernels of the sampling ops (torch.ops.me.sample / me_step / select_members /
mixture_sample / mixture_logprobs / verify_draft from me_kernels._C) against the torch references.

Tokens and members must be exactly the reference's: the kernels draw the same Philox numbers and
compute the same fp32 scores, and find the top-k / top-p thresholds by selection instead of a sort.
The ops are called directly with their schema's arguments (under TRITON_INTERPRET=1 the dispatcher
still sends CPU tensors to the C++ kernels) and through the public functions with TRITON_INTERPRET
unset (the CPU path).
"""
from __future__ import annotations

import math

import pytest
import torch

import me_kernels
from me_kernels import reference as R

OPS = ("sample", "me_step", "select_members", "mixture_sample", "mixture_logprobs", "verify_draft")


def _compiled(name: str) -> bool:
    # A CPU kernel registered for the key itself comes from the extension (the Python fallback
    # registers a backend-agnostic kernel).
    return me_kernels.EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"me::{name}", "CPU")


pytestmark = pytest.mark.skipif(not all(_compiled(n) for n in OPS),
                                reason="me_kernels._C was built without the CPU sampling ops")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG, POS, NAN = float("-inf"), float("inf"), float("nan")
F32_LN_HALF = float(torch.tensor(-math.log(2.0), dtype=torch.float32))  # exp of it rounds to 0.5


@pytest.fixture
def cpu_path(monkeypatch):
    """Public functions take the CPU path (the compiled op), not the Triton interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def op_args(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0):
    """The schema's (tensor, scalar) pairs of the six row parameters."""
    args = []
    for value, default in ((temperature, 1.0), (top_k, 0), (top_p, 1.0), (min_p, 0.0), (seed, 0), (offset, 0)):
        args += [value, default] if isinstance(value, torch.Tensor) else [None, value]
    return args


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x [B, V] in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "every-other":  # stride (2V, 2)
        big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    assert layout == "transposed"  # stride (1, B)
    return x.t().contiguous().t()


def random_logits(batch, vocab, dtype, gen, scale=3.0):
    x = torch.randn(batch, vocab, generator=gen) * scale
    # a few confident rows and a few flat ones, like real next-token logits
    x[::3] += torch.randn(batch, vocab, generator=gen)[::3] * 4
    return x.to(dtype)


def row_seeds(batch, gen):
    return torch.randint(-(2**62), 2**62, (batch,), generator=gen)


CONFIGS = [
    {},
    dict(temperature=0.6),
    dict(temperature=POS),
    dict(temperature=0.0),
    dict(temperature=1e-30),  # 1 / T is finite: not greedy, extreme scaling
    dict(temperature=1e-45),  # 1 / T overflows: greedy
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=50, temperature=1.3),
    dict(top_k=10**6),
    dict(top_p=0.5),
    dict(top_p=0.9),
    dict(top_p=0.999, temperature=0.7),
    dict(top_p=1e-6),
    dict(min_p=0.05),
    dict(min_p=0.3, temperature=2.0),
    dict(min_p=1.0),
    dict(top_k=50, top_p=0.9),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=POS, top_k=7, top_p=0.6),
    dict(temperature=POS, top_p=0.3, min_p=0.5),
]


def check_sample(logits, **kw):
    """Direct op and reference give the same tokens; returns them."""
    want = R.sample_reference(logits, **kw)
    got = torch.ops.me.sample(logits, *op_args(**kw))
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), f"{kw}: kernel {got.tolist()} vs reference {want.tolist()}"
    return got


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,vocab", [(1, 1), (3, 7), (17, 1000), (3, 4099)])
@pytest.mark.parametrize("layout", ["contiguous", "every-other", "transposed"])
def test_sample_matches_reference_on_random_rows(dtype, batch, vocab, layout):
    gen = torch.Generator().manual_seed(batch * 7919 + vocab + len(layout) + DTYPES.index(dtype))
    logits = strided(random_logits(batch, vocab, dtype, gen), layout)
    for i, kw in enumerate(CONFIGS):
        seed = row_seeds(batch, gen) if i % 2 else int(torch.randint(0, 2**62, (1,), generator=gen))
        offset = torch.randint(0, 2**40, (batch,), generator=gen) if i % 3 else i
        check_sample(logits, seed=seed, offset=offset, **kw)


@pytest.mark.parametrize("vocab", [7, 1000, 4099])
def test_sample_per_row_parameters(vocab):
    gen = torch.Generator().manual_seed(vocab)
    batch = 17
    logits = random_logits(batch, vocab, torch.float32, gen)
    temp = torch.tensor([0.0, POS, 1e-30] + torch.rand(batch - 3, generator=gen).mul(2).tolist())
    top_k = torch.randint(0, vocab + 3, (batch,), generator=gen, dtype=torch.int32)
    top_p = torch.rand(batch, generator=gen).clamp(min=1e-3)
    top_p[::4] = 1.0
    min_p = torch.rand(batch, generator=gen) * 0.3
    min_p[::3] = 0.0
    seed, offset = row_seeds(batch, gen), torch.randint(0, 2**62, (batch,), generator=gen)
    for kw in (dict(temperature=temp), dict(top_k=top_k), dict(top_p=top_p), dict(min_p=min_p),
               dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)):
        check_sample(logits, seed=seed, offset=offset, **kw)
    # stride-0 (expanded) parameter tensors, and top_k as int64
    check_sample(logits, temperature=torch.tensor(0.7).expand(batch), top_k=torch.tensor(9).expand(batch),
                 top_p=torch.tensor([0.8]).expand(batch), min_p=torch.tensor(0.01).expand(batch),
                 seed=torch.tensor(5).expand(batch), offset=torch.tensor(3).expand(batch))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_ties(dtype):
    """Integer-valued logits: many exact ties at the top, at the top-k boundary and in the
    top-p crossing class (kept or dropped as a whole)."""
    gen = torch.Generator().manual_seed(11)
    for vocab in (7, 1000, 4099):
        logits = torch.randint(-4, 3, (17, vocab), generator=gen).to(dtype)
        seed = row_seeds(17, gen)
        for kw in CONFIGS:
            check_sample(logits, seed=seed, offset=3, **kw)
    # greedy: the lowest index of the maximum
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [NEG, 0.0, 0.0, NEG]], dtype=dtype)
    assert check_sample(logits, temperature=0.0).tolist() == [1, 0, 1]


def test_sample_thresholds_hit_exactly():
    # top-p reached exactly: T = inf weighs every token 1, so the mass of the top 4 of 8 is
    # exactly 0.5 * 8; the 4th largest is the crossing token and is kept, the 5th is not.
    logits = torch.arange(8, dtype=torch.float32).flip(0).repeat(64, 1)  # 7, 6, ..., 0
    seeds = torch.arange(64)
    tokens = check_sample(logits, temperature=POS, top_p=0.5, seed=seeds)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    # ... and with the crossing class tied: 6 tokens of logit 1, p * Z = 3 falls inside it
    logits = torch.tensor([[1.0] * 6 + [0.0] * 6]).repeat(64, 1)
    tokens = check_sample(logits, temperature=POS, top_p=0.25, seed=seeds)
    assert set(tokens.tolist()) == set(range(6))
    # top-k boundary tie: k = 2 with three tokens tying the 2nd largest keeps all four
    logits = torch.tensor([[4.0, 2.0, 2.0, 1.0, 2.0, 0.0]]).repeat(64, 1)
    tokens = check_sample(logits, top_k=2, temperature=POS, seed=seeds)
    assert set(tokens.tolist()) == {0, 1, 2, 4}
    # min-p boundary: exp(fp32(-ln 2)) rounds to exactly 0.5, so min_p = 0.5 keeps that token
    logits = torch.tensor([[0.0, F32_LN_HALF, F32_LN_HALF - 1e-3, -5.0]]).repeat(64, 1)
    tokens = check_sample(logits, min_p=0.5, seed=seeds)
    assert set(tokens.tolist()) == {0, 1}
    tokens = check_sample(logits, min_p=1.0, seed=seeds)
    assert set(tokens.tolist()) == {0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_special_rows(dtype):
    gen = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max
    logits = random_logits(9, 300, torch.float32, gen)
    logits[0, [3, 100, 299]] = POS  # uniform among the +inf entries
    logits[1, :] = NEG  # no finite logit: -1
    logits[2, 17] = NAN  # NaN: -1
    logits[3, ::2] = NEG  # half -inf
    logits[4, :] = NEG
    logits[4, 250] = 0.0  # a single finite logit
    logits[5, :] = -big  # extreme values: x - m overflows at T = inf
    logits[5, ::7] = big
    logits[6, 5] = POS
    logits[6, 6] = NAN  # NaN wins over +inf
    logits[7, :] = big  # every logit the largest finite value
    logits[8, 0] = NEG
    logits = logits.to(dtype)
    seed = row_seeds(9, gen)
    for kw in CONFIGS:
        tokens = check_sample(logits, seed=seed, offset=1, **kw)
        assert tokens[1] == tokens[2] == tokens[6] == -1
        assert tokens[0] in (3, 100, 299) and tokens[4] == 250
    # the +inf row's draw covers its +inf entries
    rows = logits[:1].expand(64, -1)
    assert set(check_sample(rows, seed=torch.arange(64)).tolist()) == {3, 100, 299}


def test_sample_bad_row_parameters_yield_minus_one():
    gen = torch.Generator().manual_seed(3)
    logits = random_logits(6, 50, torch.float32, gen)
    seed = row_seeds(6, gen)
    good = dict(temperature=torch.ones(6), top_k=torch.zeros(6, dtype=torch.int32), top_p=torch.ones(6),
                min_p=torch.zeros(6))
    bad_values = dict(temperature=[NAN, -1.0], top_k=[-1, -(2**31)], top_p=[0.0, 1.5, NAN, -0.1],
                      min_p=[-0.1, 1.5, NAN])
    for name, values in bad_values.items():
        for value in values:
            kw = {k: v.clone() for k, v in good.items()}
            kw[name][2] = value
            tokens = check_sample(logits, seed=seed, **kw)
            assert tokens[2] == -1 and bool((tokens[[0, 1, 3, 4, 5]] >= 0).all())
    # scalar parameters out of range: every row -1 (the public functions refuse them earlier)
    for kw in (dict(temperature=-1.0), dict(top_k=-3), dict(top_p=0.0), dict(top_p=2.0), dict(min_p=NAN)):
        assert check_sample(logits, **kw).tolist() == [-1] * 6


def test_sample_seeds_negative_and_large(cpu_path):
    gen = torch.Generator().manual_seed(8)
    logits = random_logits(5, 999, torch.float32, gen)
    seed = torch.tensor([-1, -(2**63), 2**63 - 1, 0, 2**32])
    offset = torch.tensor([2**63 - 1, -1, 2**32 - 1, -(2**63), 7])
    for kw in (dict(), dict(top_p=0.8), dict(top_k=3)):
        check_sample(logits, seed=seed, offset=offset, **kw)
        # a Python int seed of 64 bits wraps to the signed int64 of the same bits
        got = me_kernels.sample(logits, seed=2**64 - 1, offset=2**63, **kw)
        assert torch.equal(got, R.sample_reference(logits, seed=-1, offset=-(2**63), **kw))


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_public_functions_use_the_kernels(cpu_path, layout, monkeypatch):
    gen = torch.Generator().manual_seed(21)
    logits = strided(random_logits(17, 1000, torch.bfloat16, gen), layout)
    mix = torch.stack([logits, logits.flip(1)])
    w = torch.tensor([0.3, 0.7])
    seed = row_seeds(17, gen)
    want = [(R.sample_reference(logits, seed=seed, offset=4, **kw),
             R.mixture_sample_reference(mix, w, seed=seed, offset=4, **kw),
             R.me_step_reference(logits, w, seed=seed, offset=4, **kw)) for kw in CONFIGS]
    want_members = R.select_members_reference(w, seed=seed, offset=9, batch=17)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the CPU path ran the torch reference instead of the compiled kernel")

    for name in ("sample_reference", "mixture_sample_reference", "me_step_reference", "select_members_reference"):
        monkeypatch.setattr(R, name, must_not_run)
    for kw, (tokens, mixture_tokens, (step_tokens, step_members)) in zip(CONFIGS, want):
        assert torch.equal(me_kernels.sample(logits, seed=seed, offset=4, **kw), tokens), kw
        assert torch.equal(me_kernels.mixture_sample(mix, w, seed=seed, offset=4, **kw), mixture_tokens), kw
        got = me_kernels.me_step(logits, w, seed=seed, offset=4, **kw)
        assert torch.equal(got[0], step_tokens) and torch.equal(got[1], step_members), kw
    assert torch.equal(me_kernels.select_members(w, seed=seed, offset=9), want_members)
    assert me_kernels.sample(logits[:0]).shape == (0,)


def test_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = random_logits(8, 513, torch.float32, gen)
    seed = row_seeds(8, gen)
    whole = torch.ops.me.sample(logits, *op_args(top_p=0.9, seed=seed, offset=3))
    for b in range(8):
        one = torch.ops.me.sample(logits[b : b + 1], *op_args(top_p=0.9, seed=seed[b : b + 1], offset=3))
        assert one.item() == whole[b].item()


def test_sample_argument_errors():
    logits = torch.randn(2, 5)
    with pytest.raises(TypeError, match="logits"):
        torch.ops.me.sample(logits.to(torch.int32), *op_args())
    with pytest.raises(ValueError, match="logits"):
        torch.ops.me.sample(logits[0], *op_args())
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.me.sample(logits, *op_args(temperature=torch.ones(3)))
    with pytest.raises(TypeError, match="top_k"):
        torch.ops.me.sample(logits, *op_args(top_k=torch.ones(2)))


# --------------------------------------------------------------------------------------------
# select_members and me_step
# --------------------------------------------------------------------------------------------


def weight_cases(batch, members, gen):
    rows = torch.rand(batch, members, generator=gen) + 0.01
    if members > 1:
        rows[::2, 0] = 0.0  # zero weights are never drawn
        rows[1::2, 1:] = 0.0  # a single positive member
    vec = torch.rand(members, generator=gen)
    vec[members // 2] = 0.0
    if not bool((vec > 0).any()):
        vec[0] = 1.0
    return [rows, vec, rows.t().contiguous().t(), torch.full((members,), 3.0)]


@pytest.mark.parametrize("members", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_select_members_matches_reference(members, batch, cpu_path):
    gen = torch.Generator().manual_seed(members * 100 + batch)
    seed, offset = row_seeds(batch, gen), torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    for w in weight_cases(batch, members, gen):
        for sd, off in ((seed, offset), (5, 9), (seed, 2**62)):
            want = R.select_members_reference(w, seed=sd, offset=off, batch=batch)
            got = torch.ops.me.select_members(w, *op_args(seed=sd, offset=off)[8:], batch)
            assert got.dtype == torch.int32 and torch.equal(got, want)
            assert torch.equal(me_kernels.select_members(w, seed=sd, offset=off, batch=batch), want)
            assert bool((w.expand(batch, -1).gather(1, got.long()[:, None]) > 0).all())


def test_select_members_bad_rows_yield_minus_one():
    w = torch.tensor([[1.0, 2.0], [NAN, 1.0], [-1.0, 2.0], [0.0, 0.0], [POS, 1.0], [0.0, 1e-30]])
    seed = torch.arange(6)
    want = R.select_members_reference(w, seed=seed, offset=3)
    got = torch.ops.me.select_members(w, seed, 0, None, 3, 6)
    assert torch.equal(got, want) and got[1:5].tolist() == [-1] * 4 and got[5] == 1


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch,vocab", [(1, 7), (3, 1000), (17, 4099)])
def test_me_step_matches_reference(shared, batch, vocab, cpu_path):
    gen = torch.Generator().manual_seed(batch + vocab + shared)
    logits = random_logits(batch, vocab, torch.float16, gen)
    seed, offset = row_seeds(batch, gen), torch.randint(0, 2**62, (batch,), generator=gen)
    offset[0] = 2**63 - 1  # offset + 1 wraps
    for i, w in enumerate(weight_cases(batch, 3, gen)):
        kw = CONFIGS[(5 * i) % len(CONFIGS)]
        want = R.me_step_reference(logits, w, seed=seed, offset=offset, shared=shared, **kw)
        got = torch.ops.me.me_step(logits, w, *op_args(seed=seed, offset=offset, **kw), shared)
        assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kw
        pub = me_kernels.me_step(logits, w, seed=seed, offset=offset, shared=shared, **kw)
        assert torch.equal(pub[0], want[0]) and torch.equal(pub[1], want[1])
    empty = torch.ops.me.me_step(logits[:0], torch.ones(2), *op_args(), shared)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


# --------------------------------------------------------------------------------------------
# mixture_logprobs and mixture_sample
# --------------------------------------------------------------------------------------------


def mixture_logits(members, batch, vocab, dtype, gen, layout="contiguous"):
    x = torch.randn(members, batch, vocab, generator=gen) * 3
    if layout == "transposed":  # [M, B, V] with the vocabulary outermost in memory
        return x.permute(2, 0, 1).contiguous().permute(1, 2, 0).to(dtype)
    return x.to(dtype)


def assert_logprobs_match(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got == NEG, want == NEG)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("members,batch,vocab", [(1, 1, 1), (2, 3, 7), (3, 17, 1000), (2, 3, 4099)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_mixture_logprobs_matches_reference(dtype, members, batch, vocab, layout, cpu_path):
    gen = torch.Generator().manual_seed(members * 1000 + batch * 10 + vocab)
    logits = mixture_logits(members, batch, vocab, dtype, gen, layout)
    for w in weight_cases(batch, members, gen):
        want = R.mixture_logprobs_reference(logits, w)
        assert_logprobs_match(torch.ops.me.mixture_logprobs(logits, w), want)
        assert_logprobs_match(me_kernels.mixture_logprobs(logits, w), want)


def special_mixture(dtype):
    """[3, 8, 40] logits + [8, 3] weights with +inf members, -inf / NaN rows, zero weights."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 8, 40, generator=gen) * 2
    w = torch.rand(8, 3, generator=gen) + 0.1
    logits[0, 0, [2, 9]] = POS  # member 0 uniform over its +inf entries
    logits[1, 1, :] = NEG  # no finite logit in a positive member: NaN row
    logits[2, 2, 5] = NAN  # NaN in a positive member: NaN row
    logits[2, 3, 5] = NAN
    w[3, 2] = 0.0  # ... but member 2 has zero weight in row 3: ignored
    logits[:, 4, :20] = NEG  # tokens no member can produce: -inf
    w[5] = torch.tensor([NAN, 1.0, 1.0])  # bad weight row
    w[6] = 0.0  # all-zero weight row
    logits[:, 7, :] = NEG
    logits[:, 7, 33] = 1.0  # one token only
    return logits.to(dtype), w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixture_special_rows(dtype):
    logits, w = special_mixture(dtype)
    want = R.mixture_logprobs_reference(logits, w)
    got = torch.ops.me.mixture_logprobs(logits, w)
    assert_logprobs_match(got, want)
    assert bool(torch.isnan(got[[1, 2, 5, 6]]).all()) and not bool(torch.isnan(got[[0, 3, 4, 7]]).any())
    seed = torch.arange(8) * 977
    for kw in CONFIGS:
        want_t = R.mixture_sample_reference(logits, w, seed=seed, offset=2, **kw)
        got_t = torch.ops.me.mixture_sample(logits, w, *op_args(seed=seed, offset=2, **kw))
        assert torch.equal(got_t, want_t), kw
        assert got_t[[1, 2, 5, 6]].tolist() == [-1] * 4 and got_t[7] == 33


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("members,batch,vocab", [(1, 3, 7), (2, 17, 1000), (3, 3, 4099)])
def test_mixture_sample_matches_reference(dtype, members, batch, vocab, cpu_path):
    gen = torch.Generator().manual_seed(members + batch + vocab)
    logits = mixture_logits(members, batch, vocab, dtype, gen, "transposed" if members == 2 else "contiguous")
    seed = row_seeds(batch, gen)
    for i, w in enumerate(weight_cases(batch, members, gen)):
        for kw in CONFIGS[i::4]:
            want = R.mixture_sample_reference(logits, w, seed=seed, offset=i, **kw)
            got = torch.ops.me.mixture_sample(logits, w, *op_args(seed=seed, offset=i, **kw))
            assert got.dtype == torch.int64 and torch.equal(got, want), kw
            assert torch.equal(me_kernels.mixture_sample(logits, w, seed=seed, offset=i, **kw), want)
    # per-row parameters, one of them bad
    temp = torch.rand(batch, generator=gen) + 0.2
    top_p = torch.rand(batch, generator=gen).clamp(min=0.05)
    top_p[0] = NAN
    want = R.mixture_sample_reference(logits, weights_ := torch.ones(members), temperature=temp, top_p=top_p,
                                      seed=seed)
    got = torch.ops.me.mixture_sample(logits, weights_, *op_args(temperature=temp, top_p=top_p, seed=seed))
    assert torch.equal(got, want) and got[0] == -1


def test_opcheck():
    logits, mix, w = torch.randn(3, 37), torch.randn(2, 3, 37), torch.tensor([0.4, 0.6])
    params = (None, 0.7, None, 5, torch.full((3,), 0.9), 1.0, None, 0.0, torch.arange(3), 0, None, 2)
    torch.library.opcheck(torch.ops.me.sample.default, (logits, *params))
    torch.library.opcheck(torch.ops.me.me_step.default, (logits, w, *params, False))
    torch.library.opcheck(torch.ops.me.select_members.default, (w, torch.arange(3), 0, None, 1, 3))
    torch.library.opcheck(torch.ops.me.mixture_sample.default, (mix, w, *params))
    torch.library.opcheck(torch.ops.me.mixture_logprobs.default, (mix, w))
    target, draft = torch.randn(2, 3, 2, 37), torch.randn(3, 2, 37)
    tokens = torch.randint(0, 37, (3, 2))
    torch.library.opcheck(torch.ops.me.verify_draft.default, (target, draft, tokens, w, None, 2, *params))


VERIFY_SETTINGS = [dict(), dict(temperature=0.0), dict(temperature=0.7, top_p=0.8), dict(top_k=3), dict(min_p=0.2),
                   dict(temperature=float("inf"), top_k=5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 100, 1000])
def test_verify_draft_matches_reference(dtype, vocab):
    """Accept counts and residual tokens exactly the reference's, over many random draws: drafts
    mostly near the drafter's mode (long accepted runs), some out of range; NaN mixtures; per-row
    num_drafts; strided views."""
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(30):
        members, batch, span = (int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen)),
                                int(torch.randint(1, 5, (1,), generator=gen)))
        target = (torch.randn(members, batch, span, vocab + 3, generator=gen) * 3)[..., :vocab].to(dtype)
        draft = (target[trial % members].float() + 0.3 * torch.randn(batch, span, vocab, generator=gen)).to(dtype)
        tokens = torch.where(torch.rand(batch, span, generator=gen) < 0.8, draft.float().argmax(-1),
                             torch.randint(-1, vocab + 1, (batch, span), generator=gen))
        if trial % 7 == 0:
            target[0, 0, -1, 0] = NAN
        weights = torch.rand(members, generator=gen) + 0.1
        params = VERIFY_SETTINGS[trial % len(VERIFY_SETTINGS)]
        seed, offset = torch.randint(0, 1000, (batch,), generator=gen), torch.randint(0, 50, (batch,), generator=gen)
        drafts = torch.randint(0, span + 1, (batch,), generator=gen)
        want = R.verify_draft_reference(target, draft, tokens, weights, num_drafts=drafts, seed=seed, offset=offset,
                                        **params)
        got = torch.ops.me.verify_draft(target, draft, tokens, weights, drafts, 0,
                                        *op_args(seed=seed, offset=offset, **params))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (trial, params, got, want)
