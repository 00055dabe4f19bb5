"""Memory a generate call needs, estimated before any work (Ensemble.estimate_memory).

What a call allocates beyond the weights (already resident):
  * KV caches: per member, 2 (key, value) x layers x kv_heads x head_dim x element bytes per cached
    token. The stacked engine preallocates every member's cache for every request slot at the
    call's capacity (on CUDA rounded up to powers of two, at least 256 positions, for CUDA
    graphs); the hf engine's caches grow to the batch's padded width + new tokens per member.
  * Logits (fp32): the step's [B, V] per member that runs (CE: every member; drafting: every
    member at J = draft_tokens + 1 positions, plus the drafter's [B, J, V]).
  * The first forward over the prompts (activations of the tokens read at once: stacked, at most
    CHUNK_TOKENS per forward; hf, one member's whole padded prompt batch), roughly 12 hidden-size
    vectors per token (attention and MLP intermediates) in the members' dtype.
Estimates, not measurements: allocator rounding and framework workspaces come on top (a margin
of 10% is asked for when comparing with the free memory of a CUDA device).
"""
from __future__ import annotations

import torch


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one cached token takes in one member's KV cache (keys and values, every layer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * element


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def estimate(models: list[torch.nn.Module], *, engine: str, device: torch.device, vocab_size: int, batch_size: int,
             prompt_len: int, max_new_tokens: int, method: str = "me", draft_tokens: int = 0,
             max_seq_len: int | None = None, chunk_tokens: int = 4096,
             groups: list[list[int]] | None = None) -> dict[str, int]:
    """{"kv_cache", "logits", "activations", "total"} bytes for one generate call of batch_size
    requests whose longest prompt has prompt_len tokens (see the module docstring). groups: the
    stacked engine's member groups (one cache, and one trash row, per group)."""
    members = len(models)
    length = prompt_len + max_new_tokens
    per_token = [kv_bytes_per_token(m) for m in models]
    if engine == "stacked":
        slots, capacity = batch_size, length
        if device.type == "cuda":
            slots, capacity = _pow2(slots), max(_pow2(capacity), 256)
            if max_seq_len is not None:
                capacity = min(capacity, max_seq_len)
        groups = groups or [list(range(members))]
        kv = sum(p * (slots * capacity) for p in per_token)
        kv += sum(per_token[ids[0]] * capacity for ids in groups)  # each group's cache has a trash row
        read_at_once = min(chunk_tokens, batch_size * prompt_len * members)
    else:
        kv = sum(p * batch_size * length for p in per_token)
        read_at_once = batch_size * prompt_len  # one member's whole padded prompt batch
    span = draft_tokens + 1 if draft_tokens else 1
    running = members if (method == "ce" or draft_tokens) else min(members, batch_size)
    logits = 4 * vocab_size * batch_size * (running * span + (span if draft_tokens else 0))
    config = models[0].config.get_text_config() if hasattr(models[0].config, "get_text_config") else models[0].config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    activations = read_at_once * 12 * hidden * next(models[0].parameters()).element_size()
    return {"kv_cache": kv, "logits": logits, "activations": activations, "total": kv + logits + activations}
