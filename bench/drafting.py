"""Exact CE by drafting: tokens/s and acceptance against plain CE and ME, side by side in one run.

Member sets:
    demo        the two trained demo members (dissimilar: code and prose)
    finetunes   three "fine-tunes" of one base: bench/configs/small-llama.json (or --base) with
                random weights, its logits sharpened (final-norm gain --sharpness, so next-token
                distributions are peaked like a trained model's), and members = base + Gaussian
                noise of --perturb times each weight tensor's standard deviation

Rows, for each member set, batch size and sampling setting:
    ce          plain CE (every member every step, mixture_sample)
    me          ME (one member per step per request)
    ce-draft    CE by drafting, adaptive (draft_tokens = --draft-tokens is the per-round maximum)
    ce-draft-k  CE by drafting, always --draft-tokens per round (draft_adaptive=False)
    ce-draft-m0 adaptive, member 0 drafts every token (draft_member=0)

Each row reports tokens/s, ms per token, the acceptance rate (accepted / drafted over the run)
and, for the drafting rows, the cost model: rounds, draft forwards and verification forwards per
emitted token. One thread, rows interleaved per repeat, median of --repeats.

    python bench/drafting.py --out bench/results/cpu-2026-11-30/drafting.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from e2e import build_members, cpu_name, load_config, sync  # noqa: E402
from me_runtime import Ensemble  # noqa: E402

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "top_p=0.9": dict(temperature=1.0, top_p=0.9),
    "top_k=10": dict(temperature=1.0, top_k=10),
}
ROWS = ("ce", "me", "ce-draft", "ce-draft-k", "ce-draft-m0")


def finetunes(base: str, count: int, sharpness: float, perturb: float, device, dtype=torch.float32) -> list[torch.nn.Module]:
    """`count` perturbed copies of one random base member (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    config = load_config(base)
    torch.manual_seed(1234)
    with torch.device(device):
        base_model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        base_model.model.norm.weight.mul_(sharpness)
    state = {k: v.clone() for k, v in base_model.state_dict().items()}
    members = []
    for i in range(count):
        # the noise is drawn where the members live (a CPU generator for CPU members, as in the
        # committed CPU results; on a GPU, drawing billions of numbers on the host would take minutes)
        gen = torch.Generator(device=device).manual_seed(99 + i)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        noisy = {}
        for name, value in state.items():
            if value.dim() >= 1 and value.numel() > 1 and value.is_floating_point():
                noise = torch.randn(value.shape, generator=gen, device=device)
                value = (value.float() + perturb * value.float().std() * noise).to(value.dtype)
            noisy[name] = value
        model.load_state_dict(noisy)
        model.generation_config.eos_token_id = None
        members.append(model)
    return members


def run(ens, row, prompts, new_tokens, params, k, seed):
    kwargs = dict(max_new_tokens=new_tokens, seed=seed, **params)
    if row == "me":
        gens = ens.generate_ids(prompts, method="me", **kwargs)
    elif row == "ce":
        gens = ens.generate_ids(prompts, method="ce", **kwargs)
    else:
        extra = {"ce-draft": {}, "ce-draft-k": {"draft_adaptive": False}, "ce-draft-m0": {"draft_member": 0}}[row]
        gens = ens.generate_ids(prompts, method="ce", draft_tokens=k, **extra, **kwargs)
    return gens


def measure(ens, members_name, batch, setting, args, results):
    params = SETTINGS[setting]
    gen = torch.Generator().manual_seed(7)
    vocab = ens.models[0].config.vocab_size
    prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()
    rows = {r: [] for r in ROWS}
    stats = {r: None for r in ROWS}
    for row in ROWS:  # warm-up (allocations, first-call costs)
        run(ens, row, prompts, 4, params, args.draft_tokens, 0)
    for rep in range(args.repeats):
        for row in ROWS:
            sync(ens.device)
            t0 = time.perf_counter()
            gens = run(ens, row, prompts, args.new_tokens, params, args.draft_tokens, 1000 * rep)
            sync(ens.device)
            seconds = time.perf_counter() - t0
            tokens = sum(len(g.token_ids) for g in gens)
            rows[row].append(tokens / seconds)
            if rep == 0:
                stats[row] = dict(drafted=sum(g.drafted for g in gens), accepted=sum(g.accepted for g in gens),
                                  tokens=tokens)
    for row in ROWS:
        tps = statistics.median(rows[row])
        entry = dict(members=members_name, batch=batch, setting=setting, row=row, tokens_per_s=tps,
                     ms_per_token=1e3 * batch / tps, runs=rows[row], **stats[row])
        if stats[row]["drafted"]:
            entry["acceptance"] = stats[row]["accepted"] / stats[row]["drafted"]
        results.append(entry)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items() if k != "runs"}),
              flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="demo,finetunes")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--base", default="small-llama", help="bench/configs/NAME.json of the fine-tunes' base")
    p.add_argument("--sharpness", type=float, default=20.0)
    p.add_argument("--perturb", type=float, default=0.05)
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the fine-tunes' dtype (the demo members are bf16)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip (not kill) the remaining cases once this much time is spent; JSON after every case")
    p.add_argument("--out", default=None)
    p.add_argument("--tables", metavar="JSON", default=None, help="only print the tables of an earlier run's JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tables:
        with open(args.tables) as f:
            data = json.load(f)
        print(format_table(data["results"]))
        print()
        print(cost_model_table(data["results"], data["args"]["draft_tokens"]))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: list[dict] = []
    out = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        torch=torch.__version__, threads=args.threads, args=vars(args), results=results, skipped=[],
    )
    began = time.perf_counter()
    for name in args.sets.split(","):
        if name == "demo":
            models = build_members("demo", 2, torch.bfloat16, device)
        else:
            models = finetunes(args.base, 3, args.sharpness, args.perturb, device, getattr(torch, args.dtype))
        ens = Ensemble(models, engine="auto", max_seq_len=args.prompt_len + args.new_tokens + 8)
        print(f"# {name}: {len(models)} members, engine {ens.engine}, vocab {models[0].config.vocab_size}", flush=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            for setting in args.settings.split(","):
                if args.max_seconds is not None and time.perf_counter() - began > args.max_seconds:
                    out["skipped"].append(dict(members=name, batch=batch, setting=setting))
                    continue
                measure(ens, name, batch, setting, args, results)
                if args.out:  # after every case: a time limit keeps what was measured
                    with open(args.out, "w") as f:
                        json.dump(out, f, indent=1)
        del ens, models
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(format_table(results))
    print()
    print(cost_model_table(results, args.draft_tokens))
    return 0


def format_table(results: list[dict]) -> str:
    """Markdown: one line per (members, batch, setting) with tokens/s per row and ratios to CE."""
    lines = ["| members | B | setting | CE tok/s | ME | CE-draft (adaptive) | CE-draft k fixed | CE-draft member 0 | "
             "acceptance (adaptive / fixed k) |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["members"], r["batch"], r["setting"]) for r in results}, key=lambda k: (k[0], k[1]))
    for key in keys:
        by = {r["row"]: r for r in results if (r["members"], r["batch"], r["setting"]) == key}
        ce = by["ce"]["tokens_per_s"]

        def cell(row):
            return f"{by[row]['tokens_per_s']:.1f} ({by[row]['tokens_per_s'] / ce:.2f}x)"

        acc = " / ".join(f"{by[r].get('acceptance', float('nan')):.2f}" for r in ("ce-draft", "ce-draft-k"))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {ce:.1f} | {cell('me')} | {cell('ce-draft')} | "
                     f"{cell('ce-draft-k')} | {cell('ce-draft-m0')} | {acc} |")
    return "\n".join(lines)


def cost_model_table(results: list[dict], k: int) -> str:
    """The cost model next to the measured fixed-k figure, batch 1: a round of k drafts costs k
    draft steps (c_d: measured as ME's ms per token, one member per step) plus a verification;
    it emits E = sum_{i<=k} a^i tokens (a: the measured acceptance of the fixed-k row). If the
    verification of k + 1 positions cost one CE step (c_ce: memory-bound decode, where reading
    the weights dominates), the speedup over CE would be E * c_ce / (k * c_d + c_ce). The measured
    figure falls short of it by what the verification really costs here (on a CPU a forward over
    k + 1 tokens costs several CE steps: compute-bound) and by the verification kernel itself."""
    lines = ["| members | setting | acceptance a | E (tokens / round) | c_d ms | c_ce ms | model: memory-bound "
             "verification | measured (fixed k) | implied verification ms (vs c_ce) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({(r["members"], r["setting"]) for r in results if r["batch"] == 1}):
        by = {r["row"]: r for r in results if (r["members"], r["setting"]) == key and r["batch"] == 1}
        if not all(row in by for row in ("ce", "me", "ce-draft-k")):
            continue
        a = by["ce-draft-k"].get("acceptance", 0.0)
        expected = sum(a**i for i in range(k + 1))
        c_d, c_ce = by["me"]["ms_per_token"], by["ce"]["ms_per_token"]
        model = expected * c_ce / (k * c_d + c_ce)
        measured = by["ce-draft-k"]["tokens_per_s"] / by["ce"]["tokens_per_s"]
        implied = expected * by["ce-draft-k"]["ms_per_token"] - k * c_d  # what a verification took
        lines.append(f"| {key[0]} | {key[1]} | {a:.2f} | {expected:.2f} | {c_d:.2f} | {c_ce:.2f} | {model:.2f}x | "
                     f"{measured:.2f}x | {implied:.1f} ({implied / c_ce:.1f}x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
