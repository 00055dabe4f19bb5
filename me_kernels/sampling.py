"""Fused on-device sampling: temperature -> top-k -> top-p -> min-p -> draw, one launch, no sort.

`sample` draws one token per row; `me_step` also draws the member of the next step in the same
launch (the fused ME decode step). Semantics: the sampling section of me_kernels.reference. The
kernel is one program per row running the row pipeline of me_kernels._rows (its docstring has
the design); randomness is Philox-4x32-10 keyed by (seed[b], offset[b]) in stream STREAM_TOKEN
(the member: STREAM_MEMBER at offset + 1, see me_kernels.selection).

Layout (as Liger-Kernel's ops): the Triton kernel, its launcher, the registered torch ops
(me::sample, me::me_step; schemas in me_kernels._ops), then the public functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _ops
from ._dispatch import eager, on_device, use_triton
from ._random import STREAM_TOKEN
from ._row_passes import load_row_params, row_param
from ._rows import block_config, sample_row, scratch_for
from ._validate import SAMPLING_ROW_NAMES, RowParams, check_logits, check_weights, sampling_row_params
from .selection import draw_members

__all__ = ["sample", "me_step", "sample_thresholds"]

_TOKEN_STREAM = tl.constexpr(STREAM_TOKEN)


# --------------------------------------------------------------------------------------------
# Kernel: sample (SELECT=False) and the fused ME step (SELECT=True)
# --------------------------------------------------------------------------------------------


# Scalars that vary per call or per vocabulary are not specialised (each specialisation is another
# compile on a fresh machine); V keeps its divisibility-by-16 specialisation, which lets the
# bounds mask of the vectorised loads be proven uniform.
@triton.jit(do_not_specialize=["temp_s", "topk_s", "topp_s", "minp_s", "seed_s", "off_s", "M", "n_sub", "n_tiles",
                             "debug"])
def _sample_kernel(
    logits_ptr, stride_lb, stride_lv, V,
    temp_ptr, stride_temp, temp_s,
    topk_ptr, stride_topk, topk_s,
    topp_ptr, stride_topp, topp_s,
    minp_ptr, stride_minp, minp_s,
    seed_ptr, stride_seed, seed_s: tl.int64,
    off_ptr, stride_off, off_s: tl.int64,
    w_ptr, stride_wb, stride_wm, M,
    tok_ptr, mem_ptr, submax_ptr, n_sub, tilemax_ptr, n_tiles, cand_v_ptr, cand_i_ptr, dbg_ptr, debug,
    HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
    HAS_SEED: tl.constexpr, HAS_OFF: tl.constexpr,
    SELECT: tl.constexpr, SHARED: tl.constexpr, M_PAD: tl.constexpr,
    NSUB: tl.constexpr, SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temp, top_k, top_p, min_p, seed, offset = load_row_params(
        row, temp_ptr, stride_temp, temp_s, topk_ptr, stride_topk, topk_s, topp_ptr, stride_topp, topp_s, minp_ptr,
        stride_minp, minp_s, seed_ptr, stride_seed, seed_s, off_ptr, stride_off, off_s,
        HAS_TEMP, HAS_TOPK, HAS_TOPP, HAS_MINP, HAS_SEED, HAS_OFF)
    no_mix_c = tl.full([1], 0, tl.float32)
    no_mix_pinf = tl.full([1], 0, tl.int1)
    token, tau_k, tau_p, passes = sample_row(
        logits_ptr + row * stride_lb, 0, stride_lv, V, no_mix_c, no_mix_pinf, 1,
        submax_ptr + row * n_sub, tilemax_ptr + row * n_tiles, cand_v_ptr + row * CAP, cand_i_ptr + row * CAP,
        temp, top_k, top_p, min_p, seed, offset, True,
        _TOKEN_STREAM, 0, 1, NSUB, SUB, P, CAP)
    tl.store(tok_ptr + row, token.to(tl.int64))
    if debug != 0:  # a runtime flag, not a constexpr (the debug entry still compiles once more: its
        # info buffer is fp32 where normal calls pass the int64 tokens as the unused pointer)
        tl.store(dbg_ptr + row * 4 + 0, tau_k)
        tl.store(dbg_ptr + row * 4 + 1, tau_p)
        tl.store(dbg_ptr + row * 4 + 2, passes.to(tl.float32))
    if SELECT:
        # The member for the next step: Philox stream STREAM_MEMBER at offset + 1.
        if SHARED:
            src_row = row * 0
        else:
            src_row = row
        mseed = row_param(seed_ptr, stride_seed, seed_s, src_row, HAS_SEED, tl.int64)
        moff = row_param(off_ptr, stride_off, off_s, src_row, HAS_OFF, tl.int64) + 1
        mm = tl.arange(0, M_PAD)
        w = tl.load(w_ptr + src_row * stride_wb + mm[None, :] * stride_wm, mask=mm[None, :] < M, other=0.0)
        member = draw_members(w.to(tl.float32), mseed, moff, M, M_PAD)
        tl.store(mem_ptr + row + tl.arange(0, 1), member)



# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _launch_sample(logits: torch.Tensor, rows: RowParams, weights: torch.Tensor | None = None, shared: bool = False,
                   debug: torch.Tensor | None = None, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs _sample_kernel: tokens int64 [B] and (weights given) next members int32 [B]."""
    batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    select = weights is not None
    members = torch.empty(batch if select else 0, dtype=torch.int32, device=device)
    if batch == 0:
        return tokens, members
    cfg = block_config(vocab, cap, interpreted=device.type != "cuda")
    submax, tilemax, cand_v, cand_i = scratch_for(batch, vocab, cfg, device)
    dummy = tokens
    if select:
        w = weights
        w_args = (w, w.stride(0) if w.dim() == 2 else 0, w.stride(-1), w.shape[-1])
        m_pad = triton.next_power_of_2(w.shape[-1])
    else:
        w_args = (dummy, 0, 0, 1)
        m_pad = 1
    with on_device(device):
        _sample_kernel[(batch,)](
            logits, logits.stride(0), logits.stride(1), vocab,
            *rows.kernel_args(dummy),
            *w_args,
            tokens, members, submax, submax.shape[1], tilemax, tilemax.shape[1], cand_v, cand_i,
            debug if debug is not None else dummy, int(debug is not None),
            **rows.has_flags(),
            SELECT=select, SHARED=bool(shared), M_PAD=m_pad,
            NSUB=cfg["NSUB"], SUB=cfg["SUB"], P=cfg["P"], CAP=cfg["CAP"], num_warps=cfg["num_warps"],
        )
    return tokens, members


# --------------------------------------------------------------------------------------------
# Registered ops: the CUDA implementations of me::sample and me::me_step (CPU: me_kernels._ops)
# --------------------------------------------------------------------------------------------


def _sample_cuda(logits: torch.Tensor, *row) -> torch.Tensor:
    use_triton(logits.device)  # raises if the kernels were imported for the interpreter
    return _launch_sample(logits, RowParams.from_flat(SAMPLING_ROW_NAMES, row))[0]


def _me_step_cuda(logits: torch.Tensor, weights: torch.Tensor, *row_and_shared) -> tuple[torch.Tensor, torch.Tensor]:
    *row, shared = row_and_shared
    use_triton(logits.device)
    return _launch_sample(logits, RowParams.from_flat(SAMPLING_ROW_NAMES, row), weights=weights, shared=shared)


_ops.register_cuda("sample", _sample_cuda)
_ops.register_cuda("me_step", _me_step_cuda)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _row_params(logits: torch.Tensor, temperature, top_k, top_p, min_p, seed, offset) -> RowParams:
    batch, _ = check_logits(logits)
    return sampling_row_params(batch, logits.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               seed=seed, offset=offset)


def sample(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
           top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0, seed: int | torch.Tensor = 0,
           offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Sample one token per row: temperature -> top-k -> top-p -> min-p -> draw.

    Args:
        logits: [B, V] float32 / bfloat16 / float16, any strides (e.g. `out.logits[:, -1, :]`;
            rows are read in place through their stride, never copied).
        temperature: >= 0 (0 = greedy, lowest index on ties; inf = uniform over the kept set).
        top_k: >= 0 (0 = off); keeps every token that ties the k-th largest logit.
        top_p: in (0, 1] (1 = off); keeps the smallest set of most likely tokens whose mass
            reaches top_p, the crossing token and its ties included.
        min_p: in [0, 1] (0 = off); keeps p_i >= min_p * p_max.
        seed, offset: int or int64 tensor [B]; row b draws from Philox stream STREAM_TOKEN at
            (seed[b], offset[b]), so its token does not depend on the batch (a Python int is used
            for every row: pass per-row seeds for independent rows).
        Every sampling parameter is a Python scalar or a tensor [B] on the logits' device. Values
        of CPU tensors are range-checked (ValueError); CUDA tensors are not read on the host, and
        a row with an out-of-range device value yields -1.
    Returns:
        int64 [B]; -1 for a row with a NaN, with every logit -inf, or with a bad device parameter.
        A row with +inf logits draws uniformly among its +inf entries.

    No host synchronisation: the call can be captured in a CUDA graph (seed / offset as device
    tensors updated between replays).

    Example::

        >>> logits = model(input_ids).logits[:, -1, :]            # [B, V]
        >>> seeds = torch.arange(B, device=logits.device)         # one stream per request
        >>> tokens = sample(logits, temperature=0.7, top_p=0.9, seed=seeds, offset=step)  # int64 [B]
    """
    rows = _row_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    if eager() and use_triton(logits.device):
        return _launch_sample(logits, rows)[0]
    return torch.ops.me.sample(logits, *rows.flat())


def me_step(logits: torch.Tensor, weights: torch.Tensor | list[float], *, temperature: float | torch.Tensor = 1.0,
            top_k: int | torch.Tensor = 0, top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
            seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0,
            shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused ME decode step in a single launch: the token of step t and the member of t + 1.

    Args:
        logits: [B, V], the chosen members' last-position logits (as for `sample`).
        weights: [M] or [B, M] member weights (as for `select_members`); a device tensor when the
            call is captured in a CUDA graph (host weights are copied to the device per call).
        temperature, top_k, top_p, min_p, seed, offset: as for `sample`.
        shared: draw one member for the whole batch from row 0's weights, seed and offset.
    Returns:
        tokens int64 [B], exactly `sample(logits, ..., seed=seed, offset=offset)`, and
        next_members int32 [B], exactly `select_members(weights, seed=seed, offset=offset + 1,
        batch=B)` (shared: `select_members(weights row 0, seed=seed[0], offset=offset[0] + 1,
        batch=1)` broadcast). Token and member use independent Philox streams.
    The runtime calls select_members(w, seed=s, offset=0) before step 0 and
    me_step(logits_t, w, seed=s, offset=t) at step t.

    Example::

        >>> members = select_members(w, seed=seeds, offset=0)            # step 0's members
        >>> for t in range(n_steps):
        ...     logits = run_members(members)                             # [B, V], row b from members[b]
        ...     tokens, members = me_step(logits, w, top_p=0.9, seed=seeds, offset=t)
    """
    rows = _row_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    weights = check_weights(weights, "weights", logits.device, batch=logits.shape[0])
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be a bool, got {type(shared).__name__}")
    if eager() and use_triton(logits.device):
        return _launch_sample(logits, rows, weights=weights, shared=shared)
    return torch.ops.me.me_step(logits, weights, *rows.flat(), shared)


def sample_thresholds(logits: torch.Tensor, *, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                      top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                      seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0,
                      cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug entry of the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1): returns
    (tokens int64 [B], info float32 [B, 4]) with info[:, 0] = tau_k, info[:, 1] = tau_p (-inf when
    the filter is off or was not needed: greedy / plain / +inf rows) and info[:, 2] = the number
    of passes over the row. The kept set of a truncated row is
    {x >= max(tau_k, tau_p)} & {exp((x - max) / T) >= min_p}. `cap` overrides the candidate
    capacity (a power of two) to exercise the refinement paths on small rows.

    Example::

        >>> tokens, info = sample_thresholds(logits, top_k=50, top_p=0.9, seed=seeds)
        >>> info[:, 2].mean()                                     # passes over a row, on average
    """
    rows = _row_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    if not use_triton(logits.device):
        raise RuntimeError("sample_thresholds runs the Triton kernel: use CUDA tensors or TRITON_INTERPRET=1")
    info = torch.zeros((logits.shape[0], 4), dtype=torch.float32, device=logits.device)
    tokens, _ = _launch_sample(logits, rows, debug=info, cap=cap)
    return tokens, info
