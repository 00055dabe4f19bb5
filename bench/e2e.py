"""End-to-end benchmark: ME vs CE vs one member vs HF generate vs the paper's algorithm.

GPU mode (default) measures members with the real architectures of Qwen2.5-1.5B and
Llama-3.2-1B (bench/configs/*.json, random bf16 weights: decode speed does not depend on weight
values), for each member count M and batch size B, side by side in one process:

    me          ME, independent selection (each request draws its member every step)
    me-shared   ME, one member per step for the whole batch
    ce          conventional ensemble, fused mixture kernel
    single      member 0 alone through the same runtime
    hf-generate Hugging Face `generate` on member 0 (sampling, same top_p / temperature)
    seed-algo   the paper's reference loop re-implemented (B = 1 only; bench/seed_algorithm.py)

The runtime rows (me, me-shared, ce, single) run on each engine of --engines: "stacked" (one
grouped-GEMM forward per step for all rows, preallocated caches) and "hf" (Hugging Face forwards
member by member); the engine is a column, and the ratios compare rows of one engine plus stacked
vs hf for the same row.

Each row reports tokens/s (all requests), ms per decode step, peak GPU memory, and the floor:
the bytes a step must read (the weights of the members that run -- in expectation for
independent ME -- plus their KV caches) over the measured copy bandwidth.

    python bench/e2e.py --out e2e.json                      # GPU grid (see --help)
    python bench/e2e.py --cpu --out e2e_cpu.json            # tiny members on the CPU (CI smoke)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from me_runtime import Ensemble  # noqa: E402
from seed_algorithm import SeedAlgorithm  # noqa: E402

ROWS = ("me", "me-shared", "ce", "single", "hf-generate", "seed-algo")
RUNTIME_ROWS = ("me", "me-shared", "ce", "single")
ENGINES = ("stacked", "hf")


# ------------------------------------------------------------------------------ setup
def load_config(name: str):
    from transformers import AutoConfig

    with open(os.path.join(HERE, "configs", f"{name}.json")) as f:
        data = json.load(f)
    model_type = data.pop("model_type")
    data.pop("torch_dtype", None)
    data["eos_token_id"] = None  # random weights: never stop early, every run makes all tokens
    return AutoConfig.for_model(model_type, **data)


def build_members(arch: str, count: int, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Module]:
    """`count` members of bench/configs/ARCH.json with random weights; arch "demo" loads the two
    trained bf16 members shipped with the package (me_runtime.demo_members(), count <= 2)."""
    from transformers import AutoModelForCausalLM

    if arch == "demo":
        from me_runtime import demo_members

        paths = demo_members()
        if count > len(paths):
            raise SystemExit(f"e2e: arch demo has {len(paths)} members, asked for {count}")
        models = [AutoModelForCausalLM.from_pretrained(p).to(device) for p in paths[:count]]
        for model in models:
            model.generation_config.eos_token_id = None  # every run makes all its tokens
        return [m.eval() for m in models]

    config = load_config(arch)
    models = []
    for i in range(count):
        torch.manual_seed(1234 + i)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.generation_config.eos_token_id = None
        models.append(model.eval())
    return models


def measure_bandwidth(device: torch.device) -> float:
    """Copy bandwidth in bytes/s, counting bytes read plus bytes written (the floor's unit)."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} logical CPUs)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def expected_members_per_step(weights: list[float], batch: int, row: str) -> float:
    if row in ("me-shared", "single", "hf-generate", "seed-algo"):
        return 1.0
    if row == "ce":
        return float(len(weights))
    return sum(1.0 - (1.0 - w) ** batch for w in weights)  # independent ME: distinct members drawn


# ------------------------------------------------------------------------------ rows
def run_row(row, ens, models, prompts, new_tokens, params, seed):
    """Generate new_tokens for every prompt; returns (seconds, generated token count)."""
    device = ens.device
    if row in ("me", "me-shared", "ce", "single"):
        method = {"me-shared": "me"}.get(row, row)
        selection = "shared" if row == "me-shared" else "independent"
        gens = ens.generate_ids(prompts, method=method, selection=selection, max_new_tokens=new_tokens, seed=seed, **params)
        return sum(len(g.token_ids) for g in gens)
    if row == "hf-generate":
        ids = torch.tensor(prompts, device=device)
        out = models[0].generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=params["temperature"],
            top_p=params["top_p"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]
    if row == "seed-algo":
        algo = SeedAlgorithm(models, ens.weights, temperature=params["temperature"], top_p=params["top_p"], seed=seed)
        tokens, _ = algo.generate(prompts[0], new_tokens)
        return len(tokens)
    raise ValueError(row)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    count = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, count, peak


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny members on the CPU (quick smoke / CPU measurement)")
    p.add_argument("--archs", default=None, help="comma list of bench/configs names, or demo (the shipped members)")
    p.add_argument("--members", default=None, help="comma list of member counts M")
    p.add_argument("--batches", default=None, help="comma list of batch sizes")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {ROWS}")
    p.add_argument(
        "--cells",
        default=None,
        help="ARCH:M:B,... measured in this order instead of the archs x members x batches grid "
        "(put the cells that matter first when --max-seconds may cut the run short)",
    )
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {ENGINES} for the runtime rows")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row, median reported (default: 1 GPU, 3 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 in CPU mode, else torch's)")
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="stop the grid (partial results) after this")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.cpu:
        # One intra-op thread: these members are small enough that OpenMP hand-offs cost more than
        # they save, and multi-threaded timings on a shared CPU swing by 10x.
        defaults = dict(archs="tiny-llama", members="3", batches="1,4", prompt_len=32, new_tokens=32, repeats=3, threads=1)
    else:
        defaults = dict(
            archs="qwen2.5-1.5b,llama-3.2-1b", members="2,3,4", batches="1,8,32,64", prompt_len=256, new_tokens=256, repeats=1
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("e2e: no CUDA device; use --cpu for the CPU mode", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"e2e: unknown rows {sorted(unknown)}; choose from {ROWS}")
    engines = [e for e in args.engines.split(",") if e]
    if set(engines) - set(ENGINES):
        raise SystemExit(f"e2e: unknown engines {sorted(set(engines) - set(ENGINES))}; choose from {ENGINES}")
    member_counts = [int(m) for m in args.members.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    params = {"temperature": args.temperature, "top_p": args.top_p}
    bandwidth = measure_bandwidth(device)
    started = time.perf_counter()
    results, skipped = [], []
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "bandwidth_GBps": bandwidth / 1e9,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "params": params,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    try:
        import transformers
        import triton

        meta["transformers"], meta["triton"] = transformers.__version__, triton.__version__
    except ImportError:
        pass
    print(f"e2e on {meta['device']}: copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)

    if args.cells:
        cells = []
        for cell in args.cells.split(","):
            arch, num, batch = cell.split(":")
            cells.append((arch, int(num), int(batch)))
    else:
        cells = [(a, m, b) for a in args.archs.split(",") for m in member_counts for b in batches]
    most_members = {}
    for arch, num, _ in cells:
        most_members[arch] = max(num, most_members.get(arch, 0))

    built, warmed = {}, set()
    for arch, num, batch in cells:
        if arch not in built:
            models = build_members(arch, most_members[arch], dtype, device)
            built[arch] = (models, model_bytes(models[0]), kv_bytes_per_token(models[0]), models[0].config.vocab_size)
        all_models, weights_bytes, kv_per_token, vocab = built[arch]
        models = all_models[:num]
        # uniform weights; the stacked engine shares the members' weights (no second copy)
        ensembles = {e: Ensemble(models, engine=e) for e in engines}
        gen = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).tolist()
        # the engine rows first (stacked, then hf), then the engine-less baselines
        jobs = [(row, e) for e in engines for row in rows if row in RUNTIME_ROWS]
        jobs += [(row, "-") for row in rows if row not in RUNTIME_ROWS]
        for row, engine in jobs:
            ens = ensembles[engine if engine != "-" else engines[0]]
            if row == "seed-algo" and batch != 1:
                continue
            if time.perf_counter() - started > args.max_seconds:
                skipped.append({"arch": arch, "members": num, "batch": batch, "row": row, "engine": engine})
                continue
            if (arch, row, engine, batch) not in warmed:  # first use compiles kernels / sizes allocator pools
                # long enough to meet the shapes of the timed runs (the stacked engine captures a
                # CUDA graph per shape bucket on first use: prefill, 1, 2, 4, 8... pending tokens)
                run_row(row, ens, models, prompts, min(args.new_tokens, 32), params, seed=0)
                warmed.add((arch, row, engine, batch))
            runs = [
                timed(lambda: run_row(row, ens, models, prompts, args.new_tokens, params, seed=1 + r), device)
                for r in range(args.repeats)
            ]
            seconds, count, peak = sorted(runs)[len(runs) // 2]  # the median run
            steps = args.new_tokens
            members_per_step = expected_members_per_step(ens.weights, batch, row)
            context = args.prompt_len + args.new_tokens / 2  # mean KV length over the run
            floor_step_bytes = members_per_step * (weights_bytes + batch * context * kv_per_token)
            floor_ms = 1e3 * floor_step_bytes / bandwidth
            rec = {
                "arch": arch,
                "members": num,
                "batch": batch,
                "row": row,
                "engine": engine,
                "seconds": seconds,
                "tokens": count,
                "tokens_per_s": count / seconds,
                "ms_per_step": 1e3 * seconds / steps,
                "floor_ms_per_step": floor_ms,
                "floor_tokens_per_s": batch / (floor_ms / 1e3),
                "fraction_of_floor": floor_ms / (1e3 * seconds / steps),
                "members_per_step": members_per_step,
                "peak_memory_GB": None if peak is None else peak / 1e9,
                "weights_GB": num * weights_bytes / 1e9,
                "kv_cache_GB": getattr(ens._engine, "cache_bytes", 0) / 1e9 if engine == "stacked" else None,
            }
            results.append(rec)
            print(
                f"{arch:14s} M={num} B={batch:<3d} {row:12s} {engine:8s} {rec['tokens_per_s']:9.1f} tok/s "
                f"{rec['ms_per_step']:8.2f} ms/step  floor {floor_ms:7.2f} ms/step",
                flush=True,
            )
            if args.out:  # after every row, so a run cut short still leaves its results
                write_json(args.out, {"meta": meta, "results": results, "ratios": compute_ratios(results), "skipped": skipped})

    ratios = compute_ratios(results)
    out = {"meta": meta, "results": results, "ratios": ratios, "skipped": skipped}
    print()
    print(format_tables(out))
    if args.out:
        write_json(args.out, out)
    return 0


def write_json(path, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def compute_ratios(results):
    """ME rows against the other rows of the same engine (and the engine-less baselines), and the
    stacked engine against the hf engine for the same row."""
    by_key = {(r["arch"], r["members"], r["batch"], r["row"], r.get("engine", "hf")): r for r in results}
    ratios = []
    for (arch, num, batch, row, engine), r in by_key.items():
        if row not in RUNTIME_ROWS:
            continue
        rec = {"arch": arch, "members": num, "batch": batch, "row": row, "engine": engine}
        if row in ("me", "me-shared"):
            for other in ("ce", "single"):
                o = by_key.get((arch, num, batch, other, engine))
                if o is not None:
                    rec[f"vs_{other}"] = r["tokens_per_s"] / o["tokens_per_s"]
            for other in ("hf-generate", "seed-algo"):
                o = by_key.get((arch, num, batch, other, "-"))
                if o is not None:
                    rec[f"vs_{other}"] = r["tokens_per_s"] / o["tokens_per_s"]
        if engine == "stacked":
            o = by_key.get((arch, num, batch, row, "hf"))
            if o is not None:
                rec["vs_hf_engine"] = r["tokens_per_s"] / o["tokens_per_s"]
        if len(rec) > 5:
            ratios.append(rec)
    return ratios


def format_tables(out) -> str:
    meta = out["meta"]
    lines = [
        f"device: {meta['device']}  date: {meta['date']}  torch {meta['torch']}  "
        f"bandwidth {meta['bandwidth_GBps']:.0f} GB/s  prompt {meta['prompt_len']}  new {meta['new_tokens']}",
        "",
        "| arch | M | B | row | engine | tokens/s | ms/step | floor ms/step | floor/measured | peak mem GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        mem = "-" if r["peak_memory_GB"] is None else f"{r['peak_memory_GB']:.2f}"
        lines.append(
            f"| {r['arch']} | {r['members']} | {r['batch']} | {r['row']} | {r.get('engine', '-')} | {r['tokens_per_s']:.1f} | "
            f"{r['ms_per_step']:.2f} | {r['floor_ms_per_step']:.2f} | {r['fraction_of_floor']:.2f} | {mem} |"
        )
    lines += ["", "| arch | M | B | row | engine | vs CE | vs single | vs HF generate | vs seed algorithm | vs hf engine |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["ratios"]:
        cell = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        lines.append(
            f"| {r['arch']} | {r['members']} | {r['batch']} | {r['row']} | {r.get('engine', '-')} | {cell('vs_ce')} | "
            f"{cell('vs_single')} | {cell('vs_hf-generate')} | {cell('vs_seed-algo')} | {cell('vs_hf_engine')} |"
        )
    if out["skipped"]:
        lines.append(f"\nskipped (time budget): {len(out['skipped'])} rows")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
