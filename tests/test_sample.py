"""me_kernels.sample: semantics, statistics, kernel-vs-reference agreement, robustness, errors.

The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (`kernel_device` = cpu-interpret)
and on CUDA (`gpu`). The interpreter is slow (tens of ms per row), so most statistics run on the
torch reference, which draws bit-identical random numbers; the kernel is then required to return
the reference's token on every row (fp32 near-ties aside, see _sampling_testlib).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import me_kernels as K
from me_kernels import reference as R
from me_kernels._rows import block_config
from me_kernels.sampling import _launch_sample, sample_thresholds
from me_kernels._validate import RowParam, RowParams

from _sampling_testlib import assert_tokens_match, borderline_rows, chi2_check, exact_probs, llm_like_logits

NEG = float("-inf")
INF = float("inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Semantics of the reference (kept sets on hand-made rows, and against exact_probs)
# --------------------------------------------------------------------------------------------


def _kept(row, **params):
    return R.kept_mask_reference(torch.tensor([row], dtype=torch.float32), **params)[0].tolist()


def test_top_k_keeps_ties_of_the_kth_value():
    row = [1.0, 5.0, 3.0, 3.0, 0.0, 3.0]
    assert _kept(row, top_k=2) == [False, True, True, True, False, True]
    assert _kept(row, top_k=1) == [False, True, False, False, False, False]
    assert _kept(row, top_k=6) == [True] * 6 and _kept(row, top_k=100) == [True] * 6


def test_top_p_keeps_the_crossing_token_and_its_ties():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(p).tolist()
    assert _kept(row, top_p=0.5) == [True, False, False, False]
    assert _kept(row, top_p=0.6) == [True, True, False, False]  # 0.5 + 0.3 crosses 0.6
    assert _kept(row, top_p=0.81) == [True, True, True, False]
    tied = np.log([0.4, 0.2, 0.2, 0.2]).tolist()
    assert _kept(tied, top_p=0.5) == [True, True, True, True]  # the crossing value's ties are kept
    assert _kept(tied, top_p=0.4) == [True, False, False, False]


def test_min_p_and_order_of_transforms():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(p).tolist()
    assert _kept(row, min_p=0.61) == [True, False, False, False]  # 0.3 < 0.61 * 0.5
    assert _kept(row, min_p=0.29) == [True, True, True, False]  # 0.15 >= 0.29 * 0.5 > 0.05
    # top-p is computed on the top-k set: with k=2 the mass is renormalised over {0.5, 0.3}.
    assert _kept(row, top_k=2, top_p=0.7) == [True, True, False, False]
    assert _kept(row, top_k=3, top_p=0.6) == [True, True, False, False]
    # temperature 2 flattens to sqrt(p / p_max): 0.775, 0.548, 0.316.
    assert _kept(row, temperature=2.0, min_p=0.7) == [True, True, False, False]


ROW = [2.0, 1.0, 1.0, 0.5, -0.3, 3.1, -1.0, 0.2, 2.4, -2.0]
TRANSFORMS = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(top_k=3),
    dict(top_k=2, temperature=0.8),
    dict(top_p=0.7),
    dict(top_p=0.95, temperature=1.5),
    dict(min_p=0.15),
    dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05),
    dict(temperature=float("inf"), top_k=4),
]


@pytest.mark.parametrize("params", TRANSFORMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "plain")
def test_reference_chi_square(params):
    n = 30000
    probs = exact_probs(ROW, **params)
    assert np.array_equal(probs > 0, np.array(_kept(ROW, **params)))
    logits = torch.tensor([ROW], dtype=torch.float32).expand(n, -1)
    tokens = R.sample_reference(logits, seed=torch.arange(n) + 1000, offset=7, **params)
    chi2_check(tokens, probs, f"reference {params}")


def test_reference_plain_fast_path_equals_sorted_path():
    """Host-known scalars that switch top-k / top-p off skip the sort: same tokens."""
    x = torch.randn(40, 300, generator=_gen(12))
    x[3, 5], x[4, :] = INF, NEG
    zeros_k = torch.zeros(40, dtype=torch.int64)
    for params in (dict(), dict(temperature=0.0), dict(temperature=0.5, min_p=0.1)):
        fast = R.sample_reference(x, seed=torch.arange(40), **params)
        assert torch.equal(fast, R.sample_reference(x, top_k=zeros_k, seed=torch.arange(40), **params))


def test_reference_plus_inf_rows_are_uniform_over_inf_entries():
    n = 20000
    row = [0.0, INF, 5.0, INF, NEG, INF, 1e30]
    tokens = R.sample_reference(torch.tensor([row]).expand(n, -1), top_k=1, seed=torch.arange(n))
    chi2_check(tokens, exact_probs(row), "+inf row")
    assert R.sample_reference(torch.tensor([row]), temperature=0.0).item() == 1


# --------------------------------------------------------------------------------------------
# Kernel against the reference
# --------------------------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(temperature=0.0),
    dict(top_p=0.9),
    dict(top_p=0.5, temperature=0.6),
    dict(top_k=1),
    dict(top_k=40),
    dict(top_k=50, top_p=0.9, temperature=0.7),
    dict(min_p=0.05),
    dict(top_p=0.95, min_p=0.1, temperature=1.3),
    dict(top_k=5, min_p=0.3),
]


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "plain")
def test_kernel_matches_reference(kernel_device, params):
    gen = _gen(11)
    b, v = (12, 704) if kernel_device.type == "cpu" else (256, 32000)
    logits = torch.cat([llm_like_logits(b // 2, v, gen), torch.randn(b - b // 2, v, generator=gen) * 2])
    seeds = torch.randint(0, 2**62, (b,), generator=gen)
    got = K.sample(logits.to(kernel_device), seed=seeds.to(kernel_device), offset=3, **params)
    want = R.sample_reference(logits, seed=seeds, offset=3, **params)
    assert got.dtype == torch.int64 and got.shape == (b,)
    assert_tokens_match(got, want, logits, seed=seeds, offset=3, **params)


def _kept_from_thresholds(x, info, temperature, min_p):
    t_star = torch.maximum(info[:, 0], info[:, 1])
    m = x.max(dim=1).values
    e = torch.exp((x - m[:, None]) * (1.0 / torch.tensor(temperature, dtype=torch.float32)))
    return (x > NEG) & (x >= t_star[:, None]) & (e >= min_p)


DISTRIBUTIONS = ["llm", "flat", "ties", "bf16"]


def _rows(kind: str, b: int, v: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "llm":
        return llm_like_logits(b, v, gen)
    if kind == "flat":
        return torch.randn(b, v, generator=gen) * 0.3
    if kind == "ties":
        return torch.randint(-6, 3, (b, v), generator=gen).float()
    return (torch.randn(b, v, generator=gen) * 2).bfloat16().float()


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("cap", [16, None])
def test_kernel_thresholds_and_kept_sets_match_reference(kernel_device, kind, cap):
    """Exact kept-set equality. A small candidate capacity forces the bracket-refinement and
    band paths (and the single-value path on tied rows) that large vocabularies take."""
    gen = _gen(5)
    b, v = (6, 1504) if kernel_device.type == "cpu" else (64, 20000)
    x = _rows(kind, b, v, gen)
    for params in (dict(top_p=0.8, temperature=0.9), dict(top_k=37, top_p=0.95), dict(top_k=300, min_p=0.02)):
        seeds = torch.arange(b) * 31
        tokens, info = sample_thresholds(x.to(kernel_device), seed=seeds.to(kernel_device), cap=cap, **params)
        info = info.cpu()
        temp = params.get("temperature", 1.0)
        ref = R.sampling_thresholds_reference(x, torch.full((b,), temp), torch.full((b,), params.get("top_k", 0)),
                                              torch.full((b,), params.get("top_p", 1.0)),
                                              torch.full((b,), params.get("min_p", 0.0)))
        ok = ~borderline_rows(x, **params)
        assert ok.float().mean() >= 0.9
        assert torch.equal(info[ok, 0], ref["tau_k"][ok]), (kind, params, info[:, 0], ref["tau_k"])
        assert torch.equal(info[ok, 1], ref["tau_p"][ok]), (kind, params, info[:, 1], ref["tau_p"])
        kept = _kept_from_thresholds(x, info, temp, params.get("min_p", 0.0))
        assert torch.equal(kept[ok], ref["kept"][ok])
        assert_tokens_match(tokens, R.sample_reference(x, seed=seeds, **params), x, seed=seeds, **params)
        assert (info[:, 2] >= 2).all()


def test_kernel_chi_square(kernel_device):
    """End to end on the kernel itself (few draws under the interpreter; the reference tests
    above carry the statistical power there, and the kernel matches the reference row by row)."""
    n = 160 if kernel_device.type == "cpu" else 200000
    row = [1.0, 2.2, 0.3, 2.0, -1.0, 1.6, -3.0, 0.9]
    params = dict(temperature=0.8, top_k=5, top_p=0.9)
    logits = torch.tensor([row], device=kernel_device).expand(n, -1)
    tokens = K.sample(logits, seed=torch.arange(n, device=kernel_device) + 77, **params)
    chi2_check(tokens, exact_probs(row, **params), f"kernel {params}")
    plain = K.sample(logits[: n // 2 + 20], seed=torch.arange(n // 2 + 20, device=kernel_device) + 5)
    chi2_check(plain, exact_probs(row), "kernel plain")


def test_per_row_parameters_mixed_in_one_batch(kernel_device):
    gen = _gen(3)
    b, v = 10, 400
    x = llm_like_logits(b, v, gen)
    temp = torch.tensor([1.0, 0.0, 0.7, 1.0, 2.0, 0.5, 1.0, 0.0, 1.2, 0.9])
    top_k = torch.tensor([0, 0, 5, 0, 50, 1, 0, 3, 20, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.8, 0.9, 1.0, 1.0, 0.5, 0.7, 0.6])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.2, 0.0, 0.0, 0.1])
    seeds = torch.randint(0, 2**40, (b,), generator=gen)
    offsets = torch.randint(0, 1000, (b,), generator=gen)
    d = kernel_device
    got = K.sample(x.to(d), temperature=temp.to(d), top_k=top_k.to(d), top_p=top_p.to(d), min_p=min_p.to(d),
                   seed=seeds.to(d), offset=offsets.to(d)).cpu()
    want = R.sample_reference(x, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds, offset=offsets)
    assert_tokens_match(got, want, x, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds,
                        offset=offsets)
    for r in (0, 1, 4, 8):  # each row alone, with scalar parameters, gives the same token
        alone = K.sample(x[r:r + 1].to(d), temperature=float(temp[r]), top_k=int(top_k[r]), top_p=float(top_p[r]),
                         min_p=float(min_p[r]), seed=int(seeds[r]), offset=int(offsets[r]))
        assert int(alone) == int(got[r])


def test_batch_invariance(kernel_device):
    gen = _gen(9)
    v = 896
    target = llm_like_logits(1, v, gen)
    params = dict(top_p=0.9, temperature=0.8)
    alone = K.sample(target.to(kernel_device), seed=torch.tensor([42], device=kernel_device), offset=17, **params)
    for b, pos in ((5, 0), (8, 7), (6, 3)):
        batch = llm_like_logits(b, v, gen)
        batch[pos] = target[0]
        seeds = torch.randint(0, 1000, (b,), generator=gen)
        seeds[pos] = 42
        got = K.sample(batch.to(kernel_device), seed=seeds.to(kernel_device), offset=17, **params)
        assert int(got[pos]) == int(alone[0])


def test_seeds_are_deterministic_and_offsets_change_the_draw(kernel_device):
    gen = _gen(4)
    x = (torch.randn(16, 304, generator=gen) * 0.1).to(kernel_device)  # nearly uniform rows
    seeds = torch.arange(16, device=kernel_device)
    a = K.sample(x, seed=seeds, offset=5)
    assert torch.equal(a, K.sample(x, seed=seeds, offset=5))
    assert (a != K.sample(x, seed=seeds, offset=6)).sum() >= 12
    assert (a != K.sample(x, seed=seeds + 100, offset=5)).sum() >= 12
    # A Python int seed / offset is the same as the tensor holding it for every row (also 0-dim).
    one = K.sample(x, seed=7, offset=5)
    assert torch.equal(one, K.sample(x, seed=torch.full((16,), 7, device=kernel_device), offset=5))
    assert torch.equal(one, K.sample(x, seed=torch.tensor(7, device=kernel_device),
                                     offset=torch.tensor(5, device=kernel_device)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1 / 1e-45 in the interpreter
def test_greedy_lowest_index_on_ties(kernel_device):
    x = torch.tensor([
        [1.0, 3.0, 2.0, 3.0, 3.0],
        [NEG, 0.5, 0.5, NEG, 0.1],
        [2.0, 2.0, 2.0, 2.0, 2.0],
        [0.0, INF, 1.0, INF, 5.0],
        [-1e30, -1e30, -2e30, -1e30, NEG],
    ], device=kernel_device)
    want = [1, 1, 0, 1, 0]
    assert K.sample(x, temperature=0.0).tolist() == want
    assert K.sample(x, temperature=0.0, top_k=2, top_p=0.3, min_p=0.5, seed=9).tolist() == want
    assert K.sample(x, temperature=1e-45).tolist() == want  # 1 / T overflows: greedy too
    assert K.sample(x, top_k=1, seed=3).tolist()[:3] != [-1, -1, -1]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # +-3e38 rows in the interpreter
def test_special_rows(kernel_device):
    nan = float("nan")
    x = torch.tensor([
        [0.0, nan, 1.0, 2.0],       # NaN -> -1
        [NEG, NEG, NEG, NEG],       # no finite logit -> -1
        [NEG, NEG, 4.0, NEG],       # a single candidate
        [INF, 0.0, INF, 3.0],       # +inf entries: uniform among them
        [1e30, -1e30, 1e30, 0.0],   # huge finite values
        [3e38, -3e38, 1.0, 3e38],   # near the fp32 range
        [nan, nan, nan, nan],
        [-1e-30, 1e-30, 0.0, -0.0],  # tiny values and signed zeros
    ], device=kernel_device)
    for params in (dict(), dict(top_p=0.5), dict(top_k=1), dict(min_p=0.5), dict(temperature=0.3, top_k=2, top_p=0.9)):
        seeds = torch.arange(8, device=kernel_device) * 3
        got = K.sample(x, seed=seeds, **params).cpu()
        want = R.sample_reference(x.cpu(), seed=seeds.cpu(), **params)
        assert got[[0, 1, 6]].tolist() == [-1, -1, -1]
        assert int(got[2]) == 2 and int(got[3]) in (0, 2) and int(got[4]) in (0, 2) and int(got[5]) in (0, 3)
        assert_tokens_match(got, want, x.cpu(), seed=seeds.cpu(), **params)
    assert K.sample(torch.tensor([[1.5]], device=kernel_device), top_p=0.3).tolist() == [0]  # V = 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e30 rows in the interpreter
def test_plus_inf_draw_matches_reference(kernel_device):
    n = 64
    row = torch.tensor([[0.0, INF, 5.0, INF, NEG, INF, 1e30]])
    seeds = torch.arange(n)
    got = K.sample(row.expand(n, -1).to(kernel_device), top_p=0.6, seed=seeds.to(kernel_device))
    want = R.sample_reference(row.expand(n, -1), top_p=0.6, seed=seeds)
    assert torch.equal(got.cpu(), want) and set(got.tolist()) == {1, 3, 5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(kernel_device, dtype):
    gen = _gen(21)
    x = (llm_like_logits(8, 608, gen) * 1.5).to(dtype)
    seeds = torch.arange(8) + 3
    for params in (dict(top_p=0.85), dict(top_k=10, temperature=0.7), dict(temperature=0.0)):
        got = K.sample(x.to(kernel_device), seed=seeds.to(kernel_device), **params)
        assert_tokens_match(got, R.sample_reference(x, seed=seeds, **params), x, seed=seeds, **params)


def test_non_contiguous_logits(kernel_device):
    gen = _gen(8)
    b, seq, v = 4, 3, 528
    out = torch.randn(b, seq, v, generator=gen).to(kernel_device) * 2
    last = out[:, -1, :]  # row stride seq * V, read in place
    assert not last.is_contiguous()
    seeds = torch.arange(b, device=kernel_device)
    assert torch.equal(K.sample(last, top_p=0.9, seed=seeds), K.sample(last.contiguous(), top_p=0.9, seed=seeds))
    transposed = out[:, 0, :].t().contiguous().t()  # element stride B
    assert transposed.stride(1) != 1
    assert torch.equal(K.sample(transposed, top_k=20, seed=seeds),
                       K.sample(transposed.contiguous(), top_k=20, seed=seeds))


def test_large_vocabulary(kernel_device):
    gen = _gen(13)
    b, v = (2, 65536) if kernel_device.type == "cpu" else (32, 262144)
    x = llm_like_logits(b, v, gen, scale=2.0)
    seeds = torch.arange(b) + 1
    for params in (dict(top_p=0.9), dict(top_k=50, temperature=0.8)):
        got = K.sample(x.to(kernel_device), seed=seeds.to(kernel_device), **params)
        assert_tokens_match(got, R.sample_reference(x, seed=seeds, **params), x, seed=seeds, **params)


def test_bad_device_parameters_yield_minus_one(kernel_device):
    """CUDA parameter tensors are not read on the host; the kernel maps bad rows to -1 (here
    called below the host checks, which would raise for CPU tensors)."""
    d = kernel_device
    x = torch.randn(6, 48, generator=_gen(1)).to(d)

    def rp(values, dtype):
        return RowParam(torch.tensor(values, dtype=dtype, device=d), 0)

    tokens, _ = _launch_sample(x, RowParams(
        temperature=rp([1.0, -1.0, 1.0, 1.0, 1.0, float("nan")], torch.float32), top_k=rp([0, 0, -3, 0, 0, 0], torch.int32),
        top_p=rp([0.9, 0.9, 0.9, 0.0, 1.0, 0.9], torch.float32), min_p=rp([0.0, 0.0, 0.0, 0.0, 2.0, 0.0], torch.float32),
        seed=RowParam(None, 1), offset=RowParam(None, 0)))
    assert tokens.tolist()[1:] == [-1, -1, -1, -1, -1] and 0 <= int(tokens[0]) < 48


def test_cpu_reference_path(monkeypatch):
    """Without TRITON_INTERPRET=1, CPU tensors run the vectorised torch reference."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    x = llm_like_logits(5, 304, _gen(2))
    seeds = torch.arange(5)
    assert torch.equal(K.sample(x, top_p=0.8, seed=seeds), R.sample_reference(x, top_p=0.8, seed=seeds))


def test_torch_compile_traces_the_op(kernel_device):
    x = llm_like_logits(3, 256, _gen(6)).to(kernel_device)
    seeds = torch.arange(3, device=kernel_device)

    def step(logits, s):
        return K.sample(logits, top_p=0.9, seed=s, offset=2) + 1

    backend = "aot_eager" if kernel_device.type == "cpu" else "inductor"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x, seeds), step(x, seeds))


def test_block_config():
    gpu_classes = set()
    for v in (1, 3, 17, 1000, 2048, 16383, 16384, 131072, 262144):
        for interpreted in (False, True):
            cfg = block_config(v, interpreted=interpreted)
            assert cfg["SUB"] % 4 == 0 and cfg["CAP"] & (cfg["CAP"] - 1) == 0 and cfg["NSUB"] * 32 >= cfg["SUB"] // 4
        gpu_classes.add(tuple(sorted(block_config(v).items())))
    assert len(gpu_classes) == 3  # few compilations on a fresh GPU machine
    with pytest.raises(ValueError, match="cap"):
        block_config(100, cap=12)


# --------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------

X = torch.zeros(2, 5)
BAD_CALLS = [
    (lambda: K.sample([[1.0]]), TypeError, "logits must be a torch.Tensor"),
    (lambda: K.sample(torch.zeros(5)), ValueError, "logits must be 2-D"),
    (lambda: K.sample(torch.zeros(2, 5, dtype=torch.float64)), TypeError, "float32, bfloat16 or float16"),
    (lambda: K.sample(torch.zeros(2, 0)), ValueError, "vocabulary size"),
    (lambda: K.sample(X, temperature=-0.5), ValueError, r"temperature must be in \[0, inf\]"),
    (lambda: K.sample(X, temperature=float("nan")), ValueError, "temperature"),
    (lambda: K.sample(X, temperature="hot"), TypeError, "temperature must be a float"),
    (lambda: K.sample(X, top_k=-1), ValueError, "top_k"),
    (lambda: K.sample(X, top_k=2.5), TypeError, "top_k must be an int"),
    (lambda: K.sample(X, top_k=True), TypeError, "top_k must be an int"),
    (lambda: K.sample(X, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (lambda: K.sample(X, top_p=1.5), ValueError, "top_p"),
    (lambda: K.sample(X, top_p=float("nan")), ValueError, "top_p"),
    (lambda: K.sample(X, min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
    (lambda: K.sample(X, min_p=1.01), ValueError, "min_p"),
    (lambda: K.sample(X, seed=1.5), TypeError, "seed must be an int"),
    (lambda: K.sample(X, seed=2**64), ValueError, "seed must be a 64-bit integer"),
    (lambda: K.sample(X, offset=-2**63 - 1), ValueError, "offset"),
    (lambda: K.sample(X, temperature=torch.ones(3)), ValueError, r"temperature must be a scalar or a tensor of shape \[B\]"),
    (lambda: K.sample(X, top_p=torch.tensor([0.5, 0.0])), ValueError, r"top_p\[1\] = 0.0 is outside"),
    (lambda: K.sample(X, top_k=torch.tensor([1, -2])), ValueError, r"top_k\[1\] = -2"),
    (lambda: K.sample(X, top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must be an integer tensor"),
    (lambda: K.sample(X, temperature=torch.tensor([1, 2])), TypeError, "temperature must be a float tensor"),
    (lambda: K.sample(X, min_p=torch.tensor([0.1, float("nan")])), ValueError, "min_p"),
    (lambda: K.sample(X, seed=torch.tensor([1.0, 2.0])), TypeError, "seed must be an int64 tensor"),
    (lambda: K.sample(X, offset=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "offset must be a scalar"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_wrong_device_parameter():
    x = torch.zeros(2, 5, device="cuda")
    with pytest.raises(ValueError, match="top_p is on cpu"):
        K.sample(x, top_p=torch.tensor([0.5, 0.5]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_batch_matches_reference(dtype):
    gen = _gen(17)
    x = llm_like_logits(256, 152064, gen).to(dtype)
    seeds = torch.randint(0, 2**62, (256,), generator=gen)
    for params in (dict(top_p=0.9), dict(top_k=50, top_p=0.9, temperature=0.7), dict(min_p=0.05), dict()):
        got = K.sample(x.cuda(), seed=seeds.cuda(), offset=11, **params)
        want = R.sample_reference(x.cuda(), seed=seeds.cuda(), offset=11, **params)
        assert_tokens_match(got, want, x, seed=seeds, offset=11, **params)


F32_MAX = float(torch.finfo(torch.float32).max)


def _sample_paths(kernel_device, monkeypatch):
    """(name, sample function) for the Triton kernel on `kernel_device` and the CPU path (the
    compiled C++ kernel when the extension is built)."""
    def triton_path(x, **kw):
        kw = {k: (v.to(kernel_device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return K.sample(x.to(kernel_device), **kw).cpu()

    def cpu_path(x, **kw):
        with monkeypatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            return K.sample(x, **kw)

    return [("kernel", triton_path), ("cpu", cpu_path)]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # +-3.4e38 rows in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_infinite_temperature_is_uniform_even_beside_huge_logits(kernel_device, monkeypatch):
    """Regression (found by tests/test_fuzz_kernels.py): the reference replaced T = inf by the
    largest finite float (torch.nan_to_num also maps inf), so on a row holding fp32's largest
    logit the other token weighed exp(-1) instead of 1 and the reference disagreed with both
    kernels. At T = inf every finite token weighs 1: the draw is the argmax of the Gumbel noise."""
    from me_kernels._philox import STREAM_TOKEN, gumbel_torch

    n = 64
    x = torch.tensor([[F32_MAX, -0.88029]]).expand(n, -1)
    seeds = torch.arange(n)
    noise_argmax = gumbel_torch(seeds, torch.zeros(n, dtype=torch.int64), STREAM_TOKEN, 2).argmax(1)
    want = R.sample_reference(x, temperature=INF, seed=seeds)
    assert torch.equal(want, noise_argmax) and set(want.tolist()) == {0, 1}
    for name, sample in _sample_paths(kernel_device, monkeypatch):
        assert torch.equal(sample(x, temperature=INF, seed=seeds), want), name
    # the fuzzer's minimal input: seed 1 draws token 1
    assert R.sample_reference(x[:1], temperature=INF, seed=1).tolist() == [1]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # +-3.4e38 rows in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_infinite_temperature_top_p_on_a_row_wider_than_the_fp32_range(kernel_device, monkeypatch):
    """Regression (found by tests/test_fuzz_kernels.py): at T = inf on a row holding both +-3.4e38,
    x - m overflows to -inf for the lowest logit and (-inf) * 0 is NaN. Both kernels summed that
    NaN into the top-p mass, which switched top-p off (any finite token could come out). Such a
    token weighs 0 (me_kernels.reference), and top-p applies to the others: each weighs 1."""
    n = 32
    x = torch.tensor([[5.559, -F32_MAX, -0.47314, 4.331, 0.79815, 0.49937, F32_MAX]]).expand(n, -1)
    seeds = torch.arange(n)
    for top_p, allowed in ((1e-7, {6}), (0.5, {0, 3, 6})):  # the top 1 / top 3 of 6 equal weights
        want = R.sample_reference(x, temperature=INF, top_p=top_p, seed=seeds)
        assert set(want.tolist()) == allowed
        for name, sample in _sample_paths(kernel_device, monkeypatch):
            assert torch.equal(sample(x, temperature=INF, top_p=top_p, seed=seeds), want), (name, top_p)
    # top-p off: every token but the overflowing one can be drawn
    want = R.sample_reference(x, temperature=INF, seed=seeds)
    assert 1 not in want.tolist() and len(set(want.tolist())) > 3


def test_top_p_threshold_when_even_the_smallest_candidate_misses_by_rounding(kernel_device):
    # top_p just below 1 on log-softmax rows whose two smallest values are adjacent floats: the
    # candidates' re-summed mass can fall an ulp short of the target. The threshold must then be
    # the smallest candidate (keep the whole band), never a made-up value such as 0.0, and no valid
    # row may come back -1.
    from me_kernels.sampling import sample_thresholds

    gen = torch.Generator().manual_seed(1)
    rows, vocab = 200, 60
    x = torch.randn(rows, vocab, generator=gen) * 3
    x[:, 0] = x.min(1).values - 1.0
    x = torch.log_softmax(x, 1)
    x[:, 1] = torch.nextafter(x[:, 0], torch.zeros(rows))
    top_p = float(torch.tensor(1.0 - 2**-24, dtype=torch.float32))
    tokens, info = sample_thresholds(x.to(kernel_device), top_p=top_p, temperature=0.5, seed=torch.arange(rows).to(kernel_device))
    tokens, tau_p = tokens.cpu(), info[:, 1].cpu()
    assert int((tokens < 0).sum()) == 0
    assert not bool((tau_p == 0.0).any())
    # every threshold is one of the row's own values
    assert bool(((x == tau_p[:, None]) | torch.isinf(tau_p)[:, None]).any(1).all())


@pytest.mark.gpu
def test_kernels_launch_on_the_tensors_device():
    # Triton launches on the current device: the launchers must switch to the tensors' GPU.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    logits = torch.randn(4, 1000, device="cuda:1")
    w = torch.tensor([0.5, 0.5], device="cuda:1")
    seeds = torch.arange(4, device="cuda:1")
    with torch.cuda.device(0):
        tokens, members = K.me_step(logits, w, top_p=0.9, seed=seeds, offset=1)
        mixed = K.mixture_sample(torch.stack([logits, logits]), w, seed=seeds, offset=1)
    assert tokens.device == members.device == mixed.device == logits.device
    ref = K.sample(logits.cpu(), top_p=0.9, seed=seeds.cpu(), offset=1)
    assert tokens.cpu().tolist() == ref.tolist()
