"""Which Hugging Face members the stacked decoder (me_runtime/stacked.py) runs, and which of them
stack together: `unsupported_reason` (None, or why not) and `shape_key` (equal keys stack)."""
from __future__ import annotations

import torch

__all__ = ["SUPPORTED_ARCHITECTURES", "is_tied", "shape_key", "sliding_windows", "unsupported_reason"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# RoPE types whose inverse frequencies depend on the sequence length (one stacked table cannot hold them)
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when `model` can run in the stacked engine, else a sentence saying why not."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        return f"architecture {name} is not supported by the stacked engine (supported: {supported})"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"{name} uses hidden_act={config.hidden_act!r}; the stacked engine supports only 'silu'"
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if any(kind in rope_type for kind in _LENGTH_DEPENDENT_ROPE):
        return (f"{name} uses rope_type={rope_type!r} (frequencies depend on the length), "
                "not supported by the stacked engine")
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return (f"{name} has parameters of dtypes {sorted(map(str, dtypes))}; "
                "the stacked engine needs one floating dtype")
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"{name} has parameters on devices {sorted(map(str, devices))}; the stacked engine needs one real device"
    attn = model.model.layers[0].self_attn
    if len({attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}) != 1:
        return f"{name} has biases on only some of q/k/v; the stacked engine needs all or none"
    for layer, window in enumerate(sliding_windows(model)):
        if window is not None and window < 1:
            return f"{name} layer {layer} has sliding_window={window}; it must be >= 1"
    return None


def shape_key(model: torch.nn.Module) -> tuple:
    """Members with equal keys can be stacked: sizes, which biases / norms exist, dtype, device.

    (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, qkv_bias, o_bias, mlp_bias,
    qk_norm, dtype, device). Tied or untied embeddings, RMSNorm eps, RoPE frequencies and sliding
    windows may differ between stacked members (so may Llama and Mistral). Raises ValueError for
    a model that unsupported_reason() refuses.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(reason)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    embed = model.model.embed_tokens.weight
    return (
        embed.shape[1],
        mlp.gate_proj.out_features,
        len(model.model.layers),
        attn.q_proj.out_features // attn.head_dim,
        attn.k_proj.out_features // attn.head_dim,
        attn.head_dim,
        embed.shape[0],
        attn.q_proj.bias is not None,
        attn.o_proj.bias is not None,
        mlp.gate_proj.bias is not None,
        hasattr(attn, "q_norm"),
        embed.dtype,
        embed.device,
    )


def sliding_windows(model: torch.nn.Module) -> list[int | None]:
    """The sliding window of each layer as Hugging Face's masks apply it: Mistral masks every
    layer with config.sliding_window; Qwen2 / Qwen3 only the layers whose layer_types entry is
    "sliding_attention" (the attention module's sliding_window); Llama none."""
    layers = model.model.layers
    if type(model).__name__ == "MistralForCausalLM":
        return [model.config.sliding_window] * len(layers)
    return [getattr(layer.self_attn, "sliding_window", None) for layer in layers]


def is_tied(model: torch.nn.Module) -> bool:
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return head is embed or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape)
