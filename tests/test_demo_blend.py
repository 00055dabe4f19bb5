"""The third shipped demo member, "blend": the same Llama shape as code and prose, trained on
equal amounts of both corpora, with a tokenizer of its own (SentencePiece-style BPE with byte
fallback as Llama-2 / Mistral ship it, vocabulary 3072, <unk>/<s>/</s> = 0/1/2), so that
ensembles of members with different tokenizers can be tested offline.

It is not part of the default ensemble: demo_members() still returns code and prose only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from me_runtime import Ensemble
from me_runtime.demo import ALL_MEMBER_NAMES, HELDOUT_FILE, MEMBER_NAMES, demo_member, demo_members

BLEND_VOCAB_SIZE = 3072
SHARED_VOCAB_SIZE = 4096
MAX_FOLDER_BYTES = 10 * 1024 * 1024
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "training.json")
# Characters the blend tokenizer has no piece for (outside its ~94-character alphabet): each is
# encoded as the byte tokens of its UTF-8 form.
OUTSIDE_VOCABULARY = ["🐍", "日本", "é"]


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def blend_path() -> Path:
    return Path(demo_member("blend"))


@pytest.fixture(scope="module")
def blend_tokenizer(blend_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(blend_path, local_files_only=True)


@pytest.fixture(scope="module")
def raw_blend_tokenizer(blend_path):
    """The `tokenizers` object as train.py wrote it, without transformers in between."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(blend_path / "tokenizer.json"))


@pytest.fixture(scope="module")
def shared_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_members()[0], local_files_only=True)


@pytest.fixture(scope="module")
def blend_model(blend_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(blend_path, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_excerpts() -> dict[str, list[str]]:
    return json.loads(HELDOUT_FILE.read_text(encoding="utf-8"))


def test_demo_member_names_and_paths():
    assert ALL_MEMBER_NAMES == ("code", "prose", "blend")
    assert MEMBER_NAMES == ("code", "prose")  # the default ensemble is unchanged
    assert demo_members() == [demo_member("code"), demo_member("prose")]
    blend = Path(demo_member("blend"))
    assert blend.is_absolute() and blend.name == "blend" and blend.parent == Path(demo_members()[0]).parent
    assert str(blend) not in demo_members()
    with pytest.raises(ValueError, match="unknown demo member"):
        demo_member("Blend")


def test_missing_member_folder_is_reported(monkeypatch, tmp_path):
    import me_runtime.demo as demo

    monkeypatch.setattr(demo, "MEMBERS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="blend"):
        demo.demo_member("blend")


def test_blend_folder_files_size_and_weights(blend_path):
    for name in REQUIRED_FILES:
        assert (blend_path / name).is_file(), f"{blend_path} lacks {name}"
    size = sum(f.stat().st_size for f in blend_path.iterdir() if f.is_file())
    assert size < MAX_FOLDER_BYTES, f"{blend_path} is {size} bytes"
    with safe_open(str(blend_path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
        assert tuple(f.get_slice("model.embed_tokens.weight").get_shape()) == (BLEND_VOCAB_SIZE, 256)
    assert "lm_head.weight" not in names  # tied to the embeddings, stored once


def test_blend_has_the_shared_members_shape_but_its_own_vocabulary(blend_path):
    blend = json.loads((blend_path / "config.json").read_text())
    code = json.loads((Path(demo_member("code")) / "config.json").read_text())
    shape_keys = ("model_type", "architectures", "dtype", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim",
                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    assert {k: blend[k] for k in shape_keys} == {k: code[k] for k in shape_keys}
    assert (blend["vocab_size"], code["vocab_size"]) == (BLEND_VOCAB_SIZE, SHARED_VOCAB_SIZE)
    assert blend.get("pad_token_id") is None  # like Llama-2: no padding token
    assert "auto_map" not in blend
    generation = json.loads((blend_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    training = json.loads((blend_path / "training.json").read_text())
    assert training["member"] == "blend"
    assert training["settings"]["tokenizer"] == "metaspace"
    assert training["settings"]["vocab_size"] == BLEND_VOCAB_SIZE


def test_blend_tokenizer_is_sentencepiece_style_with_llama_specials(blend_path, blend_tokenizer):
    spec = json.loads((blend_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert spec["pre_tokenizer"]["type"] == "Metaspace" and spec["pre_tokenizer"]["replacement"] == "\u2581"
    assert len(blend_tokenizer) == BLEND_VOCAB_SIZE
    # Llama-2's layout: the specials, then the 256 byte tokens, then the learned pieces.
    assert blend_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (blend_tokenizer.unk_token_id, blend_tokenizer.bos_token_id, blend_tokenizer.eos_token_id) == (0, 1, 2)
    assert blend_tokenizer.pad_token_id is None
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    assert blend_tokenizer.convert_tokens_to_ids(byte_tokens) == list(range(3, 259))


def test_blend_vocabulary_differs_from_the_shared_one(blend_tokenizer, shared_tokenizer):
    assert len(shared_tokenizer) == SHARED_VOCAB_SIZE != len(blend_tokenizer)
    # Id 0 means different things: <pad> in the shared tokenizer, <unk> in blend's.
    assert shared_tokenizer.convert_ids_to_tokens(0) == "<pad>"
    assert blend_tokenizer.convert_ids_to_tokens(0) == "<unk>"
    shared_vocab, blend_vocab = shared_tokenizer.get_vocab(), blend_tokenizer.get_vocab()
    # Pieces that start a word are spelled "Ġthe" in one and "▁the" in the other; the spellings
    # they do share (punctuation, word endings) almost never have the same id.
    common = set(shared_vocab) & set(blend_vocab)
    assert len(common) < 0.5 * len(blend_vocab)
    same_id = {t for t in common if shared_vocab[t] == blend_vocab[t]}
    assert {"<s>", "</s>"} <= same_id and len(same_id) < 0.01 * len(common)
    text = "def add(a, b):\n    return a + b\n"
    assert blend_tokenizer.encode(text) != shared_tokenizer.encode(text)


def test_blend_round_trips_the_heldout_excerpts(blend_tokenizer, raw_blend_tokenizer, heldout_excerpts):
    texts = [t for name in MEMBER_NAMES for t in heldout_excerpts[name]]
    assert len(texts) >= 6
    assert any(t.startswith(" ") for t in texts)  # indented code: the leading space must survive
    for text in texts:
        ids = blend_tokenizer(text, verbose=False).input_ids
        assert ids == raw_blend_tokenizer.encode(text).ids  # transformers adds nothing of its own
        assert ids[0] == blend_tokenizer.bos_token_id and blend_tokenizer.unk_token_id not in ids
        assert blend_tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", OUTSIDE_VOCABULARY)
def test_byte_fallback_for_characters_outside_the_vocabulary(blend_tokenizer, raw_blend_tokenizer, text):
    assert not set(text) & set(blend_tokenizer.get_vocab())
    ids = blend_tokenizer(f"a {text} b").input_ids
    assert ids == raw_blend_tokenizer.encode(f"a {text} b").ids
    tokens = blend_tokenizer.convert_ids_to_tokens(ids)
    expected_bytes = [f"<0x{b:02X}>" for b in text.encode("utf-8")]
    start = tokens.index(expected_bytes[0])
    assert tokens[start : start + len(expected_bytes)] == expected_bytes
    assert blend_tokenizer.unk_token_id not in ids
    assert blend_tokenizer.decode(ids, skip_special_tokens=True) == f"a {text} b"


def test_a_leading_space_is_kept(blend_tokenizer, raw_blend_tokenizer):
    # Every text gets one "▁" in front (Llama-2's dummy prefix) and the decoder strips exactly
    # one, so " x" and "x" encode differently and both come back unchanged.
    plain, spaced = blend_tokenizer("x").input_ids, blend_tokenizer(" x").input_ids
    assert blend_tokenizer.convert_ids_to_tokens(plain) == ["<s>", "\u2581x"]
    assert blend_tokenizer.convert_ids_to_tokens(spaced) == ["<s>", "\u2581", "\u2581x"]
    for text, ids in (("x", plain), (" x", spaced)):
        assert ids == raw_blend_tokenizer.encode(text).ids
        assert blend_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_generation_is_the_same_on_both_engines(blend_path, blend_tokenizer):
    prompts = ["def main():\n", "And it came to pass"]
    runs = {}
    for engine in ("stacked", "hf"):
        ensemble = Ensemble.from_pretrained([blend_path], engine=engine, dtype=torch.float32)
        assert ensemble.engine == engine
        runs[engine] = ensemble.generate(prompts, method="me", temperature=0.0, max_new_tokens=12, seed=0)
    assert [g.token_ids for g in runs["stacked"]] == [g.token_ids for g in runs["hf"]]
    for prompt, generation in zip(prompts, runs["stacked"]):
        assert len(generation.token_ids) > 0 and all(0 <= t < BLEND_VOCAB_SIZE for t in generation.token_ids)
        assert generation.members == [0] * len(generation.token_ids)
        assert generation.text == blend_tokenizer.decode(generation.token_ids, skip_special_tokens=True)


@torch.no_grad()
def test_heldout_loss_is_far_below_a_uniform_guess(blend_model, blend_tokenizer, heldout_excerpts):
    uniform = math.log(BLEND_VOCAB_SIZE)  # nats per token of a uniform guess
    context = blend_model.config.max_position_embeddings
    losses = {}
    for name in MEMBER_NAMES:
        batch = [blend_tokenizer(t, verbose=False).input_ids[:context] for t in heldout_excerpts[name]]
        length = min(len(ids) for ids in batch)
        ids = torch.tensor([row[:length] for row in batch])
        logits = blend_model(input_ids=ids).logits[:, :-1].double()
        losses[name] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    # Trained on both domains, blend must model each far better than chance: 2.5 nats below the
    # uniform guess is a geometric-mean probability over 12 times the uniform 1/3072 for every
    # held-out token (measured when shipped: 3.7 nats on code, 4.7 on prose, against 8.03).
    for name, loss in losses.items():
        assert loss < uniform - 2.5, (losses, uniform)
