"""The embedded default ensemble: small Llama-architecture causal LMs shipped with the package.

Member 0 ("code") was trained on Python source code, member 1 ("prose") on English prose; both
share one byte-level BPE tokenizer (vocabulary 4096, <pad>/<s>/</s> = 0/1/2) and the same
architecture, so they ensemble token by token. `demo_members()` returns exactly these two: the
default ensemble.

A third member, "blend", was trained on equal amounts of the same code and prose and has the
same architecture but a different tokenizer: SentencePiece-style BPE as Llama-2 / Mistral ship
it (a "▁" for each space, byte fallback to <0x00>..<0xFF>, vocabulary 3072, <unk>/<s>/</s> =
0/1/2). Its ids mean different things from the shared tokenizer's, so it ensembles with the
others only through text (members with different tokenizers); `demo_member("blend")` gives its
folder. All are ordinary Hugging Face folders (config.json, bf16 model.safetensors, tokenizer
files):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    code_path, prose_path = demo_members()
    model = AutoModelForCausalLM.from_pretrained(code_path)
    blend_tokenizer = AutoTokenizer.from_pretrained(demo_member("blend"))

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
# The default ensemble: the members that share one tokenizer, in demo_members() order.
MEMBER_NAMES = ("code", "prose")
# Every shipped member; "blend" has a tokenizer of its own.
ALL_MEMBER_NAMES = ("code", "prose", "blend")
# Small excerpts of held-out text ({"code": [...], "prose": [...]}, each under 512 tokens) for
# tests and demos that score text offline; written by scripts/demo/corpus.py --write-heldout-sample.
HELDOUT_FILE = Path(__file__).resolve().parent / "heldout.json"


def _shipped_paths(names) -> list[str]:
    """Folders of the members ``names``; FileNotFoundError when any is missing or incomplete."""
    paths = [MEMBERS_DIR / name for name in names]
    missing = [str(p) for p in paths if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo member folders are missing or incomplete: {missing}; reinstall the package or "
            f"rebuild them from a checkout of the repository with `python -m scripts.demo.train --out {MEMBERS_DIR}`"
            " (see scripts/demo/__init__.py for the blend member's options)"
        )
    return [str(p) for p in paths]


def demo_members() -> list[str]:
    """Paths of the two demo member folders that share one tokenizer, code member first, then
    prose member (the default ensemble; "blend" is not among them, see demo_member).

    Raises FileNotFoundError when the package was installed without its model files."""
    return _shipped_paths(MEMBER_NAMES)


def demo_member(name: str) -> str:
    """Path of the shipped member folder ``name``, one of ALL_MEMBER_NAMES ("code", "prose",
    "blend").

    Raises ValueError for another name, FileNotFoundError when the package was installed
    without that member's model files."""
    if name not in ALL_MEMBER_NAMES:
        raise ValueError(f"unknown demo member {name!r}; the shipped members are {ALL_MEMBER_NAMES}")
    return _shipped_paths([name])[0]


__all__ = ["demo_members", "demo_member", "MEMBERS_DIR", "MEMBER_NAMES", "ALL_MEMBER_NAMES", "HELDOUT_FILE"]
