"""The decode loop: ME, CE and single-member generation over a batch of requests.

Per step t (token t of every active request):

* ME: each request has a member z drawn at step t-1 (at setup for t = 0). Every member that at
  least one request chose runs ONE forward over its pending tokens (the prompt too, the first
  time it is chosen) -- for every active row, not only the rows that chose it. Catching up
  the other rows costs almost nothing in the memory-bound decode regime (the weights are read
  once either way) and keeps every row of a member's KV cache at the same length, so caches
  carry no padding holes beyond the prompts' left padding, however long the generation. The
  fused `me_step` kernel then samples token t from each row's chosen member and draws the
  member of step t+1, on the device.
* CE: every member runs every step; `mixture_sample` draws from the mixture.
* single: one member runs alone.

Randomness: request i draws with (seed_i, offset = t) only, so it gets the same tokens alone
or inside any batch. The one host transfer per step copies the step's tokens (and, for ME,
the next members): stop checks need the tokens on the host, and choosing which members run
next is Python control flow. Nothing else in the loop waits for the device; rows that finish
are dropped from every member's cache, so they stop costing compute.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import me_kernels
from me_kernels import SamplingParams

from .stopping import StopChecker

try:  # transformers >= 4.56
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - old transformers
    from transformers import DynamicCache

    DynamicLayer = None


@dataclass
class RequestResult:
    token_ids: list[int] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    finish_reason: str = "length"


class Batch:
    """State shared by all members: one row per active request, on the sampling device."""

    def __init__(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, device: torch.device):
        self.request_ids = list(range(len(prompts)))
        self.prompt_lens = [len(p) for p in prompts]
        width = max(self.prompt_lens)
        # Left padding: every prompt ends at the same column, so the last position of a forward
        # is every row's next-token position. Pad slots are masked out and hold token 0.
        padded = [[0] * (width - len(p)) + list(p) for p in prompts]
        self.prompt_ids = torch.tensor(padded, dtype=torch.long, device=device)
        self.prompt_lens_dev = torch.tensor(self.prompt_lens, dtype=torch.long, device=device)
        self.generated = torch.zeros((len(prompts), max(max_new_tokens, 1)), dtype=torch.long, device=device)
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.device = device

    @property
    def size(self) -> int:
        return len(self.request_ids)

    @property
    def width(self) -> int:
        return self.prompt_ids.shape[1]

    def keep(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        """Keep only `rows` (host list, and the same indices on this device)."""
        self.request_ids = [self.request_ids[r] for r in rows]
        self.prompt_lens = [self.prompt_lens[r] for r in rows]
        trim = self.width - max(self.prompt_lens)  # columns that are now padding in every row
        self.prompt_ids = self.prompt_ids[rows_dev, trim:]
        self.prompt_lens_dev = self.prompt_lens_dev[rows_dev]
        self.generated = self.generated[rows_dev]
        self.seeds = self.seeds[rows_dev]


def _padding_mask_kind(config) -> str:
    """How a member takes a padding mask: a 4D bool mask (sdpa), a 4D additive mask (eager), or
    the 2D mask transformers expands itself (other attention kernels, sliding-window layers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    if sliding or any(t != "full_attention" for t in layer_types):
        return "2d"
    return {"sdpa": "4d-bool", "eager": "4d-float"}.get(getattr(config, "_attn_implementation", None), "2d")


class MemberRunner:
    """One member's view of the batch: its KV cache and how many generated tokens it has read.

    Every active row of a member's cache has read the same number of generated tokens
    (`consumed`); rows differ only by their prompt's left padding (`pad`), which is fixed at the
    member's first forward and trimmed when the longest prompts leave the batch.
    """

    def __init__(self, model: torch.nn.Module, sampling_device: torch.device):
        self.model = model
        self.device = next(model.parameters()).device
        self.sampling_device = sampling_device
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.mask_kind = _padding_mask_kind(model.config)
        self.cache = None
        self.consumed = 0  # generated tokens read by every active row
        self.cache_len = 0  # columns in the KV cache (prompt width at prefill + consumed)
        self.pad: list[int] = []  # host: left-pad columns of each row
        self.pad_dev: torch.Tensor | None = None

    def catch_up(self, batch: Batch, t: int) -> torch.Tensor:
        """Read every pending token of every row (the whole prompt the first time); return the
        next-token logits [B, V] of each row, on the sampling device."""
        if self.cache is None:
            tokens = torch.cat([batch.prompt_ids, batch.generated[:, :t]], dim=1)
            self.pad = [batch.width - n for n in batch.prompt_lens]
            self.pad_dev = (batch.width - batch.prompt_lens_dev).to(self.device)
            steps = torch.arange(tokens.shape[1], device=self.device)
            positions = (steps[None, :] - self.pad_dev[:, None]).clamp_(min=0)
            self.cache = DynamicCache(config=self.model.config)
        else:
            tokens = batch.generated[:, self.consumed : t]
            steps = torch.arange(self.consumed, t, device=self.device)
            positions = batch.prompt_lens_dev.to(self.device)[:, None] + steps[None, :]
        new = tokens.shape[1]
        mask = None
        if any(self.pad):  # without padding no mask is passed at all
            mask = self._padding_mask(new)
        kwargs = {"logits_to_keep": 1} if self.accepts_logits_to_keep else {}
        out = self.model(
            input_ids=tokens.to(self.device).contiguous(),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        self.cache_len += new
        self.consumed = t
        return out.logits[:, -1, :].to(self.sampling_device)

    def _padding_mask(self, new: int) -> torch.Tensor:
        """The mask for `new` queries over cache_len + new keys, rows left-padded by pad_dev.

        transformers turns a 2D padding mask into a 4D one after checking it on the host (a sync
        per forward); for sdpa / eager attention without sliding windows we build the 4D mask
        here on the device instead, and hand other attention implementations the 2D mask.
        """
        total = self.cache_len + new
        keys = torch.arange(total, device=self.device)
        not_pad = keys[None, :] >= self.pad_dev[:, None]  # [B, total]
        if self.mask_kind == "2d":
            return not_pad.long()
        queries = torch.arange(self.cache_len, total, device=self.device)
        causal = keys[None, :] <= queries[:, None]  # [new, total]
        allowed = (not_pad[:, None, :] & causal[None]) | (keys[None, :] == queries[:, None])[None]
        # (a padded query attends to itself: a row with no key at all would give NaN values that
        # leak into real rows through 0 * NaN)
        allowed = allowed[:, None]  # [B, 1, new, total]
        if self.mask_kind == "4d-bool":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def keep(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        if self.cache is None:
            return
        idx = rows_dev.to(self.device)
        self.cache.batch_select_indices(idx)
        self.pad = [self.pad[r] for r in rows]
        self.pad_dev = self.pad_dev[idx]
        trim = min(self.pad)
        # Columns that are padding in every remaining row hold nothing: drop them (plain
        # attention layers only; sliding-window or recurrent layers keep their own layout).
        if trim > 0 and DynamicLayer is not None and all(type(layer) is DynamicLayer for layer in self.cache.layers):
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys = layer.keys[..., trim:, :]
                    layer.values = layer.values[..., trim:, :]
            self.pad = [p - trim for p in self.pad]
            self.pad_dev = self.pad_dev - trim
            self.cache_len -= trim


def decode(
    models: list[torch.nn.Module],
    weights: torch.Tensor,
    prompts: list[list[int]],
    seeds: list[int],
    *,
    method: str,
    selection: str,
    member: int,
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: frozenset[int],
    stop_checker: StopChecker,
    progress: bool,
) -> list[RequestResult]:
    """Generate up to `max_new_tokens` tokens for every prompt (token-id lists). See module doc."""
    device = weights.device
    results = [RequestResult() for _ in prompts]
    if max_new_tokens == 0:
        return results
    batch = Batch(prompts, seeds, max_new_tokens, device)
    runners = [MemberRunner(m, device) for m in models]
    sample_kwargs = params.kwargs()
    shared = selection == "shared"
    # "shared": one member per step for the whole batch, drawn from the first request's seed
    # (kept fixed even after that request finishes, so the draw sequence is well defined).
    batch_seed = batch.seeds[:1].clone()

    def draw_members(offset: int) -> torch.Tensor:
        if shared:
            return me_kernels.select_members(weights, seed=batch_seed, offset=offset, batch=1).expand(batch.size)
        return me_kernels.select_members(weights, seed=batch.seeds, offset=offset, batch=batch.size)

    if method == "me":
        next_members = draw_members(0)
        next_members_host = next_members.tolist()  # which members run at step 0 (host control flow)
        if min(next_members_host) < 0:
            raise RuntimeError(f"no member could be drawn from the weights {weights.tolist()}")
    bar = tqdm(total=max_new_tokens, disable=not progress, desc=f"generate ({method})", unit="tok")
    try:
        for t in range(max_new_tokens):
            if method == "me":
                members_now, members_host = next_members, next_members_host
                logits = None
                for m in sorted(set(members_host)):
                    member_logits = runners[m].catch_up(batch, t)
                    if logits is None:
                        logits = member_logits
                    else:
                        logits = torch.where((members_now == m)[:, None], member_logits, logits)
                if shared:
                    tokens = me_kernels.sample(logits, seed=batch.seeds, offset=t, **sample_kwargs)
                    next_members = draw_members(t + 1)
                else:
                    tokens, next_members = me_kernels.me_step(
                        logits, weights, seed=batch.seeds, offset=t, **sample_kwargs
                    )
                # The step's one host transfer: the tokens for the stop checks, the members for
                # the next step's control flow.
                host = torch.stack([tokens, next_members.to(torch.long)]).tolist()
                tokens_host, next_members_host = host[0], host[1]
                if min(next_members_host) < 0:  # the kernels' signal for an invalid weight row
                    raise RuntimeError(f"step {t}: no member could be drawn from the weights {weights.tolist()}")
            elif method == "ce":
                stacked = torch.stack([r.catch_up(batch, t) for r in runners])
                tokens = me_kernels.mixture_sample(stacked, weights, seed=batch.seeds, offset=t, **sample_kwargs)
                tokens_host = tokens.tolist()  # the step's one host transfer (stop checks)
                members_host = [-1] * batch.size
            else:
                logits = runners[member].catch_up(batch, t)
                tokens = me_kernels.sample(logits, seed=batch.seeds, offset=t, **sample_kwargs)
                tokens_host = tokens.tolist()  # the step's one host transfer (stop checks)
                members_host = [member] * batch.size
            batch.generated[:, t] = tokens
            bar.update(1)

            finished = []
            for row, req in enumerate(batch.request_ids):
                res = results[req]
                tok = tokens_host[row]
                if tok < 0:
                    raise RuntimeError(
                        f"request {req}: the logits at step {t} had no finite value or a NaN (member "
                        f"{members_host[row]}); nothing can be sampled from them"
                    )
                res.token_ids.append(tok)
                res.members.append(members_host[row])
                if tok in eos_ids:
                    res.finish_reason = "eos"
                elif stop_checker.hit(res.token_ids):
                    res.finish_reason = "stop"
                elif t + 1 < max_new_tokens:
                    continue
                finished.append(row)
            if finished:
                if len(finished) == batch.size:
                    break
                keep = [r for r in range(batch.size) if r not in set(finished)]
                keep_dev = torch.tensor(keep, dtype=torch.long, device=device)
                batch.keep(keep, keep_dev)
                for runner in runners:
                    runner.keep(keep, keep_dev)
                if method == "me":
                    next_members = next_members[keep_dev]
                    next_members_host = [next_members_host[r] for r in keep]
    finally:
        bar.close()
    return results
