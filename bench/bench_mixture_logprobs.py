"""Microbenchmark of me_kernels.mixture_logprobs, the CE distribution (pytest-benchmark).

Each case times one implementation on one (B, V, dtype) with M = 3 members:
    me_kernels  the Triton kernels (per-chunk partials, then the log-sum-exp over members)
    reference   the torch reference (me_kernels.reference.mixture_logprobs_reference), on the GPU
    torch       log of the weighted sum of the members' softmaxes (fp32)
for B in {1, 8, 64}, V in {32000, 152064}, fp32 and bf16. Timing and the recorded keys:
bench/_benchlib.py (`measure`); the floor counts the logits read twice (partials, then values)
plus the fp32 [B, V] output written.

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import DTYPES, MIXTURE_MEMBERS, Rotation, case_id, copy_bandwidth, cuda, measure, rotating_logits  # noqa: F401

CASES = [("plain", b, v, dt) for dt in DTYPES for v in (32000, 152064) for b in (1, 8, 64)]
LOGPROB_IMPLS = ["me_kernels", "reference", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mixture_logprobs(benchmark, cuda, copy_bandwidth, case, impl):
    _cfg, b, v, dt = case
    inputs, nbytes = rotating_logits((MIXTURE_MEMBERS, b, v), dt, "cuda")
    rot = Rotation(inputs)
    weights = torch.tensor([0.5, 0.3, 0.2], device=cuda)
    benchmark.group = f"mixture_logprobs-M{MIXTURE_MEMBERS}-B{b}-V{v}-{dt}"
    info = dict(op="mixture_logprobs", M=MIXTURE_MEMBERS, B=b, V=v, dtype=dt, impl=impl)
    if impl == "me_kernels":
        def fn():
            return K.mixture_logprobs(rot.next(), weights)
    elif impl == "reference":
        def fn():
            return R.mixture_logprobs_reference(rot.next(), weights)
    else:
        w = (weights / weights.sum())[:, None, None]

        def fn():
            return torch.log((w * torch.softmax(rot.next().to(torch.float32), dim=-1)).sum(dim=0))
    measure(benchmark, fn, 2 * nbytes + b * v * 4, copy_bandwidth, **info)


def test_mixture_logprobs_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 4, 128, generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2])
    out = benchmark.pedantic(lambda: K.mixture_logprobs(mix, w), rounds=2, iterations=1)
    assert out.shape == (4, 128)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(4), atol=1e-5)
    benchmark.extra_info.update(op="smoke", device="cpu")
