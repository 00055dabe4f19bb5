"""The "hf" engine: Hugging Face forwards, member by member, each with its own DynamicCache.

Works with any causal LM. A member that runs catches up EVERY active row (not only the rows that
chose it): nearly free when decoding is memory-bound. Steps take t as one int (every row at the
same generated count) or as RowPositions (a count per row: CE by drafting emits each row's own
accepted run; members with their own token streams grow rows by different numbers of tokens).
One forward serves every row either way: each row's pending tokens end the block of columns it
appends (left-padded to the longest), so where rows read different counts a row's cache gets holes:
masked columns between its tokens (`MemberRunner`). Positions are passed per row, so holes are
exact for full-attention layers; a member with sliding-window layers takes holes only while its
cache fits in the window, and one with other layer kinds (recurrent states) none: a ragged step
beyond that raises ValueError naming the member (lock-step steps keep working), and
`HFEngine.per_row_positions` is False for such an ensemble. In lock-step the caches carry no
padding but the prompts' left padding, as before: no per-column state, no extra work.

Which members run is Python control flow on the host copy of the step's members (the decode loop
transfers them with the tokens); the host mirrors each row's read count and cache layout, so
nothing in a step waits for the device.
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


def _hole_limit(config) -> tuple[int | None, str | None]:
    """How many cache columns a member's cache may span while it holds holes (columns that are
    padding in a row but not at the row's start), and why there is a limit: (None, None) when any
    number (full attention only: keys are masked one by one, positions are passed explicitly).

    A sliding-window layer counts its window in cache columns (and drops the columns that fall
    out of it), so holes would let a row see fewer of its own tokens: exact only while the whole
    cache fits in the window. Other layer kinds (recurrent or linear-attention states, chunked
    attention) would read the holes: no holes at all."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    if not layer_types:
        layer_types = {"sliding_attention" if window is not None else "full_attention"}
    others = sorted(layer_types - {"full_attention", "sliding_attention"})
    if others:
        return 0, f"its {', '.join(others)} layers would read the padding between a row's tokens"
    if "sliding_attention" in layer_types:
        if window is None:
            return 0, "its sliding-attention layers have no sliding_window in the config"
        return int(window), (f"its sliding-window attention (window {window}) counts the window in cache columns, so "
                             f"the padding between a row's tokens is exact only while the cache spans at most {window} "
                             "columns")
    return None, None


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class MemberRunner:
    """One member's view of the batch: its KV cache and how many tokens of each row it holds.

    Row b's cache holds `seen[b]` tokens of the row (its prompt, then its generated tokens, in
    order; the host list, and `seen_dev` int64 [B] on the member's device). Rows may hold
    different counts (a catch-up to per-row positions, a per-row rollback), so a row's tokens
    need not fill its columns. Two layouts:

    * contiguous (`runs` is None): row b's tokens fill columns [cache_len - seen[b], cache_len),
      the columns before them are padding. The prompts' left padding, and every lock-step step,
      keep this layout: no per-column state at all.
    * holed: `valid` bool [B, cache_len] on the device says which columns hold a token of the row
      (in order), `runs[b]` mirrors it on the host as [start, stop) column intervals. Attention
      masks every other column; positions are passed per row, so holes change no result.

    A catch-up appends one block of columns, each row's pending tokens at its END (left-padded to
    the step's longest), so every row's last token is the block's last column: the logits of the
    last `span` columns serve every row (logits_to_keep=span, nothing to gather). A block where
    rows read different counts leaves holes behind the rows that had an earlier token; a first
    read (prefill) is all left padding, whatever the counts.
    """

    def __init__(self, model: torch.nn.Module, sampling_device: torch.device, name: str = "member"):
        self.model = model
        self.name = name
        self.device = _device_of(model)
        self.sampling_device = sampling_device
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.mask_kind = _padding_mask_kind(model.config)
        self.hole_limit, self.hole_reason = _hole_limit(model.config)
        self._reset()

    def _reset(self) -> None:
        """An empty cache (the next catch-up reads every row's prefix again)."""
        self.cache = None
        self.cache_len = 0  # columns in the KV cache
        self.seen: list[int] = []  # host: tokens of each row the cache holds (prompt + generated)
        self.seen_dev: torch.Tensor | None = None  # the same, int64 [B] on self.device
        self.runs: list[list[list[int]]] | None = None  # holed layout only: each row's [start, stop) columns
        self.valid: torch.Tensor | None = None  # holed layout only: bool [B, cache_len], a token of the row

    # ---------------------------------------------------------------- reading
    def _targets(self, batch: Batch, t) -> tuple[list[int], torch.Tensor]:
        """Tokens of each row up to generated token t_b - 1 (t: an int, or RowPositions), on the
        host and int64 [B] on the member's device."""
        lens_dev = batch.prompt_lens_dev.to(self.device)
        if isinstance(t, int):
            return [n + t for n in batch.prompt_lens], lens_dev + t
        return [n + v for n, v in zip(batch.prompt_lens, t.host)], lens_dev + t.dev.to(self.device)

    def catch_up(self, batch: Batch, t, span: int = 1) -> torch.Tensor:
        """Read every row's pending tokens (the whole prompt the first time), up to generated token
        t_b - 1 of row b (t: an int for every row, or RowPositions); return the logits of each
        row's last `span` tokens read, which predict its generated tokens t_b - span + 1 .. t_b:
        [B, V] for span 1, else [B, span, V], on the sampling device. A row whose cache already
        holds more than t_b - span generated tokens first forgets them (it re-reads them: the
        logits of tokens read earlier are not kept)."""
        targets, targets_dev = self._targets(batch, t)
        if min(targets) < span:
            raise RuntimeError(f"catch_up: a row of {min(targets)} tokens cannot give {span} positions of logits")
        if self.cache is not None and any(s > n - span for s, n in zip(self.seen, targets)):
            self.forget([min(s, n - span) for s, n in zip(self.seen, targets)], targets_dev - span)
        if self.cache is None:
            self.seen = [0] * batch.size
            self.seen_dev = torch.zeros(batch.size, dtype=torch.long, device=self.device)
        pending = [n - s for n, s in zip(targets, self.seen)]
        new = max(pending)
        total = self.cache_len + new
        # A row with an earlier token and fewer pending tokens than the longest gets a hole
        # between them (its pending tokens end the block, padding starts it).
        holed = self.runs is not None or any(p < new and s > 0 for p, s in zip(pending, self.seen))
        if holed and self.hole_limit is not None and total > self.hole_limit:
            raise ValueError(
                f"the hf engine cannot catch {self.name} up on rows that hold different numbers of tokens here: "
                f"{self.hole_reason} (this step would span {total}). Generations whose rows stay at one count (int t) "
                "work."
            )

        steps = torch.arange(new, device=self.device)
        if min(pending) == new:  # no padding in the block (lock-step): the positions follow what was read
            first = self.seen_dev  # row b's token index at the block's first column
            positions = first[:, None] + steps[None, :]
        else:
            first = targets_dev - new  # (< seen: padding)
            positions = (first[:, None] + steps[None, :]).clamp_(min=0)
        starts = {batch.width - n0 + n - new for n0, n in zip(batch.prompt_lens, targets)}
        if len(starts) == 1:  # every row's block starts at one column of batch.tokens: a slice
            start = starts.pop()
            tokens = batch.tokens[:, start : start + new].to(self.device)
        else:
            columns = (batch.width - batch.prompt_lens_dev.to(self.device) + first)[:, None] + steps[None, :]
            columns = columns.clamp_(0, batch.tokens.shape[1] - 1).to(batch.tokens.device)
            tokens = batch.tokens.gather(1, columns).to(self.device)

        mask, valid = None, None
        if holed:
            old = self.valid if self.runs is not None else self._contiguous_valid()
            valid = torch.cat([old, steps[None, :] >= (self.seen_dev - first)[:, None]], dim=1)
            mask = self._mask(valid, new)
        elif any(n < total for n in targets):  # left padding (without any padding no mask is passed)
            keys = torch.arange(total, device=self.device)
            mask = self._mask(keys[None, :] >= (total - targets_dev)[:, None], new)

        kwargs = {"logits_to_keep": span} if self.accepts_logits_to_keep else {}
        out = self.model(
            input_ids=tokens.contiguous(),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        if holed:
            runs = self.runs if self.runs is not None else self._contiguous_runs()
            for row, (p, s) in enumerate(zip(pending, self.seen)):
                self._append_run(runs[row], total - p, total)
            self.runs, self.valid = runs, valid
        self.cache_len = total
        self.seen, self.seen_dev = targets, targets_dev
        self._maybe_contiguous()
        if self.runs is not None and self.cache_len > 2 * max(self.seen):
            self._compact()
        if span == 1:
            return out.logits[:, -1, :].to(self.sampling_device)
        return out.logits[:, -span:, :].to(self.sampling_device)

    # ---------------------------------------------------------------- forgetting
    def rollback(self, batch: Batch, t) -> None:
        """Forget, in every row, the generated tokens from index t_b on (t: an int for every row,
        or RowPositions; t_b >= -1, -1 also forgets the last prompt token): each row's cache then
        holds exactly what reading its first t_b generated tokens would give."""
        if self.cache is not None:
            self.forget(*self._targets(batch, t))

    def forget(self, keep: list[int], keep_dev: torch.Tensor) -> None:
        """Keep at most keep[b] tokens of row b (host list, and int64 [B] on the member's device).
        Columns past every row's last token are cropped; a row that drops more than another keeps
        the difference as a hole (marked invalid)."""
        drops = [max(s - k, 0) for s, k in zip(self.seen, keep)]
        if not any(drops):
            return
        kept = [s - d for s, d in zip(self.seen, drops)]
        kept_dev = torch.minimum(self.seen_dev, keep_dev)
        if self.runs is None:
            crop = min(drops)
            if any(d > crop and k > 0 for d, k in zip(drops, kept)):
                # rows end at different columns from now on: the holed layout
                if self.hole_limit is not None and self.cache_len - crop > self.hole_limit:
                    self._reset()  # (a member whose cache cannot hold holes here: re-read exactly next time)
                    return
                self.runs, self.valid = self._contiguous_runs(), self._contiguous_valid()
        if self.runs is not None:
            for run, d in zip(self.runs, drops):
                self._pop_tokens(run, d)
            self.valid &= self.valid.cumsum(1) <= kept_dev[:, None]  # each row's first kept tokens
            crop = self.cache_len - max((run[-1][1] for run in self.runs if run), default=0)
        if crop:
            try:
                self.cache.crop(-crop)  # transformers 5: a negative count removes that many tokens
            except RuntimeError:
                # A sliding-window layer past its window keeps no past states to return to: forget
                # the cache; the next catch-up reads the whole prefix again (exact, one prefill).
                self._reset()
                return
            self.cache_len -= crop
            if self.valid is not None:
                self.valid = self.valid[:, : self.cache_len]
        self.seen, self.seen_dev = kept, kept_dev
        self._maybe_contiguous()

    def keep(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        """Keep only `rows` of the batch (host list, and the same indices on the sampling device);
        columns that hold no token of any remaining row are dropped."""
        if self.cache is None:
            return
        idx = rows_dev.to(self.device)
        self.cache.batch_select_indices(idx)
        self.seen = [self.seen[r] for r in rows]
        self.seen_dev = self.seen_dev[idx]
        if self.runs is not None:
            self.runs = [self.runs[r] for r in rows]
            self.valid = self.valid[idx]
        if not any(self.seen):
            return
        if self.runs is None:
            first, end = min(self.cache_len - s for s in self.seen if s), self.cache_len
        else:
            first = min(run[0][0] for run in self.runs if run)
            end = max(run[-1][1] for run in self.runs if run)
        # Columns that hold nothing in every remaining row: drop them (plain attention layers only;
        # sliding-window or recurrent layers keep their own layout).
        if (first > 0 or end < self.cache_len) and DynamicLayer is not None and all(
                type(layer) is DynamicLayer for layer in self.cache.layers):
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.keys = layer.keys[..., first:end, :]
                    layer.values = layer.values[..., first:end, :]
            self.cache_len = end - first
            if self.runs is not None:
                self.runs = [[[a - first, b - first] for a, b in run] for run in self.runs]
                self.valid = self.valid[:, first:end]
        self._maybe_contiguous()

    # ---------------------------------------------------------------- layouts and masks
    def _contiguous_runs(self) -> list[list[list[int]]]:
        return [[[self.cache_len - s, self.cache_len]] if s else [] for s in self.seen]

    def _contiguous_valid(self) -> torch.Tensor:
        keys = torch.arange(self.cache_len, device=self.device)
        return keys[None, :] >= (self.cache_len - self.seen_dev)[:, None]

    @staticmethod
    def _append_run(run: list[list[int]], start: int, stop: int) -> None:
        if run and run[-1][1] == start:
            run[-1][1] = stop
        else:
            run.append([start, stop])

    @staticmethod
    def _pop_tokens(run: list[list[int]], count: int) -> None:
        """Drop the last `count` token columns of a row's runs."""
        while count:
            start, stop = run[-1]
            if stop - start <= count:
                run.pop()
                count -= stop - start
            else:
                run[-1][1] = stop - count
                count = 0

    def _maybe_contiguous(self) -> None:
        """Back to the contiguous layout when no row has a hole (every row's tokens end the cache)."""
        if self.runs is not None and all(not run or (len(run) == 1 and run[0][1] == self.cache_len)
                                         for run in self.runs):
            self.runs, self.valid = None, None

    def _compact(self) -> None:
        """Move every row's tokens to the end of the cache, in order: the contiguous layout over
        max(seen) columns (one gather per layer). Ragged steps append more columns than rows
        read; compacting when holes fill over half the cache keeps it within twice the longest
        row. Exact: keys already carry their positions (rotary, learned or none), and attention
        masks columns, not positions. Plain attention layers only (the others never hold holes
        past their hole limit)."""
        if DynamicLayer is None or not all(type(layer) is DynamicLayer for layer in self.cache.layers):
            return
        width = max(self.seen)
        rows = len(self.seen)
        # column j of the compact cache reads old column index[b, j] (columns before a row's
        # tokens read column 0: padding, masked)
        dest = (self.valid.cumsum(1) - 1) + (width - self.seen_dev)[:, None]
        dest = torch.where(self.valid, dest, width)  # (other columns land in a column that is dropped)
        columns = torch.arange(self.cache_len, device=self.device).expand(rows, -1)
        index = torch.zeros((rows, width + 1), dtype=torch.long, device=self.device).scatter_(1, dest, columns)
        index = index[:, None, :width, None]
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
                layer.values = layer.values.gather(
                    2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))
        self.cache_len = width
        self.runs, self.valid = None, None

    def _mask(self, valid: torch.Tensor, new: int) -> torch.Tensor:
        """The attention mask for `new` queries (the last columns) over valid.shape[1] keys;
        valid bool [B, keys]: the key holds a token of the row.

        transformers turns a 2D padding mask into a 4D one after checking it on the host (a sync
        per forward); for sdpa / eager attention without sliding windows we build the 4D mask
        here on the device instead, and hand other attention implementations the 2D mask.
        """
        if self.mask_kind == "2d":
            return valid.long()
        total = valid.shape[1]
        keys = torch.arange(total, device=self.device)
        queries = torch.arange(total - new, total, device=self.device)
        causal = keys[None, :] <= queries[:, None]  # [new, total]
        allowed = (valid[:, None, :] & causal[None]) | (keys[None, :] == queries[:, None])[None]
        # (a padding query attends to itself: a row with no key at all would give NaN values that
        # leak into real rows through 0 * NaN)
        allowed = allowed[:, None]  # [B, 1, new, total]
        if self.mask_kind == "4d-bool":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )


def padded_rows(prompts: list[list[int]], conts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scoring forward's inputs: each row prompt + continuation, left-padded to the longest:
    token ids, attention mask and position ids, int64 [rows, width] on the CPU."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
    width = max(len(s) for s in seqs)
    pad = [width - len(s) for s in seqs]
    ids = torch.tensor([[0] * n + s for n, s in zip(pad, seqs)], dtype=torch.long)
    mask = (torch.arange(width)[None, :] >= torch.tensor(pad)[:, None]).long()
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def continuation_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                        cmax: int) -> torch.Tensor:
    """A member's logits [rows, cmax, V] (its dtype, on its device) at the positions predicting
    the last cmax tokens of each padded row (padded_rows), from one forward without a cache."""
    dev = _device_of(model)
    kwargs = {"logits_to_keep": cmax + 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=False,
                **kwargs)
    return out.logits[:, -cmax - 1 : -1, :]


class HFEngine:
    """Runs each member's own Hugging Face forward (any causal LM). See the module docstring."""

    name = "hf"
    # Steps take per-row generated counts (RowPositions), and rows may hold different counts. An
    # engine with a member whose cache cannot hold holes for long (sliding windows, recurrent
    # layers: `_hole_limit`) sets it False, so callers that choose (drafting) keep rows in
    # lock-step; its steps still take RowPositions, exact or a ValueError (see MemberRunner).
    per_row_positions = True

    def __init__(self, models: list[torch.nn.Module], sampling_device: torch.device, vocab_size: int):
        self.models = list(models)
        self.sampling_device = sampling_device
        self.vocab_size = vocab_size
        self.keeps_logits = all("logits_to_keep" in inspect.signature(m.forward).parameters for m in self.models)
        self.runners: list[MemberRunner] = []
        self.per_row_positions = all(_hole_limit(m.config)[0] is None for m in self.models)

    @property
    def num_members(self) -> int:
        return len(self.models)

    # ---------------------------------------------------------------- generation
    def begin(self, batch: Batch) -> None:
        """Fresh caches for one generate call."""
        self.runners = [MemberRunner(m, self.sampling_device, f"member {i}") for i, m in enumerate(self.models)]

    def member_logits(self, batch: Batch, t, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        """Next-token logits [B, V] of each row under its own member (members int [B] on the
        sampling device, and its host copy), predicting generated token t_b of row b (t: an int
        for every row, or RowPositions). A member that runs catches up every row."""
        logits = None
        for m in sorted(set(members_host)):
            member_logits = self.runners[m].catch_up(batch, t)
            logits = member_logits if logits is None else torch.where((members == m)[:, None], member_logits, logits)
        return logits

    def rows_logits(self, batch: Batch, t, member: int, rows: torch.Tensor, rows_host: list[int]) -> torch.Tensor:
        """Member `member`'s next-token logits [N, V] for the given rows (int64 [N] on the sampling
        device; t as in member_logits): the member catches every row up (see the module
        docstring), these rows' logits are kept."""
        return self.runners[member].catch_up(batch, t).index_select(0, rows)

    def all_member_logits(self, batch: Batch, t) -> torch.Tensor:
        """Every member's next-token logits [M, B, V] (the CE step; t as in member_logits)."""
        return torch.stack([runner.catch_up(batch, t) for runner in self.runners])

    def span_logits(self, batch: Batch, t, span: int) -> torch.Tensor:
        """Every member's logits [M, B, span, V] predicting generated tokens t_b - span + 1 .. t_b
        of each row b (the verification of drafted tokens; [M, B, V] for span 1): each member
        first forgets what it read from generated token t_b - span on, then reads up to token
        t_b - 1 in one forward."""
        before = t - span if isinstance(t, int) else t.shifted(-span)
        for runner in self.runners:
            runner.rollback(batch, before)
        return torch.stack([runner.catch_up(batch, t, span) for runner in self.runners])

    def rollback(self, batch: Batch, t) -> None:
        """Every member forgets, in every row b, the generated tokens from index t_b on (rejected
        drafts; t an int for every row, or RowPositions)."""
        for runner in self.runners:
            runner.rollback(batch, t)

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
        ids, mask, positions = padded_rows(prompts, conts)
        width, cmax = ids.shape[1], max(len(c) for c in conts)
        member_logits = [continuation_logits(model, ids, mask, positions, cmax).to(self.sampling_device)
                         for model in self.models]
        rows = len(prompts)
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
