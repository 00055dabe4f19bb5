"""Exact CE by drafting: ME proposes tokens, every member verifies them in one forward.

`generate(method="ce", draft_tokens=k)` samples from exactly CE's distribution (the transforms
applied to the mixture) at close to ME's cost when the members agree. A round, for rows that
have generated g tokens:

1. Draft (`draft_step`, D <= k times): position s = g + j is drafted by ME: member z_s drawn from
   the weights with (seed, offset s) (or the fixed `draft_member`) reads its pending tokens and
   the token x_s is drawn from its transformed distribution q_s with (seed, offset s): exactly
   the ME step, so the draft tokens are ME's tokens.
2. Verify (`verify`): every member reads the drafted tokens in ONE multi-token forward
   (`Engine.span_logits`) and gives its logits at the D + 1 positions g .. g + D. Position g + D
   is drafted from those logits too (member z_{g+D}'s row: no forward of its own), so the round
   has J = D + 1 drafted positions.
3. Accept (`me_kernels.verify_draft`, one fused kernel): position s is accepted with probability
   min(1, p_s(x_s) / q_s(x_s)), p_s = CE's transformed mixture; at the first rejection the token
   is drawn from normalise(max(0, p_s - q_s)). The row emits its accepted drafts and that token.
   At temperature 0 a draft is accepted iff it is the mixture's argmax, which is emitted at the
   first mismatch: CE's greedy tokens.

Why the tokens are exactly CE's distribution: each emitted token is distributed as p_s given the
prefix (the speculative-sampling identity), whatever q is. Why they do not depend on the batch or
on how positions fall into rounds: every random number used at position s is keyed by (seed, s)
(streams TOKEN / MEMBER for the draft, ACCEPT / RESIDUAL for the verification), and position s's
outcome depends only on the prefix and those numbers. The last position of a round is therefore
drafted, not drawn from the mixture directly (the usual "bonus" token): a round that ends there
and a round that drafts through it give the same token.

Rows keep their own positions on engines whose steps take a generated count per row
(`Engine.per_row_positions`: the stacked engine, and the hf engine unless a member has sliding-
window or recurrent layers, whose caches cannot hold the holes that rows at different positions
leave): each row emits its own accepted run and the token after it every round. Otherwise the
rows advance in lock-step: a round emits the fewest tokens any row got for every row (a row that
accepted more re-derives the same tokens next round, by the keying above). KV caches and read
counts are rolled back exactly to the emitted tokens (`Engine.rollback`).

Cost model, in member forwards (memory-bound decode: a forward over a few tokens costs about one
over one token): a round costs D draft forwards (one member each at batch 1) + one verification
forward of all M members, and emits E(D) = sum_{i=0..D} a^i tokens at acceptance rate a (batch
1). CE costs M forwards per token. The number of drafts per round adapts (`DraftController`): D in
[0, k] maximising E(D) / (D * c_draft + c_verify) from the measured acceptance and the measured
times of draft and verification steps, so it falls to 0 (a CE step with the verification kernel)
where drafting does not pay. Host transfers: one per draft step (the drafted tokens and the next
drafter, which the engines need on the host to pick what runs) and one per round (accept counts,
residual tokens and the next drafters).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

import me_kernels

from .decode import Batch, Decoder, RequestResult, RowPositions, append_token


class DraftController:
    """Chooses the number of drafted forwards per round from measured acceptance and costs.

    Acceptance: per request, accepted / tested drafts with a prior of one accepted in two. A
    round with D drafts emits sum_{i=0..D} a_b^i tokens for row b with per-row positions, and
    sum_{i=0..D} prod_b a_b^i for every row in lock-step (the minimum over rows). Costs, from
    the wall time of each phase (each ends with a host transfer, so the host clock measures the
    device work): a draft step's time, and the verification's time as a line in the positions J
    it verifies, c(J) = a + b * J, fitted to the average time of each J measured so far (b = 0,
    the memory-bound GPU regime, until two different J are measured; on a CPU the verification
    is compute-bound and b > 0). The first measured rounds explore: one draft, then none, so the
    line has two points before the choice rests on it. Before any measurement: a draft costs one
    member forward, a verification M."""

    def __init__(self, max_drafts: int, num_members: int, adaptive: bool = True):
        self.max_drafts = max_drafts
        self.adaptive = adaptive
        self.c_draft = 1.0
        self.num_members = num_members
        self.verify_times: dict[int, float] = {}  # positions verified -> average seconds
        self.measured = False

    def verify_cost(self, span: int) -> float:
        if not self.verify_times:
            return float(self.num_members)
        if len(self.verify_times) == 1:
            return next(iter(self.verify_times.values()))
        xs, ys = zip(*self.verify_times.items())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return max(my + max(slope, 0.0) * (span - mx), 1e-9)

    def choose(self, tested: list[int], accepted: list[int], per_row: bool = False) -> int:
        """Drafts for the next round. per_row: every row keeps its own accepted run (expected
        tokens sum_b sum_i a_b^i), else the rows advance in lock-step (sum_i prod_b a_b^i)."""
        if not self.adaptive or self.max_drafts == 0:
            return self.max_drafts
        # Exploration, cheap whatever the acceptance: a round of one draft (which also measures a
        # draft step), then a round of none, so the verification's cost line has two points
        # (J = 2 and J = 1) before any choice rests on it.
        if 2 not in self.verify_times:
            return 1
        if 1 not in self.verify_times:
            return 0
        rates = [(a + 1.0) / (n + 2.0) for n, a in zip(tested, accepted)]
        best, best_d = -1.0, 0
        for d in range(self.max_drafts + 1):
            if per_row:
                expected = sum(sum(r**i for i in range(d + 1)) for r in rates) / len(rates)
            else:
                expected = sum(math.prod(r**i for r in rates) for i in range(d + 1))
            value = expected / (d * self.c_draft + self.verify_cost(d + 1))
            if value > best * (1 + 1e-9):
                best, best_d = value, d
        return best_d

    def observe(self, draft_seconds: float, drafts: int, verify_seconds: float) -> None:
        """Record one round: `drafts` draft steps took draft_seconds, verifying drafts + 1
        positions took verify_seconds."""
        if not self.measured and not drafts:
            self.c_draft = verify_seconds / self.num_members  # the prior's ratio, in seconds
        if drafts:
            per = draft_seconds / drafts
            self.c_draft = per if not self.measured else 0.7 * self.c_draft + 0.3 * per
        span = drafts + 1
        old = self.verify_times.get(span)
        self.verify_times[span] = verify_seconds if old is None else 0.7 * old + 0.3 * verify_seconds
        self.measured = True


class DraftingDecoder(Decoder):
    """A Decoder whose rounds draft with ME and verify against CE (see the module docstring).

    Rows keep their own generated counts (`gen`): on an engine with per-row positions (the
    stacked engine; the hf engine unless a member's cache cannot hold holes) each row emits its
    own accepted run every round; otherwise the rows advance in lock-step (every row emits the
    fewest tokens any row got, and re-derives the rest)."""

    def __init__(self, engine, weights: torch.Tensor, batch: Batch, *, params, draft_tokens: int,
                 draft_member: int | None, max_new_tokens: int, adaptive: bool = True):
        super().__init__(engine, weights, batch, selection="independent", member=0, params=params)
        self.max_drafts = draft_tokens
        self.draft_member = draft_member
        self.max_new_tokens = max_new_tokens
        self.per_row = bool(getattr(engine, "per_row_positions", False))
        self.controller = DraftController(draft_tokens, engine.num_members, adaptive)
        self.gen = [0] * batch.size  # generated tokens of each active row (host) ...
        self.gen_dev = torch.zeros(batch.size, dtype=torch.long, device=batch.device)  # ... and on the device
        self.tested = [0] * batch.size  # per active row: drafts tested / accepted (controller)
        self.accepted = [0] * batch.size

    def positions(self, delta: int):
        """The engines' t for generated position gen_b + delta of every row: RowPositions, or
        the int every row shares in lock-step."""
        if self.per_row:
            return RowPositions([g + delta for g in self.gen], self.gen_dev + delta)
        return self.gen[0] + delta

    # ---------------------------------------------------------------- drafter draws
    def drafters(self, offsets: torch.Tensor) -> torch.Tensor:
        """The drafter of each row at absolute generated positions `offsets` (int64 [B] or
        [B, J]): drawn from the weights with (seed, offset), or the fixed draft_member."""
        batch = self.batch
        if self.draft_member is not None:
            return torch.full(offsets.shape, self.draft_member, dtype=torch.int32, device=batch.device)
        seeds = batch.seeds.reshape(-1, *([1] * (offsets.dim() - 1))).expand(offsets.shape)
        out = me_kernels.select_members(self.weights, seed=seeds.reshape(-1), offset=offsets.reshape(-1),
                                        batch=offsets.numel())
        return out.reshape(offsets.shape)

    def first_members(self) -> None:
        self.next_members = self.drafters(self.gen_dev)
        self.next_members_host = self.next_members.tolist()
        self._check_members(-1)

    # ---------------------------------------------------------------- one round
    def draft_step(self, j: int) -> torch.Tensor:
        """Draft generated position gen_b + j of every row with its drafter; returns the
        drafter's logits [B, V] (q before the transforms) and writes the tokens into the batch."""
        batch = self.batch
        members, members_host = self.next_members, self.next_members_host
        logits = self.engine.member_logits(batch, self.positions(j), members, members_host)
        offset = self.gen_dev + j
        if self.draft_member is None:
            tokens, next_members = me_kernels.me_step(logits, self.weights, seed=batch.seeds, offset=offset,
                                                      **self.sample_kwargs)
        else:
            tokens = me_kernels.sample(logits, seed=batch.seeds, offset=offset, **self.sample_kwargs)
            next_members = members
        batch.generated.scatter_(1, offset[:, None], tokens[:, None])
        # The draft step's one host transfer: the engines pick what runs from the drafters.
        host = torch.stack([tokens, next_members.to(torch.long)]).tolist()
        if min(host[0]) < 0:  # the sampling kernels' signal for logits with no finite value or a NaN
            row = host[0].index(min(host[0]))
            raise RuntimeError(f"request {batch.request_ids[row]}: the drafter's (member {members_host[row]}) logits at "
                               f"step {self.gen[row] + j} had no finite value or a NaN; nothing can be drafted from them")
        self.next_members, self.next_members_host = next_members, host[1]
        self._check_members(j)
        self._draft_tokens_host.append(host[0])
        return logits

    def round(self) -> list[list[int]]:
        """One draft-and-verify round; returns the tokens each row emitted (host lists)."""
        batch = self.batch
        remaining = min(self.max_new_tokens - g for g in self.gen)
        drafts = min(self.controller.choose(self.tested, self.accepted, self.per_row), remaining - 1)
        span = drafts + 1
        dev = batch.device
        steps = torch.arange(span, device=dev)[None, :]
        self._draft_tokens_host = []
        began = time.perf_counter()
        drafted_logits = [self.draft_step(j) for j in range(drafts)]
        drafted = time.perf_counter()

        target = self.engine.span_logits(batch, self.positions(drafts), span)  # [M, B, span, V] (or [M, B, V])
        if span == 1:
            target = target[:, :, None]
        rows = torch.arange(batch.size, device=dev)
        last = target[self.next_members.long(), rows, span - 1]  # the last position's drafter's logits
        draft_logits = torch.stack(drafted_logits + [last], dim=1) if drafts else last[:, None]  # [B, span, V]
        last_offset = self.gen_dev + drafts
        last_tokens = me_kernels.sample(last, seed=batch.seeds, offset=last_offset, **self.sample_kwargs)
        batch.generated.scatter_(1, last_offset[:, None], last_tokens[:, None])
        draft_tokens = batch.generated.gather(1, self.gen_dev[:, None] + steps)
        accepted, residual = me_kernels.verify_draft(target, draft_logits, draft_tokens, self.weights, seed=batch.seeds,
                                                     offset=self.gen_dev, **self.sample_kwargs)
        # the drafters of every position a row's next round may start at (gen + 1 .. gen + span)
        candidates = self.drafters(self.gen_dev[:, None] + 1 + steps)
        # The round's one host transfer: what was accepted, the residual tokens (stop checks),
        # the last drafted tokens and the next drafters.
        host = torch.cat([accepted[:, None], residual[:, None], last_tokens[:, None],
                          candidates.to(torch.long)], dim=1).tolist()
        if min(self.gen) > 0:  # the first round also reads the prompts: not a measure of a round's cost
            self.controller.observe(drafted - began, drafts, time.perf_counter() - drafted)
        if any(row[0] == 0 and row[1] < 0 for row in host):  # the kernel's failure signal
            bad = next(b for b, row in enumerate(host) if row[0] == 0 and row[1] < 0)
            raise RuntimeError(f"request {batch.request_ids[bad]}: the mixture at step {self.gen[bad]} had no finite "
                               "value or a NaN; nothing can be sampled from it")

        if self.per_row:  # each row emits its accepted run and the token after it
            emitted = [min(row[0] + 1, span) for row in host]
            emitted_dev = torch.clamp(accepted + 1, max=span)
        else:  # lock-step: the fewest any row got
            emitted = [min(min(row[0] + 1, span) for row in host)] * batch.size
            emitted_dev = torch.full_like(accepted, emitted[0])
        final = torch.where(accepted >= emitted_dev, draft_tokens.gather(1, (emitted_dev - 1)[:, None])[:, 0], residual)
        batch.generated.scatter_(1, (self.gen_dev + emitted_dev - 1)[:, None], final[:, None])
        drafted_host = [list(col) for col in zip(*self._draft_tokens_host)] if drafts else [[] for _ in host]
        tokens = []
        for b, row in enumerate(host):
            drafts_b = drafted_host[b] + [row[2]]
            tokens.append([drafts_b[j] if row[0] > j else row[1] for j in range(emitted[b])])
            self.tested[b] += min(row[0] + 1, span)
            self.accepted[b] += row[0]
        self.gen = [g + e for g, e in zip(self.gen, emitted)]
        self.gen_dev = self.gen_dev + emitted_dev
        # every member forgets what it read past the emitted tokens but the last (which may differ
        # from its draft)
        self.engine.rollback(batch, self.positions(-1))
        self.next_members = candidates.gather(1, (emitted_dev - 1)[:, None])[:, 0].contiguous()
        self.next_members_host = [row[3 + e - 1] for row, e in zip(host, emitted)]
        self._check_members(-1)
        self.round_drafted = [min(row[0] + 1, span) for row in host]
        self.round_accepted = [row[0] for row in host]
        return tokens

    def retire(self, finished: list[int]) -> None:
        done = set(finished)
        keep = [r for r in range(self.batch.size) if r not in done]
        self.tested = [self.tested[r] for r in keep]
        self.accepted = [self.accepted[r] for r in keep]
        self.gen = [self.gen[r] for r in keep]
        self.gen_dev = self.gen_dev[torch.tensor(keep, dtype=torch.long, device=self.batch.device)]
        super().retire(finished)


def decode_drafting(engine, weights: torch.Tensor, prompts: list[list[int]], seeds: list[int], *, params,
                    draft_tokens: int, draft_member: int | None, max_new_tokens: int, eos_ids: frozenset[int],
                    stop_checker, progress: bool, adaptive: bool = True) -> list[RequestResult]:
    """me_runtime.decode.decode for method="ce" with draft_tokens > 0: rounds of drafts and
    verification instead of CE steps (same arguments; results also count drafted / accepted)."""
    results = [RequestResult() for _ in prompts]
    if max_new_tokens == 0:
        return results
    batch = Batch(prompts, seeds, max_new_tokens, weights.device)
    decoder = DraftingDecoder(engine, weights, batch, params=params, draft_tokens=draft_tokens,
                              draft_member=draft_member, max_new_tokens=max_new_tokens, adaptive=adaptive)
    bar = tqdm(total=max_new_tokens, disable=not progress, desc="generate (ce, drafted)", unit="tok")
    try:
        decoder.first_members()
        engine.begin(batch)
        done_tokens = 0
        while batch.size:
            starts = list(decoder.gen)
            emitted = decoder.round()
            finished = []
            for b, (start, tokens) in enumerate(zip(starts, emitted)):
                res = results[batch.request_ids[b]]
                res.drafted += decoder.round_drafted[b]
                res.accepted += decoder.round_accepted[b]
                for j, tok in enumerate(tokens):
                    if append_token(res, tok, -1, start + j, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                    stop_checker=stop_checker):
                        finished.append(b)
                        break
            progress_now = min(decoder.gen)
            bar.update(progress_now - done_tokens)
            done_tokens = progress_now
            if len(finished) == batch.size:
                break
            if finished:
                decoder.retire(finished)
    finally:
        engine.end()
        bar.close()
    return results
