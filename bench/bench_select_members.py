"""Microbenchmark of me_kernels.select_members, the per-row member draw (pytest-benchmark).

Each case times one implementation on one (B, M):
    me_kernels  the Triton kernel (Gumbel-max over the members, BLOCK_B rows per program)
    reference   the torch reference (me_kernels.reference.select_members_reference), on the GPU
    torch       torch.multinomial over the normalised weights (not counter-based: a baseline)
for B in {1, 64, 1024, 16384}, M in {2, 3, 8}, [B, M] fp32 weights. Timing and the recorded keys:
bench/_benchlib.py (`measure`); the floor is the weights' bytes plus the int32 output. At these
sizes a call is launch-bound: the interesting figure is the time itself.

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import copy_bandwidth, cuda, measure  # noqa: F401

SIZES = [(b, m) for m in (2, 3, 8) for b in (1, 64, 1024, 16384)]
SELECT_IMPLS = ["me_kernels", "reference", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", SELECT_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=[f"B{b}-M{m}" for b, m in SIZES])
def test_select_members(benchmark, cuda, copy_bandwidth, size, impl):
    b, m = size
    weights = torch.rand(b, m, device=cuda) + 0.05
    seeds = torch.arange(b, device=cuda, dtype=torch.int64)
    offset = torch.zeros(b, device=cuda, dtype=torch.int64)
    benchmark.group = f"select_members-B{b}-M{m}"
    info = dict(op="select_members", B=b, M=m, impl=impl)
    if impl == "me_kernels":
        def fn():
            return K.select_members(weights, seed=seeds, offset=offset)
    elif impl == "reference":
        def fn():
            return R.select_members_reference(weights, seed=seeds, offset=offset)
    else:
        def fn():
            return torch.multinomial(weights / weights.sum(dim=1, keepdim=True), num_samples=1)[:, 0]
    measure(benchmark, fn, weights.numel() * 4 + b * 4, copy_bandwidth, **info)


def test_select_members_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    w = torch.tensor([0.5, 0.3, 0.2])
    members = benchmark.pedantic(lambda: K.select_members(w, seed=torch.arange(16), offset=0), rounds=2, iterations=1)
    assert members.shape == (16,) and members.dtype == torch.int32
    assert ((members >= 0) & (members < 3)).all()
    benchmark.extra_info.update(op="smoke", device="cpu")
