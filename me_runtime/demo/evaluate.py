"""Bits per byte of the demo members and of their 0.5/0.5 mixture on held-out text.

    python -m me_runtime.demo.evaluate --members me_runtime/demo/members --write EVAL.md

For a text t encoded as <s> x_1 .. x_n, a model's bits per byte is
    -sum_i log p(x_i | <s> x_<i) / (len(t.encode("utf-8")) * ln 2),
and the mixture's is the same with p(x | prefix) = sum_m w_m p_m(x | prefix), computed exactly
per token as logsumexp_m(log w_m + log p_m). Texts longer than the members' context are scored
with sliding windows (window = context, stride = context / 2): every token is scored once, with
at least half a window of left context after the first window.

Held-out slices come from me_runtime.demo.corpus (documents never trained on): each document is
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

from . import corpus as corpus_lib

MEMBER_NAMES = ("code", "prose")


def load_members(folder: Path, dtype=torch.float32):
    """(tokenizer, [code model, prose model]) loaded offline from ``folder``/{code,prose}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / MEMBER_NAMES[0])
    models = [AutoModelForCausalLM.from_pretrained(folder / n, dtype=dtype).eval() for n in MEMBER_NAMES]
    return tok, models


@torch.no_grad()
def token_logprobs(model, ids: list[int], context: int | None = None) -> torch.Tensor:
    """float64 [len(ids) - 1]: log p(ids[i] | ids[:i]) for i >= 1 (sliding windows past
    ``context`` tokens, default the model's max_position_embeddings)."""
    context = context or model.config.max_position_embeddings
    keep = context // 2  # left context carried into each later window
    x = torch.tensor(ids, dtype=torch.long)
    out = torch.empty(len(ids) - 1, dtype=torch.float64)
    start, scored = 0, 1  # window start; first position (index into ids) not yet scored
    while scored < len(ids):
        end = min(start + context, len(ids))
        logp = torch.log_softmax(model(input_ids=x[None, start:end]).logits[0].double(), dim=-1)
        pos = torch.arange(scored, end)  # position p is predicted by logits row p - 1 - start
        out[pos - 1] = logp[pos - 1 - start, x[pos]]
        scored, start = end, end - keep
    return out


def text_logprobs(models, tok, text: str, context: int | None = None) -> torch.Tensor:
    """float64 [M, n]: per-token log-probabilities of ``text`` (after <s>) under each model."""
    # The backend encoder: long texts are expected here (windows), so skip the length warning.
    ids = [tok.bos_token_id] + tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.stack([token_logprobs(m, ids, context) for m in models])


def mixture_logprobs(member_logprobs: torch.Tensor, weights) -> torch.Tensor:
    """log sum_m w_m p_m per token from [M, n] member log-probabilities."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return torch.logsumexp(member_logprobs + torch.log(w / w.sum())[:, None], dim=0)


def bits_per_byte(total_logprob: float, nbytes: int) -> float:
    return -total_logprob / (nbytes * math.log(2))


def evaluate_texts(models, tok, texts: list[str], weights=(0.5, 0.5)) -> dict:
    """Bits per byte of each member and of the mixture over a list of texts (each scored alone)."""
    sums = torch.zeros(len(models) + 1, dtype=torch.float64)
    nbytes = ntokens = 0
    for text in texts:
        lp = text_logprobs(models, tok, text)
        sums[:-1] += lp.sum(dim=1)
        sums[-1] += mixture_logprobs(lp, weights).sum()
        nbytes += len(text.encode("utf-8"))
        ntokens += lp.shape[1]
    bpb = [bits_per_byte(float(s), nbytes) for s in sums]
    return {"members": bpb[:-1], "mixture": bpb[-1], "bytes": nbytes, "tokens": ntokens}


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
    ap.add_argument("--members", type=Path, default=Path(__file__).resolve().parent / "members")
    ap.add_argument("--cache", type=Path, default=corpus_lib.DEFAULT_CACHE)
    ap.add_argument("--max-bytes", type=int, default=None, help="cap each held-out slice (bytes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--samples", type=int, default=0, help="max new tokens of the samples (0: none)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--write", type=Path, default=None, help="write the report (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    tok, models = load_members(args.members)
    corpora = corpus_lib.load_corpora(args.cache)
    code_docs = _cap(corpora["code"]["heldout"], args.max_bytes)
    prose_docs = _cap(corpora["prose"]["heldout"], args.max_bytes)
    mixed = corpus_lib.mixed_text(code_docs, prose_docs)
    rows = {
        "code (held-out)": evaluate_texts(models, tok, [d.text for d in code_docs]),
        "prose (held-out)": evaluate_texts(models, tok, [d.text for d in prose_docs]),
        "mixed 50/50": evaluate_texts(models, tok, [mixed]),
    }
    elapsed = time.perf_counter() - t0

    lines = [
        "| text | bytes | tokens | code member | prose member | mixture 0.5/0.5 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes']:,} | {r['tokens']:,} | {r['members'][0]:.3f} | "
                     f"{r['members'][1]:.3f} | {r['mixture']:.3f} |")
    code, prose, mix = rows["code (held-out)"], rows["prose (held-out)"], rows["mixed 50/50"]
    margins = [
        f"- code held-out: code member better than prose member by "
        f"{code['members'][1] - code['members'][0]:.3f} bits/byte",
        f"- prose held-out: prose member better than code member by "
        f"{prose['members'][0] - prose['members'][1]:.3f} bits/byte",
        f"- mixed 50/50: mixture better than the best single member by "
        f"{min(mix['members']) - mix['mixture']:.3f} bits/byte",
    ]
    report = "\n".join(lines + [""] + margins)
    print(report)
    print(f"(evaluation took {elapsed:.0f} s)", file=sys.stderr)

    sample_md = []
    if args.samples:
        for name, model, prompts in (("code", models[0], CODE_PROMPTS), ("prose", models[1], PROSE_PROMPTS)):
            for prompt, text in samples(model, tok, prompts, seed=0, max_new_tokens=args.samples,
                                        temperature=args.temperature):
                sample_md += [f"{name} member, prompt {prompt!r}:", "", "```", text, "```", ""]
                print(f"--- {name}\n{text}\n")

    if args.write:
        command = "python -m me_runtime.demo.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        body = [
            "# Demo members: held-out evaluation",
            "",
            f"Measured {datetime.date.today().isoformat()} with `{command}` "
            f"(torch {torch.__version__}, fp32 compute on the stored bf16 weights).",
            "",
            "Bits per byte (lower is better) of each member and of the exact 0.5/0.5 mixture "
            "(log sum_m w_m p_m(token | prefix) per token). Held-out documents were never trained "
            "on; the mixed text alternates ~2 KB pieces of held-out code and prose.",
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
