"""Decoding members with different tokenizers: ME by text exchange, CE over the union vocabulary.

The process (the definition both methods follow; README "Members with different tokenizers"):
every request has one shared text, the prompt followed by the pieces emitted so far (a piece is
the byte string of one token, me_runtime/vocabularies.py). Member m reads the prompt in its own
tokenizer's encoding, then, for every emitted piece, its spelling of that piece (`spelling[m]`).
At step t:

* ME: the member z_t drawn from the weights (seed, t) reads its pending tokens and samples a token
  from its own distribution (transformed by temperature / top-k / top-p / min-p; its special
  tokens other than EOS removed); the piece of that token is emitted.
* CE: every member reads its pending tokens; each member's distribution over pieces (the sum of
  its tokens' probabilities per piece) is mixed with the weights over the union vocabulary, the
  transforms apply to that mixture, and a piece is sampled from it.
* single: member `member` alone, as ME with all the weight on it.

So at temperature 1 without truncation, ME and CE emit the same distribution over piece
sequences: at each step P(piece s) = sum_m w_m p_m(s | the member's reading of the shared text),
and every member's reading is a function of the emitted pieces alone. A request ends when a
member's EOS token is sampled ("eos"), a stop string appears in the emitted bytes ("stop"),
max_new_tokens pieces were emitted or a member's context (max_seq_len positions) cannot take the
next piece ("length").

Batched on the device: each member has its own token stream per request (a `Batch` of its own,
rows growing by different numbers of tokens per step, read through the engines' per-row positions)
and its own one-member engine. One host transfer per step copies the emitted union ids (and for
ME the next members): the stop checks and the spelling lengths (which size the next catch-up)
need them on the host, as in the shared-vocabulary loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import me_kernels
from me_kernels import SamplingParams

from .decode import Batch, RowPositions
from .stopping import ByteStopChecker
from .vocabularies import END, UnionVocabulary


@dataclass
class PieceResult:
    """One request's output: union ids of the emitted pieces, their members, and the bytes."""

    token_ids: list[int] = field(default_factory=list)
    members: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    finish_reason: str = "length"


class MemberStream:
    """One member's token stream: its Batch (its encoding of each prompt, then the spellings of the
    emitted pieces) and how many tokens each row holds after its prompt (host list and device)."""

    def __init__(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, longest_spelling: int,
                 max_seq_len: int | None, device: torch.device):
        # Each row holds at most max_new_tokens spellings, and at most max_seq_len positions.
        room = [max_new_tokens * longest_spelling if max_seq_len is None
                else min(max_new_tokens * longest_spelling, max_seq_len - len(p)) for p in prompts]
        # + longest_spelling columns of slack: an append writes a fixed width past a row's end
        self.batch = Batch(prompts, seeds, max(room) + longest_spelling, device)
        self.batch.max_positions = max(len(p) + r for p, r in zip(prompts, room))
        self.gen_host = [0] * len(prompts)
        self.gen_dev = torch.zeros(len(prompts), dtype=torch.long, device=device)

    def positions(self) -> RowPositions:
        return RowPositions(self.gen_host, self.gen_dev)

    def keep(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        self.batch.keep(rows, rows_dev)
        self.gen_host = [self.gen_host[r] for r in rows]
        self.gen_dev = self.gen_dev[rows_dev]


@dataclass
class StepPieces:
    union: torch.Tensor  # int64 [B] union ids of the emitted pieces (-1: nothing could be sampled)
    union_host: list[int]
    members_host: list[int]  # the member that produced each row's piece (-1 for CE)


class MixedDecoder:
    """One generate call over members with different tokenizers (see the module docstring)."""

    def __init__(self, engines: list, vocab: UnionVocabulary, weights: torch.Tensor, streams: list[MemberStream], *,
                 selection: str, member: int, params: SamplingParams, max_seq_len: int | None):
        self.engines = engines
        self.vocab = vocab
        self.weights = weights
        self.streams = streams
        self.shared = selection == "shared"
        self.member = member
        self.max_seq_len = max_seq_len
        self.sample_kwargs = params.kwargs()
        self.seeds = streams[0].batch.seeds
        self.batch_seed = self.seeds[:1].clone()
        self.device = weights.device
        self.next_members: torch.Tensor | None = None
        self.next_members_host: list[int] = []

    @property
    def size(self) -> int:
        return self.seeds.shape[0]

    # ---------------------------------------------------------------- member draws (as decode.Decoder)
    def draw_members(self, offset: int) -> torch.Tensor:
        if self.shared:
            return me_kernels.select_members(self.weights, seed=self.batch_seed, offset=offset, batch=1).expand(self.size)
        return me_kernels.select_members(self.weights, seed=self.seeds, offset=offset, batch=self.size)

    def first_members(self) -> None:
        self.next_members = self.draw_members(0)
        self.next_members_host = self.next_members.tolist()  # which members run at step 0
        if min(self.next_members_host) < 0:
            raise RuntimeError(f"no member could be drawn from the weights {self.weights.tolist()}")

    def _member_rows(self, m: int, rows: torch.Tensor, rows_host: list[int]) -> torch.Tensor:
        """Member m's logits [N, V_m] for the given rows, its never-sampled tokens at -inf."""
        stream = self.streams[m]
        logits = self.engines[m].rows_logits(stream.batch, stream.positions(), 0, rows, rows_host)
        return self.vocab.masked_logits(m, logits)

    def _to_union(self, m: int, tokens: torch.Tensor) -> torch.Tensor:
        union = self.vocab.to_union[m][tokens.clamp(min=0)]
        return torch.where(tokens < 0, -1, union)  # -1: the kernels found nothing to sample

    # ---------------------------------------------------------------- one step per method
    def me_step(self, t: int) -> StepPieces:
        members, members_host = self.next_members, self.next_members_host
        union = torch.empty(self.size, dtype=torch.long, device=self.device)
        next_members = torch.empty(self.size, dtype=torch.long, device=self.device)
        # Rows grouped by member on the device; the host knows each member's row count.
        order = torch.sort(members.long(), stable=True).indices
        begin = 0
        for m in sorted(set(members_host)):
            rows_host = [r for r, z in enumerate(members_host) if z == m]
            rows = order[begin : begin + len(rows_host)]
            begin += len(rows_host)
            logits = self._member_rows(m, rows, rows_host)
            seeds = self.seeds.index_select(0, rows)
            if self.shared:
                tokens = me_kernels.sample(logits, seed=seeds, offset=t, **self.sample_kwargs)
            else:
                tokens, nxt = me_kernels.me_step(logits, self.weights, seed=seeds, offset=t, **self.sample_kwargs)
                next_members.index_copy_(0, rows, nxt.long())
            union.index_copy_(0, rows, self._to_union(m, tokens))
        if self.shared:
            next_members = self.draw_members(t + 1).long()
        host = torch.stack([union, next_members]).tolist()  # the step's one host transfer
        self.next_members, self.next_members_host = next_members, host[1]
        if min(host[1]) < 0:
            raise RuntimeError(f"step {t + 1}: no member could be drawn from the weights {self.weights.tolist()}")
        return StepPieces(union, host[0], members_host)

    def ce_step(self, t: int) -> StepPieces:
        stacked = torch.stack([
            self.vocab.union_logits(m, self.vocab.masked_logits(
                m, self.engines[m].all_member_logits(stream.batch, stream.positions())[0]))
            for m, stream in enumerate(self.streams)
        ])  # [M, B, U]
        union = me_kernels.mixture_sample(stacked, self.weights, seed=self.seeds, offset=t, **self.sample_kwargs)
        return StepPieces(union, union.tolist(), [-1] * self.size)  # the step's one host transfer

    def single_step(self, t: int) -> StepPieces:
        m = self.member
        rows = torch.arange(self.size, device=self.device)
        logits = self._member_rows(m, rows, list(range(self.size)))
        tokens = me_kernels.sample(logits, seed=self.seeds, offset=t, **self.sample_kwargs)
        union = self._to_union(m, tokens)
        return StepPieces(union, union.tolist(), [m] * self.size)  # the step's one host transfer

    # ---------------------------------------------------------------- bookkeeping
    def fits(self, row: int, union_id: int) -> bool:
        """Whether every member's context can take the piece's spelling in this row."""
        if self.max_seq_len is None:
            return True
        return all(len_prompt + gen + self.vocab.spelling_lengths[m][union_id] <= self.max_seq_len
                   for m, (len_prompt, gen) in enumerate((s.batch.prompt_lens[row], s.gen_host[row]) for s in self.streams))

    def append(self, step: StepPieces) -> None:
        """Every member appends its spelling of each row's piece to its stream (on the device)."""
        union = step.union.clamp(min=0)
        for m, stream in enumerate(self.streams):
            lengths = [self.vocab.spelling_lengths[m][u] if u >= 0 else 0 for u in step.union_host]
            width = max(lengths)
            if width == 0:
                continue
            spelled = self.vocab.spell(m, union, width)
            cols = stream.batch.width + stream.gen_dev[:, None] + torch.arange(width, device=self.device)[None, :]
            stream.batch.tokens.scatter_(1, cols, spelled)
            offsets = self.vocab.spelling_offsets[m]
            stream.gen_dev += offsets[union + 1] - offsets[union]
            stream.gen_host = [g + n for g, n in zip(stream.gen_host, lengths)]

    def retire(self, finished: list[int]) -> None:
        done = set(finished)
        keep = [r for r in range(self.size) if r not in done]
        keep_dev = torch.tensor(keep, dtype=torch.long, device=self.device)
        for engine, stream in zip(self.engines, self.streams):
            stream.keep(keep, keep_dev)
            engine.retire(keep, keep_dev)
        self.seeds = self.streams[0].batch.seeds
        if self.next_members is not None:
            self.next_members = self.next_members[keep_dev]
            self.next_members_host = [self.next_members_host[r] for r in keep]


def record_pieces(results: list[PieceResult], request_ids: list[int], decoder: MixedDecoder, step: StepPieces,
                  t: int, *, max_new_tokens: int, stop_checker: ByteStopChecker) -> list[int]:
    """Append step t's pieces to the requests' results; return the rows that finished."""
    finished = []
    for row, req in enumerate(request_ids):
        u = step.union_host[row]
        if u < 0:
            raise RuntimeError(f"request {req}: the logits at step {t} had no finite value or a NaN (member "
                               f"{step.members_host[row]}); nothing can be sampled from them")
        res = results[req]
        res.token_ids.append(u)
        res.members.append(step.members_host[row])
        if u == END:
            res.finish_reason = "eos"
        else:
            res.data += decoder.vocab.pieces[u]
            if stop_checker.hit(res.data):
                res.finish_reason = "stop"
            elif t + 1 < max_new_tokens and decoder.fits(row, u):
                continue
        finished.append(row)
    return finished


def decode_mixed(engines: list, vocab: UnionVocabulary, weights: torch.Tensor, prompts: list[list[list[int]]],
                 seeds: list[int], *, method: str, selection: str, member: int, params: SamplingParams,
                 max_new_tokens: int, stop_checker: ByteStopChecker, max_seq_len: int | None,
                 progress: bool) -> list[PieceResult]:
    """Generate up to max_new_tokens pieces per request. prompts[m][i]: request i in member m's
    tokens; engines[m]: a one-member engine (per-row positions) for member m."""
    count = len(prompts[0])
    results = [PieceResult() for _ in range(count)]
    if max_new_tokens == 0:
        return results
    streams = [MemberStream(prompts[m], seeds, max_new_tokens, vocab.longest_spelling[m], max_seq_len, weights.device)
               for m in range(len(engines))]
    decoder = MixedDecoder(engines, vocab, weights, streams, selection=selection, member=member, params=params,
                           max_seq_len=max_seq_len)
    step = {"me": decoder.me_step, "ce": decoder.ce_step, "single": decoder.single_step}[method]
    if method == "me":
        decoder.first_members()
    request_ids = list(range(count))
    bar = tqdm(total=max_new_tokens, disable=not progress, desc=f"generate ({method}, mixed tokenizers)", unit="piece")
    try:
        for engine, stream in zip(engines, streams):
            engine.begin(stream.batch)
        for t in range(max_new_tokens):
            out = step(t)
            bar.update(1)
            finished = record_pieces(results, request_ids, decoder, out, t, max_new_tokens=max_new_tokens,
                                     stop_checker=stop_checker)
            if len(finished) == len(request_ids):
                break
            decoder.append(out)
            if finished:
                decoder.retire(finished)
                done = set(finished)
                request_ids = [r for i, r in enumerate(request_ids) if i not in done]
    finally:
        for engine in engines:
            engine.end()
        bar.close()
    return results
