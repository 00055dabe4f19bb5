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

The blend member has a tokenizer of its own, so it cannot join that token-level mixture; it is
scored alone (weights [1]) on the same texts, tokenized with its own tokenizer. Bits per byte
divide by the text's bytes, not its tokens, so its numbers compare directly with the others'.

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

# The members that share one tokenizer (code, prose) and the one with its own (blend).
SHARED_TOKENIZER_MEMBERS = ("code", "prose")
BLEND_MEMBER = "blend"
assert set(MEMBER_NAMES) == {*SHARED_TOKENIZER_MEMBERS, BLEND_MEMBER}
# Weights of the columns of the table: each shared-tokenizer member alone, then their mixture.
SETUPS = {"code member": [1.0, 0.0], "prose member": [0.0, 1.0], "mixture 0.5/0.5": [0.5, 0.5]}
DEFAULT_MIN_CONTEXT = 256  # half the members' 512-token context, as the shipped EVAL.md was measured


def load_ensemble(folder: Path, dtype=torch.float32):
    """Ensemble of the code and prose members in ``folder`` (loaded offline, fp32 compute)."""
    return Ensemble.from_pretrained([folder / name for name in SHARED_TOKENIZER_MEMBERS], dtype=dtype)


def load_blend(folder: Path, dtype=torch.float32):
    """The blend member of ``folder`` alone, as a one-member Ensemble with its own tokenizer, or
    None when ``folder`` has no blend member."""
    path = folder / BLEND_MEMBER
    if not (path / "config.json").is_file():
        return None
    return Ensemble.from_pretrained([path], dtype=dtype)


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


def evaluate_blend(blend, texts: list[str], *, min_context: int = DEFAULT_MIN_CONTEXT) -> dict:
    """{"bits_per_byte": value, "bytes": n, "tokens": n} of the one-member Ensemble ``blend`` over
    ``texts`` (each scored on its own, in its own tokenizer's tokens)."""
    ids = [encode(blend.tokenizer, t) for t in texts]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    total = sum(blend.score_rolling_ids(ids, min_context=min_context))
    return {"bits_per_byte": bits_per_byte(total, nbytes), "bytes": nbytes, "tokens": sum(len(x) for x in ids)}


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
                             max_new_tokens=max_new_tokens,
                             # blend has no padding token (like Llama-2); one prompt needs none anyway
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append((prompt, tok.decode(gen[0], skip_special_tokens=True)))
    return out


def training_summary(folder: Path) -> list[str]:
    """Markdown lines summarising each member's training.json (written by train.py)."""
    import json

    lines = ["| member | parameters | corpus train bytes | corpus train tokens | tokens trained on | epochs started | "
             "training wall time (s) | tokenizer | vocabulary | final loss | final held-out loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    shown_settings = {}  # member -> its settings (with the tokenizer kind filled in)
    for name in MEMBER_NAMES:
        path = folder / name / "training.json"
        if not path.is_file():
            if name in SHARED_TOKENIZER_MEMBERS:
                return []
            continue  # a members folder from before blend existed
        info = json.loads(path.read_text())
        settings = info["settings"]
        # Members trained before --tokenizer existed used the byte-level kind.
        shown_settings[name] = {**settings, "tokenizer": settings.get("tokenizer", "bytelevel")}
        seen = settings["steps"] * settings["batch_size"] * settings["context"]
        last = info["log"][-1]
        lines.append(f"| {name} | {info['parameters']:,} | {info['corpus']['train']['bytes']:,} | "
                     f"{info['train_tokens']:,} | {seen:,} | {info['epochs_started']} | {info['train_wall_s']} | "
                     f"{shown_settings[name]['tokenizer']} | {settings['vocab_size']:,} | {last['loss']} | "
                     f"{last.get('heldout_loss', '')} |")
    keys = ("seed", "tokenizer", "vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "context",
            "steps", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "clip", "parallel", "threads")
    first = shown_settings[SHARED_TOKENIZER_MEMBERS[0]]
    settings_lines = ["Settings: " + ", ".join(f"{k}={first.get(k)}" for k in keys)]
    for name, shown in shown_settings.items():
        differ = [k for k in keys if shown.get(k) != first.get(k)]
        if differ:
            settings_lines.append(f"Settings of {name} where they differ: "
                                  + ", ".join(f"{k}={shown.get(k)}" for k in differ))
    return lines + [""] + settings_lines


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
    blend = load_blend(args.members)
    corpora = corpus_lib.load_corpora(args.cache)
    code_docs = _cap(corpora["code"]["heldout"], args.max_bytes)
    prose_docs = _cap(corpora["prose"]["heldout"], args.max_bytes)
    mixed = corpus_lib.mixed_text(code_docs, prose_docs)
    texts = {
        "code (held-out)": [d.text for d in code_docs],
        "prose (held-out)": [d.text for d in prose_docs],
        "mixed 50/50": [mixed],
    }
    rows = {name: evaluate_texts(ensemble, t, min_context=args.min_context) for name, t in texts.items()}
    blend_rows = ({name: evaluate_blend(blend, t, min_context=args.min_context) for name, t in texts.items()}
                  if blend is not None else {})
    elapsed = time.perf_counter() - t0

    blend_header = " blend tokens | blend member |" if blend_rows else ""
    lines = [
        "| text | bytes | tokens | " + " | ".join(SETUPS) + " |" + blend_header,
        "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if blend_rows else ""),
    ]
    for name, r in rows.items():
        blend_cells = (f" {blend_rows[name]['tokens']:,} | {blend_rows[name]['bits_per_byte']:.3f} |"
                       if blend_rows else "")
        lines.append(f"| {name} | {r['bytes']:,} | {r['tokens']:,} | "
                     + " | ".join(f"{r['bits_per_byte'][s]:.3f}" for s in SETUPS) + " |" + blend_cells)
    code, prose, mix = (r["bits_per_byte"] for r in rows.values())
    margins = [
        f"- code held-out: code member better than prose member by "
        f"{code['prose member'] - code['code member']:.3f} bits/byte",
        f"- prose held-out: prose member better than code member by "
        f"{prose['code member'] - prose['prose member']:.3f} bits/byte",
        f"- mixed 50/50: mixture better than the best single member by "
        f"{min(mix['code member'], mix['prose member']) - mix['mixture 0.5/0.5']:.3f} bits/byte",
    ]
    if blend_rows:
        blend_mixed = blend_rows["mixed 50/50"]["bits_per_byte"]
        margins.append(f"- mixed 50/50: blend member (one model trained on both domains, its own tokenizer) "
                       f"{blend_mixed:.3f} bits/byte against the mixture's {mix['mixture 0.5/0.5']:.3f}")
    report = "\n".join(lines + [""] + margins)
    print(report)
    print(f"(evaluation took {elapsed:.0f} s)", file=sys.stderr)

    sample_md = []
    if args.samples:
        tok, models = ensemble.tokenizer, ensemble.models
        runs = [("code", models[0], tok, CODE_PROMPTS), ("prose", models[1], tok, PROSE_PROMPTS)]
        if blend is not None:
            # Without the trailing space: blend's tokenizer turns it into a lone "▁" token, which in
            # its training text only ever starts a run of indentation (words carry their own "▁"),
            # so it would continue with spaces (the SentencePiece trailing-space effect).
            runs.append(("blend", blend.models[0], blend.tokenizer,
                         [p.rstrip(" ") for p in CODE_PROMPTS + PROSE_PROMPTS]))
        for name, model, tok, prompts in runs:
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
            f"windows, each window after the first giving at least {args.min_context} tokens of context. "
            "The blend member (its own tokenizer) is scored alone on the same texts; \"tokens\" counts "
            "the shared tokenizer's tokens, \"blend tokens\" blend's.",
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
