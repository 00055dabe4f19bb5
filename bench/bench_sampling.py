"""Microbenchmarks of me_kernels.sample and me_kernels.mixture_sample (pytest-benchmark).

Each case times one implementation on one (B, V, dtype):
    me_kernels  the fused Triton kernels
    reference   the sort-based torch reference (me_kernels.reference), on the GPU
    hf          Hugging Face's logits warpers (Temperature / TopK / TopP / MinP) on fp32 scores,
                softmax and torch.multinomial, as `generate` samples
for B in {1, 8, 64, 256}, V in {32000, 128256, 152064}, fp32 and bf16, plus the issue's target
(top-p 0.9, B = 128, V = 131072, fp32). mixture_sample uses M = 3 members with top-p 0.9; its
Hugging Face baseline is the conventional ensemble written with torch ops: the weighted sum of
the members' softmaxes, the warpers on its log, then multinomial.

Timing: the GPU time of one call is the median of triton.testing.do_bench (CUDA events, the L2
flushed before every call, which also hides the host launch overhead behind the flush). Inputs
rotate through enough copies to exceed the L2 several times. benchmark.extra_info records
gpu_ms, achieved GB/s (logits bytes / gpu time: the bytes any implementation must read once),
the floor (logits bytes / device-to-device copy bandwidth, measured once per session with a
512 MiB copy, read + write bytes counted) and, for me_kernels, the mean number of passes the
kernel made over a row. pytest-benchmark's own statistics are host wall times of a call plus a
synchronisation (a few rounds only).

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public functions (torch reference path) so this file cannot rot.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

BATCHES = [1, 8, 64, 256]
VOCABS = [32000, 128256, 152064]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAMPLE_CONFIGS = {
    "top_p": dict(top_p=0.9),
    "topk_topp_temp": dict(temperature=0.7, top_k=50, top_p=0.9),
}
MIXTURE_MEMBERS = 3
IMPLS = ["me_kernels", "reference", "hf"]
L2_BYTES = 50 * 2**20  # H100: 50 MiB
ROTATION_BYTES = 4 * L2_BYTES
DO_BENCH = dict(warmup=10, rep=40, return_mode="median")


def _cases():
    cases = []
    for cfg in SAMPLE_CONFIGS:
        for dt in DTYPES:
            for v in VOCABS:
                for b in BATCHES:
                    cases.append((cfg, b, v, dt))
    cases.append(("top_p", 128, 131072, "fp32"))  # the target case
    return cases


def _id(case):
    cfg, b, v, dt = case
    return f"{cfg}-B{b}-V{v}-{dt}"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def copy_bandwidth(cuda):
    """Device-to-device copy bandwidth in bytes/s (read + write bytes), measured once."""
    from triton.testing import do_bench

    n = 128 * 2**20  # 512 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=cuda).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)


@functools.lru_cache(maxsize=1)
def _rotating_logits(shape: tuple[int, ...], dtype_name: str, device: str):
    """Copies of LLM-shaped logits (a Zipf-like profile over a random permutation per row plus
    noise), enough of them to exceed the L2 several times; generated once per shape."""
    dtype = DTYPES[dtype_name]
    *lead, v = shape
    rows = math.prod(lead)
    nbytes = rows * v * torch.finfo(dtype).bits // 8
    copies = max(2, min(64, math.ceil(ROTATION_BYTES / nbytes)))
    gen = torch.Generator(device=device).manual_seed(1234)
    base = -3.0 * torch.log(torch.arange(1, v + 1, device=device, dtype=torch.float32))
    out = torch.empty((copies, rows, v), dtype=dtype, device=device)
    for c in range(copies):
        perm = torch.argsort(torch.rand(rows, v, device=device, generator=gen), dim=1)
        out[c] = (base[perm] + torch.randn(rows, v, device=device, generator=gen)).to(dtype)
    return out.view(copies, *shape), nbytes


class _Rotation:
    def __init__(self, inputs):
        self.inputs = inputs
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % self.inputs.shape[0]
        return self.inputs[self.i]


def _hf_warpers(params):
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    procs = []
    if params.get("temperature", 1.0) != 1.0:
        procs.append(TemperatureLogitsWarper(params["temperature"]))
    if params.get("top_k", 0):
        procs.append(TopKLogitsWarper(params["top_k"]))
    if params.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(params["top_p"]))
    if params.get("min_p", 0.0):
        procs.append(MinPLogitsWarper(params["min_p"]))
    return LogitsProcessorList(procs)


def _measure(benchmark, fn, nbytes, copy_bw, **info):
    from triton.testing import do_bench

    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()
    ms = do_bench(fn, **DO_BENCH)
    if info.get("impl") == "me_kernels":
        # The suite's common keys (bench/plot.py, bench/summarize.py) for our kernels, with the
        # issue's absolute targets: top-p at B=128, V=131072, fp32 < 0.15 ms; B=1 < 30 us.
        benchmark.extra_info["time_ms"] = ms
        if info.get("op") == "sample" and info.get("B") == 128 and info.get("V") == 131072 and info.get("config") == "top_p":
            benchmark.extra_info["target_ms"] = 0.15
        elif info.get("op") == "sample" and info.get("B") == 1:
            benchmark.extra_info["target_ms"] = 0.030
    benchmark.extra_info.update(
        gpu_ms=ms,
        achieved_GBps=nbytes / (ms * 1e-3) / 1e9,
        floor_ms=nbytes / copy_bw * 1e3,
        copy_GBps=copy_bw / 1e9,
        logits_bytes=nbytes,
        device=torch.cuda.get_device_name(),
        **info,
    )

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=3, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_sample(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, v, dt = case
    params = SAMPLE_CONFIGS[cfg]
    inputs, nbytes = _rotating_logits((b, v), dt, "cuda")
    rot = _Rotation(inputs)
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
        warpers = _hf_warpers(params)
        input_ids = torch.zeros((b, 1), dtype=torch.long, device=cuda)

        def fn():
            scores = warpers(input_ids, rot.next().to(torch.float32))
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
    _measure(benchmark, fn, nbytes, copy_bandwidth, **info)


# --------------------------------------------------------------------------------------------
# mixture_sample
# --------------------------------------------------------------------------------------------


def _mixture_cases():
    return [("top_p", b, v, dt) for dt in DTYPES for v in VOCABS for b in BATCHES]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _mixture_cases(), ids=_id)
def test_mixture_sample(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, v, dt = case
    params = SAMPLE_CONFIGS[cfg]
    inputs, nbytes = _rotating_logits((MIXTURE_MEMBERS, b, v), dt, "cuda")
    rot = _Rotation(inputs)
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
        warpers = _hf_warpers(params)
        input_ids = torch.zeros((b, 1), dtype=torch.long, device=cuda)
        w = (weights / weights.sum())[:, None, None]

        def fn():
            probs = (w * torch.softmax(rot.next().to(torch.float32), dim=-1)).sum(dim=0)
            scores = warpers(input_ids, torch.log(probs))
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
    _measure(benchmark, fn, nbytes, copy_bandwidth, **info)


# --------------------------------------------------------------------------------------------
# CPU smoke (runs everywhere)
# --------------------------------------------------------------------------------------------


def test_cpu_smoke(benchmark):
    """Tiny CPU case through the public functions, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=gen)
    mix = torch.randn(3, 4, 128, generator=gen)
    w = torch.tensor([0.5, 0.3, 0.2])
    seeds = torch.arange(4)

    def step():
        t = K.sample(x, seed=seeds, **SAMPLE_CONFIGS["topk_topp_temp"])
        m = K.mixture_sample(mix, w, seed=seeds, top_p=0.9)
        return t, m

    tokens, mixed = benchmark.pedantic(step, rounds=2, iterations=1)
    assert tokens.shape == (4,) and mixed.shape == (4,)
    assert ((tokens >= 0) & (tokens < 128)).all() and ((mixed >= 0) & (mixed < 128)).all()
    scores = _hf_warpers(SAMPLE_CONFIGS["topk_topp_temp"])(torch.zeros((4, 1), dtype=torch.long), x.clone())
    assert torch.isfinite(scores).sum(dim=1).min() >= 1
    benchmark.extra_info.update(op="smoke", device="cpu")
