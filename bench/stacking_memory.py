"""Peak memory of stacking members for the stacked engine, against the weights' bytes.

Builds M members of a bench/configs architecture on the CPU, then measures the process's resident
memory (Linux /proc/self/status: VmRSS now, VmHWM the peak, reset through /proc/self/clear_refs)
while `Ensemble(models, engine="stacked")` copies every projection into its stacked tensor and
re-points the members' parameters to views of it:

    python bench/stacking_memory.py --arch small-llama --members 3 [--out stacking_memory.json]

Prints the weights' bytes, the peak increase during stacking (expected: about one stacked tensor,
the largest being the embeddings / lm_heads), and the resident memory after stacking minus before
(expected: about 0: the original parameter storage is freed as its copy takes over).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from e2e import build_members, model_bytes  # noqa: E402
from me_runtime import Ensemble  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size
        f.write("5")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="small-llama")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    models = build_members(args.arch, args.members, getattr(torch, args.dtype), torch.device("cpu"))
    weights = sum(model_bytes(m) for m in models)
    gc.collect()
    before = _status_kb("VmRSS")
    _reset_peak()
    ens = Ensemble(models, engine="stacked")
    gc.collect()
    peak, after = _status_kb("VmHWM"), _status_kb("VmRSS")
    largest = max(t.numel() * t.element_size() for g in ens._engine.groups for t in g.weight_tensors())
    out = {
        "arch": args.arch, "members": args.members, "dtype": args.dtype,
        "weights_MB": weights / 2**20,
        "largest_stacked_tensor_MB": largest / 2**20,
        "peak_increase_during_stacking_MB": (peak - before) / 1024,
        "resident_after_minus_before_MB": (after - before) / 1024,
        "memory_bytes": ens.memory_bytes(),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
