"""The compiled CPU sampling kernels (torch.ops.me.sample from me_kernels._C) against the torch
reference path (me_kernels.reference.sample_reference: a full sort when top-k / top-p are on,
Philox through the compiled helper), on one thread.

    PYTHONPATH=. python bench/bench_cpu_kernels.py [--out results.json] [--repeat-seconds 0.5]

(PYTHONPATH=. makes a source checkout's me_kernels win over an installed one.)

Cases: B in {1, 8}, V in {4096, 49152, 151936}, fp32 logits, for plain sampling, top-p 0.9 and
top-k 50. Each timing is the median over as many calls as fit in --repeat-seconds (at least 3)
of the calling thread's CPU time (time.thread_time: with one torch thread the op runs on it, and
unlike wall time it does not count the time a loaded machine gives to other processes); the median
wall time is recorded too. Inputs are fixed (the CPU caches favour both implementations alike).
Both implementations are checked to return the same tokens on the benchmarked inputs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from me_kernels import reference as R

BATCHES = [1, 8]
VOCABS = [4096, 49152, 151936]
CONFIGS = {"plain": {}, "top_p0.9": dict(top_p=0.9), "top_k50": dict(top_k=50)}


def _op_args(kw, seed, offset):
    """Schema arguments of torch.ops.me.sample after the logits (scalars only)."""
    return (None, 1.0, None, int(kw.get("top_k", 0)), None, float(kw.get("top_p", 1.0)), None, 0.0, None, seed,
            None, offset)


def _median_ms(fn, seconds: float) -> tuple[float, float]:
    """(median thread CPU ms, median wall ms) of one call."""
    fn()  # warm up (allocations, first-touch)
    cpu, wall = [], []
    start = time.perf_counter()
    while len(cpu) < 3 or time.perf_counter() - start < seconds:
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run(repeat_seconds: float) -> dict:
    import me_kernels

    if not (me_kernels.EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("me::sample", "CPU")):
        raise SystemExit(f"{me_kernels.__file__}: me_kernels._C has no CPU kernel for me::sample (rebuild it, or "
                         "run with PYTHONPATH=. from a source checkout)")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for vocab in VOCABS:
        for batch in BATCHES:
            # LLM-like logits: a Gaussian body with a few strong candidates
            logits = torch.randn(batch, vocab, generator=gen) * 2.5
            logits[:, :20] += 8.0
            for name, kw in CONFIGS.items():
                seed, offset = 1234, 7
                compiled = lambda: torch.ops.me.sample(logits, *_op_args(kw, seed, offset))  # noqa: E731
                reference = lambda: R.sample_reference(logits, seed=seed, offset=offset, **kw)  # noqa: E731
                assert torch.equal(compiled(), reference()), (name, batch, vocab)
                row = {"config": name, "B": batch, "V": vocab}
                row["compiled_ms"], row["compiled_wall_ms"] = _median_ms(compiled, repeat_seconds)
                row["reference_ms"], row["reference_wall_ms"] = _median_ms(reference, repeat_seconds)
                row["speedup"] = row["reference_ms"] / row["compiled_ms"]
                rows.append(row)
                print(f"{name:9s} B={batch:2d} V={vocab:6d}  compiled {row['compiled_ms']:8.3f} ms  "
                      f"reference {row['reference_ms']:8.3f} ms  x{row['speedup']:.1f}", flush=True)
    return {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "fp32",
            "results": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--repeat-seconds", type=float, default=0.5, help="time budget per case and implementation")
    args = parser.parse_args()
    result = run(args.repeat_seconds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
