"""The "hf" engine: Hugging Face forwards, member by member, each with its own DynamicCache.

Works with any causal LM. A member that runs catches up EVERY active row (not only the rows that
chose it): nearly free when decoding is memory-bound, and it keeps every row of the member's cache
at the same length, so caches carry no padding holes beyond the prompts' left padding, however
long the generation. Which members run is Python control flow on the host copy of the step's
members (the decode loop transfers them with the tokens, so this adds no synchronisation).
"""
from __future__ import annotations

import inspect

import torch

import me_kernels

from .decode import Batch

try:  # transformers >= 4.56
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - old transformers
    from transformers import DynamicCache

    DynamicLayer = None


def _padding_mask_kind(config) -> str:
    """How a member takes a padding mask: a 4D bool mask (sdpa), a 4D additive mask (eager), or
    the 2D mask transformers expands itself (other attention kernels, sliding-window layers)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    if sliding or any(t != "full_attention" for t in layer_types):
        return "2d"
    return {"sdpa": "4d-bool", "eager": "4d-float"}.get(getattr(config, "_attn_implementation", None), "2d")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class MemberRunner:
    """One member's view of the batch: its KV cache and how many generated tokens it has read.

    Every active row of a member's cache has read the same number of generated tokens
    (`consumed`); rows differ only by their prompt's left padding (`pad`), which is fixed at the
    member's first forward and trimmed when the longest prompts leave the batch.
    """

    def __init__(self, model: torch.nn.Module, sampling_device: torch.device):
        self.model = model
        self.device = _device_of(model)
        self.sampling_device = sampling_device
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.mask_kind = _padding_mask_kind(model.config)
        self.cache = None
        self.consumed = 0  # generated tokens read by every active row (-1: not even the prompt's last)
        self.cache_len = 0  # columns in the KV cache (prompt width at prefill + consumed)
        self.pad: list[int] = []  # host: left-pad columns of each row
        self.pad_dev: torch.Tensor | None = None

    def catch_up(self, batch: Batch, t: int, span: int = 1) -> torch.Tensor:
        """Read every pending token of every row (the whole prompt the first time), up to
        generated token t - 1; return the logits of the last `span` positions read, which predict
        generated tokens t - span + 1 .. t: [B, V] for span 1, else [B, span, V], on the sampling
        device. span > 1 needs the member to have read at most t - span generated tokens (see
        `rollback`)."""
        if self.cache is None:
            tokens = batch.tokens[:, : batch.width + t]
            self.pad = [batch.width - n for n in batch.prompt_lens]
            self.pad_dev = (batch.width - batch.prompt_lens_dev).to(self.device)
            steps = torch.arange(tokens.shape[1], device=self.device)
            positions = (steps[None, :] - self.pad_dev[:, None]).clamp_(min=0)
            self.cache = DynamicCache(config=self.model.config)
        else:
            # consumed may be -1 after a rollback into the prompt: the last prompt token is re-read
            tokens = batch.tokens[:, batch.width + self.consumed : batch.width + t]
            steps = torch.arange(self.consumed, t, device=self.device)
            positions = batch.prompt_lens_dev.to(self.device)[:, None] + steps[None, :]
        new = tokens.shape[1]
        if new < span:
            raise RuntimeError(f"catch_up: {new} pending tokens cannot give {span} positions of logits")
        mask = None
        if any(self.pad):  # without padding no mask is passed at all
            mask = self._padding_mask(new)
        kwargs = {"logits_to_keep": span} if self.accepts_logits_to_keep else {}
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
        if span == 1:
            return out.logits[:, -1, :].to(self.sampling_device)
        return out.logits[:, -span:, :].to(self.sampling_device)

    def rollback(self, t: int) -> None:
        """Forget every generated token from index t on (t >= -1; -1 also forgets the last prompt
        token): the cache keeps exactly what reading the first t generated tokens would give."""
        if self.cache is None or self.consumed <= t:
            return
        drop = self.consumed - t
        try:
            self.cache.crop(-drop)  # transformers 5: a negative count removes that many tokens
        except RuntimeError:
            # A sliding-window layer past its window keeps no past states to return to: forget
            # the cache; the next catch-up reads the whole prefix again (exact, one prefill).
            self.cache, self.consumed, self.cache_len = None, 0, 0
            return
        self.cache_len -= drop
        self.consumed = t

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


class HFEngine:
    """Runs each member's own Hugging Face forward (any causal LM). See the module docstring."""

    name = "hf"
    per_row_positions = False  # every row of a member's cache holds the same count (see MemberRunner)

    def __init__(self, models: list[torch.nn.Module], sampling_device: torch.device, vocab_size: int):
        self.models = list(models)
        self.sampling_device = sampling_device
        self.vocab_size = vocab_size
        self.keeps_logits = all("logits_to_keep" in inspect.signature(m.forward).parameters for m in self.models)
        self.runners: list[MemberRunner] = []

    @property
    def num_members(self) -> int:
        return len(self.models)

    # ---------------------------------------------------------------- generation
    def begin(self, batch: Batch) -> None:
        """Fresh caches for one generate call."""
        self.runners = [MemberRunner(m, self.sampling_device) for m in self.models]

    def member_logits(self, batch: Batch, t: int, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        """Next-token logits [B, V] of each row under its own member (members int [B] on the
        sampling device, and its host copy)."""
        logits = None
        for m in sorted(set(members_host)):
            member_logits = self.runners[m].catch_up(batch, t)
            logits = member_logits if logits is None else torch.where((members == m)[:, None], member_logits, logits)
        return logits

    def rows_logits(self, batch: Batch, t, member: int, rows: torch.Tensor, rows_host: list[int]) -> torch.Tensor:
        """Member `member`'s next-token logits [N, V] for the given rows (int64 [N] on the sampling
        device): the member catches every row up (see the module docstring), these are kept."""
        return self.runners[member].catch_up(batch, t).index_select(0, rows)

    def all_member_logits(self, batch: Batch, t: int) -> torch.Tensor:
        """Every member's next-token logits [M, B, V] (the CE step)."""
        return torch.stack([runner.catch_up(batch, t) for runner in self.runners])

    def span_logits(self, batch: Batch, t: int, span: int) -> torch.Tensor:
        """Every member's logits [M, B, span, V] predicting generated tokens t - span + 1 .. t
        (the verification of drafted tokens): each member first forgets what it read from
        generated token t - span on, then reads up to token t - 1 in one forward."""
        for runner in self.runners:
            runner.rollback(t - span)
        return torch.stack([runner.catch_up(batch, t, span) for runner in self.runners])

    def rollback(self, batch: Batch, t: int) -> None:
        """Every member forgets the generated tokens from index t on (rejected drafts)."""
        for runner in self.runners:
            runner.rollback(t)

    def retire(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        """Keep only `rows` of the batch in every member's cache."""
        for runner in self.runners:
            runner.keep(rows, rows_dev)

    def end(self) -> None:
        self.runners = []

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: list[list[int]], conts: list[list[int]], weights: torch.Tensor,
              *, with_greedy: bool = False) -> list[float] | list[tuple[float, bool]]:
        """Exact mixture log-likelihood of each (non-empty) continuation; see Ensemble.score_ids.
        with_greedy: (log-likelihood, every continuation token is the mixture's argmax) pairs."""
        scores: list = [None] * len(prompts)
        for chunk in self._score_chunks(prompts, conts):
            values = self._score_chunk([prompts[i] for i in chunk], [conts[i] for i in chunk], weights)
            for i, value in zip(chunk, values):
                scores[i] = value if with_greedy else value[0]
        return scores

    def _score_chunks(self, prompts, conts, max_tokens=16384, max_logit_bytes=1 << 30):
        """Split rows into chunks whose forward holds at most max_tokens (padded) tokens and
        whose kept logits, all members together, take at most max_logit_bytes."""
        def too_big(rows, width, cmax):
            positions = cmax + 1 if self.keeps_logits else width
            logit_bytes = rows * positions * self.vocab_size * 4 * (self.num_members + 1)
            return rows * width > max_tokens or logit_bytes > max_logit_bytes

        chunk, width, cmax = [], 0, 0
        for i in range(len(prompts)):
            row_width, row_cont = len(prompts[i]) + len(conts[i]), len(conts[i])
            if chunk and too_big(len(chunk) + 1, max(width, row_width), max(cmax, row_cont)):
                yield chunk
                chunk, width, cmax = [], 0, 0
            chunk.append(i)
            width, cmax = max(width, row_width), max(cmax, row_cont)
        if chunk:
            yield chunk

    def _score_chunk(self, prompts, conts, weights) -> list[tuple[float, bool]]:
        seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
        width = max(len(s) for s in seqs)
        cmax = max(len(c) for c in conts)
        pad = [width - len(s) for s in seqs]
        ids = torch.tensor([[0] * n + s for n, s in zip(pad, seqs)], dtype=torch.long)
        mask = (torch.arange(width)[None, :] >= torch.tensor(pad)[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        member_logits = []
        for model in self.models:
            dev = _device_of(model)
            kwargs = {"logits_to_keep": cmax + 1} if self.keeps_logits else {}
            out = model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=False, **kwargs
            )
            # the logits at the cmax positions that predict the last cmax tokens
            member_logits.append(out.logits[:, -cmax - 1 : -1, :].to(self.sampling_device))
        rows = len(seqs)
        stacked = torch.stack(member_logits).reshape(self.num_members, rows * cmax, -1)
        logmix = me_kernels.mixture_logprobs(stacked, weights).reshape(rows, cmax, -1)
        targets = ids[:, width - cmax :].to(self.sampling_device)
        token_lp = logmix.gather(2, targets[:, :, None]).squeeze(2).double()
        valid = torch.arange(cmax, device=self.sampling_device)[None, :] >= torch.tensor(
            [cmax - len(c) for c in conts], device=self.sampling_device
        )[:, None]
        # greedy: the argmax (lowest id on ties, as temperature-0 sampling) at every scored position
        greedy = ((logmix.argmax(2) == targets) | ~valid).all(1)
        return list(zip(token_lp.masked_fill(~valid, 0.0).sum(1).tolist(), greedy.tolist()))
