"""me_kernels.mixture_logprobs: log sum_m wbar_m softmax(logits_m), the CE distribution."""
from __future__ import annotations

import os

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R
from me_kernels.mixture import _launch_logprobs

NEG, INF, NAN = float("-inf"), float("inf"), float("nan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixture_float64(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_m wbar_m softmax(l_m) in float64, straight from the definition."""
    l = logits.double()
    w = weights.double()
    w = (w[None, :].expand(l.shape[1], -1) if w.dim() == 1 else w)
    w = w / w.sum(dim=1, keepdim=True)
    probs = sum(w[:, m, None] * torch.softmax(l[m], dim=-1) for m in range(l.shape[0]))
    return torch.log(probs)


@pytest.mark.parametrize("shape", [(2, 3, 257), (3, 5, 1100), (1, 2, 40), (4, 1, 2050)])
def test_mixture_logprobs_matches_float64(kernel_device, shape):
    gen = _gen(1)
    m, b, v = shape
    logits = torch.randn(m, b, v, generator=gen) * 3
    for weights in (torch.rand(m, generator=gen) + 0.1, torch.rand(b, m, generator=gen) + 0.05):
        got = K.mixture_logprobs(logits.to(kernel_device), weights.to(kernel_device))
        assert got.dtype == torch.float32 and got.shape == (b, v)
        want = _mixture_float64(logits, weights)
        assert torch.allclose(got.cpu().double(), want, atol=2e-5, rtol=1e-5)
        assert torch.allclose(R.mixture_logprobs_reference(logits, weights).double(), want, atol=2e-5, rtol=1e-5)


def test_mixture_logprobs_special_members(kernel_device):
    d = kernel_device
    base = torch.randn(3, 6, 64, generator=_gen(2))
    base[1, 0, 5] = NAN          # row 0: NaN in a member of positive weight -> NaN row
    base[:, 1, :] = NEG          # row 1: every member all -inf -> NaN row
    base[0, 2, :] = NEG          # row 2: member 0 all -inf but weight 0 -> ignored
    base[2, 3, [3, 9]] = INF     # row 3: member 2 uniform over {3, 9}
    base[1, 4, 7] = NAN          # row 4: NaN in a zero-weight member -> ignored
    base[:, 5, 10:] = NEG        # row 5: tokens 10.. have probability 0 -> -inf
    w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0], [1.0, 0.0, 1.0],
                      [1.0, 2.0, 3.0]])
    got = K.mixture_logprobs(base.to(d), w.to(d)).cpu()
    want = R.mixture_logprobs_reference(base, w)
    assert torch.isnan(got[0]).all() and torch.isnan(got[1]).all()
    assert torch.isfinite(got[[2, 3, 4]]).all() and torch.isinf(got[5, 10:]).all()
    assert torch.allclose(got[2:], want[2:], atol=1e-5, equal_nan=True)
    # Row 3: member 2 (weight 1/2) puts 1/4 on each +inf entry.
    p3 = got[3].exp()
    assert abs(float(p3.sum()) - 1) < 1e-5 and float(p3[3]) > 0.25 and float(p3[9]) > 0.25
    # Bad device weights (not checked on the host for CUDA) give NaN rows; shown below the checks.
    bad_w = torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [NAN, 1.0, 1.0], [INF, 1.0, 1.0], [1.0, 1.0, 1.0],
                          [1.0, 1.0, 1.0]], device=d)
    out = _launch_logprobs(base.to(d), bad_w).cpu()
    assert torch.isnan(out[:4]).all() and torch.isfinite(out[5, :10]).all()


def test_mixture_logprobs_nan_beside_plus_inf(kernel_device):
    """A member row holding both NaN and +inf makes the row NaN (the NaN rule is not erased by
    the +inf remap), in the kernel and in the reference alike; +inf alone is still uniform."""
    l = torch.randn(2, 2, 16, generator=_gen(9))
    l[1, 0, 0] = NAN
    l[1, 0, 1] = INF
    l[0, 1, 3] = INF
    w = torch.tensor([0.5, 0.5])
    got = K.mixture_logprobs(l.to(kernel_device), w.to(kernel_device)).cpu()
    want = R.mixture_logprobs_reference(l, w)
    assert torch.isnan(got[0]).all() and torch.isnan(want[0]).all()
    assert torch.isfinite(want[1]).all() and torch.allclose(got[1], want[1], atol=1e-5)


def test_mixture_logprobs_is_batch_invariant_bitwise(kernel_device):
    # The per-member log-sum-exp is merged from per-chunk partials: the chunking must depend on
    # the vocabulary only, or a row's values change with the batch size (and the GPU's SM count).
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 8, 8000, generator=gen) * 6).to(kernel_device)
    w = torch.tensor([0.5, 0.3, 0.2], device=kernel_device)
    whole = K.mixture_logprobs(logits, w)
    alone = torch.cat([K.mixture_logprobs(logits[:, b : b + 1], w) for b in range(8)])
    assert torch.equal(whole, alone)


def test_mixture_logprobs_cpu_reference_path(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    l = torch.randn(2, 3, 112, generator=_gen(7))
    w = torch.tensor([0.3, 0.7])
    got, want = K.mixture_logprobs(l, w), R.mixture_logprobs_reference(l, w)
    if K.EXTENSION_LOADED:
        # The compiled CPU kernel: libm exp / its own summation order against torch's vectorised
        # ones, so agreement to fp32 rounding (tests/test_cpu_kernels.py checks it over the
        # special values too), not bit for bit.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)


LOGPROBS_ERRORS = [
    (lambda: K.mixture_logprobs(torch.zeros(2, 3, 5), torch.ones(3)), ValueError, "3 member weights"),
    (lambda: K.mixture_logprobs(torch.zeros(2, 3, 5), [1.0, float("nan")]), ValueError, "NaN"),
]


@pytest.mark.parametrize("call,exc,match", LOGPROBS_ERRORS, ids=[m for _, _, m in LOGPROBS_ERRORS])
def test_mixture_logprobs_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
