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
    # YaRN scales cos / sin by attention_scaling != 1 (taken from the HF rotary module).
    "llama-yarn": (
        LlamaForCausalLM,
        LlamaConfig,
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                             "original_max_position_embeddings": 64}},
    ),
    "llama-biases": (
        LlamaForCausalLM, LlamaConfig, {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}
    ),
    # Tied embeddings, q/k/v biases, and a sliding window on layer 1 only (layer_types).
    "qwen2-tied-sliding": (
        Qwen2ForCausalLM,
        Qwen2Config,
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
    "qwen3-qknorm": (
        Qwen3ForCausalLM,
        Qwen3Config,
        {"head_dim": 24, "num_key_value_heads": 1,
         "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
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


@pytest.mark.parametrize("case", list(CASES))
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


def test_demo_members_stacked_match_hf():
    """The two trained demo members (Llama, tied embeddings) in one group, one row each in every
    forward, against each member's own HF logits and greedy generate, on a real text prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from me_runtime.demo import demo_members

    paths = demo_members()
    models = [AutoModelForCausalLM.from_pretrained(p, local_files_only=True, dtype=torch.float32).eval() for p in paths]
    prompt = AutoTokenizer.from_pretrained(paths[0], local_files_only=True)("def add(a, b):\n    return")["input_ids"]
    steps = 20
    expected = [
        m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                   max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)[0].tolist()
        for m in models
    ]
    group = StackedGroup.from_models(models)
    assert group.tied == [True, True]
    cache = group.new_cache(1, len(prompt) + steps + 1)
    sequences, history = [list(prompt), list(prompt)], [[], []]
    pending, start = [list(prompt), list(prompt)], 0
    for _ in range(steps + 1):
        n_pending = len(pending[0])
        logits = group.forward(cache, torch.tensor(pending), one_row([0, 1]), one_row([0, 0]), one_row([start, start]),
                               one_row([n_pending, n_pending]), kv_len=start + n_pending)
        start += n_pending
        pending = [[int(logits[i].argmax())] for i in range(2)]
        for i in range(2):
            history[i].append(logits[i])
            sequences[i].append(pending[i][0])
    for i, model in enumerate(models):
        assert sequences[i][:-1] == expected[i]
        reference = hf_logits(model, sequences[i][:-1], len(prompt))
        assert (torch.stack(history[i]) - reference).abs().max().item() <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# Several members stacked: rows on different members in one forward
# ---------------------------------------------------------------------------------------------

# Three members of one shape per family, with different weights and per-member eps, RoPE base,
# sliding window and tying (all of which a group may mix).
MEMBER_FAMILIES = {
    # Llama and Mistral share the math, so one group holds both (the window is per member).
    "llama-mistral-untied": [
        ("llama-gqa", {}),
        ("llama3-rope", {"rms_norm_eps": 0.05}),
        ("mistral-sliding", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    ],
    "qwen2-mixed-tying": [
        ("qwen2-tied-sliding", {}),
        ("qwen2-tied-sliding", {"tie_word_embeddings": False, "sliding_window": 3, "rms_norm_eps": 1e-3}),
        ("qwen2-tied-sliding", {"use_sliding_window": False}),
    ],
}


def build_family(family: str, seed: int = 10) -> list[torch.nn.Module]:
    return [build(case, seed + i, **overrides) for i, (case, overrides) in enumerate(MEMBER_FAMILIES[family])]


def padded(rows: list[list[int]], q_len: int, pad: int = -1) -> torch.Tensor:
    """[N, q_len] int64, each row's tokens then `pad` (padding values must not matter)."""
    return torch.tensor([row + [pad] * (q_len - len(row)) for row in rows])


@pytest.mark.parametrize("family", list(MEMBER_FAMILIES))
def test_rows_on_different_members_match_each_members_hf_logits(family):
    models = build_family(family)
    group = StackedGroup.from_models(models)
    assert group.tied == [False] * 3 if family == "llama-mistral-untied" else group.tied == [True, False, True]
    cache = group.new_cache(slots=2, max_seq_len=48)
    # (member, slot, prompt length); member 1 slot 1 holds an earlier sequence and sits out
    # the prefill as a count-0 row.
    rows = [(0, 0, 7), (2, 1, 11), (1, 0, 4), (0, 1, 9), (1, 1, 0)]
    idle = cache.row(1, 1)
    earlier = random_prompt(99, 6)
    group.forward(cache, torch.tensor([earlier]), one_row([1]), one_row([1]), one_row([0]), one_row([6]), kv_len=6)
    before = cache.key.clone(), cache.value.clone()

    prompts = [random_prompt(20 + i, length) for i, (_, _, length) in enumerate(rows)]
    member = one_row([r[0] for r in rows], torch.int32)
    slot = one_row([r[1] for r in rows])
    count = one_row([r[2] for r in rows])
    start = torch.zeros(len(rows), dtype=torch.int64)
    # kv_len is a bucket above the longest prompt, as the engine passes it.
    logits = group.forward(cache, padded(prompts, 11), member, slot, start, count, kv_len=16)

    written = {cache.row(m, s) for m, s, c in rows if c} | {cache.trash_row}
    untouched = [r for r in range(cache.key.shape[1]) if r not in written]
    assert idle in untouched
    assert torch.equal(cache.key[:, untouched], before[0][:, untouched])
    assert torch.equal(cache.value[:, untouched], before[1][:, untouched])

    active = [i for i, r in enumerate(rows) if r[2] > 0]
    sequences = {i: list(prompts[i]) for i in active}
    history = {i: [logits[i]] for i in active}
    start = count.clone()
    count = torch.tensor([1 if r[2] else 0 for r in rows])
    for _ in range(8):
        step_tokens = [[int(history[i][-1].argmax())] if i in active else [0] for i in range(len(rows))]
        for i in active:
            sequences[i].append(step_tokens[i][0])
        logits = group.forward(cache, torch.tensor(step_tokens), member, slot, start, count, kv_len=32)
        for i in active:
            history[i].append(logits[i])
        start = start + count
    assert torch.equal(cache.key[:, idle], before[0][:, idle])
    for i in active:
        reference = hf_logits(models[rows[i][0]], sequences[i], rows[i][2])
        assert (torch.stack(history[i]) - reference).abs().max().item() <= FP32_TOL, f"row {i} (member {rows[i][0]})"


def test_multi_token_catch_up_equals_token_by_token():
    """A row with start > 0 fed Q = 3 tokens at once (logits="all") equals three single-token
    steps, next to a row of another member that decodes one token padded to Q = 3."""
    models = build_family("qwen2-mixed-tying", seed=30)
    group = StackedGroup.from_models(models)
    caught_up, stepwise = group.new_cache(2, 32), group.new_cache(2, 32)
    prompt_a, prompt_b = random_prompt(40, 9), random_prompt(41, 5)
    for cache in (caught_up, stepwise):  # prefill: row a on member 1 slot 0, row b on member 2 slot 1
        group.forward(cache, padded([prompt_a, prompt_b], 9), one_row([1, 2]), one_row([0, 1]), one_row([0, 0]),
                      one_row([9, 5]), kv_len=9, logits="none")
    pending = random_prompt(42, 3)
    both = group.forward(caught_up, padded([pending, pending[:1]], 3), one_row([1, 2]), one_row([0, 1]),
                         one_row([9, 5]), one_row([3, 1]), kv_len=12, logits="all")
    single = [
        group.forward(stepwise, torch.tensor([[tok]]), one_row([1]), one_row([0]), one_row([9 + q]), one_row([1]),
                      kv_len=12)[0]
        for q, tok in enumerate(pending)
    ]
    assert (both[0] - torch.stack(single)).abs().max().item() <= 1e-5
    row_b = group.forward(stepwise, torch.tensor([pending[:1]]), one_row([2]), one_row([1]), one_row([5]), one_row([1]),
                          kv_len=12)
    assert (both[1, 0] - row_b[0]).abs().max().item() <= 1e-5
    for name in ("key", "value"):
        assert torch.allclose(getattr(caught_up, name)[:, :-1], getattr(stepwise, name)[:, :-1], atol=1e-5, rtol=0)
    reference = hf_logits(models[1], prompt_a + pending, len(prompt_a) + 1)  # HF, token by token
    assert (both[0] - reference[:3]).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_logits_equal_all_logits_at_each_last_token(dtype):
    """logits="last" runs the last layer past attention on each sequence's last token only; its
    logits and cache writes match logits="all" at q = count - 1 (ragged counts, a count-0 row)."""
    models = [build("llama-gqa", 80, dtype), build("mistral-sliding", 81, dtype)]
    group = StackedGroup.from_models(models)
    caches = {mode: group.new_cache(2, 24) for mode in ("last", "all")}
    prompts = padded([random_prompt(82, 7), random_prompt(83, 4), random_prompt(84, 6)], 7)
    member, slot = one_row([0, 1, 1], torch.int32), one_row([0, 0, 1])
    for cache in caches.values():
        group.forward(cache, prompts, member, slot, one_row([0, 0, 0]), one_row([7, 4, 6]), kv_len=7, logits="none")
    tokens = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(85))
    start, count = one_row([7, 4, 6]), one_row([4, 2, 0])
    out = {mode: group.forward(cache, tokens, member, slot, start, count, kv_len=11, logits=mode)
           for mode, cache in caches.items()}
    # Fewer rows may change a GEMM's blocking (rounding), not the math: fp32 ~1e-6, bf16 an ulp.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for row in (0, 1):
        expected = out["all"][row, count[row] - 1]
        assert (out["last"][row] - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())
    # Every layer's keys / values come from all tokens in both modes: the same ops, bit for bit.
    assert torch.equal(caches["last"].kv[:, :-1], caches["all"].kv[:, :-1])


def test_one_grouped_linear_call_per_projection(monkeypatch):
    """4 grouped_linear calls per layer + 1 lm_head, however many members the rows use."""
    models = build_family("llama-mistral-untied", seed=50)
    group = StackedGroup.from_models(models)
    cache = group.new_cache(3, 16)
    calls = []
    real = stacked.grouped_linear

    def counting(x, members, weight, bias=None):
        calls.append(weight.shape[0])
        return real(x, members, weight, bias)

    monkeypatch.setattr(stacked, "grouped_linear", counting)
    layers = group.layout.layers
    tokens = torch.randint(0, VOCAB, (3, 2))
    for members, mode, expected in (([0, 1, 2], "last", 4 * layers + 1), ([1, 1, 1], "last", 4 * layers + 1),
                                    ([2, 0, 2], "all", 4 * layers + 1), ([0, 1, 2], "none", 4 * layers)):
        calls.clear()
        group.forward(cache, tokens, one_row(members), one_row([0, 1, 2]), one_row([0, 0, 0]), one_row([2, 2, 1]),
                      kv_len=2, logits=mode)
        assert len(calls) == expected, (members, mode)
        assert all(m == 3 for m in calls[:-1])  # every projection holds all three members


# ---------------------------------------------------------------------------------------------
# Weights held once; the Hugging Face models keep working
# ---------------------------------------------------------------------------------------------


def storages(tensors) -> dict[int, int]:
    """data_ptr -> nbytes of the distinct storages behind `tensors`."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@torch.no_grad()
def test_weights_are_held_once_and_hf_outputs_are_unchanged():
    models = build_family("qwen2-mixed-tying", seed=60) + [build("qwen2-tied-sliding", 63, tie_word_embeddings=False)]
    # Tied through a second Parameter object over the same storage (not `lm_head.weight is embed`).
    models.append(build("qwen2-tied-sliding", 64))
    models[-1].lm_head.weight = torch.nn.Parameter(models[-1].model.embed_tokens.weight.data)
    ids = torch.tensor([random_prompt(61, 12)])
    before = [m(ids).logits for m in models]
    original_bytes = sum(storages(p for m in models for p in m.parameters()).values())

    group = StackedGroup.from_models(models)
    stacked_storages = storages(group.weight_tensors())
    assert len(stacked_storages) == len(group.weight_tensors())  # each stacked tensor its own allocation
    member_storages = storages(p for m in models for p in m.parameters())
    assert set(member_storages) <= set(stacked_storages)  # every HF parameter views a stacked tensor
    assert set(member_storages) == set(stacked_storages)  # and every stacked tensor backs some parameter
    assert sum(member_storages.values()) == original_bytes == group.weight_bytes
    assert group.tied == [True, False, True, False, True]
    for m, model in enumerate(models):
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == group.tied[m]
        assert model.lm_head.weight.data_ptr() == group.vocab_weight[int(group.lm_head_index[m])].data_ptr()
    after = [m(ids).logits for m in models]
    for b, a in zip(before, after):
        assert torch.equal(a, b)


def test_stacking_peak_memory_is_the_weights_plus_one_stacked_projection(monkeypatch):
    """Accounting of live storages while from_models runs: the members' parameter storages plus
    every stacked tensor allocated so far, before and after each tensor is filled. Storages no
    parameter references any more are freed (nothing else holds them here). The excess over the
    original weights must stay within one stacked tensor plus the per-layer norm tables (tiny,
    allocated once up front)."""
    models = build_family("qwen2-mixed-tying", seed=80)
    params = lambda: (p for m in models for p in m.parameters())  # noqa: E731
    original = sum(storages(params()).values())
    allocated: dict[int, int] = {}
    peak = 0
    real = stacked._stack_parameters

    def accounting(members_params, out, rows=slice(None)):
        nonlocal peak
        allocated.update(storages([out]))
        peak = max(peak, sum({**storages(params()), **allocated}.values()))
        real(members_params, out, rows)
        peak = max(peak, sum({**storages(params()), **allocated}.values()))

    monkeypatch.setattr(stacked, "_stack_parameters", accounting)
    group = StackedGroup.from_models(models)
    tensors = group.weight_tensors()
    norm_tables = sum(t.untyped_storage().nbytes() for t in (group.input_norm, group.post_attention_norm))
    largest = max(t.untyped_storage().nbytes() for t in tensors)
    assert largest == group.vocab_weight.untyped_storage().nbytes()
    assert sum(storages(params()).values()) == original  # the end state holds the weights once
    print(f"peak excess {peak - original} B; largest stacked tensor {largest} B; norm tables {norm_tables} B")
    assert original < peak <= original + largest + norm_tables


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unsupported_architectures_and_mismatched_shapes_are_refused():
    gpt2_config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=None,
                             eos_token_id=None)
    gpt2 = GPT2LMHeadModel(gpt2_config)
    reason = unsupported_reason(gpt2)
    assert "GPT2LMHeadModel" in reason and "LlamaForCausalLM" in reason
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        StackedGroup.from_models([build("llama-gqa", 0), gpt2])
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        shape_key(gpt2)
    dynamic = build("llama-gqa", 0, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "dynamic" in unsupported_reason(dynamic)
    assert "gelu" in unsupported_reason(build("llama-gqa", 0, hidden_act="gelu"))
    assert unsupported_reason(build("qwen3-qknorm", 0)) is None

    base = build("llama-gqa", 0)
    assert shape_key(base) == shape_key(build("llama3-rope", 1))  # RoPE variants stack together
    for other in (build("llama-gqa", 1, intermediate_size=64), build("llama-biases", 1), build("qwen3-qknorm", 1),
                  build("llama-gqa", 1, dtype=torch.bfloat16)):
        assert shape_key(other) != shape_key(base)
        with pytest.raises(ValueError, match="cannot be stacked"):
            StackedGroup.from_models([base, other])
    with pytest.raises(ValueError, match="more than once"):
        StackedGroup.from_models([base, base])
    with pytest.raises(ValueError, match="at least one"):
        StackedGroup.from_models([])

    group = StackedGroup.from_models([base])
    cache = group.new_cache(1, 8)
    one = one_row([0])
    with pytest.raises(ValueError, match="kv_len"):
        group.forward(cache, torch.zeros(1, 1, dtype=torch.long), one, one, one, one_row([1]), kv_len=9)
    with pytest.raises(ValueError, match="logits"):
        group.forward(cache, torch.zeros(1, 1, dtype=torch.long), one, one, one, one_row([1]), kv_len=1, logits="first")
    with pytest.raises(ValueError, match="new_cache"):
        group.forward(StackedGroup.from_models([build("qwen3-qknorm", 2)]).new_cache(1, 8),
                      torch.zeros(1, 1, dtype=torch.long), one, one, one, one_row([1]), kv_len=1)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the proof that a forward has no host synchronisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_forward_compiles_fullgraph_and_matches_eager():
    """fullgraph=True fails on any graph break (.item(), .tolist(), data-dependent branches,
    nonzero...), so compiling the forward proves it never syncs with the device. Q = 1 (decode,
    rows on different members) and Q = 3 (ragged catch-up with a count-0 row)."""
    torch._dynamo.reset()
    models = [build("qwen3-qknorm", 70), build("qwen3-qknorm", 71, tie_word_embeddings=True)]
    group = StackedGroup.from_models(models)
    compiled = torch.compile(group.forward, fullgraph=True, dynamic=False)
    eager_cache, compiled_cache = group.new_cache(2, 16), group.new_cache(2, 16)
    prompts = padded([random_prompt(72, 5), random_prompt(73, 3), random_prompt(74, 4)], 5)
    args = (one_row([0, 1, 1], torch.int32), one_row([0, 1, 0]), one_row([0, 0, 0]), one_row([5, 3, 4]))
    for cache in (eager_cache, compiled_cache):
        group.forward(cache, prompts, *args, kv_len=5, logits="none")
    steps = [
        (torch.randint(0, VOCAB, (3, 1)), one_row([5, 3, 4]), one_row([1, 1, 1])),
        (torch.randint(0, VOCAB, (3, 3)), one_row([6, 4, 5]), one_row([3, 0, 2])),
    ]
    began = time.perf_counter()
    for tokens, start, count in steps:
        member, slot = args[0], args[1]
        expected = group.forward(eager_cache, tokens, member, slot, start, count, kv_len=12, logits="all")
        got = compiled(compiled_cache, tokens, member, slot, start, count, kv_len=12, logits="all")
        valid = torch.arange(tokens.shape[1])[None, :] < count[:, None]
        assert (got - expected)[valid].abs().max().item() <= 1e-5
        assert torch.allclose(compiled_cache.key[:, :-1], eager_cache.key[:, :-1], atol=1e-5, rtol=0)
        assert torch.allclose(compiled_cache.value[:, :-1], eager_cache.value[:, :-1], atol=1e-5, rtol=0)
    print(f"compile + run of 2 shapes: {time.perf_counter() - began:.1f}s")


# ---------------------------------------------------------------------------------------------
# CUDA (GPU machine): the same forward on the device, against Hugging Face on the device
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _device_logits(model, group, token_ids: list[int], prompt_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(HF logits, stacked logits), both fp32 [len - prompt_len + 1, V] on the CPU, teacher-forced
    on `device`: the prompt in one forward, then one token per step."""
    ids = torch.tensor([token_ids], device=device)
    hf_cache = DynamicCache(config=model.config)
    cache = group.new_cache(1, len(token_ids) + 1)
    chunks = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, len(token_ids))]
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    hf, ours = [], []
    for a, b in chunks:
        hf.append(model(ids[:, a:b], past_key_values=hf_cache, use_cache=True).logits[0, -1].float().cpu())
        logits = group.forward(cache, ids[:, a:b], zero, zero, torch.full((1,), a, device=device),
                               torch.full((1,), b - a, device=device), kv_len=b)
        ours.append(logits[0].cpu())
    return torch.stack(hf), torch.stack(ours)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_forward_matches_hf_on_the_device(case, dtype):
    # fp32 grouped_linear runs as 3xTF32 on CUDA (close to fp32 FMA, not bit-identical); bf16 as
    # on the CPU: within HF bf16's own distance from the exact (fp32, CPU) logits plus one bf16
    # step of the largest logit.
    model_cpu = build(case, seed=5)
    prompt = random_prompt(6)
    steps = 20
    tokens = model_cpu.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
        do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
    )[0].tolist()
    exact = hf_logits(model_cpu, tokens, PROMPT_LEN)
    model = build(case, seed=5, dtype=dtype).cuda()
    group = StackedGroup.from_models([model])
    hf, ours = _device_logits(model, group, tokens, PROMPT_LEN, torch.device("cuda"))
    scale = exact.abs().max().item()
    hf_error = (hf - exact).abs().max().item()
    allowed = hf_error + scale * (2.0**-8 if dtype == torch.bfloat16 else 1e-4)
    diff = (ours - hf).abs().max().item()
    print(f"{case} {dtype}: cuda max abs diff vs HF {diff:.3g}; HF vs exact {hf_error:.3g}")
    assert diff <= allowed
