"""Preallocated KV cache of the stacked engine (me_runtime.stacked) and its index arithmetic.

One cache serves one StackedGroup: every (member, request slot) pair owns one cache row of
`max_seq_len` positions per layer, plus one trash row that padded tokens write to (so a forward
over a padded [N, Q] batch has static shapes and never touches a real row it must not).

Layout per tensor: [layers, rows + 1, max_seq_len, kv_heads, head_dim], row = member * slots +
slot, the trash row last. A token's key / value is one contiguous [kv_heads, head_dim] block,
so writing the tokens of a forward is one index_put_ per layer, without a host synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KVCache", "CachePlan", "plan_cache_access", "write_layer", "attention_mask"]


class KVCache:
    """Keys and values of every (member, slot) row of one stacked group.

    Attributes:
        key, value: [layers, num_members * slots + 1, max_seq_len, kv_heads, head_dim] in the
            members' dtype; zero-initialised (masked-out positions are multiplied by an attention
            weight of 0, and 0 * NaN from uninitialised memory would poison a row).
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
        shape = (num_layers, num_members * slots + 1, max_seq_len, kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)

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
        return self.key.numel() * self.key.element_size() * 2

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
    read_rows: int64 [N], the cache row of each sequence.
    query_positions: int64 [N, 1, Q, 1], positions clamped to kv_len - 1 for the mask: valid
        tokens are unchanged (start + count <= kv_len), padded ones then still see one key, so
        no softmax row is empty (an empty row would give NaN).
    key_positions: int64 [kv_len].
    """

    positions: torch.Tensor
    write_row: torch.Tensor
    write_position: torch.Tensor
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
    return CachePlan(positions, write_row, write_position, read_rows, query_positions, key_positions)


def write_layer(cache_tensor: torch.Tensor, layer: int, plan: CachePlan, states: torch.Tensor) -> None:
    """Store states [N * Q, kv_heads, head_dim] of `layer` at (write_row, write_position).

    One index_put_ on the whole cache tensor, not on a view of it: under torch.compile a
    mutation through a view (cache[layer].view(...).index_copy_) is functionalised into a copy
    of the whole layer, while an index_put_ on the graph input itself stays in place.
    """
    layer_index = torch.full_like(plan.write_row, layer)
    cache_tensor.index_put_((layer_index, plan.write_row, plan.write_position), states)


def attention_mask(plan: CachePlan, window: torch.Tensor) -> torch.Tensor:
    """Boolean [N, 1, Q, kv_len]: key j is visible to the query at position p iff j <= p and
    j > p - window (Hugging Face's causal + sliding-window rule, masking_utils.sliding_window_overlay).

    window: int64 [N], the sequence's member's window for this layer (a huge value = full attention).
    """
    keys = plan.key_positions
    queries = plan.query_positions
    return (keys <= queries) & (keys > queries - window[:, None, None, None])
