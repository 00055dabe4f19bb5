"""Microbenchmark of me_kernels.group_rows, the stable counting sort of rows by member that
grouped execution runs before grouped_linear (pytest-benchmark).

Each case times one implementation on one (T, M), member ids drawn uniformly at random:
    me_kernels  torch.ops.me.group_rows (the compiled CUDA kernel; needs me_kernels._C)
    reference   the torch reference (me_kernels.reference.group_rows_reference: a stable sort
                plus a scatter-add of the counts), on the GPU
for T in {1, 16, 512, 4096} rows, M in {3, 8}. Timing and the recorded keys: bench/_benchlib.py
(`measure`); the floor is the ids read plus the order and offsets written. At these sizes a call
is launch-bound: the interesting figure is the time itself.

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function so this file cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import copy_bandwidth, cuda, measure  # noqa: F401

SIZES = [(t, m) for m in (3, 8) for t in (1, 16, 512, 4096)]
GROUP_IMPLS = ["me_kernels", "reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GROUP_IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=[f"T{t}-M{m}" for t, m in SIZES])
def test_group_rows(benchmark, cuda, copy_bandwidth, size, impl):
    t, m = size
    if impl == "me_kernels" and not K.EXTENSION_LOADED:
        pytest.skip("needs the compiled extension me_kernels._C")
    gen = torch.Generator(device="cuda").manual_seed(t * 31 + m)
    members = torch.randint(0, m, (t,), device=cuda, dtype=torch.int32, generator=gen)
    benchmark.group = f"group_rows-T{t}-M{m}"
    info = dict(op="group_rows", T=t, M=m, impl=impl)
    if impl == "me_kernels":
        def fn():
            return K.group_rows(members, m)
    else:
        def fn():
            return R.group_rows_reference(members, m)
    measure(benchmark, fn, 2 * t * 4 + (m + 1) * 4, copy_bandwidth, **info)


def test_group_rows_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    members = torch.tensor([2, 0, 1, 2, 0, 0], dtype=torch.int32)
    order, offsets = benchmark.pedantic(lambda: K.group_rows(members, 3), rounds=2, iterations=1)
    assert order.tolist() == [1, 4, 5, 2, 0, 3] and offsets.tolist() == [0, 3, 4, 6]
    benchmark.extra_info.update(op="smoke", device="cpu", extension_loaded=K.EXTENSION_LOADED)
