"""The demo tooling in scripts/demo (not installed): it runs from the repository root as
`python -m scripts.demo.<name>`, writes into this checkout's me_runtime/demo, and its own logic
(held-out split, mixed text, aggregation of bits per byte) does what its docstrings say."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts/ is repository tooling, importable from the root only
    sys.path.insert(0, str(ROOT))

from scripts.demo import HELDOUT_FILE, MEMBERS_DIR, corpus, evaluate  # noqa: E402

import me_runtime.demo  # noqa: E402
from me_runtime.demo.scores import bits_per_byte, heldout_texts  # noqa: E402


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


def test_scripts_write_into_this_checkouts_demo_package():
    assert HELDOUT_FILE == me_runtime.demo.HELDOUT_FILE
    assert MEMBERS_DIR == me_runtime.demo.MEMBERS_DIR
    assert corpus.HELDOUT_SAMPLE_FILE == HELDOUT_FILE


def test_scripts_are_not_installed_packages():
    from setuptools import find_packages

    # the selection setup.py makes
    packages = find_packages(str(ROOT), include=["me_kernels", "me_kernels.*", "me_runtime", "me_runtime.*"])
    assert "me_runtime.demo" in packages
    assert not [p for p in packages if p.split(".")[0] == "scripts"]


def test_train_runs_as_a_module_from_the_root():
    done = subprocess.run(
        [sys.executable, "-m", "scripts.demo.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "--seed" in done.stdout


def test_heldout_split_depends_on_the_name_only():
    docs = [corpus.Document(f"code:pkg/mod{i}.py", "x = 1\n") for i in range(400)]
    train, held = corpus.split_heldout(docs)
    assert len(train) + len(held) == len(docs) and not set(train) & set(held)
    assert 0 < len(held) < 0.15 * len(docs)  # about HELDOUT_FRACTION = 5 %
    assert [d.name for d in held] == [d.name for d in docs if corpus.is_heldout(d.name)]
    assert corpus.split_heldout(list(reversed(docs)))[1] == list(reversed(held))


def test_mixed_text_alternates_domains_half_and_half():
    code = [corpus.Document(f"code:{i}", "".join(f"c{i}_{j} = {j}\n" for j in range(300))) for i in range(3)]
    prose = [corpus.Document(f"prose:{i}", "".join(f"Prose line {i} {j}.\n" for j in range(300))) for i in range(3)]
    mixed = corpus.mixed_text(code, prose, piece_bytes=500)
    pieces = mixed.split("\n\n")
    assert len(pieces) >= 4
    assert all(p.startswith("c") for p in pieces[0::2]) and all(p.startswith("Prose") for p in pieces[1::2])
    code_bytes = sum(len(p.encode()) for p in pieces[0::2])
    assert abs(code_bytes / sum(len(p.encode()) for p in pieces) - 0.5) < 0.1


@pytest.fixture(scope="module")
def ensemble():
    torch.set_num_threads(1)
    return evaluate.load_ensemble(MEMBERS_DIR)


def test_evaluate_texts_sums_over_documents(ensemble):
    texts = heldout_texts()["code"][:2]
    row = evaluate.evaluate_texts(ensemble, texts)
    assert row["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert row["tokens"] == sum(len(evaluate.encode(ensemble.tokenizer, t)) for t in texts)
    assert set(row["bits_per_byte"]) == set(evaluate.SETUPS)
    # short texts fit one window: the same numbers as the package's comparison
    for name, weights in evaluate.SETUPS.items():
        expected = bits_per_byte(ensemble.models, ensemble.tokenizer, texts, weights)
        assert row["bits_per_byte"][name] == pytest.approx(expected, rel=1e-6)
    assert row["bits_per_byte"]["code member"] < row["bits_per_byte"]["prose member"]
    assert evaluate.bits_per_byte(-math.log(2) * 10, 5) == pytest.approx(2.0)


def test_training_summary_reads_the_shipped_members():
    lines = evaluate.training_summary(MEMBERS_DIR)
    assert lines[0].startswith("| member | parameters")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["code", "prose"]
    assert any(line.startswith("Settings: seed=") for line in lines)


def test_evaluate_main_writes_the_report(monkeypatch, tmp_path, capsys):
    # The shipped excerpts stand in for the corpora (fetching those needs PyPI and Debian mirrors).
    texts = heldout_texts()
    fake = {
        kind: {"train": [], "heldout": [corpus.Document(f"{kind}:{i}", t) for i, t in enumerate(texts[kind])]}
        for kind in ("code", "prose")
    }
    monkeypatch.setattr(evaluate.corpus_lib, "load_corpora", lambda cache: fake)
    report = tmp_path / "EVAL.md"
    evaluate.main(["--write", str(report), "--max-bytes", "2500"])
    out = capsys.readouterr().out
    written = report.read_text()
    assert "python -m scripts.demo.evaluate --write" in written
    rows = [line for line in written.splitlines() if line.startswith("| code (held-out)")]
    assert len(rows) == 1 and rows[0] in out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    code_docs = evaluate._cap(fake["code"]["heldout"], 2500)
    assert int(cells[1].replace(",", "")) == sum(len(d.text.encode()) for d in code_docs)
    assert float(cells[3]) < float(cells[4])  # the code member wins on code
    assert "mixed 50/50: mixture better than the best single member by" in written
    assert "## Training (from the members' training.json)" in written


def test_blend_corpus_takes_equal_bytes_of_each_domain_alternating():
    code = [corpus.Document(f"code:m{i}.py", "x = 1\n" * (20 + 7 * (i % 5))) for i in range(60)]
    prose = [corpus.Document(f"prose:book:{i}", "Some prose here.\n" * (5 + i % 3)) for i in range(25)]
    held = {"code": [corpus.Document("code:h.py", "y = 2\n")], "prose": [corpus.Document("prose:b:99", "Held.\n")]}
    corpora = {"code": {"train": code, "heldout": held["code"]}, "prose": {"train": prose, "heldout": held["prose"]}}
    blend = corpus.blend_corpus(corpora)

    def nbytes(docs):
        return sum(len(d.text.encode()) for d in docs)

    picked_code = [d for d in blend["train"] if d.name.startswith("code:")]
    picked_prose = [d for d in blend["train"] if d.name.startswith("prose:")]
    assert picked_prose == prose  # the smaller domain is taken whole
    largest_code_doc = max(len(d.text.encode()) for d in code)
    assert abs(nbytes(picked_code) - nbytes(prose)) <= largest_code_doc / 2
    # spread over the whole code corpus, in its order, not just its head
    positions = [code.index(d) for d in picked_code]
    assert positions == sorted(positions) and positions[-1] >= len(code) - 4
    kinds = [d.name.split(":")[0] for d in blend["train"]]
    pairs = min(len(picked_code), len(picked_prose))
    assert kinds[: 2 * pairs] == ["code", "prose"] * pairs  # then the longer side's rest
    assert len(set(kinds[2 * pairs :])) <= 1
    assert blend["heldout"] == held["code"] + held["prose"]


def test_metaspace_tokenizer_layout_and_round_trip():
    from scripts.demo import train

    texts = ["def f(x):\n    return x + 1\n", "The cat sat on the mat. The dog sat too.\n"] * 20
    tok = train.train_tokenizer(texts, 300, "metaspace")
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
    assert 259 < tok.get_vocab_size() <= 300
    for text in ["    return the cat\n", " x", "x", "naïve 🐍"]:
        encoding = tok.encode(text)
        assert encoding.ids[0] == train.BOS_ID and 0 not in encoding.ids  # <unk> never: byte fallback
        assert tok.decode(encoding.ids) == text
    assert tok.encode("🐍").tokens[1:] == ["\u2581", "<0xF0>", "<0x9F>", "<0x90>", "<0x8D>"]
    with pytest.raises(ValueError, match="tokenizer kind"):
        train.train_tokenizer(texts, 300, "wordpiece")
