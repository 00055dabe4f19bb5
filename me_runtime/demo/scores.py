"""Bits per byte of the demo members and of their mixture on the held-out excerpts shipped with
the package (heldout.json), computed with Ensemble.score_rolling_ids: the exact mixture
likelihood that ME and CE sample from at temperature 1.

These excerpts are small (a few documents of about 1.2 KB per kind); EVAL.md reports the same
measure on the full held-out split (scripts/demo/evaluate.py in the repository), so its numbers
differ from the ones computed here."""
from __future__ import annotations

import json
import math

from ..ensemble import Ensemble
from . import HELDOUT_FILE

SETUPS = {"code member": [1.0, 0.0], "prose member": [0.0, 1.0], "mixture 0.5/0.5": [0.5, 0.5]}


def heldout_texts() -> dict[str, list[str]]:
    """{"code": [...], "prose": [...]}: held-out excerpts never trained on (each < 512 tokens)."""
    with open(HELDOUT_FILE, encoding="utf-8") as f:
        return json.load(f)


def text_kinds() -> dict[str, list[str]]:
    """The texts of each row of compare(): the code excerpts, the prose excerpts, and both sets
    together ("mixed 50/50", every excerpt still scored as its own document)."""
    texts = heldout_texts()
    return {"code": texts["code"], "prose": texts["prose"], "mixed 50/50": texts["code"] + texts["prose"]}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]


def bits_per_byte(models, tokenizer, texts: list[str], weights) -> float:
    """-log2 p(texts) / bytes under the mixture `weights` of `models`; each text is scored whole
    as a document (after the BOS token, in windows if it outgrows the members' context), so
    weights [1, 0] give member 0 alone."""
    ens = Ensemble(models, tokenizer=tokenizer, weights=weights)
    logp = ens.score_rolling_ids(_encode(tokenizer, texts))
    return -sum(logp) / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def excerpt_sizes(tokenizer) -> dict[str, dict[str, int]]:
    """{text kind: {"documents", "bytes", "tokens"}} of what compare() scores (tokens without BOS)."""
    return {
        kind: {
            "documents": len(docs),
            "bytes": sum(len(t.encode("utf-8")) for t in docs),
            "tokens": sum(len(ids) for ids in _encode(tokenizer, docs)),
        }
        for kind, docs in text_kinds().items()
    }


def compare(models, tokenizer) -> dict[str, dict[str, float]]:
    """{text kind: {"code member", "prose member", "mixture 0.5/0.5": bits per byte}} for the code
    excerpts, the prose excerpts, and both together (about 50/50 code and prose by bytes)."""
    return {
        kind: {name: bits_per_byte(models, tokenizer, docs, w) for name, w in SETUPS.items()}
        for kind, docs in text_kinds().items()
    }
