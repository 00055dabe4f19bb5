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

Batched on the device: every member's token stream of every request lives in one Batch of M x B
rows (`MixedStreams`; rows grow by different numbers of tokens per step, read through the engines'
per-row positions). On the stacked engine all members run in one engine whose groups stack members
of one layer shape although their vocabularies differ (padded to the largest): a step's rows, of
whatever members, are one grouped forward per layer, and one sampling kernel draws every row's
token from its own member's logits (`StackedMembers`). On the hf engine each member runs its own
forward over its rows (`EngineMembers`). One host transfer per step copies the emitted union ids
(and for ME the next members): the stop checks and the spelling lengths (which size the next
catch-up) need them on the host, as in the shared-vocabulary loop.
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


class MixedStreams:
    """Every member's token stream of every request, in one Batch of M x B rows, member-major:
    row m * B + b holds member m's encoding of request b's prompt, then its spellings of the
    emitted pieces. gen_host / gen_dev: tokens each row holds after its prompt (host, device)."""

    def __init__(self, prompts: list[list[list[int]]], seeds: list[int], max_new_tokens: int,
                 longest_spelling: list[int], max_seq_len: int | None, device: torch.device):
        self.num_members, self.size = len(prompts), len(prompts[0])
        flat = [p for member_prompts in prompts for p in member_prompts]
        # Each row holds at most max_new_tokens spellings, and at most max_seq_len positions.
        room = [max_new_tokens * longest_spelling[m] if max_seq_len is None
                else min(max_new_tokens * longest_spelling[m], max_seq_len - len(p))
                for m, member_prompts in enumerate(prompts) for p in member_prompts]
        # + slack columns: an append writes a fixed width past a row's end
        self.batch = Batch(flat, seeds * self.num_members, max(room) + max(longest_spelling), device)
        self.batch.max_positions = max(len(p) + r for p, r in zip(flat, room))
        self.seeds = self.batch.seeds[: self.size]
        self.gen_host = [0] * len(flat)
        self.gen_dev = torch.zeros(len(flat), dtype=torch.long, device=device)

    def rows(self, m: int) -> slice:
        return slice(m * self.size, (m + 1) * self.size)

    def positions(self, m: int | None = None) -> RowPositions:
        """Generated-token counts of every row (m None) or of member m's rows."""
        if m is None:
            return RowPositions(self.gen_host, self.gen_dev)
        return RowPositions(self.gen_host[self.rows(m)], self.gen_dev[self.rows(m)])

    def prompt_len(self, m: int, b: int) -> int:
        return self.batch.prompt_lens[m * self.size + b]

    def keep(self, keep: list[int]) -> tuple[list[int], torch.Tensor]:
        """Keep requests `keep`; returns the kept rows (host, device) of the old layout."""
        rows = [m * self.size + b for m in range(self.num_members) for b in keep]
        rows_dev = torch.tensor(rows, dtype=torch.long, device=self.batch.device)
        self.batch.keep(rows, rows_dev)
        self.gen_host = [self.gen_host[r] for r in rows]
        self.gen_dev = self.gen_dev[rows_dev]
        self.size = len(keep)
        self.seeds = self.batch.seeds[: self.size]
        return rows, rows_dev


class MemberView:
    """Member m's rows of MixedStreams as a Batch-like view (tokens, widths and prompt lengths read
    through, no copy): what a one-member engine reads."""

    def __init__(self, streams: MixedStreams, m: int):
        self.streams, self.m = streams, m

    @property
    def _rows(self) -> slice:
        return self.streams.rows(self.m)

    tokens = property(lambda self: self.streams.batch.tokens[self._rows])
    prompt_lens = property(lambda self: self.streams.batch.prompt_lens[self._rows])
    prompt_lens_dev = property(lambda self: self.streams.batch.prompt_lens_dev[self._rows])
    width = property(lambda self: self.streams.batch.width)
    size = property(lambda self: self.streams.size)
    device = property(lambda self: self.streams.batch.device)
    max_new_tokens = property(lambda self: self.streams.batch.max_new_tokens)
    max_positions = property(lambda self: self.streams.batch.max_positions)


class StackedMembers:
    """All members in one stacked engine (vocabularies padded to the largest): a step's rows, of
    whatever members, are one grouped forward per layer (per group of equal shapes)."""

    def __init__(self, engine, num_members: int):
        self.engine = engine
        self.num_members = num_members

    def begin(self, streams: MixedStreams) -> None:
        self.engine.begin(streams.batch, slots_of_rows=list(range(streams.size)) * self.num_members)

    def logits(self, streams: MixedStreams, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        """[B, V_max]: request b's next-token logits under member members[b] (-inf past its vocabulary)."""
        rows = members * streams.size + torch.arange(streams.size, device=members.device)
        rows_host = [z * streams.size + b for b, z in enumerate(members_host)]
        return self.engine.sequences_logits(streams.batch, streams.positions(), rows, rows_host, members, members_host)

    def all_logits(self, streams: MixedStreams) -> torch.Tensor:
        """[M, B, V_max]: every member's next-token logits of every request."""
        n = self.num_members * streams.size
        members_host = [r // streams.size for r in range(n)]
        rows = torch.arange(n, device=streams.batch.device)
        members = rows // streams.size
        out = self.engine.sequences_logits(streams.batch, streams.positions(), rows, list(range(n)), members, members_host)
        return out.view(self.num_members, streams.size, -1)

    def retire(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        self.engine.retire(rows, rows_dev)

    def end(self) -> None:
        self.engine.end()


class EngineMembers:
    """One one-member engine per member (the hf engine), each reading its rows of the streams."""

    def __init__(self, engines: list, vocab_sizes: list[int]):
        self.engines = engines
        self.vocab_sizes = vocab_sizes
        self.width = max(vocab_sizes)

    def begin(self, streams: MixedStreams) -> None:
        self.views = [MemberView(streams, m) for m in range(len(self.engines))]
        for engine, view in zip(self.engines, self.views):
            engine.begin(view)

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(logits, (0, self.width - logits.shape[1]), value=float("-inf"))

    def logits(self, streams: MixedStreams, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        out = torch.empty((streams.size, self.width), dtype=torch.float32, device=members.device)
        # rows grouped by member on the device; the host knows each member's row count
        order = torch.sort(members, stable=True).indices
        begin = 0
        for m in sorted(set(members_host)):
            rows_host = [b for b, z in enumerate(members_host) if z == m]
            rows = order[begin : begin + len(rows_host)]
            begin += len(rows_host)
            logits = self.engines[m].rows_logits(self.views[m], streams.positions(m), 0, rows, rows_host)
            out.index_copy_(0, rows, self._padded(logits.float()))
        return out

    def all_logits(self, streams: MixedStreams) -> torch.Tensor:
        return torch.stack([self._padded(engine.all_member_logits(view, streams.positions(m))[0].float())
                            for m, (engine, view) in enumerate(zip(self.engines, self.views))])

    def retire(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        keep = rows[: len(rows) // len(self.engines)]  # member 0's rows: the kept requests
        keep_dev = rows_dev[: len(keep)]
        for engine in self.engines:
            engine.retire(keep, keep_dev)

    def end(self) -> None:
        for engine in self.engines:
            engine.end()


@dataclass
class StepPieces:
    union: torch.Tensor  # int64 [B] union ids of the emitted pieces (-1: nothing could be sampled)
    union_host: list[int]
    members_host: list[int]  # the member that produced each row's piece (-1 for CE)


class MixedDecoder:
    """One generate call over members with different tokenizers (see the module docstring)."""

    def __init__(self, members, vocab: UnionVocabulary, weights: torch.Tensor, streams: MixedStreams, *,
                 selection: str, member: int, params: SamplingParams, max_seq_len: int | None):
        self.members = members  # StackedMembers or EngineMembers
        self.vocab = vocab
        self.weights = weights
        self.streams = streams
        self.shared = selection == "shared"
        self.member = member
        self.max_seq_len = max_seq_len
        self.sample_kwargs = params.kwargs()
        self.batch_seed = streams.seeds[:1].clone()
        self.device = weights.device
        self.next_members: torch.Tensor | None = None
        self.next_members_host: list[int] = []

    @property
    def size(self) -> int:
        return self.streams.size

    @property
    def seeds(self) -> torch.Tensor:
        return self.streams.seeds

    # ---------------------------------------------------------------- member draws (as decode.Decoder)
    def draw_members(self, offset: int) -> torch.Tensor:
        if self.shared:
            return me_kernels.select_members(self.weights, seed=self.batch_seed, offset=offset, batch=1).expand(self.size)
        return me_kernels.select_members(self.weights, seed=self.seeds, offset=offset, batch=self.size)

    def first_members(self) -> None:
        self.next_members = self.draw_members(0).long()
        self.next_members_host = self.next_members.tolist()  # which members run at step 0
        if min(self.next_members_host) < 0:
            raise RuntimeError(f"no member could be drawn from the weights {self.weights.tolist()}")

    def _sampled_logits(self, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        """[B, V_max]: each request's logits under its member, tokens never sampled at -inf."""
        logits = self.members.logits(self.streams, members, members_host)
        return logits.masked_fill(self.vocab.sample_mask_table[members], float("-inf"))

    def _to_union(self, members: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        union = self.vocab.to_union_table[members, tokens.clamp(min=0)]
        return torch.where(tokens < 0, -1, union)  # -1: the kernels found nothing to sample

    # ---------------------------------------------------------------- one step per method
    def me_step(self, t: int) -> StepPieces:
        members, members_host = self.next_members, self.next_members_host
        logits = self._sampled_logits(members, members_host)
        if self.shared:
            tokens = me_kernels.sample(logits, seed=self.seeds, offset=t, **self.sample_kwargs)
            next_members = self.draw_members(t + 1).long()
        else:
            tokens, next_members = me_kernels.me_step(logits, self.weights, seed=self.seeds, offset=t, **self.sample_kwargs)
            next_members = next_members.long()
        union = self._to_union(members, tokens)
        host = torch.stack([union, next_members]).tolist()  # the step's one host transfer
        self.next_members, self.next_members_host = next_members, host[1]
        if min(host[1]) < 0:
            raise RuntimeError(f"step {t + 1}: no member could be drawn from the weights {self.weights.tolist()}")
        return StepPieces(union, host[0], members_host)

    def ce_step(self, t: int) -> StepPieces:
        logits = self.members.all_logits(self.streams)  # [M, B, V_max]
        stacked = torch.stack([
            self.vocab.union_logits(m, self.vocab.masked_logits(m, logits[m, :, : self.vocab.vocab_sizes[m]]))
            for m in range(self.vocab.num_members)
        ])  # [M, B, U]
        union = me_kernels.mixture_sample(stacked, self.weights, seed=self.seeds, offset=t, **self.sample_kwargs)
        return StepPieces(union, union.tolist(), [-1] * self.size)  # the step's one host transfer

    def single_step(self, t: int) -> StepPieces:
        members = torch.full((self.size,), self.member, dtype=torch.long, device=self.device)
        logits = self._sampled_logits(members, [self.member] * self.size)
        tokens = me_kernels.sample(logits, seed=self.seeds, offset=t, **self.sample_kwargs)
        union = self._to_union(members, tokens)
        return StepPieces(union, union.tolist(), [self.member] * self.size)  # the step's one host transfer

    # ---------------------------------------------------------------- bookkeeping
    def fits(self, row: int, union_id: int) -> bool:
        """Whether every member's context can take the piece's spelling in this row."""
        if self.max_seq_len is None:
            return True
        s = self.streams
        return all(s.prompt_len(m, row) + s.gen_host[m * s.size + row] + self.vocab.spelling_lengths[m][union_id]
                   <= self.max_seq_len for m in range(s.num_members))

    def append(self, step: StepPieces) -> None:
        """Every member appends its spelling of each row's piece to its stream (on the device)."""
        union = step.union.clamp(min=0)
        s = self.streams
        tokens = s.batch.tokens
        for m in range(s.num_members):
            lengths = [self.vocab.spelling_lengths[m][u] if u >= 0 else 0 for u in step.union_host]
            width = max(lengths)
            if width == 0:
                continue
            rows = s.rows(m)
            spelled = self.vocab.spell(m, union, width)
            gen = s.gen_dev[rows]
            cols = s.batch.width + gen[:, None] + torch.arange(width, device=self.device)[None, :]
            tokens[rows].scatter_(1, cols, spelled)  # (a view of the member's rows)
            offsets = self.vocab.spelling_offsets[m]
            s.gen_dev[rows] = gen + offsets[union + 1] - offsets[union]
            s.gen_host[rows] = [g + n for g, n in zip(s.gen_host[rows], lengths)]

    def retire(self, finished: list[int]) -> None:
        done = set(finished)
        keep = [r for r in range(self.size) if r not in done]
        keep_dev = torch.tensor(keep, dtype=torch.long, device=self.device)
        rows, rows_dev = self.streams.keep(keep)
        self.members.retire(rows, rows_dev)
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


def decode_mixed(members, vocab: UnionVocabulary, weights: torch.Tensor, prompts: list[list[list[int]]],
                 seeds: list[int], *, method: str, selection: str, member: int, params: SamplingParams,
                 max_new_tokens: int, stop_checker: ByteStopChecker, max_seq_len: int | None,
                 progress: bool) -> list[PieceResult]:
    """Generate up to max_new_tokens pieces per request. prompts[m][i]: request i in member m's
    tokens; members: StackedMembers or EngineMembers (how the members run)."""
    count = len(prompts[0])
    results = [PieceResult() for _ in range(count)]
    if max_new_tokens == 0:
        return results
    streams = MixedStreams(prompts, seeds, max_new_tokens, vocab.longest_spelling, max_seq_len, weights.device)
    decoder = MixedDecoder(members, vocab, weights, streams, selection=selection, member=member, params=params,
                           max_seq_len=max_seq_len)
    step = {"me": decoder.me_step, "ce": decoder.ce_step, "single": decoder.single_step}[method]
    if method == "me":
        decoder.first_members()
    request_ids = list(range(count))
    bar = tqdm(total=max_new_tokens, disable=not progress, desc=f"generate ({method}, mixed tokenizers)", unit="piece")
    try:
        members.begin(streams)
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
        members.end()
        bar.close()
    return results
