"""What the text exchange costs: tokens/s of ME and CE for a pair of members with different
tokenizers against a pair of members sharing one vocabulary, same model sizes, side by side.

    TRITON_INTERPRET=0 python bench/mixed_tokenizers.py --out bench/results/cpu-2026-11-30/mixed_tokenizers.json

Pairs (the demo members, me_runtime/demo): shared = code + prose (one byte-level BPE, 4096 tokens),
mixed = code + blend (blend: a SentencePiece-style BPE with byte fallback, 3072 tokens); all three
have the same Llama shape (4 layers, hidden 256). Target (issue #13): mixed ME >= 0.8x shared ME.

Each cell generates max_new_tokens units per request (tokens for the shared pair, pieces for the
mixed pair: one sampled token each) for the batch's prompts (held-out excerpts' openings), seeds
fixed, temperature 1, top_p 0.9; the best of --repeats timed runs after a warm-up, the pairs
alternating within each repeat so load changes hit both. One torch thread.

Besides tokens/s the JSON records what explains the ratio: the union vocabulary's size, the mean
number of tokens each member reads per emitted piece (its spelling length: 1.0 for the shared pair),
and the time of the exchange's own per-step work (the union-id mapping and every member's append of
its spelling), measured alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy


def _prompts(batch: int) -> list[str]:
    from me_runtime.demo import HELDOUT_FILE

    held = json.loads(Path(HELDOUT_FILE).read_text())
    texts = [t for name in ("code", "prose") for t in held[name]]
    return [texts[i % len(texts)][:80] for i in range(batch)]


def _run(ens, prompts, method, max_new_tokens, seed=0):
    outs = ens.generate(prompts, method=method, max_new_tokens=max_new_tokens, seed=seed, top_p=0.9)
    return sum(len(o.token_ids) for o in outs), outs


def _spelling_lengths(ens, outs) -> list[float]:
    """Mean tokens each member appends per emitted piece (1.0 everywhere for one vocabulary)."""
    vocab = ens.union_vocabulary
    if vocab is None:
        return [1.0] * ens.num_members
    ids = [u for o in outs for u in o.token_ids]
    return [statistics.fmean(vocab.spelling_lengths[m][u] for u in ids) for m in range(ens.num_members)]


def _exchange_ms(ens, batch: int, repeats: int = 200) -> float:
    """The text exchange's own per-step work, alone: union ids of sampled tokens and every
    member's append of its spelling (me_runtime.mixed.MixedDecoder.append)."""
    from me_runtime.mixed import MixedDecoder, MixedStreams, StepPieces
    from me_kernels import SamplingParams

    vocab = ens.union_vocabulary
    prompts = [[[1, 2, 3]] * batch for _ in range(ens.num_members)]
    streams = MixedStreams(prompts, list(range(batch)), repeats + 1, vocab.longest_spelling, None, ens.device)
    decoder = MixedDecoder(None, vocab, ens._weights_tensor(), streams, selection="independent", member=0,
                           params=SamplingParams(), max_seq_len=None)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab.vocab_sizes[0], (repeats, batch), generator=gen)
    members = torch.zeros(batch, dtype=torch.long)
    start = time.perf_counter()
    for r in range(repeats):
        union = decoder._to_union(members, tokens[r])
        decoder.append(StepPieces(union, union.tolist(), [0] * batch))
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--methods", default="me,ce")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    from me_runtime import Ensemble
    from me_runtime.demo import demo_member

    pairs = {"shared": ["code", "prose"], "mixed": ["code", "blend"]}
    ensembles = {name: Ensemble.from_pretrained([demo_member(n) for n in names], dtype="float32", device=args.device,
                                                engine=args.engine)
                 for name, names in pairs.items()}
    mixed = ensembles["mixed"]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = _prompts(batch)
        for method in args.methods.split(","):
            best = {name: float("inf") for name in ensembles}
            units, outs = {}, {}
            for name, ens in ensembles.items():  # warm-up
                units[name], outs[name] = _run(ens, prompts, method, args.max_new_tokens)
            for _ in range(args.repeats):
                for name, ens in ensembles.items():
                    start = time.perf_counter()
                    _run(ens, prompts, method, args.max_new_tokens)
                    best[name] = min(best[name], time.perf_counter() - start)
            row = {"batch": batch, "method": method}
            for name, ens in ensembles.items():
                row[f"{name}_units"] = units[name]
                row[f"{name}_s"] = round(best[name], 4)
                row[f"{name}_tok_s"] = round(units[name] / best[name], 1)
                row[f"{name}_tokens_read_per_unit"] = [round(x, 3) for x in _spelling_lengths(ens, outs[name])]
            row["mixed_over_shared"] = round(row["mixed_tok_s"] / row["shared_tok_s"], 3)
            row["exchange_ms_per_step"] = round(_exchange_ms(mixed, batch), 4)
            row["mixed_ms_per_step"] = round(best["mixed"] / (units["mixed"] / batch) * 1e3, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "bench": "mixed_tokenizers",
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "engine": mixed.engine,
        "max_new_tokens": args.max_new_tokens,
        "sampling": {"temperature": 1.0, "top_p": 0.9},
        "union_vocabulary": mixed.union_vocabulary.size,
        "longest_spelling": mixed.union_vocabulary.longest_spelling,
        "stacked_groups": getattr(mixed._engine, "group_members", None),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'B':>3} {'method':>6} {'shared tok/s':>12} {'mixed tok/s':>11} {'mixed/shared':>12} "
          f"{'tokens read/piece':>18} {'exchange ms/step':>16}")
    for r in rows:
        print(f"{r['batch']:>3} {r['method']:>6} {r['shared_tok_s']:>12} {r['mixed_tok_s']:>11} {r['mixed_over_shared']:>12} "
              f"{str(r['mixed_tokens_read_per_unit']):>18} {r['exchange_ms_per_step']:>16}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
