"""PNG plots of a benchmark run directory (what bench/gpu_suite.sh writes).

    python bench/plot.py OUTDIR

* speedup_vs_batch.png: ME / CE tokens-per-second ratio against batch size, one line per member
  count (independent selection solid, shared dashed), one panel per architecture; from e2e.json.
* kernels_vs_floor.png: each kernel benchmark case's measured time against its floor (bytes it
  must move / measured copy bandwidth); from the bench_*.json files of pytest-benchmark, whose
  cases record `time_ms` and `floor_ms` in extra_info.
"""
from __future__ import annotations

import glob
import json
import os
import sys


def plot_speedups(e2e: dict, path: str) -> bool:
    import matplotlib.pyplot as plt

    ratios = [r for r in e2e.get("ratios", []) if "vs_ce" in r and r.get("engine", "stacked") in ("stacked", "-")]
    if not ratios:
        return False
    archs = sorted({r["arch"] for r in ratios})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for num in sorted({r["members"] for r in ratios if r["arch"] == arch}):
            for row, style in (("me", "-o"), ("me-shared", "--s")):
                pts = sorted((r["batch"], r["vs_ce"]) for r in ratios if r["arch"] == arch and r["members"] == num and r["row"] == row)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"M={num} {row}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("ME / CE tokens per second")
        ax.set_title(arch)
        ax.legend(fontsize=8)
    meta = e2e.get("meta", {})
    fig.suptitle(f"ME speedup over CE - {meta.get('device', '?')} - {meta.get('date', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def kernel_cases(bench_json: dict) -> list[tuple[str, float, float]]:
    cases = []
    for b in bench_json.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "time_ms" in info and "floor_ms" in info:
            cases.append((b.get("name", "?"), float(info["time_ms"]), float(info["floor_ms"])))
    return cases


def plot_kernels(outdir: str, path: str) -> bool:
    import matplotlib.pyplot as plt

    groups = {}
    for f in sorted(glob.glob(os.path.join(outdir, "bench_*.json"))):
        with open(f) as fh:
            cases = kernel_cases(json.load(fh))
        if cases:
            groups[os.path.basename(f)[len("bench_") : -len(".json")]] = cases
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 5), squeeze=False)
    for ax, (name, cases) in zip(axes[0], groups.items()):
        floor = [c[2] for c in cases]
        measured = [c[1] for c in cases]
        ax.scatter(floor, measured, s=14)
        lo, hi = min(floor + measured), max(floor + measured)
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, label="floor")
        ax.plot([lo, hi], [2 * lo, 2 * hi], color="gray", lw=0.8, ls=":", label="2x floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("floor (ms): bytes / measured bandwidth")
        ax.set_ylabel("measured (ms)")
        ax.set_title(f"{name}: {len(cases)} cases")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/plot.py OUTDIR", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    outdir = argv[0]
    made = []
    e2e_path = os.path.join(outdir, "e2e.json")
    if os.path.exists(e2e_path):
        with open(e2e_path) as f:
            if plot_speedups(json.load(f), os.path.join(outdir, "speedup_vs_batch.png")):
                made.append("speedup_vs_batch.png")
    if plot_kernels(outdir, os.path.join(outdir, "kernels_vs_floor.png")):
        made.append("kernels_vs_floor.png")
    print("plots:", ", ".join(made) if made else "none (no results found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
