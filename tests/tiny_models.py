"""Tiny random Hugging Face members for runtime tests (built from configs, no downloads)."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = ("llama", "qwen2")


def tiny_member(arch: str, vocab_size: int, seed: int, *, sharpness: float = 1.0, eos_token_id=None) -> torch.nn.Module:
    """A 2-layer causal LM with random weights. `sharpness` scales the output layer so that the
    next-token distributions are peaked (distinct members are then easy to tell apart)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval()


# Small members of other architectures (any AutoModelForCausalLM): name -> (model_type, extra
# config; None: GPT-2's own config names).
OTHER_ARCHITECTURES = {
    "mistral-sliding-window": ("mistral", dict(sliding_window=4)),
    "gemma2-hybrid-sliding": ("gemma2", dict(head_dim=8, sliding_window=4)),
    "qwen3": ("qwen3", dict(head_dim=8)),
    "phi3": ("phi3", {}),
    "gpt2-learned-positions": ("gpt2", None),
}


def other_architecture_members(name: str, count: int = 2, vocab_size: int = 12) -> list[torch.nn.Module]:
    """`count` random 2-layer members of OTHER_ARCHITECTURES[name] (EOS id 2, sharpened heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = OTHER_ARCHITECTURES[name]
    if extra is None:
        kwargs = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=None,
                      eos_token_id=2)
    else:
        kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
                      eos_token_id=2, pad_token_id=None, **extra)
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(3.0)
        models.append(model.eval())
    return models


def char_tokenizer(alphabet: str = "abcdefghijklmnopqrstuvwxyz .", *, eos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character, plus <s> (id 0) and </s> (id 1, the EOS token unless eos=False);
    decode concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>" if eos else None, unk_token="<unk>"
    )


@torch.no_grad()
def next_token_probs(model: torch.nn.Module, prefix: list[int]) -> torch.Tensor:
    """p_model(. | prefix) in float64, by a plain full forward (no cache, no padding)."""
    logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)


# A small corpus both test tokenizers learn their merges from (code and prose, some non-ASCII).
TOKENIZER_CORPUS = [
    "the cat sat on the mat. the dog sat on the log. then the cat ran to the dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "naïve café: the café is near the river; über alles, déjà vu.",
    "she said hello, and he said hello there. they talked and talked.",
]


def byte_level_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (every byte a token, "Ġ" for a space): <s>=0, </s>=1 (EOS),
    the 256 byte tokens, then merges learned from TOKENIZER_CORPUS up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def sentencepiece_style_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A Llama-2-style BPE ("▁" for a space, a dummy prefix, byte fallback): <unk>=0, <s>=1,
    </s>=2 (EOS), the byte tokens <0x00>..<0xFF> (ids 3..258), then characters and merges
    learned from TOKENIZER_CORPUS up to vocab_size. Encoding prepends <s>."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, min_frequency=2, show_progress=False)
    learner.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
