"""The "stacked" engine: one grouped-GEMM forward per step for every row, whatever member it chose.

Members whose shapes agree form a group (`StackedGroup`, me_runtime/stacked.py): their weights are
stacked per projection ([M, N, K]) and every projection of a forward is one `grouped_linear` call
over all tokens of all rows, each token through its own member's weights. Members of other shapes
form groups of their own (one forward per group that has rows in the step).

Caches are preallocated per generate call: for every member of a group and every request slot,
`capacity` positions per layer (the longest prompt + max_new_tokens, at most `max_seq_len`). A row's
slot never changes while the row is active, so retiring a row moves no cache data.

A step is a set of sequences (member, slot, start, count): the row's tokens at positions
[start, start + count) that the member has not read yet (`consumed`). Those are device tensors;
the host keeps a mirror of `consumed` (it knows which member each row ran from the step's one
transfer) only to pick the static shapes: Q (tokens per sequence, padded) and kv_len (cache
positions attention reads). So the device work of a step has no data-dependent shape and no
host synchronisation (`catch_up_sequences` compiles with torch.compile(fullgraph=True)).

On CUDA the forwards of generation steps replay CUDA graphs, one per bucket (rows rounded up to a
power of two with no-op rows, Q and kv_len to powers of two): an eager forward of a small member
is launch-bound (hundreds of kernel launches per step), a replay is one launch. The caches then
stay allocated between generate calls (graphs hold their addresses); ME_CUDA_GRAPHS=0 turns the
graphs off (eager forwards, caches freed after each call).
"""
from __future__ import annotations

import os

import torch

import me_kernels

from .architectures import shape_key, unsupported_reason
from .arguments import sharded_devices
from .decode import Batch
from .stacked import StackedGroup

# Tokens per forward chunk: a long catch-up (a prompt) runs in chunks of at most this many tokens
# over all its sequences, so activations stay bounded; the cache makes chunking exact.
CHUNK_TOKENS = 4096
# Scoring keeps at most this many bytes of fp32 logits (all members) per chunk of positions, and
# caches of at most this many positions (rows x longest row x members) per chunk of rows.
SCORE_LOGIT_BYTES = 1 << 30
SCORE_CACHE_TOKENS = 1 << 16


def check_supported(models: list[torch.nn.Module]) -> list[str | None]:
    """unsupported_reason for each member (None where the stacked engine can run it). Members
    must share one device: the stacked step runs on the sampling device (the first member's)."""
    reasons = [unsupported_reason(m) for m in models]
    first = next(models[0].parameters()).device
    for i, model in enumerate(models):
        device = next(model.parameters()).device
        shards = sharded_devices(model)
        if reasons[i] is None and shards:
            reasons[i] = (f"it is sharded over {', '.join(shards)} (a device map; the stacked engine runs a member "
                          "on one device; use engine='hf')")
        elif reasons[i] is None and device != first:
            reasons[i] = f"it is on {device} and member 0 on {first} (the stacked engine runs members on one device; use engine='hf')"
    return reasons


# pad_vocab groups members whose vocabulary sizes differ by at most this factor: a member reads
# the group's largest lm_head every step (the padded rows too), a cost worth one forward saved
# only while the padding is small.
VOCAB_PADDING_FACTOR = 1.5


def _vocab_padded_groups(models, keys: dict[tuple, list[int]]) -> dict[tuple, list[int]]:
    """Regroup shape-key groups ignoring the vocabulary size, within VOCAB_PADDING_FACTOR."""
    merged: dict[tuple, list[int]] = {}
    for key, ids in keys.items():
        merged.setdefault(key[:6] + key[7:], []).extend(ids)
    out: dict[tuple, list[int]] = {}
    for key, ids in merged.items():
        ids = sorted(ids, key=lambda i: shape_key(models[i])[6])
        smallest, cluster = None, 0
        for i in ids:
            vocab = shape_key(models[i])[6]
            if smallest is None or vocab > VOCAB_PADDING_FACTOR * smallest:
                smallest, cluster = vocab, cluster + 1
            out.setdefault(key + (cluster,), []).append(i)
    return {k: sorted(v) for k, v in out.items()}


def _bucket(n: int, device: torch.device) -> int:
    """Static-shape bucket for a token count: exact on the CPU (padding costs compute there); a
    power of two on CUDA, so a few shapes cover every step (CUDA graphs, compiled kernels)."""
    if device.type != "cuda" or n <= 1:
        return max(n, 1)
    return 1 << (n - 1).bit_length()


class GraphedForward:
    """CUDA graphs of one group's forward over one cache, captured on first use per bucket
    (rows, Q, kv_len, logits mode). Inputs are copied into the graph's static buffers; padded rows
    have count 0, so they write only the cache's trash row and their logits are dropped."""

    def __init__(self, group: StackedGroup, cache, pool) -> None:
        self.group, self.cache, self.pool = group, cache, pool
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, tokens, member, slot, start, count, *, kv_len: int, logits: str):
        n, q = tokens.shape
        rows = _bucket(n, tokens.device)
        key = (rows, q, kv_len, logits)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, q, kv_len, logits, tokens.device)
        graph, static, out = self.graphs[key]
        stage_inputs(static, (tokens, member, slot, start, count))
        graph.replay()
        return None if out is None else out[:n].clone()

    def _capture(self, rows: int, q: int, kv_len: int, logits: str, device: torch.device):
        # Static inputs start as no-op rows (count 0): the warm-up and the capture write only the
        # trash row of the cache.
        static = (torch.zeros((rows, q), dtype=torch.long, device=device),) + tuple(
            torch.zeros(rows, dtype=torch.long, device=device) for _ in range(4))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy inits)
            self.group.forward(self.cache, *static, kv_len=kv_len, logits=logits)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.group.forward(self.cache, *static, kv_len=kv_len, logits=logits)
        return graph, static, out


def stage_inputs(static: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...]) -> None:
    """Copy a step's (tokens, member, slot, start, count) for n rows into a graph's static buffers
    of a bucket's row count. Padded rows are copies of row 0 with count 0: they write only the
    cache's trash row, and their member is one the real rows use (a member no row chose would
    make grouped_linear read its weights: the memory traffic ME exists to avoid)."""
    n = values[0].shape[0]
    rows = static[0].shape[0]
    for buf, value in zip(static, values):
        buf[:n].copy_(value)
    if n < rows:
        for buf in static[1:4]:
            buf[n:].copy_(buf[:1].expand(rows - n))
        static[4][n:].zero_()


def run_sequences(group: StackedGroup, cache, tokens_buf: torch.Tensor, pad: torch.Tensor, rows: torch.Tensor,
                  member: torch.Tensor, slot: torch.Tensor, start: torch.Tensor, end: torch.Tensor, *, q: int,
                  kv_len: int, logits: str, forward=None) -> torch.Tensor | None:
    """Feed each sequence's tokens at positions [start, end) (at most q of them) to the group.

    tokens_buf int64 [B, C]: the batch's token buffer, row b's position p at column pad[b] + p;
    rows, member (local index), slot, start, end: int64 [N] device tensors. Static shapes only
    (q, kv_len are host ints): this is the device part of a step, free of host synchronisation.
    Returns the group's logits ("last": float32 [N, V] at position end - 1; "all": [N, q, V]).
    `forward` replaces group.forward over `cache` (a GraphedForward on CUDA).
    """
    count = (end - start).clamp(min=0, max=q)
    offsets = torch.arange(q, device=tokens_buf.device)
    cols = (pad[rows] + start)[:, None] + offsets[None, :]
    cols = cols.clamp(max=tokens_buf.shape[1] - 1)
    tokens = tokens_buf[rows].gather(1, cols)
    if forward is not None:
        return forward(tokens, member, slot, start, count, kv_len=kv_len, logits=logits)
    return group.forward(cache, tokens, member, slot, start, count, kv_len=kv_len, logits=logits)


def catch_up_sequences(group: StackedGroup, cache, forward, tokens_buf: torch.Tensor, width: int,
                       prompt_lens: torch.Tensor, t: int | torch.Tensor, rows: torch.Tensor, members: torch.Tensor,
                       member_local: torch.Tensor, slots: torch.Tensor, consumed: torch.Tensor, *, q: int,
                       n_chunks: int, kv_len: int, span: int = 1) -> torch.Tensor:
    """The device part of one catch-up: sequences (rows[i], members[i]) read their pending tokens,
    positions [consumed[member, slot], prompt_len + t) (t: an int, or int64 [B] per row), in
    n_chunks chunks of q; `consumed` is
    updated in place. Returns the float32 logits at each sequence's last token ([N, V]). With
    span > 1 (every sequence reads >= span tokens): the n_chunks chunks of q cover the tokens
    before the last `span`, which one more forward reads, returning their logits [N, span, V].

    tokens_buf int64 [B, C] (row b's position p at column width - prompt_lens[b] + p), prompt_lens
    int64 [B], rows / members int64 [N], member_local / slots / consumed the engine's tables. Only
    host ints shape the work: no host synchronisation (tested with torch.compile(fullgraph=True)).
    """
    slot = slots[rows]
    start = consumed[members, slot]
    end = prompt_lens[rows] + (t if isinstance(t, int) else t[rows])
    pad = width - prompt_lens
    local = member_local[members]
    if span > 1:
        # The tokens before the last `span` in chunks without logits, then the last `span` in a
        # forward of their own: logits [N, span, V], never a long chunk's worth of them.
        head_end = end - span
        for c in range(n_chunks):
            chunk_end = head_end - (n_chunks - 1 - c) * q
            run_sequences(group, cache, tokens_buf, pad, rows, local, slot, torch.maximum(start, chunk_end - q),
                          chunk_end, q=q, kv_len=kv_len, logits="none", forward=forward)
        logits = run_sequences(group, cache, tokens_buf, pad, rows, local, slot, head_end, end, q=span,
                               kv_len=kv_len, logits="all", forward=forward)
        consumed[members, slot] = end
        return logits
    # Chunks aligned on each sequence's END, so every sequence's last token is in the last chunk
    # (whose logits are the step's).
    logits = None
    for c in range(n_chunks):
        chunk_end = end - (n_chunks - 1 - c) * q
        chunk_start = torch.maximum(start, chunk_end - q)
        logits = run_sequences(group, cache, tokens_buf, pad, rows, local, slot, chunk_start, chunk_end, q=q,
                               kv_len=kv_len, logits="last" if c == n_chunks - 1 else "none", forward=forward)
    consumed[members, slot] = end
    return logits


class StackedEngine:
    """See the module docstring. Built once per Ensemble (stacking re-points the members' weights
    to views of the stacked tensors, so the weights are held once)."""

    name = "stacked"
    per_row_positions = True  # a step's t may differ per row (RowPositions): ends are per sequence

    def __init__(self, models: list[torch.nn.Module], sampling_device: torch.device, vocab_size: int, max_seq_len: int,
                 *, pad_vocab: bool = False):
        """pad_vocab: members with different vocabulary sizes (different tokenizers) may share a
        group (see StackedGroup.from_models): logits are [.., vocab_size] with vocab_size the
        largest, and a member's columns past its own vocabulary are -inf (sequences_logits)."""
        reasons = check_supported(models)
        for i, reason in enumerate(reasons):
            if reason is not None:
                raise ValueError(f"engine='stacked' cannot run member {i}: {reason}")
        self.sampling_device = sampling_device
        self.vocab_size = vocab_size
        self.max_seq_len = int(max_seq_len)
        keys: dict[tuple, list[int]] = {}
        for i, model in enumerate(models):
            keys.setdefault(shape_key(model), []).append(i)
        if pad_vocab:
            keys = _vocab_padded_groups(models, keys)
        self.group_members = list(keys.values())  # ensemble member ids of each group, in order
        self.groups = [StackedGroup.from_models([models[i] for i in ids], pad_vocab=pad_vocab)
                       for ids in self.group_members]
        self.member_vocab = [int(m.model.embed_tokens.weight.shape[0]) for m in models]
        # columns past each member's own vocabulary (pad_vocab), masked to -inf in its logits
        self.vocab_padding = None
        if len(set(self.member_vocab)) > 1:
            cols = torch.arange(vocab_size, device=sampling_device)
            self.vocab_padding = cols[None, :] >= torch.tensor(self.member_vocab, device=sampling_device)[:, None]
        self.num_members = len(models)
        self.member_group = [0] * self.num_members
        local = [0] * self.num_members
        for g, ids in enumerate(self.group_members):
            for j, i in enumerate(ids):
                self.member_group[i], local[i] = g, j
        self.member_local = torch.tensor(local, dtype=torch.long, device=sampling_device)
        # built once: a host -> device copy inside a step would wait for the device
        self.group_ids_dev = [torch.tensor(ids, dtype=torch.long, device=sampling_device) for ids in self.group_members]
        self.member_group_dev = torch.tensor(self.member_group, dtype=torch.long, device=sampling_device)
        self.caches: list = []
        self.forwards: list = []  # GraphedForward per group (CUDA graphs), else None
        self.cache_bytes = 0
        self.cuda_graphs = sampling_device.type == "cuda" and os.environ.get("ME_CUDA_GRAPHS", "1") != "0"
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # ---------------------------------------------------------------- per-call state
    def begin(self, batch: Batch, slots_of_rows: list[int] | None = None) -> None:
        """Preallocate every group's cache for this batch (slots = rows, capacity = the longest
        prompt + max_new_tokens: batch.max_positions). slots_of_rows: the cache slot of each batch
        row when rows share slots (members with different tokenizers: row m * B + b holds member
        m's tokens of request b, which only member m reads, in slot b)."""
        need = batch.max_positions
        if slots_of_rows is None:
            self._allocate(batch.size, need, graphs=True)
            return
        self._allocate(max(slots_of_rows) + 1, need, graphs=True)
        self.slots = list(slots_of_rows)
        self.slots_dev = torch.tensor(slots_of_rows, dtype=torch.long, device=self.sampling_device)

    def _allocate(self, slots: int, capacity: int, *, graphs: bool = False) -> None:
        if capacity > self.max_seq_len:
            raise ValueError(f"a request needs {capacity} cache positions but max_seq_len is {self.max_seq_len}")
        graphs = graphs and self.cuda_graphs
        if graphs:  # bucketed, and kept between calls while large enough (graphs hold the addresses)
            slots = _bucket(slots, self.sampling_device)
            capacity = min(max(_bucket(capacity, self.sampling_device), 256), self.max_seq_len)
            fits = self.caches and self.forwards[0] is not None and all(
                c.slots >= slots and c.max_seq_len >= capacity for c in self.caches)
            if fits:
                slots, capacity = self.caches[0].slots, self.caches[0].max_seq_len
                # Stale keys / values are masked (weight 0), but 0 * inf from an earlier call
                # would be NaN: start from zeros as a fresh cache does.
                for cache in self.caches:
                    cache.kv.zero_()
        if not (graphs and fits):
            self.forwards, self.caches = [], []  # free the old graphs and caches before the new ones
            self.caches = [g.new_cache(slots=slots, max_seq_len=capacity) for g in self.groups]
            self.forwards = [GraphedForward(g, c, self._graph_pool) if graphs else None
                             for g, c in zip(self.groups, self.caches)]
        self.cache_bytes = sum(c.nbytes for c in self.caches)
        self.capacity = capacity
        self.slots = list(range(slots))  # slot of each active row (host)
        self.slots_dev = torch.arange(slots, device=self.sampling_device)
        self.consumed = [[0] * slots for _ in range(self.num_members)]  # host mirror [member][slot]
        self.consumed_dev = torch.zeros((self.num_members, slots), dtype=torch.long, device=self.sampling_device)

    def retire(self, rows: list[int], rows_dev: torch.Tensor) -> None:
        self.slots = [self.slots[r] for r in rows]
        self.slots_dev = self.slots_dev[rows_dev]

    def end(self) -> None:
        if not (self.forwards and self.forwards[0] is not None):
            self.caches, self.forwards = [], []

    # ---------------------------------------------------------------- steps
    def member_logits(self, batch: Batch, t: int, members: torch.Tensor, members_host: list[int]) -> torch.Tensor:
        rows = torch.arange(batch.size, device=self.sampling_device)
        return self.sequences_logits(batch, t, rows, list(range(batch.size)), members.long(), members_host)

    def rows_logits(self, batch: Batch, t, member: int, rows: torch.Tensor, rows_host: list[int]) -> torch.Tensor:
        """Catch member `member` up on the given rows only (rows int64 [N] on the sampling device,
        and the same indices on the host); float32 logits [N, V] of each row's next token."""
        members = torch.full_like(rows, member)
        return self.sequences_logits(batch, t, rows, rows_host, members, [member] * len(rows_host))

    def sequences_logits(self, batch: Batch, t, rows: torch.Tensor, rows_host: list[int], members: torch.Tensor,
                         members_host: list[int]) -> torch.Tensor:
        """Next-token logits float32 [N, V] of sequences (rows[i], members[i]) (int64 [N] on the
        sampling device, and host copies): each member catches its row up; one forward per group
        that has sequences. With pad_vocab, columns past a member's vocabulary are -inf."""
        if len(self.groups) == 1:
            logits = self._catch_up(0, batch, t, rows, members, rows_host, members_host)
        else:
            # Several groups: sort sequences by group on the device; the host knows each group's
            # count (it holds the members), so every group's slice of the order has a static size.
            order = torch.sort(self.member_group_dev[members], stable=True).indices
            logits = torch.empty((len(rows_host), self.vocab_size), dtype=torch.float32, device=self.sampling_device)
            begin = 0
            for g in range(len(self.groups)):
                picked = [i for i in range(len(rows_host)) if self.member_group[members_host[i]] == g]
                if not picked:
                    continue
                idx = order[begin : begin + len(picked)]
                begin += len(picked)
                out = self._catch_up(g, batch, t, rows[idx], members[idx], [rows_host[i] for i in picked],
                                     [members_host[i] for i in picked])
                if out.shape[1] < self.vocab_size:  # a group of smaller vocabularies (pad_vocab)
                    out = torch.nn.functional.pad(out, (0, self.vocab_size - out.shape[1]), value=float("-inf"))
                logits.index_copy_(0, idx, out)
        if self.vocab_padding is not None:
            logits = logits.masked_fill(self.vocab_padding[members], float("-inf"))
        return logits

    def all_member_logits(self, batch: Batch, t: int) -> torch.Tensor:
        return self.span_logits(batch, t, 1)


    def span_logits(self, batch: Batch, t: int, span: int) -> torch.Tensor:
        """Every member's logits predicting generated tokens t - span + 1 .. t: [M, B, V] for span
        1 (the CE step), else [M, B, span, V] (the verification of drafted tokens). Members first
        forget what they read from generated token t - span on (nothing in plain CE)."""
        if span > 1:
            self.rollback(batch, t - span if isinstance(t, int) else t.shifted(-span))
        shape = (self.num_members, batch.size) + ((span,) if span > 1 else ()) + (self.vocab_size,)
        out = torch.empty(shape, dtype=torch.float32, device=self.sampling_device)
        for g, ids in enumerate(self.group_members):
            n = len(ids)
            ids_dev = self.group_ids_dev[g]
            rows = torch.arange(batch.size, device=self.sampling_device).repeat(n)
            members = ids_dev.repeat_interleave(batch.size)
            rows_host = list(range(batch.size)) * n
            members_host = [i for i in ids for _ in range(batch.size)]
            logits = self._catch_up(g, batch, t, rows, members, rows_host, members_host, span)
            out[ids_dev] = logits.reshape((n,) + shape[1:])
        return out

    def rollback(self, batch: Batch, t: int) -> None:
        """Every member forgets, in every active row, the generated tokens from index t on (t >= -1:
        -1 also forgets the prompt's last token). Only the read counts change: attention never
        reads a cache position at or past the query's own, and the next read overwrites them."""
        changed = False
        for r in range(batch.size):  # (self.slots may hold more slots than rows: CUDA-graph buckets)
            limit = batch.prompt_lens[r] + (t if isinstance(t, int) else t.host[r])
            for m in range(self.num_members):
                if self.consumed[m][self.slots[r]] > limit:
                    self.consumed[m][self.slots[r]] = limit
                    changed = True
        if changed:  # the host mirror says whether the device table needs the same change
            slots = self.slots_dev[: batch.size]
            limits = batch.prompt_lens_dev + (t if isinstance(t, int) else t.dev)
            self.consumed_dev[:, slots] = torch.minimum(self.consumed_dev[:, slots], limits[None, :])

    def _catch_up(self, g: int, batch: Batch, t: int, rows: torch.Tensor, members: torch.Tensor, rows_host: list[int],
                  members_host: list[int], span: int = 1) -> torch.Tensor:
        """Run sequences (row, member) of group g over their pending tokens; logits [N, V] (or
        [N, span, V])."""
        slots_host = [self.slots[r] for r in rows_host]
        ends_host = [batch.prompt_lens[r] + (t if isinstance(t, int) else t.host[r]) for r in rows_host]
        starts_host = [self.consumed[m][s] for m, s in zip(members_host, slots_host)]
        if min(e - s for e, s in zip(ends_host, starts_host)) < span:
            raise RuntimeError(f"catch-up: a sequence has fewer than {span} pending tokens")
        # span > 1: the chunks cover the tokens before the last `span` (maybe none)
        pending = max(e - s for e, s in zip(ends_host, starts_host)) - (span if span > 1 else 0)
        kv_len = min(_bucket(max(ends_host), batch.device), self.capacity)
        q = min(_bucket(max(pending, 1), batch.device), max(1, CHUNK_TOKENS // len(rows_host)))
        logits = catch_up_sequences(self.groups[g], self.caches[g], self.forwards[g], batch.tokens, batch.width,
                                    batch.prompt_lens_dev, t if isinstance(t, int) else t.dev, rows, members,
                                    self.member_local, self.slots_dev, self.consumed_dev, q=q,
                                    n_chunks=-(-pending // q), kv_len=kv_len, span=span)
        for m, s, e in zip(members_host, slots_host, ends_host):
            self.consumed[m][s] = e
        return logits.to(self.sampling_device)

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: list[list[int]], conts: list[list[int]], weights: torch.Tensor,
              *, with_greedy: bool = False) -> list[float] | list[tuple[float, bool]]:
        """Exact mixture log-likelihood of each (non-empty) continuation through the stacked
        forward: per chunk of rows, every member reads the prompt (no logits), then the scored
        positions in chunks, so at most [M, rows * q, V] logits exist at once.
        with_greedy: (log-likelihood, every continuation token is the mixture's argmax) pairs."""
        scores: list = [None] * len(prompts)
        for idx in self._score_chunks([len(p) + len(c) for p, c in zip(prompts, conts)]):
            values = self._score_rows([prompts[i] for i in idx], [conts[i] for i in idx], weights)
            for i, v in zip(idx, values):
                scores[i] = v if with_greedy else v[0]
        return scores

    def _score_chunks(self, lengths: list[int]):
        """Rows sorted by length, cut into chunks whose caches (rows x longest row, every member)
        hold at most SCORE_CACHE_TOKENS positions: a chunk's cache is allocated at once."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        chunk: list[int] = []
        for i in order:
            if chunk and (len(chunk) + 1) * lengths[i] * self.num_members > SCORE_CACHE_TOKENS:
                yield chunk
                chunk = []
            chunk.append(i)
        if chunk:
            yield chunk

    def _score_rows(self, prompts, conts, weights) -> list[tuple[float, bool]]:
        out = torch.zeros(len(prompts), dtype=torch.float64, device=self.sampling_device)
        greedy = torch.ones(len(prompts), dtype=torch.bool, device=self.sampling_device)
        for logmix, targets, valid in self.scored_positions(prompts, conts, weights):
            lp = logmix.gather(2, targets[:, :, None]).squeeze(2).double()
            out += lp.masked_fill(~valid, 0.0).sum(1)
            # greedy: the argmax (lowest id on ties, as temperature-0 sampling) at every scored position
            greedy &= ((logmix.argmax(2) == targets) | ~valid).all(1)
        return list(zip(out.tolist(), greedy.tolist()))

    def scored_positions(self, prompts, conts, weights):
        """The mixture's log-probabilities at the positions that predict each row's continuation,
        in chunks of positions: yields (logmix float32 [rows, qc, V], targets int64 [rows, qc],
        valid bool [rows, qc]); chunk c holds continuation tokens c * qc .. (c + 1) * qc - 1 of
        every row (valid where the row has that token). With weights [1.0] on a one-member engine:
        the member's own log-probabilities (me_runtime.ray_placement scores that way)."""
        dev = self.sampling_device
        seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
        lengths = [len(s) for s in seqs]
        width = max(lengths)
        buf = torch.tensor([s + [0] * (width - len(s)) for s in seqs], dtype=torch.long, device=dev)
        pad = torch.zeros(len(seqs), dtype=torch.long, device=dev)
        if width > self.max_seq_len:
            raise ValueError(f"a sequence needs {width} cache positions but max_seq_len is {self.max_seq_len}")
        # Caches of its own: scoring leaves the generation caches (and their CUDA graphs) alone.
        caches = [g.new_cache(slots=len(seqs), max_seq_len=width) for g in self.groups]
        rows_n = len(seqs)
        prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        total = torch.tensor(lengths, dtype=torch.long, device=dev)
        # the scored positions: p_k - 1 .. total - 2 (each predicts the next token)
        first = prompt_lens - 1
        cmax = max(len(c) for c in conts)
        member_logps = []
        for g, ids in enumerate(self.group_members):
            n = len(ids)
            rows = torch.arange(rows_n, device=dev).repeat(n)
            local = torch.arange(n, device=dev).repeat_interleave(rows_n)
            slot = rows
            if max(len(p) for p in prompts) > 1:  # the prompts but their last token: no logits
                q = max(len(p) for p in prompts) - 1
                for c0 in range(0, q, max(1, CHUNK_TOKENS // len(rows))):
                    qc = min(max(1, CHUNK_TOKENS // len(rows)), q - c0)
                    s = torch.full_like(first, c0).repeat(n)
                    e = torch.minimum(first.repeat(n), s + qc)
                    run_sequences(self.groups[g], caches[g], buf, pad, rows, local, slot, s, e, q=qc,
                                  kv_len=min(c0 + qc, width), logits="none")
            member_logps.append((ids, rows, local, slot))
        # scored positions in chunks of qc, all groups at each chunk, mixed over members
        # positions per chunk: at most CHUNK_TOKENS tokens and SCORE_LOGIT_BYTES of logits at once
        per_position = rows_n * self.num_members
        qc = max(1, min(cmax, CHUNK_TOKENS // per_position, SCORE_LOGIT_BYTES // (per_position * self.vocab_size * 4)))
        for c0 in range(0, cmax, qc):
            stacked = torch.empty((self.num_members, rows_n, qc, self.vocab_size), dtype=torch.float32, device=dev)
            s = first + c0
            e = torch.minimum(total - 1, s + qc)
            kv_len = min(max(len(p) for p in prompts) - 1 + c0 + qc, width)
            for g, (ids, rows, local, slot) in enumerate(member_logps):
                n = len(ids)
                logits = run_sequences(self.groups[g], caches[g], buf, pad, rows, local, slot, s.repeat(n),
                                       e.repeat(n), q=qc, kv_len=kv_len, logits="all")
                stacked[self.group_ids_dev[g]] = logits.reshape(n, rows_n, qc, -1).to(dev)
            logmix = me_kernels.mixture_logprobs(stacked.reshape(self.num_members, rows_n * qc, -1), weights)
            pos = s[:, None] + torch.arange(qc, device=dev)[None, :]  # position that predicts pos + 1
            valid = pos < (total - 1)[:, None]
            targets = buf.gather(1, (pos + 1).clamp(max=width - 1))
            yield logmix.reshape(rows_n, qc, -1), targets, valid
