"""Bits per byte of the demo members and of their 0.5/0.5 mixture on held-out text.

    python -m scripts.demo.evaluate --cache /tmp/demo_cache --write me_runtime/demo/EVAL.md   # from the repo root

For a text t encoded as <s> x_1 .. x_n, a model's bits per byte is
    -sum_i log p(x_i | <s> x_<i) / (len(t.encode("utf-8")) * ln 2),
and the mixture's is the same with p(x | prefix) = sum_m w_m p_m(x | prefix). Every number comes
from the runtime's exact scorer, Ensemble.score_rolling_ids, with weights [1, 0] (code member),
[0, 1] (prose member) and [0.5, 0.5] (mixture): no second copy of the mixture formula here.
Texts longer than the members' context (512 tokens) are scored in windows of 512 tokens; each
window after the first scores the next tokens with at least ``--min-context`` (default 256) tokens
of left context, so every token is scored once (see me_runtime/windows.py).

Held-out slices come from scripts/demo/corpus.py (documents never trained on): each document is
scored on its own. The mixed-domain text interleaves held-out code and prose pieces of about
2 KB (50/50 by bytes) and is scored as one text.
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from me_runtime import Ensemble

from . import MEMBER_NAMES, MEMBERS_DIR
from . import corpus as corpus_lib

# Weights of the rows of the table: each member alone, then the mixture.
SETUPS = {"code member": [1.0, 0.0], "prose member": [0.0, 1.0], "mixture 0.5/0.5": [0.5, 0.5]}
DEFAULT_MIN_CONTEXT = 256  # half the members' 512-token context, as the shipped EVAL.md was measured


def load_ensemble(folder: Path, dtype=torch.float32):
    """Ensemble of the code and prose members in ``folder`` (loaded offline, fp32 compute)."""
    return Ensemble.from_pretrained([folder / name for name in MEMBER_NAMES], dtype=dtype)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the scorer puts <s> in front)."""
    # The backend encoder: long texts are expected here (windows), so skip the length warning.
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def bits_per_byte(total_logprob: float, nbytes: int) -> float:
    return -total_logprob / (nbytes * math.log(2))


def evaluate_texts(ensemble, texts: list[str], *, min_context: int = DEFAULT_MIN_CONTEXT) -> dict:
    """{"bits_per_byte": {setup: value for SETUPS}, "bytes": n, "tokens": n} over ``texts``, each
    scored on its own, through Ensemble.score_rolling_ids with each setup's weights."""
    ids = [encode(ensemble.tokenizer, t) for t in texts]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    result = {"bits_per_byte": {}, "bytes": nbytes, "tokens": sum(len(x) for x in ids)}
    for name, weights in SETUPS.items():
        scorer = Ensemble(ensemble.models, tokenizer=ensemble.tokenizer, weights=weights)
        total = sum(scorer.score_rolling_ids(ids, min_context=min_context))
        result["bits_per_byte"][name] = bits_per_byte(total, nbytes)
    return result


def _cap(docs, max_bytes):
    if max_bytes is None:
        return docs
    out, size = [], 0
    for d in docs:
        if size >= max_bytes:
            break
        out.append(d)
        size += len(d.text.encode("utf-8"))
    return out


@torch.no_grad()
def samples(model, tok, prompts, *, seed: int, max_new_tokens: int, temperature: float):
    out = []
    for i, prompt in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = tok(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        out.append((prompt, tok.decode(gen[0], skip_special_tokens=True)))
    return out


def training_summary(folder: Path) -> list[str]:
    """Markdown lines summarising each member's training.json (written by train.py)."""
    import json

    lines = ["| member | parameters | corpus train bytes | corpus train tokens | tokens trained on | "
             "epochs started | training wall time (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    settings = None
    for name in MEMBER_NAMES:
        path = folder / name / "training.json"
        if not path.is_file():
            return []
        info = json.loads(path.read_text())
        settings = info["settings"]
        seen = settings["steps"] * settings["batch_size"] * settings["context"]
        lines.append(f"| {name} | {info['parameters']:,} | {info['corpus']['train']['bytes']:,} | "
                     f"{info['train_tokens']:,} | {seen:,} | {info['epochs_started']} | {info['train_wall_s']} |")
    keys = ("seed", "vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "context", "steps",
            "batch_size", "lr", "min_lr", "warmup", "weight_decay", "clip", "parallel", "threads")
    lines += ["", "Settings: " + ", ".join(f"{k}={settings.get(k)}" for k in keys)]
    return lines


CODE_PROMPTS = ["def ", "import os\n\n\nclass "]
PROSE_PROMPTS = ["Alice was ", "And it came to pass"]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Bits per byte of the demo members on held-out text.")
    ap.add_argument("--members", type=Path, default=MEMBERS_DIR)
    ap.add_argument("--cache", type=Path, default=corpus_lib.DEFAULT_CACHE)
    ap.add_argument("--max-bytes", type=int, default=None, help="cap each held-out slice (bytes)")
    ap.add_argument("--min-context", type=int, default=DEFAULT_MIN_CONTEXT,
                    help="least left context (tokens) of every window after a text's first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--samples", type=int, default=0, help="max new tokens of the samples (0: none)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--write", type=Path, default=None, help="write the report (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    ensemble = load_ensemble(args.members)
    corpora = corpus_lib.load_corpora(args.cache)
    code_docs = _cap(corpora["code"]["heldout"], args.max_bytes)
    prose_docs = _cap(corpora["prose"]["heldout"], args.max_bytes)
    mixed = corpus_lib.mixed_text(code_docs, prose_docs)
    rows = {
        "code (held-out)": evaluate_texts(ensemble, [d.text for d in code_docs], min_context=args.min_context),
        "prose (held-out)": evaluate_texts(ensemble, [d.text for d in prose_docs], min_context=args.min_context),
        "mixed 50/50": evaluate_texts(ensemble, [mixed], min_context=args.min_context),
    }
    elapsed = time.perf_counter() - t0

    lines = [
        "| text | bytes | tokens | " + " | ".join(SETUPS) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes']:,} | {r['tokens']:,} | "
                     + " | ".join(f"{r['bits_per_byte'][s]:.3f}" for s in SETUPS) + " |")
    code, prose, mix = (r["bits_per_byte"] for r in rows.values())
    margins = [
        f"- code held-out: code member better than prose member by "
        f"{code['prose member'] - code['code member']:.3f} bits/byte",
        f"- prose held-out: prose member better than code member by "
        f"{prose['code member'] - prose['prose member']:.3f} bits/byte",
        f"- mixed 50/50: mixture better than the best single member by "
        f"{min(mix['code member'], mix['prose member']) - mix['mixture 0.5/0.5']:.3f} bits/byte",
    ]
    report = "\n".join(lines + [""] + margins)
    print(report)
    print(f"(evaluation took {elapsed:.0f} s)", file=sys.stderr)

    sample_md = []
    if args.samples:
        tok, models = ensemble.tokenizer, ensemble.models
        for name, model, prompts in (("code", models[0], CODE_PROMPTS), ("prose", models[1], PROSE_PROMPTS)):
            for prompt, text in samples(model, tok, prompts, seed=0, max_new_tokens=args.samples,
                                        temperature=args.temperature):
                sample_md += [f"{name} member, prompt {prompt!r}:", "", "```", text, "```", ""]
                print(f"--- {name}\n{text}\n")

    if args.write:
        command = "python -m scripts.demo.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        body = [
            "# Demo members: held-out evaluation",
            "",
            f"Measured {datetime.date.today().isoformat()} with `{command}` "
            f"(torch {torch.__version__}, fp32 compute on the stored bf16 weights).",
            "",
            "Bits per byte (lower is better) of each member and of the exact 0.5/0.5 mixture "
            "(log sum_m w_m p_m(token | prefix) per token, Ensemble.score_rolling_ids) on the full "
            "held-out split. Held-out documents were never trained on; the mixed text alternates "
            "~2 KB pieces of held-out code and prose. Texts over 512 tokens are scored in 512-token "
            f"windows, each window after the first giving at least {args.min_context} tokens of context.",
            "",
            report,
            "",
        ]
        summary = training_summary(args.members)
        if summary:
            body += ["## Training (from the members' training.json)", ""] + summary + [""]
        if sample_md:
            body += [f"## Samples (plain sampling, temperature {args.temperature}, seed 0)", ""] + sample_md
        args.write.write_text("\n".join(body))


if __name__ == "__main__":
    main()
