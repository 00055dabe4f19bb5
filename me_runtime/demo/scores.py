"""Bits per byte of the demo members and of their mixture on the held-out excerpts shipped with
the package (heldout.json), computed with Ensemble.score_ids: the exact mixture likelihood that
ME and CE sample from at temperature 1."""
from __future__ import annotations

import json
import math

from . import HELDOUT_FILE


def heldout_texts() -> dict[str, list[str]]:
    """{"code": [...], "prose": [...]}: held-out excerpts never trained on (each < 512 tokens)."""
    with open(HELDOUT_FILE, encoding="utf-8") as f:
        return json.load(f)


def bits_per_byte(models, tokenizer, texts: list[str], weights) -> float:
    """-log2 p(texts) / bytes under the mixture `weights` of `models`; each text is scored as a
    document (after the BOS token), so weights [1, 0] give member 0 alone."""
    from ..ensemble import Ensemble

    ens = Ensemble(models, tokenizer=tokenizer, weights=weights)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    logp = ens.score_ids([[tokenizer.bos_token_id]] * len(docs), docs)
    return -sum(logp) / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)


def compare(models, tokenizer) -> dict[str, dict[str, float]]:
    """{text kind: {"code member", "prose member", "mixture 0.5/0.5": bits per byte}} for the code
    excerpts, the prose excerpts, and both together (a 50/50 mixed-domain text)."""
    texts = heldout_texts()
    kinds = {"code": texts["code"], "prose": texts["prose"], "mixed 50/50": texts["code"] + texts["prose"]}
    setups = {"code member": [1.0, 0.0], "prose member": [0.0, 1.0], "mixture 0.5/0.5": [0.5, 0.5]}
    return {kind: {name: bits_per_byte(models, tokenizer, docs, w) for name, w in setups.items()} for kind, docs in kinds.items()}
