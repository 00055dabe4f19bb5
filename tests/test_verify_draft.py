"""me_kernels.verify_draft: speculative verification of drafted tokens against the CE mixture.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (`kernel_device` = cpu-interpret)
and on CUDA (`gpu`); they must return the reference's (num_accepted, token) on every row. The
interpreter costs tens of ms per (row, position), so the statistics (the emitted token follows
the mixture, the acceptance rate is sum_x min(q(x), p(x))) run on the CPU path of the registered
op (the torch reference, which draws the kernels' random numbers bit for bit).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import me_kernels as K
from me_kernels import reference as R
from me_kernels._validate import RowParam, RowParams
from me_kernels.verify import _launch_verify

from _sampling_testlib import chi2_check, exact_probs

NEG, INF, NAN = float("-inf"), float("inf"), float("nan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _inputs(m, b, j, v, gen, *, closeness=0.7):
    """Target logits [M, B, J, V] and drafter logits [B, J, V] that resemble member 0 (so runs of
    accepted drafts of every length occur)."""
    target = torch.randn(m, b, j, v, generator=gen) * 2.0
    draft = closeness * target[0] + (1 - closeness) * 2.0 * torch.randn(b, j, v, generator=gen)
    return target, draft


def _draw_drafts(draft, seed, offset, **params):
    """Drafts as the runtime makes them: position j from q_j with `sample`'s semantics at
    (seed, offset + j) (the torch reference: bit-identical to the kernel, cheap here)."""
    b, j, _ = draft.shape
    off = offset if isinstance(offset, torch.Tensor) else torch.full((b,), offset)
    cols = [R.sample_reference(draft[:, i], seed=seed, offset=off + i, **params) for i in range(j)]
    return torch.stack(cols, dim=1)


def _assert_verify_matches(got, target, draft, tokens, weights, **kw):
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want = R.verify_draft_reference(target.cpu(), draft.cpu(), tokens.cpu(), weights.cpu(), **cpu)
    n, tok = got[0].cpu(), got[1].cpu()
    assert n.dtype == torch.int64 and tok.dtype == torch.int64
    assert torch.equal(n, want[0]) and torch.equal(tok, want[1]), (
        f"kernel n={n.tolist()} token={tok.tolist()}; reference n={want[0].tolist()} token={want[1].tolist()}")
    return want


# --------------------------------------------------------------------------------------------
# Kernel == reference on fresh random inputs
# --------------------------------------------------------------------------------------------


def _per_row_params(b):
    """Every transform, per row: greedy, T = 0.7 with top-k + top-p, T = 1 with top-p + min-p,
    T = inf with top-k (uniform over the kept set), cycling over the rows."""
    table = [(0.0, 0, 1.0, 0.0), (0.7, 2, 0.9, 0.0), (1.0, 0, 0.8, 0.1), (INF, 3, 1.0, 0.0)]
    rows = [table[i % len(table)] for i in range(b)]
    return dict(temperature=torch.tensor([r[0] for r in rows]), top_k=torch.tensor([r[1] for r in rows]),
                top_p=torch.tensor([r[2] for r in rows]), min_p=torch.tensor([r[3] for r in rows]))


# (M, B, J, V, dtype, parameters): V = 1 / 7 / 1000 / 4099, J = 1..5, M = 1..3, B = 1..5.
CASES = {
    "V1": (1, 2, 1, 1, torch.float32, dict()),
    "V7-per-row": (2, 4, 3, 7, torch.float32, "per-row"),
    "V1000-topk-topp-T0.7": (3, 2, 3, 1000, torch.float32, dict(temperature=0.7, top_k=20, top_p=0.9)),
    "V4099-minp": (2, 2, 2, 4099, torch.float32, dict(min_p=0.05)),
    "V4099-topp": (1, 1, 2, 4099, torch.float32, dict(top_p=0.95)),
    "B5-J1-fp16-topp": (3, 5, 1, 64, torch.float16, dict(top_p=0.9, temperature=1.3)),
    "J5-bf16-topk": (2, 1, 5, 40, torch.bfloat16, dict(top_k=4)),
    "J4-greedy": (2, 3, 4, 33, torch.float32, dict(temperature=0.0)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference(kernel_device, case):
    m, b, j, v, dtype, params = CASES[case]
    gen = _gen(len(case) * 7 + v)
    target, draft = _inputs(m, b, j, v, gen)
    target, draft = target.to(dtype), draft.to(dtype)
    if params == "per-row":
        params = _per_row_params(b)
    weights = torch.rand(b, m, generator=gen) + 0.05 if b % 2 else torch.rand(m, generator=gen) + 0.05
    seeds = torch.randint(0, 2**62, (b,), generator=gen)
    offsets = torch.randint(0, 2**40, (b,), generator=gen)
    tokens = _draw_drafts(draft.float(), seeds, offsets, **params)
    # A few drafts that q did not propose (the runtime never sends them, the semantics cover
    # them): any id, and ids outside [0, V).
    tokens[0, -1] = int(torch.randint(0, v, (1,), generator=gen))
    if b > 1:
        tokens[1, 0] = v if j % 2 else -1
    num_drafts = torch.randint(0, j + 1, (b,), generator=gen) if b > 2 else None
    kw = dict(num_drafts=num_drafts, seed=seeds, offset=offsets, **params)
    got = K.verify_draft(*_on(kernel_device, target, draft, tokens, weights),
                         **{k: _on(kernel_device, x)[0] for k, x in kw.items()})
    _assert_verify_matches(got, target, draft, tokens, weights, **kw)


def test_kernel_ties_at_the_top_k_boundary(kernel_device):
    """Integer logits with columns duplicated in every member: the mixture and the drafter tie
    at the k-th value, and the whole tie class is kept (p and q alike)."""
    gen = _gen(11)
    m, b, j, v = 2, 2, 3, 24
    target = torch.randint(-4, 3, (m, b, j, v), generator=gen).float()
    target[..., 5] = target[..., 3]
    target[..., 9] = target[..., 3]
    draft = torch.randint(-4, 3, (b, j, v), generator=gen).float()
    weights = torch.tensor([0.4, 0.6])
    seeds = torch.tensor([3, 4])
    for params in (dict(top_k=2), dict(top_k=3, top_p=0.7, temperature=0.8)):
        tokens = _draw_drafts(draft, seeds, 10, **params)
        got = K.verify_draft(*_on(kernel_device, target, draft, tokens, weights), seed=seeds.to(kernel_device),
                             offset=10, **params)
        _assert_verify_matches(got, target, draft, tokens, weights, seed=seeds, offset=10, **params)


def test_kernel_special_rows(kernel_device):
    """NaN / -inf / +inf rows in the targets and the drafter, an out-of-range id, a row failing
    at a position it reaches, no drafts."""
    gen = _gen(12)
    m, b, j, v = 2, 6, 3, 48
    target, draft = _inputs(m, b, j, v, gen)
    weights = torch.tensor([0.5, 0.5])
    seeds = torch.arange(b) + 100
    # row 5 drafts from the mixture itself at positions 0 and 1 (q = p: both accepted), then
    # reaches an undefined mixture at position 2, which fails the row -> (0, -1)
    draft[5, :2] = R.mixture_logprobs_reference(target[:, 5, :2], weights)
    tokens = _draw_drafts(draft, seeds, 0, top_p=0.95)
    target[0, 5, 2, :] = NAN
    target[0, 0, 0, 5] = NAN          # row 0: the mixture at position 0 is undefined -> (0, -1)
    target[1, 1, 0, :] = NEG          # row 1: a member with no finite logit at position 0 -> (0, -1)
    draft[2, 0, :] = NAN              # row 2: invalid drafter row: q = 0, rejected, residual ~ p
    tokens[3, 0] = -1                 # row 3: out-of-range id: rejected at 0, residual ~ p
    target[1, 4, 0, [7, 8]] = INF     # row 4: member 1 is uniform over {7, 8}; the drafter is sure
    draft[4, 0, 7] = INF              #        of 7 (q one-hot), accepted with prob. p(7) ~ 0.25
    tokens[4, 0] = 7
    num_drafts = torch.tensor([3, 3, 3, 3, 3, 3])
    got = K.verify_draft(*_on(kernel_device, target, draft, tokens, weights), num_drafts=num_drafts.to(kernel_device),
                         seed=seeds.to(kernel_device), top_p=0.95)
    want = _assert_verify_matches(got, target, draft, tokens, weights, num_drafts=num_drafts, seed=seeds, top_p=0.95)
    n, tok = want[0].tolist(), want[1].tolist()
    assert (n[0], tok[0]) == (0, -1) and (n[1], tok[1]) == (0, -1) and (n[5], tok[5]) == (0, -1)
    assert n[2] == 0 and 0 <= tok[2] < v and n[3] == 0 and 0 <= tok[3] < v
    # row 4 (these seeds reject the 7): q is one-hot at 7, so the residual max(0, p - q) has no 7
    assert n[4] == 0 and 0 <= tok[4] < v and tok[4] != 7
    # row 5 without its last position: both drafts accepted, nothing to correct
    two = K.verify_draft(*_on(kernel_device, target[:, 5:, :2], draft[5:, :2], tokens[5:, :2], weights),
                         seed=int(seeds[5]), top_p=0.95)
    assert (int(two[0]), int(two[1])) == (2, -1)
    # no drafts: nothing to verify, nothing emitted
    none = K.verify_draft(*_on(kernel_device, target, draft, tokens, weights), num_drafts=0, seed=1)
    assert none[0].tolist() == [0] * b and none[1].tolist() == [-1] * b


def test_kernel_strided_low_precision_views(kernel_device):
    """Non-contiguous views of every input (B and J not mergeable), bf16 targets, fp16 drafter,
    int32 draft ids: read in place, same result as contiguous copies and as the reference."""
    gen = _gen(13)
    m, b, j, v = 2, 3, 2, 100
    full = (torch.randn(m, b, 2 * j, v + 3, generator=gen) * 2).bfloat16()
    target = full[:, :, ::2, 1:v + 1]
    draft = (torch.randn(j, b, v, generator=gen) * 2).half().transpose(0, 1)
    seeds = torch.arange(b) * 5
    tokens = _draw_drafts(draft.float(), seeds, 3, top_p=0.9).to(torch.int32).t().contiguous().t()
    assert not target.is_contiguous() and not draft.is_contiguous() and not tokens.is_contiguous()
    weights = torch.tensor([1.0, 3.0])
    args = _on(kernel_device, target, draft, tokens, weights)
    got = K.verify_draft(*args, seed=seeds.to(kernel_device), offset=3, top_p=0.9)
    _assert_verify_matches(got, target, draft, tokens, weights, seed=seeds, offset=3, top_p=0.9)
    again = K.verify_draft(*[a.contiguous() for a in args], seed=seeds.to(kernel_device), offset=3, top_p=0.9)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])


def test_kernel_batch_and_offset_invariance(kernel_device):
    """A position's outcome depends only on its own inputs and (seed, offset + j): a row verified
    alone, or its drafts verified from the second position at offset + 1, agrees."""
    gen = _gen(14)
    m, b, j, v = 2, 4, 3, 20
    target, draft = _inputs(m, b, j, v, gen, closeness=0.95)
    seeds = torch.arange(b) + 7
    tokens = _draw_drafts(draft, seeds, 50, top_k=8)
    w = torch.tensor([0.7, 0.3])
    d = kernel_device
    n, tok = K.verify_draft(*_on(d, target, draft, tokens, w), seed=seeds.to(d), offset=50, top_k=8)
    _assert_verify_matches((n, tok), target, draft, tokens, w, seed=seeds, offset=50, top_k=8)
    alone = K.verify_draft(*_on(d, target[:, 2:3], draft[2:3], tokens[2:3], w), seed=int(seeds[2]), offset=50, top_k=8)
    assert (int(alone[0]), int(alone[1])) == (int(n[2]), int(tok[2]))
    n1, tok1 = K.verify_draft(*_on(d, target[:, :, 1:], draft[:, 1:], tokens[:, 1:], w), seed=seeds.to(d), offset=51,
                              top_k=8)
    first_accepted = n.cpu() >= 1
    assert first_accepted.any()
    assert torch.equal(n1.cpu()[first_accepted], n.cpu()[first_accepted] - 1)
    assert torch.equal(tok1.cpu()[first_accepted], tok.cpu()[first_accepted])


def test_kernel_greedy_emits_the_mixture_argmax(kernel_device):
    """Temperature 0: a draft is accepted iff it is the mixture's argmax, and the token emitted
    after the accepted run is the mixture's argmax (so the output equals greedy CE)."""
    gen = _gen(15)
    m, b, j, v = 3, 4, 3, 30
    target, draft = _inputs(m, b, j, v, gen)
    w = torch.tensor([0.2, 0.5, 0.3])
    best = R.mixture_logprobs_reference(target.reshape(m, b * j, v), w).argmax(dim=1).reshape(b, j)
    tokens = draft.argmax(dim=2)
    tokens[:2] = best[:2]  # rows 0 and 1 drafted the argmax everywhere
    tokens[1, 1] = (best[1, 1] + 1) % v
    n, tok = K.verify_draft(*_on(kernel_device, target, draft, tokens, w), temperature=0.0, seed=3)
    n, tok = n.cpu(), tok.cpu()
    _assert_verify_matches((n, tok), target, draft, tokens, w, temperature=0.0, seed=3)
    assert n[0] == j and tok[0] == -1 and n[1] == 1 and tok[1] == best[1, 1]
    for r in range(b):
        k = int(n[r])
        assert torch.equal(tokens[r, :k], best[r, :k])
        if k < j:
            assert tokens[r, k] != best[r, k] and tok[r] == best[r, k]


def test_bad_device_parameters_fail_their_rows(kernel_device):
    """Device parameter tensors are not read on the host: a row with an out-of-range value gives
    (0, -1); device num_drafts outside [0, J] are clamped (as in the reference)."""
    d = kernel_device
    gen = _gen(16)
    target, draft = _inputs(2, 5, 2, 16, gen)
    tokens = _draw_drafts(draft, torch.arange(5), 0)
    w = torch.tensor([0.5, 0.5], device=d)

    def rp(values, dtype):
        return RowParam(torch.tensor(values, dtype=dtype, device=d), 0)

    rows = RowParams(temperature=rp([1.0, -1.0, 1.0, 1.0, 1.0], torch.float32), top_k=rp([0, 0, -3, 0, 0], torch.int32),
                     top_p=rp([1.0, 1.0, 1.0, 0.0, 1.0], torch.float32),
                     min_p=rp([0.0, 0.0, 0.0, 0.0, 2.0], torch.float32),
                     seed=RowParam(torch.arange(5, device=d), 0), offset=RowParam(None, 0))
    n, tok = _launch_verify(*_on(d, target, draft, tokens), w, RowParam(torch.tensor([2, 2, 2, 2, 2], device=d), 2),
                            rows)
    assert n.tolist()[1:] == [0] * 4 and tok.tolist()[1:] == [-1] * 4
    _assert_verify_matches((n[:1], tok[:1]), target[:, :1], draft[:1], tokens[:1], w, seed=torch.arange(1))
    good = RowParams(temperature=RowParam(None, 1.0), top_k=RowParam(None, 0), top_p=RowParam(None, 1.0),
                     min_p=RowParam(None, 0.0), seed=RowParam(torch.arange(5, device=d), 0), offset=RowParam(None, 0))
    nd = torch.tensor([-2, 0, 1, 2, 9])
    got = _launch_verify(*_on(d, target, draft, tokens), w, RowParam(nd.to(d), 2), good)
    _assert_verify_matches(got, target, draft, tokens, w, num_drafts=nd, seed=torch.arange(5))


def test_kernel_empty_batch_and_no_positions(kernel_device):
    d = kernel_device
    w = torch.ones(2, device=d)
    n, tok = K.verify_draft(torch.zeros(2, 0, 3, 9, device=d), torch.zeros(0, 3, 9, device=d),
                            torch.zeros(0, 3, dtype=torch.int64, device=d), w)
    assert n.shape == (0,) and tok.shape == (0,)
    n, tok = K.verify_draft(torch.zeros(2, 3, 0, 9, device=d), torch.zeros(3, 0, 9, device=d),
                            torch.zeros(3, 0, dtype=torch.int64, device=d), w)
    assert n.tolist() == [0, 0, 0] and tok.tolist() == [-1, -1, -1]


# --------------------------------------------------------------------------------------------
# The CPU op path and torch.compile
# --------------------------------------------------------------------------------------------


def test_cpu_op_matches_reference(monkeypatch):
    """Without TRITON_INTERPRET=1 CPU tensors run the registered op's CPU implementation (the
    reference with the compiled Philox helper when the extension is built)."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    gen = _gen(17)
    m, b, j, v = 3, 5, 4, 300
    target, draft = _inputs(m, b, j, v, gen)
    params = _per_row_params(b)
    seeds = torch.arange(b) * 11
    tokens = _draw_drafts(draft, seeds, 9, **params)
    w = torch.rand(b, m, generator=gen) + 0.1
    nd = torch.tensor([4, 3, 0, 1, 4])
    got = K.verify_draft(target, draft, tokens, w, num_drafts=nd, seed=seeds, offset=9, **params)
    want = _assert_verify_matches(got, target, draft, tokens, w, num_drafts=nd, seed=seeds, offset=9, **params)
    rows = RowParams(**{k: RowParam(params[k].to(torch.int32 if k == "top_k" else torch.float32), 0) for k in params},
                     seed=RowParam(seeds, 0), offset=RowParam(None, 9))
    direct = torch.ops.me.verify_draft(target, draft, tokens, w, nd, 0, *rows.flat())
    assert torch.equal(direct[0], want[0]) and torch.equal(direct[1], want[1])


@pytest.mark.parametrize("target_dtype,draft_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                                      (torch.bfloat16, torch.float16)], ids=str)
def test_cpu_op_drafter_dtype_may_differ(target_dtype, draft_dtype, monkeypatch):
    """Regression (found by tests/test_fuzz_kernels.py): the compiled CPU op raised TypeError
    ("draft_logits dtype must equal target_logits dtype") for a drafter whose logits have another
    dtype than the members', which the public contract (and the Triton kernels) allow."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    gen = _gen(23)
    target, draft = _inputs(2, 3, 2, 40, gen)
    target, draft = target.to(target_dtype), draft.to(draft_dtype)
    seeds = torch.arange(3) * 5
    tokens = _draw_drafts(draft.float(), seeds, 4, top_p=0.9)
    w = torch.tensor([0.3, 0.7])
    got = K.verify_draft(target, draft, tokens, w, top_p=0.9, seed=seeds, offset=4)
    _assert_verify_matches(got, target, draft, tokens, w, top_p=0.9, seed=seeds, offset=4)
    # the minimal failing input of the fuzzer: one member, one row, one position, V = 1
    one = torch.ops.me.verify_draft(torch.full((1, 1, 1, 1), 4.623), torch.full((1, 1, 1), 4.625).to(torch.bfloat16),
                                    torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0.5]), None, 1,
                                    None, 0.0, None, 0, None, 1.0, None, 0.0, None, 0, None, 0)
    assert one[0].tolist() == [1] and one[1].tolist() == [-1]


def test_torch_compile_traces_the_op(kernel_device):
    gen = _gen(18)
    target, draft = _inputs(2, 3, 2, 64, gen)
    seeds = torch.arange(3)
    tokens = _draw_drafts(draft, seeds, 4, top_p=0.9)
    w = torch.tensor([0.5, 0.5])
    args = _on(kernel_device, target, draft, tokens, w, seeds)

    def step(t, d, x, weights, s):
        n, tok = K.verify_draft(t, d, x, weights, top_p=0.9, seed=s, offset=4)
        return n + 0, tok + 0

    backend = "aot_eager" if kernel_device.type == "cpu" else "inductor"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(*args)
    _assert_verify_matches(got, target, draft, tokens, w, top_p=0.9, seed=seeds, offset=4)


# --------------------------------------------------------------------------------------------
# Statistics of the semantics (CPU op path: the reference, many draws)
# --------------------------------------------------------------------------------------------

STAT_ROW_P = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -2.0], [-1.0, 0.0, 2.5, 1.0, 0.2, 0.0]])  # 2 members
STAT_ROW_Q = torch.tensor([0.0, 2.0, 1.0, 1.5, -1.0, 0.3])  # a drafter unlike the mixture
STAT_W = torch.tensor([0.7, 0.3])
STAT_CONFIGS = [dict(), dict(temperature=0.7, top_p=0.8), dict(top_k=3, min_p=0.1), dict(temperature=1.5, top_k=4),
                dict(temperature=INF, top_p=0.6)]


def _exact_pq(params):
    members = STAT_ROW_P.double()
    mix = torch.log(0.7 * torch.softmax(members[0], -1) + 0.3 * torch.softmax(members[1], -1))
    return exact_probs(mix.tolist(), **params), exact_probs(STAT_ROW_Q.tolist(), **params)


def _one_step(n, params, monkeypatch, seed0=0):
    """n independent requests (J = 1): draft x ~ q with me_kernels.sample, then verify."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")  # the CPU op path
    seeds = torch.arange(n) + seed0
    q_rows = STAT_ROW_Q.expand(n, -1)
    x = K.sample(q_rows, seed=seeds, offset=21, **params)
    target = STAT_ROW_P[:, None, None, :].expand(-1, n, 1, -1)
    acc, tok = K.verify_draft(target, q_rows[:, None, :], x[:, None], STAT_W, seed=seeds, offset=21, **params)
    return x, acc, tok


def _config_id(params):
    return ",".join(f"{k}={v}" for k, v in params.items()) or "plain"


@pytest.mark.parametrize("params", STAT_CONFIGS, ids=_config_id)
def test_emitted_token_follows_the_mixture(params, monkeypatch):
    """(a) Draft from q, verify: the emitted token (the draft if accepted, else the residual)
    follows p exactly, for p != q under every transform."""
    p, q = _exact_pq(params)
    assert np.abs(p - q).sum() > 0.1
    x, acc, tok = _one_step(30000, params, monkeypatch)
    emitted = torch.where(acc == 1, x, tok)
    assert ((acc == 1) == (tok == -1)).all()
    chi2_check(emitted, p, f"emitted {params}")
    # the residual alone follows normalise(max(0, p - q))
    r = np.maximum(p - q, 0.0)
    chi2_check(tok[acc == 0], r / r.sum(), f"residual {params}")


@pytest.mark.parametrize("params", STAT_CONFIGS[:3], ids=_config_id)
def test_acceptance_rate_matches_enumeration(params, monkeypatch):
    """(c) P(accept) = sum_x q(x) min(1, p(x) / q(x)) = sum_x min(p(x), q(x)), exactly
    enumerated (float64), against the empirical rate within a binomial bound; and per drafted
    token, P(accept | x) = min(1, p(x) / q(x))."""
    p, q = _exact_pq(params)
    want = float(np.minimum(p, q).sum())
    n = 30000
    x, acc, _ = _one_step(n, params, monkeypatch, seed0=10**6)
    rate = float(acc.double().mean())
    sd = (want * (1 - want) / n) ** 0.5
    assert abs(rate - want) <= 5 * sd, (rate, want)
    for tok_id in range(p.size):
        drawn = x == tok_id
        k = int(drawn.sum())
        if k < 200:
            continue
        a = min(1.0, p[tok_id] / q[tok_id])
        got = float(acc[drawn].double().mean())
        assert abs(got - a) <= 5 * (a * (1 - a) / k) ** 0.5 + 1e-12, (tok_id, got, a)


def test_greedy_reference_emits_the_argmax(monkeypatch):
    """(b) on many random rows of the CPU op path: at temperature 0 the output is greedy CE."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    gen = _gen(19)
    m, b, j, v = 2, 400, 4, 12
    target, draft = _inputs(m, b, j, v, gen, closeness=0.9)
    w = torch.rand(b, m, generator=gen) + 0.1
    best = R.mixture_logprobs_reference(target.reshape(m, b * j, v), w.repeat_interleave(j, 0)).argmax(1).view(b, j)
    tokens = draft.argmax(dim=2)
    n, tok = K.verify_draft(target, draft, tokens, w, temperature=0.0, seed=torch.arange(b))
    steps = torch.arange(j)
    run = (tokens == best) | (steps[None, :] >= n[:, None])
    assert run.all()  # every accepted draft is the argmax
    stop = n < j
    assert torch.equal(tok[stop], best[stop].gather(1, n[stop, None])[:, 0])
    assert (tokens[stop].gather(1, n[stop, None])[:, 0] != tok[stop]).all()  # the stopping draft was wrong
    assert (tok[~stop] == -1).all() and 0 < int(stop.sum()) < b


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------


def _args(m=2, b=3, j=2, v=5):
    return torch.zeros(m, b, j, v), torch.zeros(b, j, v), torch.zeros(b, j, dtype=torch.int64), torch.ones(m)


ERRORS = [
    (lambda: K.verify_draft(torch.zeros(2, 3, 5), *_args()[1:]), ValueError, "target_logits must be 4-D"),
    (lambda: K.verify_draft([1.0], *_args()[1:]), TypeError, "target_logits must be a torch.Tensor"),
    (lambda: K.verify_draft(_args()[0].int(), *_args()[1:]), TypeError, "target_logits must be float32"),
    (lambda: K.verify_draft(torch.zeros(0, 3, 2, 5), *_args()[1:3], torch.ones(0)), ValueError, "at least one member"),
    (lambda: K.verify_draft(_args()[0], torch.zeros(3, 2, 6), *_args()[2:]), ValueError,
     r"draft_logits must have shape \[B, J, V\] = \[3, 2, 5\]"),
    (lambda: K.verify_draft(_args()[0], torch.zeros(3, 2, 5, dtype=torch.int64), *_args()[2:]), TypeError,
     "draft_logits must be float32"),
    (lambda: K.verify_draft(*_args()[:2], torch.zeros(3, 2), _args()[3]), TypeError, "draft_tokens must be an integer"),
    (lambda: K.verify_draft(*_args()[:2], torch.zeros(3, 3, dtype=torch.int64), _args()[3]), ValueError,
     r"draft_tokens must have shape \[B, J\] = \[3, 2\]"),
    (lambda: K.verify_draft(*_args()[:3], torch.ones(3)), ValueError, "3 member weights but there are 2"),
    (lambda: K.verify_draft(*_args()[:3], torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
    (lambda: K.verify_draft(*_args()[:3], torch.ones(4, 2)), ValueError, "has 4 rows but the batch has B=3"),
    (lambda: K.verify_draft(*_args(), num_drafts=3), ValueError,
     r"num_drafts = 3 is outside the allowed range \[0, 2\]"),
    (lambda: K.verify_draft(*_args(), num_drafts=torch.tensor([0, -1, 2])), ValueError, r"num_drafts\[1\] = -1"),
    (lambda: K.verify_draft(*_args(), num_drafts=torch.ones(3)), TypeError, "num_drafts must be an integer tensor"),
    (lambda: K.verify_draft(*_args(), num_drafts=1.0), TypeError, "num_drafts must be None, an int"),
    (lambda: K.verify_draft(*_args(), num_drafts=torch.ones(2, dtype=torch.int64)), ValueError,
     r"num_drafts must be a scalar or a tensor of shape \[B\] = \[3\]"),
    (lambda: K.verify_draft(*_args(), top_p=0.0), ValueError, "top_p"),
    (lambda: K.verify_draft(*_args(), temperature=-1.0), ValueError, "temperature"),
    (lambda: K.verify_draft(*_args(), top_k=torch.tensor([1, -1, 0])), ValueError, r"top_k\[1\] = -1"),
    (lambda: K.verify_draft(*_args(), seed=1.5), TypeError, "seed"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[m for _, _, m in ERRORS])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
def test_cuda_inputs_on_one_device():
    t, d, x, w = _args()
    with pytest.raises(ValueError, match="draft_logits is on cpu but target_logits is on cuda"):
        K.verify_draft(t.cuda(), d, x.cuda(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("params", STAT_CONFIGS[:2], ids=["plain", "T0.7-topp0.8"])
def test_cuda_kernel_emitted_token_follows_the_mixture(params):
    """(a) end to end on the kernel, with many draws."""
    p, _q = _exact_pq(params)
    n = 200000
    seeds = torch.arange(n, device="cuda")
    q_rows = STAT_ROW_Q.cuda().expand(n, -1)
    x = K.sample(q_rows, seed=seeds, offset=21, **params)
    target = STAT_ROW_P.cuda()[:, None, None, :].expand(-1, n, 1, -1)
    acc, tok = K.verify_draft(target, q_rows[:, None, :], x[:, None], STAT_W.cuda(), seed=seeds, offset=21, **params)
    chi2_check(torch.where(acc == 1, x, tok), p, f"cuda emitted {params}")


@pytest.mark.gpu
def test_cuda_large_vocabulary_matches_reference():
    gen = _gen(20)
    m, b, j, v = 3, 8, 5, 32000
    target, draft = _inputs(m, b, j, v, gen)
    seeds = torch.arange(b)
    for params in (dict(top_p=0.9), dict(temperature=0.7, top_k=50, top_p=0.9), dict(min_p=0.05), dict()):
        tokens = _draw_drafts(draft, seeds, 0, **params)
        got = K.verify_draft(*_on("cuda", target, draft, tokens, torch.tensor([0.5, 0.3, 0.2])), seed=seeds.cuda(),
                             **params)
        _assert_verify_matches(got, target, draft, tokens, torch.tensor([0.5, 0.3, 0.2]), seed=seeds, **params)
