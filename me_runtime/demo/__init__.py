"""The embedded default ensemble: two small Llama-architecture causal LMs shipped with the package.

Member 0 ("code") was trained on Python source code, member 1 ("prose") on English prose; both
share one byte-level BPE tokenizer and the same architecture, so they ensemble token by token.
They are ordinary Hugging Face folders (config.json, bf16 model.safetensors, tokenizer files):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    code_path, prose_path = demo_members()
    model = AutoModelForCausalLM.from_pretrained(code_path)

This package holds only what loading and running them needs: the member folders, held-out
excerpts (heldout.json) and the small bits-per-byte comparison the CLI demo prints (scores.py);
SOURCES.md and EVAL.md record the training sources and the full held-out evaluation. The tools
that made them live in the repository, outside the installed packages: scripts/demo/corpus.py
(sources, held-out split), scripts/demo/train.py (training), scripts/demo/evaluate.py (bits per
byte on the full held-out split), run from the repository root as `python -m scripts.demo.<name>`.
`import me_runtime` does not import this module; `me_runtime.demo_members` loads it on first use.
"""
from __future__ import annotations

from pathlib import Path

MEMBERS_DIR = Path(__file__).resolve().parent / "members"
MEMBER_NAMES = ("code", "prose")
# Small excerpts of held-out text ({"code": [...], "prose": [...]}, each under 512 tokens) for
# tests and demos that score text offline; written by scripts/demo/corpus.py --write-heldout-sample.
HELDOUT_FILE = Path(__file__).resolve().parent / "heldout.json"


def demo_members() -> list[str]:
    """Paths of the two demo member folders, code member first, then prose member.

    Raises FileNotFoundError when the package was installed without its model files."""
    paths = [MEMBERS_DIR / name for name in MEMBER_NAMES]
    missing = [str(p) for p in paths if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo member folders are missing or incomplete: {missing}; reinstall the package or "
            f"rebuild them from a checkout of the repository with `python -m scripts.demo.train --out {MEMBERS_DIR}`"
        )
    return [str(p) for p in paths]


__all__ = ["demo_members", "MEMBERS_DIR", "MEMBER_NAMES", "HELDOUT_FILE"]
