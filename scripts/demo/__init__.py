"""How the demo members shipped in me_runtime/demo were made: corpus gathering (corpus.py),
training (train.py) and the held-out evaluation (evaluate.py). Run from the repository root:

    python -m scripts.demo.corpus --cache ~/.cache/me-ensemble-demo      # fetch, summarise
    nice python -m scripts.demo.train --out me_runtime/demo/members --seed 0
    nice python -m scripts.demo.train --out me_runtime/demo/members --seed 0 --members blend \
        --tokenizer metaspace --vocab-size 3072 --threads 1
    python -m scripts.demo.evaluate --write me_runtime/demo/EVAL.md

These write into the source tree's me_runtime/demo (never into an installed copy), so the paths
below are relative to this checkout.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PACKAGE_DIR = REPO_ROOT / "me_runtime" / "demo"  # members/, heldout.json, EVAL.md, SOURCES.md
MEMBERS_DIR = DEMO_PACKAGE_DIR / "members"
HELDOUT_FILE = DEMO_PACKAGE_DIR / "heldout.json"
# code and prose share one byte-level tokenizer; blend (a 50/50 mix of their corpora) has its
# own SentencePiece-style one (train.py --tokenizer metaspace --vocab-size 3072).
MEMBER_NAMES = ("code", "prose", "blend")
