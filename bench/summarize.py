"""Short markdown summary of a benchmark run directory (printed last by bench/gpu_suite.sh).

    python bench/summarize.py OUTDIR

Reads env.txt, steps.tsv, e2e.json and bench_*.json (pytest-benchmark; kernel cases carry
`time_ms`, `floor_ms` and optionally `target_ms` in extra_info) and prints the issue targets
next to the measured figures. Prints only what the files hold: nothing is estimated.
"""
from __future__ import annotations

import glob
import json
import os
import sys

# (M, B, row, engine, ratio key, goal, label): the stacked-engine issue's CPU and GPU targets
CPU_TARGETS = [
    (3, 1, "me", "stacked", "vs_ce", 2.7, "ME/CE at B=1, M=3 (CPU goal)"),
    (3, 1, "me", "stacked", "vs_single", 0.9, "ME/single at B=1, M=3 (CPU goal)"),
    (3, 1, "me", "stacked", "vs_hf_engine", 1.5, "stacked ME / hf-engine ME at B=1, M=3"),
]
E2E_TARGETS = [
    (3, 1, "me", "stacked", "vs_ce", 2.9, "ME/CE at B=1, M=3 (paper's best 2.68)"),
    (3, 1, "me", "stacked", "vs_single", 0.9, "ME/single at B=1, M=3"),
    (3, 32, "me-shared", "stacked", "vs_ce", 2.5, "ME shared/CE at B=32, M=3"),
]


def _read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else f.read()


def e2e_lines(e2e) -> list[str]:
    lines = ["## End to end (tokens/s ratios, same run)", "", "| target | arch | measured | goal | |", "|---|---|---|---|---|"]
    meta = e2e.get("meta", {})
    on_cpu = meta.get("device_type") == "cpu"
    if meta.get("new_tokens", 0) < 64 or (on_cpu and meta.get("repeats", 1) < 2):
        lines.insert(1, f"(smoke run: {meta.get('new_tokens')} new tokens, {meta.get('repeats')} repeat(s): checks that the "
                     "benchmark runs; too short to judge the goals)")
    for num, batch, row, engine, key, goal, label in CPU_TARGETS if on_cpu else E2E_TARGETS:
        found = [r for r in e2e.get("ratios", []) if r["members"] == num and r["batch"] == batch and r["row"] == row
                 and r.get("engine", "hf") == engine and key in r]
        if not found:
            lines.append(f"| {label} | - | not measured | {goal} | |")
        for r in found:
            ok = "met" if r[key] >= goal else f"missed by {goal / r[key]:.2f}x"
            lines.append(f"| {label} | {r['arch']} | {r[key]:.2f}x | >= {goal} | {ok} |")
    return lines


def kernel_lines(outdir) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(outdir, "bench_*.json"))):
        data = _read(path)
        benches = data.get("benchmarks", [])
        cases = [b for b in benches if "time_ms" in b.get("extra_info", {})]
        if not cases:
            continue
        name = os.path.basename(path)[:-5]
        lines += ["", f"## {name}: {len(cases)} cases of ours", ""]
        targeted = [b for b in cases if "target_ms" in b["extra_info"]]
        if targeted:
            misses = sorted(
                (b for b in targeted if b["extra_info"]["time_ms"] > b["extra_info"]["target_ms"]),
                key=lambda b: b["extra_info"]["time_ms"] / b["extra_info"]["target_ms"],
                reverse=True,
            )
            lines.append(f"targets met: {len(targeted) - len(misses)} / {len(targeted)}")
            if misses:
                lines += ["", "| worst misses | time ms | floor ms | target ms | over target |", "|---|---|---|---|---|"]
                for b in misses[:5]:
                    i = b["extra_info"]
                    lines.append(
                        f"| {b['name']} | {i['time_ms']:.4f} | {i.get('floor_ms', float('nan')):.4f} | "
                        f"{i['target_ms']:.4f} | {i['time_ms'] / i['target_ms']:.2f}x |"
                    )
        floor_ratios = sorted(
            (b["extra_info"]["time_ms"] / b["extra_info"]["floor_ms"], b["name"]) for b in cases if b["extra_info"].get("floor_ms")
        )
        if floor_ratios:
            mid = floor_ratios[len(floor_ratios) // 2][0]
            lines.append(
                f"\ntime / floor: best {floor_ratios[0][0]:.2f}x, median {mid:.2f}x, worst {floor_ratios[-1][0]:.2f}x "
                f"({floor_ratios[-1][1]})"
            )
        lines += speedup_lines(benches)
    return lines


def speedup_lines(benches) -> list[str]:
    """Ours against the other implementations timed in the same case (extra_info 'impl')."""
    by_case: dict = {}
    for b in benches:
        i = b.get("extra_info", {})
        if "impl" in i and "gpu_ms" in i:
            key = tuple(i.get(k) for k in ("op", "config", "B", "V", "dtype"))
            by_case.setdefault(key, {})[i["impl"]] = i["gpu_ms"]
    lines = []
    for other in ("reference", "hf"):
        ratios = [(c[other] / c["me_kernels"], key) for key, c in by_case.items() if other in c and "me_kernels" in c]
        big = [r for r in ratios if (r[1][2] or 0) >= 64]
        if ratios:
            lines.append(
                f"speedup over {other}: min {min(ratios)[0]:.1f}x, at B >= 64 min "
                f"{min(big)[0] if big else float('nan'):.1f}x (goal for the sort reference: >= 10x)"
            )
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/summarize.py OUTDIR", file=sys.stderr)
        return 2
    outdir = argv[0]
    lines = ["# Benchmark summary", ""]
    env = _read(os.path.join(outdir, "env.txt"))
    if env:
        lines += ["```", env.strip(), "```"]
    steps = _read(os.path.join(outdir, "steps.tsv"))
    if steps:
        lines += ["", "| step | status | time |", "|---|---|---|"]
        lines += ["| " + " | ".join(line.split("\t")) + " |" for line in steps.strip().splitlines()]
    e2e = _read(os.path.join(outdir, "e2e.json"))
    if e2e:
        lines += [""] + e2e_lines(e2e)
    lines += kernel_lines(outdir)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
