"""Member selection: draw z ~ Categorical(w / sum(w)) per row, on the device, without host sync.

Kernel: a Gumbel-max race over the M members, argmax_m(log w_m + G_m), with G_m the Gumbel
noise of element m in Philox stream STREAM_MEMBER keyed by the row's (seed, offset) (see
me_kernels._random). One program handles BLOCK_B rows as a [BLOCK_B, M_PAD] tile, so a batch of
hundreds of rows is one small launch. `draw_members` is also called by the fused ME step kernel
(me_kernels.sampling.me_step), which draws the next step's member in the same launch as the
token.

Bad weight rows on the device (a NaN, a negative or infinite weight, or an all-zero row) yield
-1: such values are not checked on the host for CUDA tensors, because reading them would
synchronise the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _ops
from ._dispatch import eager, on_device, use_triton
from ._random import STREAM_MEMBER, gumbel_at
from ._validate import SEED_ROW_NAMES, RowParams, check_batch, check_weights, seed_row_params

__all__ = ["select_members"]  # draw_members: a @triton.jit building block for the package's kernels

_MEMBER_STREAM = tl.constexpr(STREAM_MEMBER)


@triton.jit
def draw_members(w, seed, offset, M, M_PAD: tl.constexpr):
    """Gumbel-max member draw for a [R, M_PAD] tile of weights (columns >= M are padding).

    seed / offset broadcast against [R, 1]. Returns int32 [R]: the member, or -1 for a bad row
    (NaN, negative or infinite weight, or no positive weight).
    """
    mm = tl.arange(0, M_PAD)[None, :]
    mvalid = mm < M
    bad_el = mvalid & ((w < 0) | (w != w) | (w == float("inf")))
    total = tl.sum(tl.where(mvalid, w, 0.0), 1)
    bad = (tl.max(bad_el.to(tl.int32), 1) > 0) | (total <= 0.0) | (total != total)
    g = gumbel_at(mm, seed, offset, _MEMBER_STREAM)
    pos = mvalid & (w > 0.0)
    score = tl.where(pos, tl.log(tl.where(pos, w, 1.0)) + g, float("-inf"))
    j = tl.argmax(score, 1, tie_break_left=True).to(tl.int32)
    return tl.where(bad, -1, j)


@triton.jit(do_not_specialize=["M", "B", "seed_s", "off_s"])
def _select_members_kernel(
    w_ptr, stride_wb, stride_wm, M, B,
    seed_ptr, stride_seed, seed_s: tl.int64,
    off_ptr, stride_off, off_s: tl.int64,
    out_ptr,
    HAS_SEED: tl.constexpr, HAS_OFF: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    mm = tl.arange(0, M_PAD)
    w = tl.load(
        w_ptr + rows[:, None].to(tl.int64) * stride_wb + mm[None, :] * stride_wm,
        mask=rmask[:, None] & (mm[None, :] < M), other=0.0,
    ).to(tl.float32)
    if HAS_SEED:
        seed = tl.load(seed_ptr + rows.to(tl.int64) * stride_seed, mask=rmask, other=0)
    else:
        seed = tl.full([BLOCK_B], 0, tl.int64) + seed_s
    if HAS_OFF:
        offset = tl.load(off_ptr + rows.to(tl.int64) * stride_off, mask=rmask, other=0)
    else:
        offset = tl.full([BLOCK_B], 0, tl.int64) + off_s
    j = draw_members(w, seed[:, None], offset[:, None], M, M_PAD)
    tl.store(out_ptr + rows, j, mask=rmask)


def _launch_select_members(weights: torch.Tensor, rows: RowParams, batch: int) -> torch.Tensor:
    m = weights.shape[-1]
    out = torch.empty(batch, dtype=torch.int32, device=weights.device)
    if batch == 0:
        return out
    stride_wb = weights.stride(0) if weights.dim() == 2 else 0
    m_pad = triton.next_power_of_2(m)
    # Two row-block classes only: each distinct BLOCK_B is another compilation.
    block_b = max(1, min(16 if batch <= 16 else 128, 4096 // m_pad))
    grid = (triton.cdiv(batch, block_b),)
    dummy = out
    with on_device(weights.device):
        _select_members_kernel[grid](
            weights, stride_wb, weights.stride(-1), m, batch,
            *rows.kernel_args(dummy),
            out,
            **rows.has_flags(),
            M_PAD=m_pad, BLOCK_B=block_b, num_warps=4,
        )
    return out


# The CUDA implementation of me::select_members (CPU: me_kernels._ops).
def _select_members_cuda(weights: torch.Tensor, seed_t: torch.Tensor | None, seed_s: int, off_t: torch.Tensor | None,
                         off_s: int, batch: int) -> torch.Tensor:
    use_triton(weights.device)  # raises if the kernels were imported for the interpreter
    return _launch_select_members(weights, RowParams.from_flat(SEED_ROW_NAMES, (seed_t, seed_s, off_t, off_s)), batch)


_ops.register_cuda("select_members", _select_members_cuda)


def _infer_batch(weights: torch.Tensor, batch: int | None, seed, offset) -> int:
    if weights.dim() == 2:
        b = weights.shape[0]
        if batch is not None and check_batch(batch) != b:
            raise ValueError(f"batch={batch} does not match weights of shape {tuple(weights.shape)} (B={b})")
        return b
    if batch is not None:
        return check_batch(batch)
    for t in (seed, offset):
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            return t.shape[0]
    raise ValueError("weights has shape [M]: pass batch=B (or per-row seed/offset tensors of shape [B])")


def select_members(weights: torch.Tensor | list[float], *, seed: int | torch.Tensor = 0,
                   offset: int | torch.Tensor = 0, batch: int | None = None) -> torch.Tensor:
    """Draw one member per row: z_b ~ Categorical(weights_b / sum(weights_b)).

    Args:
        weights: [M] (shared by every row) or [B, M], non-negative, rows need not sum to 1
            (float tensor, or a list of numbers for [M]). Host-known weights (CPU tensor, list)
            are checked: NaN, infinite, negative or all-zero rows raise ValueError. CUDA weights
            are not read on the host; a bad device row yields -1.
        seed, offset: int or int64 tensor [B]. Row b's draw depends only on (seed[b], offset[b])
            and weights[b]; a Python int is used for every row (pass per-row seeds for
            independent rows). Draws use Philox stream STREAM_MEMBER, independent of the token
            draws of `sample` for the same (seed, offset).
        batch: B when weights is [M] (may be omitted if seed/offset are [B] tensors).
    Returns:
        int32 [B] member ids in [0, M) (-1 for a bad device weight row).

    Example::

        >>> select_members([0.5, 0.3, 0.2], seed=torch.arange(4), offset=0)   # int32 [4]
        >>> select_members(torch.tensor([[1.0, 0.0], [0.2, 0.8]]), seed=7)      # row 0: member 0
    """
    device = weights.device if isinstance(weights, torch.Tensor) else torch.device("cpu")
    if isinstance(weights, torch.Tensor) and weights.device.type == "cpu":
        for t in (seed, offset):
            if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                device = t.device  # host weights with device seeds: run on the seeds' device
    weights = check_weights(weights, "weights", device)
    b = _infer_batch(weights, batch, seed, offset)
    rows = seed_row_params(b, device, seed=seed, offset=offset)
    if eager() and use_triton(device):
        return _launch_select_members(weights, rows, b)
    return torch.ops.me.select_members(weights, *rows.flat(), b)
