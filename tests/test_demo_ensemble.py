"""The embedded default (issue 6) through the runtime: Ensemble.score on held-out text shows each
member best on its own domain and the mixture best on mixed text; `me-generate` runs the demo."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from me_runtime import Ensemble, demo_members
from me_runtime.cli import main
from me_runtime.demo.scores import compare, heldout_texts


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def demo():
    return Ensemble.from_pretrained(demo_members(), weights=[0.5, 0.5], dtype=torch.float32)


def test_members_and_mixture_on_heldout_text(demo):
    table = compare(demo.models, demo.tokenizer)
    code, prose, mixed = table["code"], table["prose"], table["mixed 50/50"]
    assert code["code member"] < code["prose member"] - 0.5
    assert prose["prose member"] < prose["code member"] - 0.5
    assert mixed["mixture 0.5/0.5"] < min(mixed["code member"], mixed["prose member"]) - 0.1


def test_score_equals_per_member_sum(demo):
    # Ensemble.score with weights (1, 0) is member 0 alone: compare with a plain forward.
    text = heldout_texts()["code"][0]
    tok = demo.tokenizer
    alone = Ensemble(demo.models, tokenizer=tok, weights=[1.0, 0.0])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    got = alone.score_ids([[tok.bos_token_id]], [ids])[0]
    full = torch.tensor([[tok.bos_token_id] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(demo.models[0](input_ids=full).logits[0, :-1].double(), -1)
    expected = float(logp.gather(1, full[0, 1:, None]).sum())
    assert got == pytest.approx(expected, rel=1e-5)


def test_cli_demo_runs_offline(capsys):
    assert main(["--max-new-tokens", "12", "--compare", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "demo members (code, prose)" in out
    assert "--- me (12 tokens" in out and "--- ce (12 tokens" in out
    assert "member trace" in out and "tokens/s" in out
    assert "mixed 50/50" in out
    # the table says what it scored: the shipped excerpts, with their sizes, not EVAL.md's split
    assert "me_runtime/demo/heldout.json" in out and "full held-out split" in out
    header = next(line for line in out.splitlines() if line.startswith("text "))
    assert header.split()[:4] == ["text", "docs", "bytes", "tokens"]
    code_row = next(line for line in out.splitlines() if line.startswith("code "))
    assert int(code_row.split()[1]) == len(heldout_texts()["code"])


def test_cli_demo_mixed_runs_the_three_members_with_two_tokenizers(capsys):
    assert main(["--demo-mixed", "--max-new-tokens", "12", "--compare", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "blend: its own" in out and "union vocabulary" in out
    assert "--- me (12 tokens" in out and "--- ce (12 tokens" in out
    trace = out.split("--- member trace")[1].split("--- tokens per member")[0]
    assert "[" in trace and "|" in trace
    assert main(["--demo-mixed", "--model", "x"]) == 2


def test_demo_members_with_different_tokenizers_both_engines():
    """code + prose (one byte-level BPE) + blend (SentencePiece-style BPE with byte fallback): the
    union vocabulary joins them, and both engines give the same pieces."""
    from me_runtime.demo import ALL_MEMBER_NAMES, demo_member

    paths = [demo_member(n) for n in ALL_MEMBER_NAMES]
    outs = {}
    for engine in ("stacked", "hf"):
        ens = Ensemble.from_pretrained(paths, dtype=torch.float32, engine=engine)
        assert ens.tokenizers is not None and ens.union_vocabulary.size > 4096
        prompts = ["def read_config(path):", "The morning was cold and"]
        outs[engine] = {m: ens.generate(prompts, method=m, max_new_tokens=12, seed=[1, 2]) for m in ("me", "ce")}
        if engine == "stacked":  # one grouped forward for all three (vocabularies 4096 and 3072, padded)
            assert ens._engine.group_members == [[0, 1, 2]]
    for m in ("me", "ce"):
        assert [g.token_ids for g in outs["stacked"][m]] == [g.token_ids for g in outs["hf"][m]]
        for g in outs["stacked"][m]:
            assert len(g.token_ids) == 12 or g.finish_reason in ("eos", "length")
    assert {z for g in outs["stacked"]["me"] for z in g.members} == {0, 1, 2}


def test_cli_reports_bad_arguments(capsys):
    assert main(["--max-new-tokens", "4", "--top-p", "1.5", "--no-score"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_import_me_runtime_leaves_the_demo_and_scripts_alone():
    # A fresh interpreter (this process has long imported everything), run from the repository
    # root so that it imports this checkout's packages.
    code = (
        "import sys, me_runtime; "
        "print(sorted(m for m in sys.modules if m.startswith(('me_runtime.demo', 'scripts')))); "
        "me_runtime.demo_members(); print('me_runtime.demo' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]  # loaded on first use only
