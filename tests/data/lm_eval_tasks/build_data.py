"""Writes the items of the demo lm-eval tasks (deterministic; the .jsonl files are committed).

    python tests/data/lm_eval_tasks/build_data.py

From the held-out excerpts shipped with the demo members (me_runtime/demo/heldout.json: 4 Python
code excerpts, 4 English prose excerpts, none seen in training):
  * me_demo_mc.jsonl (multiple choice, 40 items): the first part of an excerpt, then the real
    next ~60 characters vs the chunks at the same place of 3 other excerpts (one of the same
    kind, two of the other kind); the answer's position is drawn by a seeded generator.
  * me_demo_gen.jsonl (generate_until, 16 items): the first part of an excerpt up to a line
    break; the target is the next line (exact match).
  * me_demo_ppl.jsonl (loglikelihood_rolling, 6 docs): whole excerpts, and two of them joined so
    that the text spans more than one 512-token window.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT = HERE.parents[2] / "me_runtime" / "demo" / "heldout.json"
CONTEXT_CHARS = 320  # context of at most this many characters before the split point
CHUNK_CHARS = 60  # length of each choice (cut at a space or line break)
SPLITS_PER_EXCERPT = 5


def _word_start(text: str, pos: int) -> int:
    """The first position >= pos that starts a word (right after a space or a line break)."""
    while pos < len(text) and text[pos - 1] not in " \n":
        pos += 1
    return pos


def _chunk(text: str, start: int) -> str:
    """About CHUNK_CHARS characters from start, extended to the end of a word, started on its
    separator so that the choice reads as the text's continuation (" word ...")."""
    end = start + CHUNK_CHARS
    while end < len(text) and text[end] not in " \n":
        end += 1
    return text[start - 1 : end]


def main() -> None:
    heldout = json.loads(HELDOUT.read_text())
    excerpts = [("code", t) for t in heldout["code"]] + [("prose", t) for t in heldout["prose"]]
    rng = random.Random(20261130)

    mc = []
    for e, (kind, text) in enumerate(excerpts):
        for j in range(SPLITS_PER_EXCERPT):
            split = _word_start(text, 200 + j * 180)
            context = text[max(0, split - 1 - CONTEXT_CHARS) : split - 1]
            gold = _chunk(text, split)
            same = [i for i, (k, _) in enumerate(excerpts) if k == kind and i != e]
            other = [i for i, (k, _) in enumerate(excerpts) if k != kind]
            sources = [rng.choice(same)] + rng.sample(other, 2)
            distractors = [_chunk(excerpts[i][1], _word_start(excerpts[i][1], split)) for i in sources]
            choices = distractors[:]
            answer = rng.randrange(len(choices) + 1)
            choices.insert(answer, gold)
            mc.append({"id": len(mc), "kind": kind, "context": context, "choices": choices, "answer": answer})

    gen = []
    for e, (kind, text) in enumerate(excerpts):
        starts = [text.find("\n", 300), text.find("\n", 700)]
        for s in starts:
            nxt = text.find("\n", s + 1)
            if s < 0 or nxt < 0:
                continue
            gen.append({"id": len(gen), "kind": kind, "context": text[max(0, s + 1 - CONTEXT_CHARS) : s + 1],
                        "target": text[s + 1 : nxt]})

    ppl = [{"id": i, "kind": kind, "text": text} for i, (kind, text) in enumerate(excerpts[:2] + excerpts[4:6])]
    ppl += [{"id": 4, "kind": "code", "text": excerpts[2][1] + "\n" + excerpts[3][1]},
            {"id": 5, "kind": "prose", "text": excerpts[6][1] + "\n" + excerpts[7][1]}]

    for name, rows in (("me_demo_mc", mc), ("me_demo_gen", gen), ("me_demo_ppl", ppl)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
