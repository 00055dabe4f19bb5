"""Microbenchmark of me_kernels.sample (pytest-benchmark).

Each case times one implementation on one (B, V, dtype):
    me_kernels  the fused Triton kernels
    reference   the sort-based torch reference (me_kernels.reference), on the GPU
    hf          Hugging Face's logits warpers (Temperature / TopK / TopP / MinP) on fp32 scores,
                softmax and torch.multinomial, as `generate` samples
for B in {1, 8, 64, 256}, V in {32000, 128256, 152064}, fp32 and bf16, plus the issue's target
(top-p 0.9, B = 128, V = 131072, fp32).

Timing and the recorded keys: bench/_benchlib.py (`measure`); for me_kernels also the mean
number of passes the kernel made over a row.

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import (DTYPES, IMPLS, SAMPLE_CONFIGS, Rotation, case_id, copy_bandwidth, cuda, hf_warpers,  # noqa: F401
                       measure, rotating_logits, sample_cases)


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sample_cases(), ids=case_id)
def test_sample(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, v, dt = case
    params = SAMPLE_CONFIGS[cfg]
    inputs, nbytes = rotating_logits((b, v), dt, "cuda")
    rot = Rotation(inputs)
    seeds = torch.arange(b, device=cuda, dtype=torch.int64)
    benchmark.group = f"sample-{cfg}-B{b}-V{v}-{dt}"
    info = dict(op="sample", config=cfg, B=b, V=v, dtype=dt, impl=impl)
    if impl == "me_kernels":
        from me_kernels.sampling import sample_thresholds

        _tok, dbg = sample_thresholds(inputs[0], seed=seeds, **params)
        info["mean_passes"] = float(dbg[:, 2].mean())

        def fn():
            return K.sample(rot.next(), seed=seeds, offset=1, **params)
    elif impl == "reference":
        def fn():
            return R.sample_reference(rot.next(), seed=seeds, offset=1, **params)
    else:
        warpers = hf_warpers(params)
        input_ids = torch.zeros((b, 1), dtype=torch.long, device=cuda)

        def fn():
            scores = warpers(input_ids, rot.next().to(torch.float32))
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
    measure(benchmark, fn, nbytes, copy_bandwidth, **info)


# --------------------------------------------------------------------------------------------
# CPU smoke (runs everywhere)
# --------------------------------------------------------------------------------------------


def test_sample_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=gen)
    seeds = torch.arange(4)
    tokens = benchmark.pedantic(lambda: K.sample(x, seed=seeds, **SAMPLE_CONFIGS["topk_topp_temp"]), rounds=2,
                                iterations=1)
    assert tokens.shape == (4,)
    assert ((tokens >= 0) & (tokens < 128)).all()
    scores = hf_warpers(SAMPLE_CONFIGS["topk_topp_temp"])(torch.zeros((4, 1), dtype=torch.long), x.clone())
    assert torch.isfinite(scores).sum(dim=1).min() >= 1
    benchmark.extra_info.update(op="smoke", device="cpu")
