"""The conventional-ensemble (CE) step: mixture log-probabilities and sampling from the mixture.

    q_b(i) = sum_m wbar_bm softmax(logits[m, b])_i,   wbar_b = w_b / sum(w_b)

`mixture_logprobs` writes log q (float32 [B, V]); `mixture_sample` applies temperature -> top-k
-> top-p -> min-p to the mixture (x = log q taken as logits) and draws, in Philox stream
STREAM_MIXTURE.

Design
------
Two launches, no [M, B, V] intermediate:
1. `_mixture_partials_kernel`, grid (B, chunks): each program streams its slice of the vocabulary
   for every member at once (a [M_PAD, NSUB, SUB] tile) and writes, per member, the slice's
   max, sum of exp(l - max) and NaN / +inf / finite counts. The grid has enough programs to fill
   the GPU at any batch size.
2. `_mixture_sample_kernel`, grid (B,): merges the partials into per-member constants
   c_m = log wbar_m - lse_m (in registers), then runs the same row pipeline as `sample`
   (me_kernels._rows) with its values computed on the fly from the M member rows:
   x_i = log sum_m exp(l_mi + c_m) (a max-shifted log-sum-exp over members). The mixture is
   never materialised: every pass of the pipeline reads the M rows (only the sub-blocks it
   needs, as in `sample`). `_mixture_logprobs_kernel`, grid (B, chunks), writes x instead.

Members with zero weight are not read. A member with +inf logits contributes the uniform
distribution over its +inf entries. A row yields -1 (mixture_sample) / NaN (mixture_logprobs)
when its weights are bad (NaN, negative, infinite, all zero; CUDA weights are not checked on
the host) or a member of positive weight has a NaN or no logit above -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _ops
from ._dispatch import eager, on_device, use_triton
from ._random import STREAM_MIXTURE
from ._row_passes import NEG_INF, POS_INF, load_raw, load_row_params, tile_offsets, values
from ._rows import block_config, sample_row, scratch_for
from ._validate import SAMPLING_ROW_NAMES, RowParams, check_mixture_logits, check_weights, sampling_row_params

__all__ = ["mixture_logprobs", "mixture_sample", "mixture_sample_thresholds"]

_MIXTURE_STREAM = tl.constexpr(STREAM_MIXTURE)
_FIELDS = tl.constexpr(5)  # per (row, chunk, member): max, sum exp(l - max), #NaN, #+inf, #finite
_MAX_CHUNKS = 64  # chunks per row of the partials kernel; also the (fixed) merge width CH_PAD


@triton.jit(do_not_specialize=["M", "tiles_per_chunk", "n_chunks"])
def _mixture_partials_kernel(
    logits_ptr, stride_lm, stride_lb, stride_lv, V, M,
    part_ptr, tiles_per_chunk, n_chunks,
    MIX_PAD: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    BLOCK: tl.constexpr = NSUB * SUB
    mm = tl.arange(0, MIX_PAD)
    src = logits_ptr + row * stride_lb
    live = tl.full([MIX_PAD], 0.0, tl.float32)  # c = 0 for every member: read them all
    mx = tl.full([MIX_PAD], NEG_INF, tl.float32)
    se = tl.full([MIX_PAD], 0, tl.float32)
    n_nan = tl.full([MIX_PAD], 0, tl.float32)
    n_pinf = tl.full([MIX_PAD], 0, tl.float32)
    n_fin = tl.full([MIX_PAD], 0, tl.float32)
    t = chunk * tiles_per_chunk
    t_end = t + tiles_per_chunk
    while t < t_end:  # a while loop: the interpreter cannot range() over runtime scalars
        offs = tile_offsets(t * BLOCK, NSUB, SUB)
        lm = load_raw(src, stride_lm, stride_lv, offs, offs < V, live, M, 1, MIX_PAD).to(tl.float32)
        fin = (lm > NEG_INF) & (lm < POS_INF)
        n_nan += tl.sum(tl.sum((lm != lm).to(tl.float32), 2), 1)
        n_pinf += tl.sum(tl.sum((lm == POS_INF).to(tl.float32), 2), 1)
        n_fin += tl.sum(tl.sum(fin.to(tl.float32), 2), 1)
        lf = tl.where(fin, lm, NEG_INF)
        new_mx = tl.maximum(mx, tl.max(tl.max(lf, 2), 1))
        safe = tl.where(new_mx > NEG_INF, new_mx, 0.0)
        se = se * tl.where(mx > NEG_INF, tl.exp(mx - safe), 0.0) + tl.sum(
            tl.sum(tl.exp(lf - safe[:, None, None]), 2), 1)
        mx = new_mx
        t += 1
    base = part_ptr + (row * n_chunks + chunk) * (_FIELDS * MIX_PAD) + mm
    tl.store(base + 0 * MIX_PAD, mx)
    tl.store(base + 1 * MIX_PAD, se)
    tl.store(base + 2 * MIX_PAD, n_nan)
    tl.store(base + 3 * MIX_PAD, n_pinf)
    tl.store(base + 4 * MIX_PAD, n_fin)


@triton.jit
def _mixture_constants(part_ptr, row, n_chunks, w_ptr, stride_wb, stride_wm, M,
                       MIX_PAD: tl.constexpr, CH_PAD: tl.constexpr):
    """Merges a row's partials: per-member c_m = log wbar_m - lse_m (-inf for members that do not
    count), the members holding +inf, and whether the row is valid."""
    mm = tl.arange(0, MIX_PAD)
    cc = tl.arange(0, CH_PAD)
    mvalid = mm < M
    w = tl.load(w_ptr + row * stride_wb + mm * stride_wm, mask=mvalid, other=0.0).to(tl.float32)
    w_bad = tl.max((mvalid & ((w < 0.0) | (w != w) | (w == POS_INF))).to(tl.int32), 0) > 0
    w_sum = tl.sum(tl.where(mvalid, w, 0.0), 0)
    w_bad = w_bad | ~(w_sum > 0.0)
    ptrs = part_ptr + (row * n_chunks + cc[:, None]) * (_FIELDS * MIX_PAD) + mm[None, :]
    cmask = (cc < n_chunks)[:, None]
    pmax = tl.load(ptrs + 0 * MIX_PAD, mask=cmask, other=NEG_INF)
    psum = tl.load(ptrs + 1 * MIX_PAD, mask=cmask, other=0.0)
    n_nan = tl.sum(tl.load(ptrs + 2 * MIX_PAD, mask=cmask, other=0.0), 0)
    n_pinf = tl.sum(tl.load(ptrs + 3 * MIX_PAD, mask=cmask, other=0.0), 0)
    n_fin = tl.sum(tl.load(ptrs + 4 * MIX_PAD, mask=cmask, other=0.0), 0)
    gmax = tl.max(pmax, 0)
    safe = tl.where(gmax > NEG_INF, gmax, 0.0)
    total = tl.sum(tl.where(pmax > NEG_INF, psum * tl.exp(pmax - safe[None, :]), 0.0), 0)
    lse = tl.where(n_pinf > 0, tl.log(tl.maximum(n_pinf, 1.0)), safe + tl.log(tl.where(total > 0.0, total, 1.0)))
    positive = mvalid & (w > 0.0)
    member_bad = positive & ((n_nan > 0) | ((n_fin + n_pinf) == 0))
    row_ok = ~w_bad & ~(tl.max(member_bad.to(tl.int32), 0) > 0)
    c = tl.where(positive, tl.log(tl.where(positive, w, 1.0)) - tl.log(tl.where(w_sum > 0.0, w_sum, 1.0)) - lse, NEG_INF)
    c = tl.where(row_ok, c, NEG_INF)
    return c, n_pinf > 0, row_ok


@triton.jit(do_not_specialize=["M", "tiles_per_chunk", "n_chunks"])
def _mixture_logprobs_kernel(
    logits_ptr, stride_lm, stride_lb, stride_lv, V, M,
    w_ptr, stride_wb, stride_wm,
    part_ptr, tiles_per_chunk, n_chunks, out_ptr, stride_ob,
    MIX_PAD: tl.constexpr, CH_PAD: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    BLOCK: tl.constexpr = NSUB * SUB
    c, pinf, row_ok = _mixture_constants(part_ptr, row, n_chunks, w_ptr, stride_wb, stride_wm, M, MIX_PAD, CH_PAD)
    src = logits_ptr + row * stride_lb
    t = chunk * tiles_per_chunk
    t_end = t + tiles_per_chunk
    while t < t_end:  # a while loop: the interpreter cannot range() over runtime scalars
        offs = tile_offsets(t * BLOCK, NSUB, SUB)
        x = values(load_raw(src, stride_lm, stride_lv, offs, offs < V, c, M, 1, MIX_PAD), c, pinf, 1)
        x = tl.where(row_ok, x, float("nan"))
        tl.store(out_ptr + row * stride_ob + offs, x, mask=offs < V)
        t += 1


@triton.jit(do_not_specialize=["temp_s", "topk_s", "topp_s", "minp_s", "seed_s", "off_s", "M", "n_chunks", "n_sub",
                             "n_tiles", "debug"])
def _mixture_sample_kernel(
    logits_ptr, stride_lm, stride_lb, stride_lv, V, M,
    w_ptr, stride_wb, stride_wm, part_ptr, n_chunks,
    temp_ptr, stride_temp, temp_s,
    topk_ptr, stride_topk, topk_s,
    topp_ptr, stride_topp, topp_s,
    minp_ptr, stride_minp, minp_s,
    seed_ptr, stride_seed, seed_s: tl.int64,
    off_ptr, stride_off, off_s: tl.int64,
    tok_ptr, submax_ptr, n_sub, tilemax_ptr, n_tiles, cand_v_ptr, cand_i_ptr, dbg_ptr, debug,
    HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
    HAS_SEED: tl.constexpr, HAS_OFF: tl.constexpr,
    MIX_PAD: tl.constexpr, CH_PAD: tl.constexpr,
    NSUB: tl.constexpr, SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temp, top_k, top_p, min_p, seed, offset = load_row_params(
        row, temp_ptr, stride_temp, temp_s, topk_ptr, stride_topk, topk_s, topp_ptr, stride_topp, topp_s, minp_ptr,
        stride_minp, minp_s, seed_ptr, stride_seed, seed_s, off_ptr, stride_off, off_s,
        HAS_TEMP, HAS_TOPK, HAS_TOPP, HAS_MINP, HAS_SEED, HAS_OFF)
    c, pinf, row_ok = _mixture_constants(part_ptr, row, n_chunks, w_ptr, stride_wb, stride_wm, M, MIX_PAD, CH_PAD)
    token, tau_k, tau_p, passes = sample_row(
        logits_ptr + row * stride_lb, stride_lm, stride_lv, V, c, pinf, M,
        submax_ptr + row * n_sub, tilemax_ptr + row * n_tiles, cand_v_ptr + row * CAP, cand_i_ptr + row * CAP,
        temp, top_k, top_p, min_p, seed, offset, row_ok,
        _MIXTURE_STREAM, 1, MIX_PAD, NSUB, SUB, P, CAP)
    tl.store(tok_ptr + row, token.to(tl.int64))
    if debug != 0:
        tl.store(dbg_ptr + row * 4 + 0, tau_k)
        tl.store(dbg_ptr + row * 4 + 1, tau_p)
        tl.store(dbg_ptr + row * 4 + 2, passes.to(tl.float32))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _chunking(n_tiles: int) -> tuple[int, int]:
    """(tiles per chunk, chunks) from the vocabulary alone. The per-member log-sum-exp is merged
    from the chunks' partials, so the chunking must not depend on the batch size or the GPU:
    otherwise a row's mixture values (and near-tie draws) would change with the batch it is in.
    Up to _MAX_CHUNKS chunks per row give a single row enough programs to fill the GPU; at large
    batches the extra partials are a few bytes per chunk."""
    per = triton.cdiv(n_tiles, max(1, min(n_tiles, _MAX_CHUNKS)))
    return per, triton.cdiv(n_tiles, per)


def _partials(logits, cfg):
    num_members, batch, vocab = logits.shape
    block = cfg["NSUB"] * cfg["SUB"]
    n_tiles = triton.cdiv(vocab, block)
    per, n_chunks = _chunking(n_tiles)
    mix_pad = triton.next_power_of_2(num_members)
    part = torch.empty((batch, n_chunks, _FIELDS.value, mix_pad), dtype=torch.float32, device=logits.device)
    with on_device(logits.device):
        _mixture_partials_kernel[(batch, n_chunks)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), vocab, num_members,
            part, per, n_chunks,
            MIX_PAD=mix_pad, NSUB=4, SUB=cfg["SUB"], num_warps=4,
        )
    return part, per, n_chunks, mix_pad


def _partials_config(vocab: int, device) -> dict:
    cfg = block_config(vocab, interpreted=device.type != "cuda")
    # The partials / log-prob kernels use 4-row tiles (4 warps) so that many programs share an SM.
    return {**cfg, "NSUB": 4}


def _launch_logprobs(logits, weights):
    num_members, batch, vocab = logits.shape
    out = torch.empty((batch, vocab), dtype=torch.float32, device=logits.device)
    if batch == 0:
        return out
    cfg = _partials_config(vocab, logits.device)
    part, per, n_chunks, mix_pad = _partials(logits, cfg)
    with on_device(logits.device):
        _mixture_logprobs_kernel[(batch, n_chunks)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), vocab, num_members,
            weights, weights.stride(0) if weights.dim() == 2 else 0, weights.stride(-1),
            part, per, n_chunks, out, out.stride(0),
            MIX_PAD=mix_pad, CH_PAD=_MAX_CHUNKS, NSUB=4, SUB=cfg["SUB"], num_warps=4,
        )
    return out


def _launch_mixture_sample(logits: torch.Tensor, weights: torch.Tensor, rows: RowParams,
                           debug: torch.Tensor | None = None, cap: int | None = None) -> torch.Tensor:
    num_members, batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return tokens
    pcfg = _partials_config(vocab, device)
    part, _per, n_chunks, mix_pad = _partials(logits, pcfg)
    cfg = block_config(vocab, cap, interpreted=device.type != "cuda")
    if cfg["num_warps"] > 8:
        # M member tiles (and their prefetch) are live at once: 8 warps leave 255 registers each.
        cfg = {**cfg, "NSUB": 8, "num_warps": 8}
    submax, tilemax, cand_v, cand_i = scratch_for(batch, vocab, cfg, device)
    dummy = tokens
    with on_device(device):
        _mixture_sample_kernel[(batch,)](
            logits, logits.stride(0), logits.stride(1), logits.stride(2), vocab, num_members,
            weights, weights.stride(0) if weights.dim() == 2 else 0, weights.stride(-1), part, n_chunks,
            *rows.kernel_args(dummy),
            tokens, submax, submax.shape[1], tilemax, tilemax.shape[1], cand_v, cand_i,
            debug if debug is not None else dummy, int(debug is not None),
            **rows.has_flags(),
            MIX_PAD=mix_pad, CH_PAD=_MAX_CHUNKS,
            NSUB=cfg["NSUB"], SUB=cfg["SUB"], P=cfg["P"], CAP=cfg["CAP"], num_warps=cfg["num_warps"],
        )
    return tokens


# --------------------------------------------------------------------------------------------
# Registered ops: the CUDA implementations of me::mixture_logprobs and me::mixture_sample (CPU:
# me_kernels._ops)
# --------------------------------------------------------------------------------------------


def _mixture_logprobs_cuda(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    use_triton(logits.device)  # raises if the kernels were imported for the interpreter
    return _launch_logprobs(logits, weights)


def _mixture_sample_cuda(logits: torch.Tensor, weights: torch.Tensor, *row) -> torch.Tensor:
    use_triton(logits.device)
    return _launch_mixture_sample(logits, weights, RowParams.from_flat(SAMPLING_ROW_NAMES, row))


_ops.register_cuda("mixture_logprobs", _mixture_logprobs_cuda)
_ops.register_cuda("mixture_sample", _mixture_sample_cuda)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _checked(logits: torch.Tensor, weights) -> tuple[int, torch.Tensor]:
    num_members, batch, _ = check_mixture_logits(logits)
    weights = check_weights(weights, "weights", logits.device, num_members=num_members, batch=batch)
    return batch, weights


def mixture_logprobs(logits: torch.Tensor, weights: torch.Tensor | list[float]) -> torch.Tensor:
    """log sum_m wbar_m softmax(logits[m]) for every row: the CE distribution, as log-probabilities.

    Args:
        logits: [M, B, V] float32 / bfloat16 / float16 (any strides).
        weights: [M] or [B, M], non-negative, rows need not sum to 1 (normalised per row).
            Host-known weights are checked (ValueError); a bad CUDA weight row yields NaN.
    Returns:
        float32 [B, V]. -inf where every member of positive weight gives probability 0. A row is
        NaN if its weights are bad or a member of positive weight has a NaN or no logit above
        -inf. Members of zero weight are ignored; +inf logits of a member make it uniform over
        its +inf entries.

    Example::

        >>> stacked = torch.stack([m(ids).logits[:, -1] for m in members])   # [M, B, V]
        >>> logq = mixture_logprobs(stacked, torch.tensor([0.5, 0.3, 0.2]))   # float32 [B, V]
        >>> score += logq.gather(1, next_ids[:, None])[:, 0]                  # exact CE log-likelihood
    """
    _, weights = _checked(logits, weights)
    if eager() and use_triton(logits.device):
        return _launch_logprobs(logits, weights)
    return torch.ops.me.mixture_logprobs(logits, weights)


def _row_params(logits: torch.Tensor, batch: int, temperature, top_k, top_p, min_p, seed, offset) -> RowParams:
    return sampling_row_params(batch, logits.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               seed=seed, offset=offset)


def mixture_sample(logits: torch.Tensor, weights: torch.Tensor | list[float], *,
                   temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                   top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                   seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """The CE step: sample from the mixture of the members' softmaxes, transforms applied to the mixture.

    Args:
        logits: [M, B, V] float32 / bfloat16 / float16 (any strides).
        weights: [M] or [B, M] member weights (see `mixture_logprobs`).
        temperature, top_k, top_p, min_p: as for `sample`, applied to log q (temperature 0 is
            the argmax of the mixture).
        seed, offset: as for `sample`; draws use Philox stream STREAM_MIXTURE.
    Returns:
        int64 [B]; -1 for a row whose mixture is undefined (see `mixture_logprobs`) or with a bad
        device parameter.

    Example::

        >>> stacked = torch.stack([m(ids).logits[:, -1] for m in members])   # [M, B, V]
        >>> tokens = mixture_sample(stacked, weights, top_p=0.9, seed=seeds, offset=step)  # int64 [B]
    """
    batch, weights = _checked(logits, weights)
    rows = _row_params(logits, batch, temperature, top_k, top_p, min_p, seed, offset)
    if eager() and use_triton(logits.device):
        return _launch_mixture_sample(logits, weights, rows)
    return torch.ops.me.mixture_sample(logits, weights, *rows.flat())


def mixture_sample_thresholds(logits: torch.Tensor, weights: torch.Tensor | list[float], *,
                              temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                              top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                              seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0,
                              cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug entry of the Triton kernel, as `me_kernels.sample_thresholds`: (tokens int64 [B],
    info float32 [B, 4]), the kept set being a threshold on mixture_logprobs(logits, weights).

    Example::

        >>> tokens, info = mixture_sample_thresholds(stacked, weights, top_p=0.9, seed=seeds)
        >>> info[:, 1]                                            # tau_p on log q, per row
    """
    batch, weights = _checked(logits, weights)
    rows = _row_params(logits, batch, temperature, top_k, top_p, min_p, seed, offset)
    if not use_triton(logits.device):
        raise RuntimeError("mixture_sample_thresholds runs the Triton kernel: use CUDA tensors or TRITON_INTERPRET=1")
    info = torch.zeros((batch, 4), dtype=torch.float32, device=logits.device)
    tokens = _launch_mixture_sample(logits, weights, rows, debug=info, cap=cap)
    return tokens, info
