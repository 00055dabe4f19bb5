"""The decode loop: ME, CE and single-member generation over a batch of requests.

Per step t (token t of every active request), one of three small steps runs, then the tokens are
recorded and finished rows retire:

* `me_step`: each request has a member z drawn at step t-1 (at setup for t = 0). The engine runs
  each row's pending tokens (the prompt too, the first time that member is chosen for the row)
  on the row's member and returns its next-token logits; the fused `me_step` kernel then samples
  token t from them and draws the member of step t+1, on the device.
* `ce_step`: every member runs every step; `mixture_sample` draws from the mixture.
* `single_step`: one member runs alone.

How a member "runs" is the engine's business (`Engine` below): the "hf" engine runs Hugging Face
forwards member by member; the "stacked" engine runs one grouped-GEMM forward for every row,
whatever member each row chose.

Randomness: request i draws with (seed_i, offset = t) only, so it gets the same tokens alone or
inside any batch. The one host transfer per step copies the step's tokens (and, for ME, the next
members): stop checks need the tokens on the host, and the engines size the next step from the
members (which rows' pending tokens it holds). Nothing else in the loop waits for the device; rows
that finish leave the batch, so they stop costing compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

import me_kernels
from me_kernels import SamplingParams

from .stopping import StopChecker


@dataclass
class RequestResult:
    token_ids: list[int] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    drafted: int = 0  # CE by drafting: drafted tokens tested, and how many were accepted
    accepted: int = 0


class Batch:
    """State shared by all members: one row per active request, on the sampling device.

    `tokens` [B, width + max_new_tokens] int64 holds each row's prompt, left-padded to `width`
    columns (pad slots hold token 0), followed by the generated tokens: token t of every row sits
    in column width + t. Row b's absolute position p is column `width - prompt_lens[b] + p`.
    """

    def __init__(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, device: torch.device):
        self.request_ids = list(range(len(prompts)))
        self.prompt_lens = [len(p) for p in prompts]
        self.width = max(self.prompt_lens)
        # Left padding: every prompt ends at the same column, so generated token t of every row
        # sits in one column. Built on the host and copied once.
        rows = [[0] * (self.width - len(p)) + list(p) + [0] * max(max_new_tokens, 1) for p in prompts]
        self.tokens = torch.tensor(rows, dtype=torch.long, device=device)
        self.prompt_lens_dev = torch.tensor(self.prompt_lens, dtype=torch.long, device=device)
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.max_new_tokens = max_new_tokens
        # The most positions (prompt + generated) any row reaches: a preallocated cache's capacity.
        self.max_positions = self.width + max_new_tokens
        self.device = device

    @property
    def size(self) -> int:
        return len(self.request_ids)

    @property
    def prompt_ids(self) -> torch.Tensor:
        """[B, width] left-padded prompts (a view of `tokens`)."""
        return self.tokens[:, : self.width]

    @property
    def generated(self) -> torch.Tensor:
        """[B, max_new_tokens] generated tokens (a view of `tokens`)."""
        return self.tokens[:, self.width :]

    def keep(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        """Keep only `rows` (host list, and the same indices on this device)."""
        self.request_ids = [self.request_ids[r] for r in rows]
        self.prompt_lens = [self.prompt_lens[r] for r in rows]
        trim = self.width - max(self.prompt_lens)  # columns that are now padding in every row
        self.tokens = self.tokens[rows_dev, trim:]
        self.width -= trim
        self.prompt_lens_dev = self.prompt_lens_dev[rows_dev]
        self.seeds = self.seeds[rows_dev]


@dataclass
class RowPositions:
    """Per-row generated-token counts (engines with `per_row_positions`): row b's value in `host`
    (a host list) and `dev` (int64 [B] on the sampling device). Used where an int t would give
    every row the same count."""

    host: list[int]
    dev: torch.Tensor

    def shifted(self, delta: int) -> "RowPositions":
        return RowPositions([v + delta for v in self.host], self.dev + delta)


class Engine(Protocol):
    """What the decode loop (and Ensemble) needs from an engine (see hf_engine.py and
    stacked_engine.py)."""

    name: str  # "hf" | "stacked"
    num_members: int
    # True: rows may sit at different generated counts: member_logits / all_member_logits /
    # span_logits / rollback take t as RowPositions (or an int for every row), exactly, for any
    # counts. False: keep rows in lock-step (the hf engine with a member whose cache cannot hold
    # holes: its steps take RowPositions too, but ragged counts may raise ValueError).
    per_row_positions: bool

    def begin(self, batch: Batch) -> None:
        """Allocate the per-call state (caches) for this batch."""

    def member_logits(self, batch: Batch, t, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        """Catch each row's member `members[b]` up on the row's tokens before step t (an int, or
        RowPositions: t_b for row b); return the float logits [B, V] of each row's next token
        under its member, on the sampling device."""

    def all_member_logits(self, batch: Batch, t) -> torch.Tensor:
        """The same for every member and row: [M, B, V]."""

    def span_logits(self, batch: Batch, t, span: int) -> torch.Tensor:
        """Every member's logits predicting generated tokens t - span + 1 .. t: [M, B, V] for
        span 1 (= all_member_logits), else [M, B, span, V] (the verification of drafted tokens;
        the members first forget what they read from generated token t - span on)."""

    def rollback(self, batch: Batch, t) -> None:
        """Every member forgets, in every row, the generated tokens from index t on (t >= -1)."""

    def retire(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        """Keep only `rows` of the batch."""

    def end(self) -> None:
        """Release the per-call state."""

    def score(self, prompts: list[list[int]], conts: list[list[int]], weights: torch.Tensor) -> list[float]:
        """Exact mixture log-likelihood of each non-empty continuation (Ensemble.score_ids)."""


@dataclass
class StepTokens:
    """What one step produced: tokens [B] on the device and their host copies."""

    tokens: torch.Tensor
    tokens_host: list[int]
    members_host: list[int]  # the member that produced each row's token (-1 for CE)


class Decoder:
    """One generate call's state and its steps (gpt-fast's decode_one_token, per method)."""

    def __init__(self, engine: Engine, weights: torch.Tensor, batch: Batch, *, selection: str, member: int,
                 params: SamplingParams):
        self.engine = engine
        self.weights = weights
        self.batch = batch
        self.shared = selection == "shared"
        self.member = member
        self.sample_kwargs = params.kwargs()
        # "shared": one member per step for the whole batch, drawn from the first request's seed
        # (kept fixed even after that request finishes, so the draw sequence is well defined).
        self.batch_seed = batch.seeds[:1].clone()
        self.next_members: torch.Tensor | None = None
        self.next_members_host: list[int] = []

    # ---------------------------------------------------------------- member draws
    def draw_members(self, offset: int) -> torch.Tensor:
        batch = self.batch
        if self.shared:
            return me_kernels.select_members(self.weights, seed=self.batch_seed, offset=offset, batch=1).expand(batch.size)
        return me_kernels.select_members(self.weights, seed=batch.seeds, offset=offset, batch=batch.size)

    def first_members(self) -> None:
        """Draw the members of step 0 (offset 0) before the loop."""
        self.next_members = self.draw_members(0)
        self.next_members_host = self.next_members.tolist()  # which members run at step 0
        self._check_members(-1)

    def _check_members(self, t: int) -> None:
        if min(self.next_members_host) < 0:  # the kernels' signal for an invalid weight row
            raise RuntimeError(f"step {t + 1}: no member could be drawn from the weights {self.weights.tolist()}")

    # ---------------------------------------------------------------- one step per method
    def me_step(self, t: int) -> StepTokens:
        batch = self.batch
        members, members_host = self.next_members, self.next_members_host
        logits = self.engine.member_logits(batch, t, members, members_host)
        if self.shared:
            tokens = me_kernels.sample(logits, seed=batch.seeds, offset=t, **self.sample_kwargs)
            next_members = self.draw_members(t + 1)
        else:
            tokens, next_members = me_kernels.me_step(logits, self.weights, seed=batch.seeds, offset=t, **self.sample_kwargs)
        # The step's one host transfer: the tokens for the stop checks, the members for the
        # engine's next step.
        host = torch.stack([tokens, next_members.to(torch.long)]).tolist()
        self.next_members, self.next_members_host = next_members, host[1]
        self._check_members(t)
        return StepTokens(tokens, host[0], members_host)

    def ce_step(self, t: int) -> StepTokens:
        batch = self.batch
        stacked = self.engine.all_member_logits(batch, t)
        tokens = me_kernels.mixture_sample(stacked, self.weights, seed=batch.seeds, offset=t, **self.sample_kwargs)
        return StepTokens(tokens, tokens.tolist(), [-1] * batch.size)  # the step's one host transfer

    def single_step(self, t: int) -> StepTokens:
        batch = self.batch
        members = torch.full((batch.size,), self.member, dtype=torch.int32, device=batch.device)
        logits = self.engine.member_logits(batch, t, members, [self.member] * batch.size)
        tokens = me_kernels.sample(logits, seed=batch.seeds, offset=t, **self.sample_kwargs)
        return StepTokens(tokens, tokens.tolist(), [self.member] * batch.size)  # the step's one host transfer

    # ---------------------------------------------------------------- bookkeeping
    def retire(self, finished: list[int]) -> None:
        """Drop finished rows from the batch, the engine and the pending member draws."""
        done = set(finished)
        keep = [r for r in range(self.batch.size) if r not in done]
        keep_dev = torch.tensor(keep, dtype=torch.long, device=self.batch.device)
        self.batch.keep(keep, keep_dev)
        self.engine.retire(keep, keep_dev)
        if self.next_members is not None:
            self.next_members = self.next_members[keep_dev]
            self.next_members_host = [self.next_members_host[r] for r in keep]


def append_token(res: RequestResult, tok: int, member: int, t: int, *, max_new_tokens: int, eos_ids: frozenset[int],
                 stop_checker: StopChecker) -> bool:
    """Append generated token t of a request; True when it finishes the request (EOS, a stop
    string, or max_new_tokens)."""
    res.token_ids.append(tok)
    res.members.append(member)
    if tok in eos_ids:
        res.finish_reason = "eos"
    elif stop_checker.hit(res.token_ids):
        res.finish_reason = "stop"
    elif t + 1 < max_new_tokens:
        return False
    return True


def record_tokens(results: list[RequestResult], batch: Batch, step: StepTokens, t: int, *, max_new_tokens: int,
                  eos_ids: frozenset[int], stop_checker: StopChecker) -> list[int]:
    """Append step t's tokens to the requests' results; return the rows that finished."""
    finished = []
    for row, req in enumerate(batch.request_ids):
        tok = step.tokens_host[row]
        if tok < 0:
            raise RuntimeError(
                f"request {req}: the logits at step {t} had no finite value or a NaN (member "
                f"{step.members_host[row]}); nothing can be sampled from them"
            )
        if append_token(results[req], tok, step.members_host[row], t, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                        stop_checker=stop_checker):
            finished.append(row)
    return finished


def decode(
    engine: Engine,
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
    """Generate up to `max_new_tokens` tokens for every prompt (token-id lists). See module doc
    (method "ce" with drafted tokens: me_runtime.drafting.decode_drafting)."""
    results = [RequestResult() for _ in prompts]
    if max_new_tokens == 0:
        return results
    batch = Batch(prompts, seeds, max_new_tokens, weights.device)
    decoder = Decoder(engine, weights, batch, selection=selection, member=member, params=params)
    step = {"me": decoder.me_step, "ce": decoder.ce_step, "single": decoder.single_step}[method]
    if method == "me":
        decoder.first_members()
    bar = tqdm(total=max_new_tokens, disable=not progress, desc=f"generate ({method})", unit="tok")
    try:
        engine.begin(batch)
        for t in range(max_new_tokens):
            out = step(t)
            batch.generated[:, t] = out.tokens
            bar.update(1)
            finished = record_tokens(results, batch, out, t, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                     stop_checker=stop_checker)
            if len(finished) == batch.size:
                break
            if finished:
                decoder.retire(finished)
    finally:
        engine.end()
        bar.close()
    return results
