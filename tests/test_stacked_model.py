"""The stacked engine's model (me_runtime.stacked) against Hugging Face.

Every supported architecture is built from a tiny random config (hidden 64, 2 layers) with weights
re-drawn at unit scale (HF's std-0.02 init gives near-uniform logits, where greedy decoding would
hinge on rounding), then compared with the Hugging Face forward over a prefill and 50 decode
steps: fp32 logits to 1e-4, greedy tokens equal to `generate(do_sample=False)`, bf16 against HF
bf16. Stacked groups of 3 members are checked row by row against each member's own HF logits,
with ragged prompts, count-0 rows, multi-token catch-up, tied and untied members.
"""
from __future__ import annotations

import time

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from me_runtime import stacked
from me_runtime.stacked import StackedGroup, shape_key, unsupported_reason

VOCAB = 160
DECODE_STEPS = 50
FP32_TOL = 1e-4
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that the tiny head_dim's frequencies fall in all three llama3 bands.
    "original_max_position_embeddings": 16,
}

# name -> (model class, config class, config overrides)
CASES = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig, {}),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-biases": (LlamaForCausalLM, LlamaConfig, {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}),
    # Tied embeddings, q/k/v biases, and a sliding window on layer 1 only (layer_types).
    "qwen2-tied-sliding": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
    "qwen3-qknorm": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 24, "num_key_value_heads": 1}),
    # A window shorter than the prompt (PROMPT_LEN = 11).
    "mistral-sliding": (MistralForCausalLM, MistralConfig, {"sliding_window": 5}),
}
PROMPT_LEN = 11


def build(case: str, seed: int, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A tiny random member of `case`, weights at unit scale (logits of a few units)."""
    model_cls, config_cls, extra = CASES[case]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.normal_()
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))  # per-member norms matter
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, param.shape[1] ** -0.5)
    return model.to(dtype).eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int], prompt_len: int) -> torch.Tensor:
    """HF next-token logits (fp32) after the prompt and after each later token, with HF's own
    DynamicCache: [len(token_ids) - prompt_len + 1, V]."""
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([token_ids])
    out = [model(ids[:, :prompt_len], past_key_values=cache, use_cache=True).logits[0, -1]]
    for t in range(prompt_len, len(token_ids)):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out).float()


def one_row(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def stacked_greedy(group, cache, member: int, slot: int, prompt: list[int], steps: int):
    """Prefill + `steps` greedy single-token steps of one row: (token ids, logits [steps + 1, V])."""
    tokens, out = list(prompt), []
    start = 0
    pending = list(prompt)
    for _ in range(steps + 1):
        logits = group.forward(
            cache, torch.tensor([pending]), one_row([member], torch.int32), one_row([slot]), one_row([start]),
            one_row([len(pending)]), kv_len=start + len(pending),
        )
        out.append(logits[0])
        start += len(pending)
        pending = [int(logits[0].argmax())]
        tokens.append(pending[0])
    return tokens[:-1], torch.stack(out)


def stacked_teacher_forced(group, cache, member: int, slot: int, token_ids: list[int], prompt_len: int):
    """Logits of one row fed `token_ids` (prompt, then one token per step): [len - prompt_len + 1, V]."""
    out, start = [], 0
    chunks = [token_ids[:prompt_len]] + [[t] for t in token_ids[prompt_len:]]
    for chunk in chunks:
        logits = group.forward(
            cache, torch.tensor([chunk]), one_row([member]), one_row([slot]), one_row([start]), one_row([len(chunk)]),
            kv_len=start + len(chunk),
        )
        out.append(logits[0])
        start += len(chunk)
    return torch.stack(out)


def random_prompt(seed: int, length: int = PROMPT_LEN) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------
# One member per architecture against Hugging Face
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_hf_logits_and_greedy_generate(case):
    model = build(case, seed=1)
    prompt = random_prompt(2)
    expected_tokens = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
        do_sample=False, max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, pad_token_id=0,
    )[0].tolist()

    group = StackedGroup.from_models([model])
    cache = group.new_cache(slots=2, max_seq_len=PROMPT_LEN + DECODE_STEPS + 3)
    tokens, logits = stacked_greedy(group, cache, 0, 1, prompt, DECODE_STEPS)
    assert tokens == expected_tokens
    reference = hf_logits(model, tokens, PROMPT_LEN)  # the HF model now runs on the stacked views
    diff = (logits - reference).abs().max().item()
    print(f"{case}: fp32 max abs diff {diff:.3g} (logits up to {reference.abs().max().item():.3g})")
    assert diff <= FP32_TOL


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-tied-sliding", "qwen3-qknorm", "mistral-sliding"])
def test_bf16_as_close_to_hf_bf16_as_rounding_allows(case):
    """bf16 rounds every activation to 8 bits of mantissa, and HF's matmuls (bf16 GEMMs) and
    grouped_linear (fp32 accumulation, one rounding) round at different points, so the two bf16
    results cannot agree bit for bit. The tolerance is derived from HF itself: HF bf16's own
    distance from the fp32 result of the same weights. Our bf16 logits must be within that
    distance of HF bf16 (two rounding paths each that far from exact are at most twice it apart;
    we allow 1x plus a bf16 ulp of the largest logit) -- and never farther from fp32 than 2x HF's
    own error."""
    model = build(case, seed=3)
    prompt = random_prompt(4)
    steps = 20
    group_fp32 = StackedGroup.from_models([model])
    tokens, _ = stacked_greedy(group_fp32, group_fp32.new_cache(1, PROMPT_LEN + steps + 1), 0, 0, prompt, steps)
    exact = hf_logits(model, tokens, PROMPT_LEN)
    model_bf16 = model.to(torch.bfloat16)
    hf_bf16 = hf_logits(model_bf16, tokens, PROMPT_LEN)
    group = StackedGroup.from_models([model_bf16])
    ours = stacked_teacher_forced(group, group.new_cache(1, PROMPT_LEN + steps + 1), 0, 0, tokens, PROMPT_LEN)
    hf_error = (hf_bf16 - exact).abs().max().item()
    diff = (ours - hf_bf16).abs().max().item()
    ulp = exact.abs().max().item() * 2.0**-8
    print(f"{case}: bf16 max abs diff vs HF bf16 {diff:.3g}; HF bf16 vs fp32 {hf_error:.3g}; "
          f"ours vs fp32 {(ours - exact).abs().max().item():.3g}")
    assert diff <= hf_error + ulp
    assert (ours - exact).abs().max().item() <= 2 * hf_error + ulp
