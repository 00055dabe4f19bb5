"""The shipped demo members: loadable offline as plain Hugging Face models, small, sharing one
tokenizer and one architecture, and each better on its own domain's held-out text, with the
0.5/0.5 mixture better than either member on mixed-domain text.

The held-out texts are the small excerpts in me_runtime/demo/heldout.json (documents that the
held-out split of me_runtime/demo/corpus.py kept out of training). Scores here use plain
Hugging Face forwards (me_runtime.demo.evaluate), independent of the runtime's Ensemble.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from me_runtime.demo import HELDOUT_FILE, MEMBER_NAMES, demo_members
from me_runtime.demo.evaluate import bits_per_byte, mixture_logprobs, text_logprobs, token_logprobs

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


def test_sliding_window_scoring_matches_direct_forwards(models, tokenizer, heldout):
    model = models[0]
    text = "\n".join(heldout["code"])
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)[:150]
    context = 64
    windowed = token_logprobs(model, ids, context=context)
    assert windowed.shape == (len(ids) - 1,)
    # Window 0 is ids[0:64]; window j >= 1 starts at 32 * j and scores positions [32 j + 32, 32 j + 64).
    for p in (1, 40, 63, 64, 95, 96, 130, len(ids) - 1):
        start = 0 if p < context else (p - context // 2) // (context // 2) * (context // 2)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start : p + 1]])).logits[0, -2].double()
        expected = torch.log_softmax(logits, dim=-1)[ids[p]]
        assert torch.allclose(windowed[p - 1], expected, atol=1e-4), p
    # With a window as long as the text, one forward scores every token.
    full = token_logprobs(model, ids, context=len(ids))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    direct = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(full, direct, atol=1e-6)


def test_mixture_logprobs_is_the_exact_mixture():
    lp = torch.log(torch.tensor([[0.5, 0.01, 1e-30], [0.25, 0.9, 0.3]], dtype=torch.float64))
    mix = mixture_logprobs(lp, [0.5, 0.5])
    expected = torch.log(0.5 * lp.exp()[0] + 0.5 * lp.exp()[1])
    assert torch.allclose(mix, expected, rtol=0, atol=1e-12)
    # Unnormalised weights are normalised.
    assert torch.allclose(mixture_logprobs(lp, [3.0, 1.0]), torch.log(0.75 * lp.exp()[0] + 0.25 * lp.exp()[1]))


def _bpb(models, tokenizer, texts):
    """Bits per byte of each member and of the 0.5/0.5 mixture over texts scored one by one."""
    totals = torch.zeros(len(models) + 1, dtype=torch.float64)
    nbytes = 0
    for text in texts:
        lp = text_logprobs(models, tokenizer, text)
        totals[:-1] += lp.sum(dim=1)
        totals[-1] += mixture_logprobs(lp, [0.5, 0.5]).sum()
        nbytes += len(text.encode("utf-8"))
    bpb = [bits_per_byte(float(t), nbytes) for t in totals]
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
