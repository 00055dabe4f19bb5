"""Preallocated KV cache of the stacked engine (me_runtime.stacked) and its index arithmetic.

One cache serves one StackedGroup: every (member, request slot) pair owns one cache row of
`max_seq_len` positions per layer, plus one trash row that padded tokens write to (so a forward
over a padded [N, Q] batch has static shapes and never touches a real row it must not).

Layout: one tensor [layers, rows + 1, max_seq_len, 2, kv_heads, head_dim] (keys at index 0 of
the "2" axis, values at 1), row = member * slots + slot, the trash row last. A token's key and
value are one contiguous [2, kv_heads, head_dim] block, the same layout as the k and v heads that
follow the q heads in a fused qkv projection's output, so writing the tokens of a forward is ONE
index_put_ per layer (keys and values together) and reading a row is one index_select, without a
host synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KVCache", "CachePlan", "plan_cache_access", "write_layer", "read_rows", "attention_mask"]


class KVCache:
    """Keys and values of every (member, slot) row of one stacked group.

    Attributes:
        kv: [layers, num_members * slots + 1, max_seq_len, 2, kv_heads, head_dim] in the members'
            dtype; zero-initialised (masked-out positions are multiplied by an attention weight of
            0, and 0 * NaN from uninitialised memory would poison a row).
        key, value: views of kv, [layers, num_members * slots + 1, max_seq_len, kv_heads, head_dim].
        num_members, slots, max_seq_len: the capacity it was built with.
    """

    def __init__(
        self,
        *,
        num_members: int,
        slots: int,
        max_seq_len: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        for name, value in (("slots", slots), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_members = num_members
        self.slots = slots
        self.max_seq_len = max_seq_len
        shape = (num_layers, num_members * slots + 1, max_seq_len, 2, kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        # One 0-d index per layer, made once: a write broadcasts it against the token indices
        # instead of filling a [N * Q] tensor with the layer number every layer of every forward.
        self.layer_index = list(torch.arange(num_layers, device=device).unbind())

    @property
    def key(self) -> torch.Tensor:
        """[layers, rows + 1, max_seq_len, kv_heads, head_dim] view of the keys."""
        return self.kv[:, :, :, 0]

    @property
    def value(self) -> torch.Tensor:
        """[layers, rows + 1, max_seq_len, kv_heads, head_dim] view of the values."""
        return self.kv[:, :, :, 1]

    @property
    def trash_row(self) -> int:
        """Index of the row that padded tokens write to (never read by a real sequence)."""
        return self.num_members * self.slots

    def row(self, member: int, slot: int) -> int:
        """Cache row owned by (member, slot)."""
        return member * self.slots + slot

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values together."""
        return self.kv.numel() * self.kv.element_size()

    def __repr__(self) -> str:
        layers, _, seq, kv_heads, head_dim = self.key.shape
        return (
            f"KVCache(members={self.num_members}, slots={self.slots}, max_seq_len={seq}, layers={layers}, "
            f"kv_heads={kv_heads}, head_dim={head_dim}, dtype={self.key.dtype}, nbytes={self.nbytes})"
        )


class CachePlan(NamedTuple):
    """Where one forward's tokens go in the cache and what they may attend to.

    positions: int64 [N, Q], start + q (RoPE positions).
    write_row, write_position: int64 [N * Q], where each token's key / value goes; padded tokens
        (q >= count) go to position 0 of the trash row.
    valid: bool [N, Q], q < count (the token slots that hold a token).
    read_rows: int64 [N], the cache row of each sequence.
    query_positions: int64 [N, 1, Q, 1], positions clamped to kv_len - 1 for the mask: valid
        tokens are unchanged (start + count <= kv_len), padded ones then still see one key, so
        no softmax row is empty (an empty row would give NaN).
    key_positions: int64 [kv_len].
    """

    positions: torch.Tensor
    write_row: torch.Tensor
    write_position: torch.Tensor
    valid: torch.Tensor
    read_rows: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor


def plan_cache_access(
    cache: KVCache,
    member: torch.Tensor,
    slot: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
    q_len: int,
    kv_len: int,
) -> CachePlan:
    """Cache indices of a forward over N sequences of Q token slots (all int64 device tensors [N])."""
    steps = torch.arange(q_len, device=start.device)
    positions = start[:, None] + steps  # [N, Q]
    valid = steps[None, :] < count[:, None]
    read_rows = member * cache.slots + slot
    write_row = torch.where(valid, read_rows[:, None], cache.trash_row).reshape(-1)
    write_position = torch.where(valid, positions, 0).reshape(-1)
    query_positions = positions.clamp(max=kv_len - 1)[:, None, :, None]
    key_positions = torch.arange(kv_len, device=start.device)
    return CachePlan(positions, write_row, write_position, valid, read_rows, query_positions, key_positions)


def write_layer(cache: KVCache, layer: int, plan: CachePlan, states: torch.Tensor) -> None:
    """Store the keys and values states [N * Q, 2, kv_heads, head_dim] (any strides) of `layer`
    at (write_row, write_position).

    One index_put_ on the whole cache tensor, not on a view of it: under torch.compile a
    mutation through a view (cache.kv[layer].view(...).index_copy_) is functionalised into a copy
    of the whole layer, while an index_put_ on the graph input itself stays in place.
    """
    cache.kv.index_put_((cache.layer_index[layer], plan.write_row, plan.write_position), states)


def read_rows(cache: KVCache, layer: int, plan: CachePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence's row at positions [0, kv_len) of `layer`:
    two [N, kv_heads, kv_len, head_dim] views of one gathered copy (strided, as SDPA takes them)."""
    kv_len = plan.key_positions.shape[0]
    # Slice before gathering, so only kv_len positions of the N rows are copied. (index_select:
    # advanced indexing of the same rows costs twice as much on the host.)
    rows = cache.kv[layer, :, :kv_len].index_select(0, plan.read_rows)  # [N, kv_len, 2, KVH, hd]
    return rows.permute(2, 0, 3, 1, 4).unbind(0)


def attention_mask(plan: CachePlan, window: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [N, 1, Q, kv_len] in `dtype`: 0 where key j is visible to the query at
    position p, -inf elsewhere. Visible iff j <= p and j > p - window (Hugging Face's causal +
    sliding-window rule, masking_utils.sliding_window_overlay).

    window: int64 [N], the sequence's member's window for this layer, or None for full (causal)
    attention. The additive form is what SDPA turns a boolean mask into (0 / -inf in the query's
    dtype) on every call; building it once here lets the layers that share a window share it.
    """
    keys = plan.key_positions
    queries = plan.query_positions
    visible = keys <= queries
    if window is not None:
        visible = visible & (keys > queries - window[:, None, None, None])
    return torch.full(visible.shape, float("-inf"), dtype=dtype, device=visible.device).masked_fill_(visible, 0.0)
