"""Argument checks of the Ensemble API: each raises a clear ValueError / TypeError naming the
argument and the allowed range, before any model runs."""
from __future__ import annotations

import math
import secrets

import torch

from me_kernels import SamplingParams

SEED_LIMIT = 2**63


def vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def check_weights(weights, num_members: int) -> list[float]:
    if weights is None:
        return [1.0 / num_members] * num_members
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a sequence of {num_members} numbers, got {type(weights).__name__}")
    if len(weights) != num_members:
        raise ValueError(f"weights has {len(weights)} entries but the ensemble has {num_members} members")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weights[{i}] must be a number, got {type(w).__name__}")
        if math.isnan(w) or math.isinf(w) or w < 0:
            raise ValueError(f"weights[{i}] = {w} must be finite and >= 0")
        values.append(float(w))
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must not be all zero")
    return [w / total for w in values]


def check_sampling(temperature, top_k, top_p, min_p) -> SamplingParams:
    # One rule per argument, shared with me_kernels (temperature=inf is accepted: the limit,
    # uniform over the kept set).
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def check_seeds(seed, count: int) -> list[int]:
    if seed is None:
        base = secrets.randbelow(SEED_LIMIT - count)
        return [base + i for i in range(count)]
    if isinstance(seed, bool):
        raise TypeError("seed must be None, an int or a list of ints, got bool")
    if isinstance(seed, int):
        seeds = [seed + i for i in range(count)]
    elif isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"seed has {len(seed)} entries but there are {count} prompts")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seed):
            raise TypeError("seed list entries must be ints")
        seeds = list(seed)
    else:
        raise TypeError(f"seed must be None, an int or a list of ints, got {type(seed).__name__}")
    for s in seeds:
        if not 0 <= s < SEED_LIMIT:
            raise ValueError(f"seeds must be in [0, 2**63), got {s} (request i uses seed + i)")
    return seeds


def context_length(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_max_seq_len(max_seq_len, models) -> tuple[int | None, str]:
    """(the longest sequence a request may reach, what sets it). Default: the smallest context
    length (max_position_embeddings) among the members, naming that member; None (no limit)
    when no member's config gives one."""
    if max_seq_len is None:
        contexts = [(c, i) for i, c in enumerate(context_length(m) for m in models) if c is not None]
        if not contexts:
            return None, "no member gives a context length"
        limit, member = min(contexts)
        return limit, f"member {member}'s context length (max_position_embeddings) is {limit}"
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
        raise TypeError(f"max_seq_len must be an int, got {type(max_seq_len).__name__}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    return max_seq_len, f"max_seq_len is {max_seq_len}"


def check_texts(texts, name: str, *, allow_empty_texts: bool = False) -> list[str]:
    """A non-empty list of strings (a single string is not taken for a list); each string
    non-empty unless allow_empty_texts."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name} must be a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(text).__name__}")
        if not text and not allow_empty_texts:
            raise ValueError(f"{name}[{i}] is empty")
    return list(texts)


def check_drafting(draft_tokens, draft_member, method: str, num_members: int) -> None:
    """draft_tokens: an int >= 0, > 0 only with method "ce"; draft_member: None or a member index,
    only with draft_tokens > 0."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int):
        raise TypeError(f"draft_tokens must be an int, got {type(draft_tokens).__name__}")
    if draft_tokens < 0:
        raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
    if draft_tokens > 0 and method != "ce":
        raise ValueError(f"draft_tokens > 0 needs method='ce' (drafting gives CE's exact distribution), got method={method!r}")
    if draft_member is None:
        return
    if isinstance(draft_member, bool) or not isinstance(draft_member, int):
        raise TypeError(f"draft_member must be None or an int, got {type(draft_member).__name__}")
    if not 0 <= draft_member < num_members:
        raise ValueError(f"draft_member must be in [0, {num_members}), got {draft_member}")
    if draft_tokens == 0:
        raise ValueError("draft_member needs draft_tokens > 0 (it names the member that drafts)")


def check_max_batch_size(max_batch_size) -> int | None:
    """None or an int >= 1."""
    if max_batch_size is None:
        return None
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be None or an int, got {type(max_batch_size).__name__}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return max_batch_size


def _is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def check_prompts(prompts) -> list:
    """generate()'s prompts: a string, a conversation (a list of {"role", "content"} dicts), or a
    non-empty list of those; returns the list."""
    if isinstance(prompts, str) or _is_conversation(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a string, a conversation or a non-empty list of them, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{i}] is empty")
        elif _is_conversation(prompt):
            for j, message in enumerate(prompt):
                if not isinstance(message.get("role"), str) or "content" not in message:
                    raise ValueError(f"prompts[{i}][{j}] must be a message with 'role' and 'content', got {message!r}")
        else:
            raise TypeError(f"prompts[{i}] must be a string or a conversation (a list of message dicts), "
                            f"got {type(prompt).__name__}")
    return list(prompts)


def encode_prompt(tokenizer, prompt, who: str) -> list[int]:
    """A prompt in a tokenizer's ids: a string with the tokenizer's special tokens (its BOS); a
    conversation rendered by the tokenizer's chat template (add_generation_prompt=True), whose
    text already holds the template's special tokens, so none are added again."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"a conversation prompt needs a chat template, but {who} has none "
                         f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})")
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_of(device):
    """The accelerate device map a member's `device` asks for (from_pretrained's device_map):
    a strategy name ("auto", "balanced", "balanced_low_0", "sequential") or a dict {module name:
    device}; None for a plain device (or None)."""
    if isinstance(device, dict):
        if not device:
            raise ValueError("a device map must not be empty")
        return device
    if isinstance(device, str) and device in DEVICE_MAP_STRATEGIES:
        return device
    return None


def sharded_devices(model) -> list[str]:
    """The distinct devices a member loaded with a device map spans (accelerate's hf_device_map),
    in order of first appearance; [] for a member on one device."""
    placement = getattr(model, "hf_device_map", None) or {}
    devices = []
    for value in placement.values():
        name = f"cuda:{value}" if isinstance(value, int) else str(value)
        if name not in devices:
            devices.append(name)
    return devices if len(devices) > 1 else []


METHODS = ("me", "ce", "single")
SELECTIONS = ("independent", "shared")


def check_generation(method: str, selection: str, member: int, max_new_tokens: int, num_members: int) -> None:
    """generate's method / selection / member / max_new_tokens."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if isinstance(member, bool) or not isinstance(member, int):
        raise TypeError(f"member must be an int, got {type(member).__name__}")
    if not 0 <= member < num_members:
        raise ValueError(f"member must be in [0, {num_members}), got {member}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def truncate_prompts(prompts: list[list[int]], max_new_tokens: int, truncate, max_seq_len: int | None,
                     limit_reason: str) -> list[list[int]]:
    """generate(truncate=...): None keeps the prompts; "left" keeps each prompt's last
    max_seq_len - max_new_tokens tokens."""
    if truncate is None:
        return prompts
    if truncate != "left":
        raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
    if max_seq_len is None:
        return prompts
    keep = max_seq_len - max_new_tokens
    if keep < 1:
        raise ValueError(f"generate: max_new_tokens = {max_new_tokens} leaves no room for a prompt: {limit_reason}")
    return [p[-keep:] if len(p) > keep else p for p in prompts]


def check_fits(lengths: list[int], what: str, max_seq_len: int | None, limit_reason: str) -> None:
    """Refuse, before any work, a request longer than max_seq_len (the stacked engine's cache
    capacity and the members' context)."""
    if max_seq_len is None:
        return
    for i, n in enumerate(lengths):
        if n > max_seq_len:
            raise ValueError(
                f"{what}: request {i} needs {n} positions (prompt + new tokens) but {limit_reason} "
                f"(pass a larger max_seq_len only if the members can use longer contexts)"
            )


def check_token_ids(sequences, name: str, vocab_size: int, *, allow_empty: bool,
                    allow_no_rows: bool = False) -> list[list[int]]:
    """A list of token-id lists (tensors accepted), every id in [0, vocab_size)."""
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.tolist()
    if not isinstance(sequences, (list, tuple)) or (not sequences and not allow_no_rows):
        raise ValueError(f"{name} must be a non-empty list of token-id lists")
    out = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, torch.Tensor):
            seq = seq.tolist()
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}[{i}] must be a list of ints, got {type(seq).__name__}")
        if not seq and not allow_empty:
            raise ValueError(f"{name}[{i}] is empty")
        for tok in seq:
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise TypeError(f"{name}[{i}] must hold ints, got {type(tok).__name__}")
            if not 0 <= tok < vocab_size:
                raise ValueError(f"{name}[{i}] holds token id {tok}, outside [0, {vocab_size})")
        out.append(list(seq))
    return out
