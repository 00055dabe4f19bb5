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
