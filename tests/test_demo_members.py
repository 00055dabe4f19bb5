"""The shipped demo members: loadable offline as plain Hugging Face models, small, sharing one
tokenizer and one architecture, and each better on its own domain's held-out text, with the
0.5/0.5 mixture better than either member on mixed-domain text.

The held-out texts are the small excerpts in me_runtime/demo/heldout.json (documents that the
held-out split of scripts/demo/corpus.py kept out of training). Scores go through the runtime's
exact scorer (Ensemble.score_rolling_ids, what scripts/demo/evaluate.py uses), which is checked
here against plain Hugging Face forwards on these members.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import me_kernels
from me_runtime import Ensemble
from me_runtime.demo import HELDOUT_FILE, MEMBER_NAMES, demo_members

MAX_FOLDER_BYTES = 10 * 1024 * 1024
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json")


@pytest.fixture(scope="module")
def paths():
    return [Path(p) for p in demo_members()]


@pytest.fixture(scope="module")
def tokenizer(paths):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths[0], local_files_only=True)


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Forwards of these tiny models gain little from a second thread, and on a busy 2-core
    # machine intra-op thread synchronisation makes them an order of magnitude slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(paths):
    from transformers import AutoModelForCausalLM

    return [
        AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32).eval()
        for p in paths
    ]


@pytest.fixture(scope="module")
def heldout():
    """{"code": [piece, ...], "prose": [piece, ...]}, pieces of ~1.2 KB of held-out text."""
    sample = json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))
    assert sorted(sample) == sorted(MEMBER_NAMES)
    assert all(len(sample[name]) >= 3 for name in MEMBER_NAMES)
    return sample


def test_demo_members_are_the_code_then_prose_folders(paths):
    assert [p.name for p in paths] == list(MEMBER_NAMES) == ["code", "prose"]
    for p in paths:
        assert p.is_dir() and p.is_absolute()


@pytest.mark.parametrize("index", [0, 1], ids=MEMBER_NAMES)
def test_folder_files_and_size(paths, index):
    folder = paths[index]
    for name in REQUIRED_FILES:
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size < MAX_FOLDER_BYTES, f"{folder} is {size} bytes"


def test_configs_share_one_llama_shape(paths):
    configs = [json.loads((p / "config.json").read_text()) for p in paths]
    shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim",
                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    for cfg in configs:
        assert cfg["model_type"] == "llama"
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert cfg["dtype"] == "bfloat16"
        assert cfg["tie_word_embeddings"] is True
        assert 256 <= cfg["max_position_embeddings"] <= 2048
        assert "auto_map" not in cfg  # nothing needs trust_remote_code
    assert {k: configs[0][k] for k in shape_keys} == {k: configs[1][k] for k in shape_keys}
    for p, cfg in zip(paths, configs):
        gen = json.loads((p / "generation_config.json").read_text())
        assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])


@pytest.mark.parametrize("index", [0, 1], ids=MEMBER_NAMES)
def test_weights_are_bf16_safetensors_with_tied_embeddings(paths, index):
    with safe_open(str(paths[index] / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert dtypes == {"BF16"}
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # tied to the embeddings, stored once


def test_tokenizer_is_shared_and_round_trips(paths, tokenizer):
    assert (paths[0] / "tokenizer.json").read_bytes() == (paths[1] / "tokenizer.json").read_bytes()
    assert (paths[0] / "tokenizer_config.json").read_bytes() == (paths[1] / "tokenizer_config.json").read_bytes()
    cfg = json.loads((paths[0] / "config.json").read_text())
    assert len(tokenizer) == cfg["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    texts = [
        "def f(x):\n\treturn x ** 2  # square\n",
        "Alice was beginning to get very tired of sitting by her sister on the bank.",
        "  leading spaces, trailing spaces   \n\n\n",
        "unicode: café, naïve, Привет, 日本語, emoji 🐍, NUL \x00 and CRLF\r\n",
        "",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id  # prompts start like training documents
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert all(0 <= i < cfg["vocab_size"] for i in ids)


@pytest.mark.parametrize("index", [0, 1], ids=MEMBER_NAMES)
def test_models_load_offline_as_llama(paths, models, index):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths[index], local_files_only=True, dtype="auto")
    assert type(model) is LlamaForCausalLM
    assert model.dtype == torch.bfloat16  # the stored dtype
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = models[index](input_ids=torch.tensor([[1, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def _direct_logprob(model, context: list[int], token: int) -> float:
    """log p(token | context) by one plain forward over the context alone (float64 softmax)."""
    logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
    return float(torch.log_softmax(logits, dim=-1)[token])


def test_windowed_scoring_matches_direct_forwards(models, tokenizer, heldout):
    model = models[0]
    alone = Ensemble(models, tokenizer=tokenizer, weights=[1.0, 0.0])  # member 0 alone
    text = "\n".join(heldout["code"])
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)[:150]
    context, min_context = 64, 32
    windowed = alone.score_rolling_ids([ids[1:]], max_length=context, min_context=min_context)[0]
    # Window 0 is ids[0:64]; later windows score 32 tokens each with the 32 before them, and
    # the last, shorter chunk has the rest of its 64-token window as context.
    expected = 0.0
    for p in range(1, len(ids)):
        if p < context:
            start = 0
        else:
            chunk_end = min(context + (p - context) // 32 * 32 + 32, len(ids))
            start = chunk_end - context
        assert p - start >= (min_context if p >= context else 1)
        expected += _direct_logprob(model, ids[start:p], ids[p])
    assert windowed == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # With a window as long as the text, one forward scores every token.
    full = alone.score_rolling_ids([ids[1:]], max_length=len(ids))[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    direct = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert full == pytest.approx(float(direct.sum()), rel=1e-5, abs=1e-4)


def test_mixture_logprobs_is_the_exact_mixture():
    # The kernel entry the scorer uses, on distributions with extreme entries.
    p = torch.tensor([[0.5, 0.01 - 1e-30, 0.49, 1e-30], [0.25, 0.05, 0.4, 0.3]], dtype=torch.float64)
    logits = torch.log(p).float()[:, None, :]  # [M=2, B=1, V=4]
    mix = me_kernels.mixture_logprobs(logits, torch.tensor([0.5, 0.5]))[0].double()
    assert torch.allclose(mix, torch.log(0.5 * p[0] + 0.5 * p[1]), rtol=1e-5, atol=1e-6)
    # Unnormalised weights are normalised.
    mix = me_kernels.mixture_logprobs(logits, torch.tensor([3.0, 1.0]))[0].double()
    assert torch.allclose(mix, torch.log(0.75 * p[0] + 0.25 * p[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [3.0, 1.0]], ids=["uniform", "unnormalised"])
def test_ensemble_score_is_the_exact_mixture_of_the_members(models, tokenizer, heldout, weights):
    ids = tokenizer.encode(heldout["prose"][0], add_special_tokens=False)[:120]
    full = [tokenizer.bos_token_id] + ids
    with torch.no_grad():
        probs = [torch.softmax(m(input_ids=torch.tensor([full])).logits[0, :-1].double(), -1) for m in models]
    target = torch.tensor(ids)[:, None]
    w0, w1 = (w / sum(weights) for w in weights)
    per_token = w0 * probs[0].gather(1, target) + w1 * probs[1].gather(1, target)
    expected = float(torch.log(per_token).sum())
    got = Ensemble(models, tokenizer=tokenizer, weights=weights).score_rolling_ids([ids])[0]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)


def _bpb(models, tokenizer, texts):
    """Bits per byte of each member and of the 0.5/0.5 mixture over texts scored one by one,
    through the runtime's scorer as scripts/demo/evaluate.py computes them (512-token windows,
    at least 256 tokens of context after the first window)."""
    ids = [tokenizer.encode(t, add_special_tokens=False, verbose=False) for t in texts]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    bpb = []
    for weights in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]):
        ens = Ensemble(models, tokenizer=tokenizer, weights=weights)
        total = sum(ens.score_rolling_ids(ids, min_context=256))
        bpb.append(-total / (nbytes * math.log(2)))
    return bpb[:-1], bpb[-1]


def test_each_member_is_better_on_its_own_domain(models, tokenizer, heldout):
    code_bpb, _ = _bpb(models, tokenizer, heldout["code"])
    prose_bpb, _ = _bpb(models, tokenizer, heldout["prose"])
    # Measured margins are much larger (EVAL.md); 0.5 bits/byte leaves room for retrained members.
    assert code_bpb[0] + 0.5 < code_bpb[1], code_bpb
    assert prose_bpb[1] + 0.5 < prose_bpb[0], prose_bpb
    for bpb in code_bpb + prose_bpb:
        assert 0.5 < bpb < 8.0 and math.isfinite(bpb)


def test_mixture_beats_each_member_on_mixed_text(models, tokenizer, heldout):
    # Held-out code and prose pieces alternating (50/50 by bytes within a few percent), scored
    # as one text, so each member's context crosses domain boundaries as in a mixed document.
    pieces = [p for pair in zip(heldout["code"], heldout["prose"]) for p in pair]
    mixed = "\n".join(pieces)
    code_bytes = sum(len(p.encode()) for p in heldout["code"])
    assert abs(code_bytes / len(mixed.encode()) - 0.5) < 0.05
    members, mixture = _bpb(models, tokenizer, [mixed])
    assert mixture + 0.1 < min(members), (members, mixture)
