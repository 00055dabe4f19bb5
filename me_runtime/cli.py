"""`me-generate`: generate from an ensemble of Hugging Face models on the command line.

    me-generate                                   # the two demo members shipped with the package
    me-generate --compare                         # ... and the same prompt/seed with CE, for speed
    me-generate --model A --model B --weights 0.7 0.3 --prompt "def add(a, b):" --method me
    me-generate --demo-mixed                      # three demo members, one with its own tokenizer

Prints the generated text, the member that produced each token, and tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DEFAULT_PROMPT = 'def read_config(path):\n    """Read the configuration file and return'
_COLORS = ("\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m")
_RESET = "\033[0m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="me-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", metavar="PATH", help="a member (repeat for each); default: the demo members")
    p.add_argument("--demo-mixed", action="store_true",
                   help="the demo members code, prose and blend (blend has its own tokenizer: members exchange text)")
    p.add_argument("--weights", type=float, nargs="+", help="mixture weights, one per member (default: uniform)")
    p.add_argument("--prompt", default=None, help="prompt text (default: a short code-and-prose prompt)")
    p.add_argument("--method", choices=("me", "ce", "single"), default="me")
    p.add_argument("--selection", choices=("independent", "shared"), default="independent")
    p.add_argument("--member", type=int, default=0, help="member for --method single")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=None, help="default 1.0 (0.7 for the demo members)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-tokens", type=int, default=0,
                   help="--method ce: draft up to this many tokens per round with ME and verify them (exact CE)")
    p.add_argument("--truncate", choices=("left",), default=None,
                   help="a prompt too long for the members' context keeps its last tokens (default: refuse it)")
    p.add_argument("--draft-member", type=int, default=None,
                   help="with --draft-tokens: the member that drafts (default: drawn from the weights)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="torch dtype for the members, e.g. bfloat16 (default: as saved)")
    p.add_argument("--engine", choices=("auto", "stacked", "hf"), default="auto",
                   help="stacked: one grouped-GEMM forward per step (Llama/Mistral/Qwen2/Qwen3); hf: Hugging Face "
                   "forwards member by member; auto: stacked when every member is supported")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + new tokens (default: the members' smallest context length)")
    p.add_argument("--placement", choices=("local", "ray"), default="local",
                   help="ray: each member in a Ray actor (pip install '.[ray]'; joins or starts a Ray cluster)")
    p.add_argument("--ray-options", default=None, metavar="JSON",
                   help='with --placement ray: ray_options as JSON, e.g. \'{"num_gpus": 1, "timeout_s": 60}\'')
    p.add_argument("--device", default=None, help="device for the members (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the tiny demo members, else torch's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from the checkpoints")
    p.add_argument("--compare", action="store_true", help="also run CE on the same prompt and seed and compare speed")
    p.add_argument("--no-trace", action="store_true", help="do not print the per-token member trace")
    p.add_argument("--no-score", action="store_true", help="demo: skip the held-out bits-per-byte comparison")
    return p


def text_of(ens):
    """ids of a Generation -> text: the shared tokenizer's decode, or for members with different
    tokenizers the emitted pieces' bytes (union-vocabulary ids)."""
    if getattr(ens, "union_vocabulary", None) is None:
        return lambda ids: ens.tokenizer.decode(ids, skip_special_tokens=True)
    pieces = ens.union_vocabulary.pieces
    return lambda ids: b"".join(pieces[u] for u in ids).decode("utf-8", errors="replace")


def format_trace(decode, token_ids: list[int], members: list[int], color: bool) -> str:
    """The generated text split into runs of tokens from one member (decode: ids -> text):
    coloured by member on a terminal, else as [m|text] segments."""
    if not token_ids:
        return ""
    pieces, start = [], 0
    for i in range(1, len(token_ids) + 1):
        if i == len(token_ids) or members[i] != members[start]:
            text = decode(token_ids[start:i])
            m = members[start]
            if color:
                pieces.append(f"{_COLORS[m % len(_COLORS)]}{text}{_RESET}")
            else:
                pieces.append(f"[{m}|{text}]")
            start = i
    return "".join(pieces)


def _timed_generate(ens, prompt: str, args, method: str):
    kwargs = dict(
        method=method,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        selection=args.selection,
        member=args.member,
        truncate=args.truncate,
    )
    if args.draft_tokens or args.draft_member is not None:
        kwargs.update(draft_tokens=args.draft_tokens, draft_member=args.draft_member)
    ens.generate([prompt], **{**kwargs, "max_new_tokens": min(4, args.max_new_tokens)})  # warm-up
    if ens.device.type == "cuda":
        torch.cuda.synchronize(ens.device)
    t0 = time.perf_counter()
    gen = ens.generate([prompt], **kwargs)[0]
    if ens.device.type == "cuda":
        torch.cuda.synchronize(ens.device)
    seconds = time.perf_counter() - t0
    return gen, len(gen.token_ids) / max(seconds, 1e-9)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .ensemble import Ensemble

    paths = args.model
    weights = args.weights
    threads = args.threads
    if args.demo_mixed and paths:
        print("me-generate: --demo-mixed and --model exclude each other", file=sys.stderr)
        return 2
    if args.demo_mixed:
        from .demo import ALL_MEMBER_NAMES, demo_member

        paths = [demo_member(name) for name in ALL_MEMBER_NAMES]
        threads = threads or 1
        if args.temperature is None:
            args.temperature = 0.7
        print("me-generate: demo members (code, prose: one tokenizer; blend: its own, so members exchange text): "
              + ", ".join(os.path.relpath(p) for p in paths))
    elif not paths:
        from . import demo_members

        paths = demo_members()
        weights = weights or [0.5, 0.5]
        # 4M-parameter members: OpenMP hand-offs cost more than a second thread saves.
        threads = threads or 1
        if args.temperature is None:
            args.temperature = 0.7  # tiny members: a cooler distribution reads better
        print(f"me-generate: demo members (code, prose): {', '.join(os.path.relpath(p) for p in paths)}")
    if threads:
        torch.set_num_threads(threads)
    if args.temperature is None:
        args.temperature = 1.0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    placement = {"placement": args.placement}
    if args.ray_options is not None:
        if args.placement != "ray":
            print("me-generate: --ray-options needs --placement ray", file=sys.stderr)
            return 2
        try:
            placement["ray_options"] = json.loads(args.ray_options)
        except json.JSONDecodeError as err:
            print(f"me-generate: --ray-options is not JSON: {err}", file=sys.stderr)
            return 2
    try:
        ens = Ensemble.from_pretrained(
            paths, weights=weights, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
            engine=args.engine, max_seq_len=args.max_seq_len, **placement,
        )
    except (ValueError, TypeError, OSError) as err:
        print(f"me-generate: {err}", file=sys.stderr)
        return 2
    try:
        return _run(ens, args)
    finally:
        if hasattr(ens, "close"):  # placement="ray": free the actors
            ens.close()


def _run(ens, args) -> int:
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    try:
        gen, tps = _timed_generate(ens, prompt, args, args.method)
    except (ValueError, TypeError) as err:
        print(f"me-generate: {err}", file=sys.stderr)
        return 2

    print(f"--- prompt (temperature {args.temperature}, top_p {args.top_p}, seed {args.seed})\n{prompt}")
    print(f"--- {args.method} ({len(gen.token_ids)} tokens, finish: {gen.finish_reason})\n{prompt}{gen.text}")
    if not args.no_trace and args.method != "ce":
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        legend = ", ".join(
            (f"{_COLORS[m % len(_COLORS)]}member {m}{_RESET}" if color else f"[{m}|...] = member {m}")
            for m in range(ens.num_members)
        )
        print(f"--- member trace ({legend})")
        print(format_trace(text_of(ens), gen.token_ids, gen.members, color))
        counts = [gen.members.count(m) for m in range(ens.num_members)]
        print("--- tokens per member: " + ", ".join(f"{m}: {c}" for m, c in enumerate(counts)))
    if gen.drafted:
        print(f"--- drafting: {gen.accepted} of {gen.drafted} drafted tokens accepted "
              f"(acceptance rate {gen.accepted / gen.drafted:.2f})")
    print(f"--- speed: {args.method} {tps:.1f} tokens/s on {ens.device} (engine {ens.engine})")
    if hasattr(ens, "memory_bytes"):  # (placement="ray": the members' memory is the actors')
        mem = ens.memory_bytes()
        cache = "" if mem["kv_cache"] is None else f", KV cache {mem['kv_cache'] / 2**20:.1f} MiB (preallocated)"
        print(f"--- memory: weights {mem['weights'] / 2**20:.1f} MiB (held once){cache}")
    else:
        print(f"--- placement: Ray actors {', '.join(ens.actor_names)}")
    if args.compare and (args.method != "ce" or args.draft_tokens):
        plain = argparse.Namespace(**{**vars(args), "draft_tokens": 0, "draft_member": None})
        ce_gen, ce_tps = _timed_generate(ens, prompt, plain, "ce")
        print(f"--- ce ({len(ce_gen.token_ids)} tokens, same prompt and seed)\n{prompt}{ce_gen.text}")
        print(f"--- speed: {args.method} {tps:.1f} tokens/s vs ce {ce_tps:.1f} tokens/s ({tps / ce_tps:.2f}x)")
    if getattr(ens, "union_vocabulary", None) is not None:
        v = ens.union_vocabulary
        print(f"--- tokenizers: one per member (union vocabulary {v.size:,} pieces; a piece costs member m up to "
              f"{v.longest_spelling} tokens); 'tokens' above are pieces")
    if not args.model and not args.demo_mixed and not args.no_score and hasattr(ens, "models"):
        from .demo.scores import compare, excerpt_sizes

        sizes = excerpt_sizes(ens.tokenizer)
        table = compare(ens.models, ens.tokenizer)
        print(
            "--- why ensemble: bits per byte (lower is better; exact mixture, Ensemble.score_rolling_ids)\n"
            "    on the held-out excerpts shipped in me_runtime/demo/heldout.json, each excerpt scored as\n"
            "    its own document; 'mixed 50/50' is the code and prose excerpts together. EVAL.md and the\n"
            "    README report the full held-out split (much more text), hence other numbers."
        )
        names = list(next(iter(table.values())))
        print(f"{'text':<12}{'docs':>5}{'bytes':>8}{'tokens':>8}" + "".join(f"{n:>17}" for n in names))
        for kind, row in table.items():
            size = sizes[kind]
            print(
                f"{kind:<12}{size['documents']:>5}{size['bytes']:>8,}{size['tokens']:>8,}"
                + "".join(f"{row[n]:>17.3f}" for n in names)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
