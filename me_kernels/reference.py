"""Plain torch reference implementations of every me_kernels op.

These define the semantics. Tests and benchmarks compare the kernels against them, and CPU
tensors use them when the Triton interpreter is not enabled (and the compiled ops fall back to
them when me_kernels._C is not built).
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------
# Grouped linear (rows routed to members' weights)
# --------------------------------------------------------------------------------------------


def group_rows_reference(members: torch.Tensor, num_members: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of rows by member id.

    members: int32 [T] in [0, num_members). Returns order int32 [T] (row ids grouped by member,
    ascending within a member) and offsets int32 [num_members + 1]. Rows with an id outside
    [0, num_members) come last, after offsets[num_members] (the CUDA kernel's convention).
    """
    ids = members.to(torch.int64)
    valid = (ids >= 0) & (ids < num_members)
    key = torch.where(valid, ids, torch.full_like(ids, num_members))
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_members + 1, dtype=torch.int64, device=members.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.zeros(num_members + 1, dtype=torch.int64, device=members.device)
    offsets[1:] = torch.cumsum(counts[:num_members], 0)
    return order, offsets.to(torch.int32)


def grouped_linear_reference(
    x: torch.Tensor, members: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """out[t] = x[t] @ weight[members[t]].T (+ bias[members[t]]), fp32 accumulation.

    x [T, K], members int [T], weight [M, N, K], bias [M, N] or None -> [T, N] in x's dtype.
    Rows whose member is outside [0, M) get NaN (nothing is indexed out of bounds). No host
    synchronisation: every member's product is computed for all rows and selected per row, so
    this costs M dense products (it is the slow reference, not the fast path).
    """
    num_members = weight.shape[0]
    ids = members.to(torch.int64)
    out = torch.full((x.shape[0], weight.shape[1]), float("nan"), dtype=torch.float32, device=x.device)
    xf = x.to(torch.float32)
    for m in range(num_members):
        prod = xf @ weight[m].to(torch.float32).t()
        if bias is not None:
            prod = prod + bias[m].to(torch.float32)
        out = torch.where((ids == m).unsqueeze(1), prod, out)
    return out.to(x.dtype)
