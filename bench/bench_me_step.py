"""Microbenchmark of me_kernels.me_step, the fused ME decode step (pytest-benchmark).

Each case times one implementation on one (B, V, dtype) with M = 3 members, top-p 0.9:
    me_kernels  the fused kernel: the token of step t and the member of step t + 1, one launch
    unfused     me_kernels.sample then me_kernels.select_members (two launches)
    reference   the torch reference (me_kernels.reference.me_step_reference), on the GPU
for B in {1, 8, 64, 256}, V in {32000, 152064}, fp32 and bf16. Timing and the recorded keys:
bench/_benchlib.py (`measure`); the floor is the logits' bytes (the member draw reads B x M
weights more, which is negligible).

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import (BATCHES, DTYPES, MIXTURE_MEMBERS, Rotation, case_id, copy_bandwidth, cuda,  # noqa: F401
                       measure, rotating_logits)

VOCABS = [32000, 152064]
PARAMS = dict(top_p=0.9)
STEP_IMPLS = ["me_kernels", "unfused", "reference"]


def _cases():
    return [("top_p", b, v, dt) for dt in DTYPES for v in VOCABS for b in BATCHES]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("case", _cases(), ids=case_id)
def test_me_step(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, v, dt = case
    inputs, nbytes = rotating_logits((b, v), dt, "cuda")
    rot = Rotation(inputs)
    weights = torch.rand(b, MIXTURE_MEMBERS, device=cuda) + 0.1
    seeds = torch.arange(b, device=cuda, dtype=torch.int64)
    benchmark.group = f"me_step-{cfg}-M{MIXTURE_MEMBERS}-B{b}-V{v}-{dt}"
    info = dict(op="me_step", config=cfg, M=MIXTURE_MEMBERS, B=b, V=v, dtype=dt, impl=impl)
    if impl == "me_kernels":
        def fn():
            return K.me_step(rot.next(), weights, seed=seeds, offset=1, **PARAMS)
    elif impl == "unfused":
        def fn():
            return (K.sample(rot.next(), seed=seeds, offset=1, **PARAMS),
                    K.select_members(weights, seed=seeds, offset=2))
    else:
        def fn():
            return R.me_step_reference(rot.next(), weights, seed=seeds, offset=1, **PARAMS)
    measure(benchmark, fn, nbytes, copy_bandwidth, **info)


def test_me_step_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2])
    seeds = torch.arange(4)
    tokens, members = benchmark.pedantic(lambda: K.me_step(x, w, seed=seeds, offset=3, **PARAMS), rounds=2,
                                         iterations=1)
    assert torch.equal(tokens, K.sample(x, seed=seeds, offset=3, **PARAMS))
    assert torch.equal(members, K.select_members(w, seed=seeds, offset=4))
    benchmark.extra_info.update(op="smoke", device="cpu")
