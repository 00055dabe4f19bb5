"""Public wrappers of the compiled grouped ops (torch.ops.me.group_rows / grouped_linear).

The ops live in csrc/ (me_kernels._C, see csrc/README.md): CUDA kernels on CUDA tensors, C++ on CPU
tensors, torch reference fallbacks (me_kernels.reference) when the extension is not built.
"""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers torch.ops.me.*)

__all__ = ["group_rows", "grouped_linear"]


def _as_member_ids(members: torch.Tensor, name: str = "members") -> torch.Tensor:
    if not isinstance(members, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of member ids, got {type(members).__name__}")
    if members.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {members.dtype}")
    if members.dtype == torch.int64:
        # A plain cast would wrap ids beyond int32 into valid-looking ones (2**32 -> 0). Map them
        # to -1 first, which the ops reject (CPU) or turn into NaN rows (CUDA), without a sync.
        fits = (members >= 0) & (members <= torch.iinfo(torch.int32).max)
        if members.device.type == "cpu" and members.numel() and not bool(fits.all()):
            t = int((~fits).nonzero()[0, 0])
            raise ValueError(f"{name}[{t}] = {int(members[t])} is not a valid member id")
        members = torch.where(fits, members, -1)
    return members.to(torch.int32)


def group_rows(members: torch.Tensor, num_members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of rows by member, on the rows' device, without host sync.

    Args:
        members: int32 [T], the member of each row, in [0, num_members).
        num_members: M >= 1.
    Returns:
        order: int32 [T], row indices grouped by member (ascending within a member).
        offsets: int32 [M + 1]; member m's rows are order[offsets[m]:offsets[m + 1]].

    Example::

        >>> order, offsets = group_rows(torch.tensor([2, 0, 1, 2, 0], dtype=torch.int32), 3)
        >>> order.tolist(), offsets.tolist()
        ([1, 4, 2, 0, 3], [0, 2, 3, 5])
    """
    if not isinstance(num_members, int) or isinstance(num_members, bool) or num_members < 1:
        raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
    return torch.ops.me.group_rows(_as_member_ids(members), num_members)


def grouped_linear(
    x: torch.Tensor, members: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-routed linear layer: out[t] = x[t] @ weight[members[t]].T (+ bias[members[t]]).

    Args:
        x: [T, K] float32 / bfloat16 / float16 (any strides).
        members: int32 [T], values in [0, M).
        weight: [M, N, K], same dtype as x.
        bias: [M, N] or None.
    Returns:
        [T, N] in x's dtype, accumulated in fp32. On CUDA no host synchronisation happens, so the
        call can be captured in a CUDA graph and replayed with other member ids; out-of-range ids
        yield NaN rows there (they raise ValueError on the CPU, where checking is free).

    CUDA: members with <= 16 rows take a memory-bound decode path (each chosen member's weights are
    read once), members with more rows a tensor-core GEMM path; members no row chose are not read.
    fp32 runs on tensor cores as 3xTF32 (error close to fp32 FMA, not bit-identical). A weight or
    bias that is not contiguous, or an x whose rows are not contiguous, is copied once per call.

    Example::

        >>> weight = torch.stack([m.q_proj.weight for m in member_layers])   # [M, N, K]
        >>> q = grouped_linear(hidden, members, weight)                       # [T, N], row t on members[t]
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    return torch.ops.me.grouped_linear(x, _as_member_ids(members), weight, bias)
