"""Microbenchmark of me_kernels.mixture_sample, the CE step (pytest-benchmark).

Each case times one implementation on one (B, V, dtype) with M = 3 members and top-p 0.9:
    me_kernels  the Triton kernels (partials + fused row pipeline)
    reference   the torch reference (me_kernels.reference), on the GPU
    hf          the conventional ensemble written with torch ops: the weighted sum of the
                members' softmaxes, Hugging Face's warpers on its log, then torch.multinomial
for B in {1, 8, 64, 256}, V in {32000, 128256, 152064}, fp32 and bf16. Timing and the recorded
keys: bench/_benchlib.py (`measure`).

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""

from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import (BATCHES, DTYPES, IMPLS, MIXTURE_MEMBERS, SAMPLE_CONFIGS, VOCABS, Rotation, case_id,  # noqa: F401
                       copy_bandwidth, cuda, hf_warpers, measure, rotating_logits)


# --------------------------------------------------------------------------------------------
# mixture_sample
# --------------------------------------------------------------------------------------------


def _mixture_cases():
    return [("top_p", b, v, dt) for dt in DTYPES for v in VOCABS for b in BATCHES]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _mixture_cases(), ids=case_id)
def test_mixture_sample(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, v, dt = case
    params = SAMPLE_CONFIGS[cfg]
    inputs, nbytes = rotating_logits((MIXTURE_MEMBERS, b, v), dt, "cuda")
    rot = Rotation(inputs)
    weights = torch.tensor([0.5, 0.3, 0.2], device=cuda)
    seeds = torch.arange(b, device=cuda, dtype=torch.int64)
    benchmark.group = f"mixture-{cfg}-M{MIXTURE_MEMBERS}-B{b}-V{v}-{dt}"
    info = dict(op="mixture_sample", config=cfg, M=MIXTURE_MEMBERS, B=b, V=v, dtype=dt, impl=impl)
    if impl == "me_kernels":
        def fn():
            return K.mixture_sample(rot.next(), weights, seed=seeds, offset=1, **params)
    elif impl == "reference":
        def fn():
            return R.mixture_sample_reference(rot.next(), weights, seed=seeds, offset=1, **params)
    else:
        warpers = hf_warpers(params)
        input_ids = torch.zeros((b, 1), dtype=torch.long, device=cuda)
        w = (weights / weights.sum())[:, None, None]

        def fn():
            probs = (w * torch.softmax(rot.next().to(torch.float32), dim=-1)).sum(dim=0)
            scores = warpers(input_ids, torch.log(probs))
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
    measure(benchmark, fn, nbytes, copy_bandwidth, **info)


# --------------------------------------------------------------------------------------------
# CPU smoke (runs everywhere)
# --------------------------------------------------------------------------------------------


def test_mixture_sample_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 4, 128, generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2])
    seeds = torch.arange(4)
    mixed = benchmark.pedantic(lambda: K.mixture_sample(mix, w, seed=seeds, top_p=0.9), rounds=2, iterations=1)
    assert mixed.shape == (4,)
    assert ((mixed >= 0) & (mixed < 128)).all()
    benchmark.extra_info.update(op="smoke", device="cpu")
