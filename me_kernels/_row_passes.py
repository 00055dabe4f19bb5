"""Memory passes of the row pipeline (me_kernels._rows): each streams one row once.

`SOURCE` selects what a row is: 0 = one logits row (`sample`, `me_step`); 1 = the mixture of M
member rows (`mixture_sample`), whose values log sum_m exp(l_m + c_m) are computed on the fly
from the raw member tiles (`values`). Every pass reads [NSUB, SUB] tiles with a one-tile-ahead
prefetch and per-lane accumulators (see me_kernels._rows for the design).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._random import gumbel_tile

__all__ = ["NEG_INF", "POS_INF", "tile_offsets", "load_raw", "values", "stats_pass", "pivot_pass", "compact_pass",
           "sample_pass", "row_param"]

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


@triton.jit
def tile_offsets(start, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Vocabulary offsets of the [NSUB, SUB] tile starting at `start` (row-major)."""
    return start + tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]


@triton.jit
def load_raw(src_ptr, stride_m, stride_v, offs, mask, mix_c, M, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr):
    """Raw loads of a tile (in the input dtype): [NSUB, SUB] for SOURCE 0, [MIX_PAD, NSUB, SUB]
    member rows for SOURCE 1 (members with c = -inf, i.e. zero weight, are not read)."""
    if SOURCE == 0:
        raw = tl.load(src_ptr + offs.to(tl.int64) * stride_v, mask=mask, other=NEG_INF)
    else:
        mm = tl.arange(0, MIX_PAD)[:, None, None]
        live = ((mix_c > NEG_INF)[:, None, None]) & (mm < M)
        ptrs = src_ptr + mm.to(tl.int64) * stride_m + offs[None, :, :].to(tl.int64) * stride_v
        raw = tl.load(ptrs, mask=live & mask[None, :, :], other=NEG_INF)
    return raw


@triton.jit
def values(raw, mix_c, mix_pinf, SOURCE: tl.constexpr):
    """fp32 values x of a raw tile. SOURCE 1: the mixture log-probability
    log sum_m exp(l_m + c_m), with c_m = log wbar_m - lse_m (-inf for members that do not count)
    and members holding +inf remapped to 0 / -inf (their lse is then log #inf)."""
    if SOURCE == 0:
        x = raw.to(tl.float32)
    else:
        lm = raw.to(tl.float32)
        lm = tl.where(mix_pinf[:, None, None], tl.where(lm == POS_INF, 0.0, NEG_INF), lm)
        c = mix_c[:, None, None]
        y = tl.where(c > NEG_INF, lm + c, NEG_INF)
        ymax = tl.max(y, 0)
        safe = tl.where(ymax > NEG_INF, ymax, 0.0)
        total = tl.sum(tl.exp(y - safe[None, :, :]), 0)
        x = tl.where(ymax > NEG_INF, safe + tl.log(tl.where(ymax > NEG_INF, total, 1.0)), NEG_INF)
    return x


@triton.jit
def _sub_active(submax_ptr, tile, n_tiles, lo, NSUB: tl.constexpr):
    """[NSUB] mask of the sub-blocks of `tile` whose maximum reaches lo (False past the end)."""
    sm = tl.load(submax_ptr + tile * NSUB + tl.arange(0, NSUB), mask=(tl.arange(0, NSUB) * 0 + tile) < n_tiles,
                 other=NEG_INF)
    return sm >= lo


@triton.jit
def _lane_argbest(score, idx):
    """(best score, lowest index among the best) of per-lane candidates; index -1 if none."""
    bs = tl.max(score)
    bi = tl.min(tl.where((score == bs) & (idx >= 0), idx, 2147483647))
    return tl.where(bs > NEG_INF, bi, -1), bs


@triton.jit
def stats_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, inv_t, seed, offset,
                want_plain, STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                NSUB: tl.constexpr, SUB: tl.constexpr):
    """Pass 1 over the row, accumulated per lane (no block reductions inside the loop): counts,
    max and its lowest index, min, the maxima of every sub-block and tile, and the plain
    Gumbel-max winner when want_plain."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    offs = tile_offsets(0, NSUB, SUB)
    raw = load_raw(src_ptr, stride_m, stride_v, offs, offs < V, mix_c, M, SOURCE, MIX_PAD)
    # Plain sampling compares scores (x - ref) / T + G against a fixed reference, the first tile's
    # max (the row max is not known yet): the same order as (x - m) / T + G up to fp32 rounding.
    x0 = values(raw, mix_c, mix_pinf, SOURCE)
    c0 = tl.max(tl.where((x0 > NEG_INF) & (x0 < POS_INF), x0, NEG_INF))
    ref = tl.where(c0 > NEG_INF, c0, 0.0)
    zeros_i = tl.full([NSUB, SUB], 0, tl.int32)
    cnt_nan = zeros_i
    cnt_pinf = zeros_i
    cnt_fin = zeros_i
    first_pinf = zeros_i + 2147483647
    lmax = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    lidx = zeros_i
    lmin = tl.full([NSUB, SUB], POS_INF, tl.float32)
    w_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    w_i = zeros_i - 1
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        raw_n = load_raw(src_ptr, stride_m, stride_v, offs_n, offs_n < V, mix_c, M, SOURCE, MIX_PAD)
        x = values(raw, mix_c, mix_pinf, SOURCE)
        is_pinf = x == POS_INF
        fin = (x > NEG_INF) & (x < POS_INF)
        cnt_nan += (x != x).to(tl.int32)
        cnt_pinf += is_pinf.to(tl.int32)
        cnt_fin += fin.to(tl.int32)
        first_pinf = tl.minimum(first_pinf, tl.where(is_pinf, offs, 2147483647))
        xf = tl.where(fin, x, NEG_INF)
        up = xf > lmax
        lidx = tl.where(up, offs, lidx)
        lmax = tl.where(up, xf, lmax)
        lmin = tl.minimum(lmin, tl.where(fin, x, POS_INF))
        tl.store(submax_ptr + t * NSUB + tl.arange(0, NSUB), tl.max(xf, 1))
        if want_plain:
            g = gumbel_tile(start, seed, offset, STREAM, NSUB, SUB)
            sc = tl.where(fin, (xf - ref) * inv_t + g, NEG_INF)
            up = sc > w_s
            w_s = tl.where(up, sc, w_s)
            w_i = tl.where(up, offs, w_i)
        raw = raw_n
        t += 1
    m = tl.max(lmax)
    amax = tl.min(tl.where(lmax == m, lidx, 2147483647))
    n_nan = tl.sum(cnt_nan)
    n_pinf = tl.sum(cnt_pinf)
    n_fin = tl.sum(cnt_fin)
    fp = tl.min(first_pinf)
    x_min = tl.min(lmin)
    w_idx, _ws = _lane_argbest(w_s, w_i)
    # Tile maxima (one scalar per tile) let later passes skip whole tiles without a reduction.
    tl.debug_barrier()
    TCH: tl.constexpr = 64
    t0 = 0
    while t0 < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        tt = t0 + tl.arange(0, TCH)
        sm = tl.load(submax_ptr + tt[:, None] * NSUB + tl.arange(0, NSUB)[None, :], mask=(tt < n_tiles)[:, None],
                     other=NEG_INF)
        tl.store(tilemax_ptr + tt, tl.max(sm, 1), mask=tt < n_tiles)
        t0 += TCH
    tl.debug_barrier()
    return n_nan, n_pinf, n_fin, fp, m, amax, x_min, w_idx


@triton.jit
def pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv, lo_skip, m,
                inv_t, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr, NSUB: tl.constexpr, SUB: tl.constexpr,
                P: tl.constexpr):
    """Count C(t) and mass W(t) of {x >= t} at the P pivots `piv` (all >= lo_skip), and the total
    mass of the sub-blocks read (the row's Z when lo_skip = -inf)."""
    BLOCK: tl.constexpr = NSUB * SUB
    # Each thread holds 4 contiguous elements of a row: they are summed in-thread first, so the
    # per-lane accumulators hold one value per thread and pivot.
    Q: tl.constexpr = SUB // 4
    n_tiles = (V + BLOCK - 1) // BLOCK
    acc_c = tl.full([P, NSUB, Q], 0, tl.int32)
    acc_w = tl.full([P, NSUB, Q], 0, tl.float32)
    acc_z = tl.full([NSUB, Q], 0, tl.float32)
    pv = piv[:, None, None, None]
    offs = tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo_skip, NSUB)
    raw = load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        offs_n = tile_offsets((t + 1) * BLOCK, NSUB, SUB)
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo_skip, NSUB)
        raw_n = load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        if tl.load(tilemax_ptr + t) >= lo_skip:
            x = tl.reshape(values(raw, mix_c, mix_pinf, SOURCE), (NSUB, Q, 4))
            e = tl.exp((x - m) * inv_t)
            # T = inf with x - m overflowing: (-inf) * 0 is NaN; such a token weighs 0 (the
            # reference's rule) instead of turning every mass into NaN.
            e = tl.where((x > NEG_INF) & (e == e), e, 0.0)
            acc_z += tl.sum(e, 2)
            ge = x[None, :, :, :] >= pv
            acc_c += tl.sum(ge.to(tl.int32), 3)
            acc_w += tl.sum(tl.where(ge, e[None, :, :, :], 0.0), 3)
        raw = raw_n
        t += 1
    return tl.sum(tl.sum(acc_c, 2), 1), tl.sum(tl.sum(acc_w, 2), 1), tl.sum(acc_z)


@triton.jit
def compact_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, hi, m, inv_t,
                  min_p, want_above, cand_v_ptr, cand_i_ptr, seed, offset,
                  STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                  NSUB: tl.constexpr, SUB: tl.constexpr, CAP: tl.constexpr):
    """Writes the elements with lo <= x < hi to the candidate scratch in index order; returns their
    number and, if want_above, the Gumbel winner (index, score) among {x >= hi} passing min-p."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    # The scratch may still be read by a previous resolve of this program.
    tl.debug_barrier()
    base = 0
    b_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    b_i = tl.full([NSUB, SUB], 0, tl.int32) - 1
    offs = tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo, NSUB)
    raw = load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo, NSUB)
        raw_n = load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        tmax = tl.load(tilemax_ptr + t)
        if tmax >= lo:
            x = values(raw, mix_c, mix_pinf, SOURCE)
            in_band = ((x >= lo) & (x < hi)).to(tl.int32)
            row_cnt = tl.sum(in_band, 1)
            row_base = tl.cumsum(row_cnt, 0) - row_cnt
            pos = base + row_base[:, None] + tl.cumsum(in_band, 1) - 1
            ok = (in_band > 0) & (pos < CAP)
            tl.store(cand_v_ptr + pos, x, mask=ok)
            tl.store(cand_i_ptr + pos, offs, mask=ok)
            base += tl.sum(row_cnt, 0)
            if want_above & (tmax >= hi):
                above = (x >= hi) & (tl.exp((x - m) * inv_t) >= min_p)
                g = gumbel_tile(start, seed, offset, STREAM, NSUB, SUB)
                sc = tl.where(above, (x - m) * inv_t + g, NEG_INF)
                up = sc > b_s
                b_s = tl.where(up, sc, b_s)
                b_i = tl.where(up, offs, b_i)
        raw = raw_n
        t += 1
    best_idx, best_s = _lane_argbest(b_s, b_i)
    # The candidates are read back by other threads of this program.
    tl.debug_barrier()
    return base, best_idx, best_s


@triton.jit
def sample_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, m, inv_t, min_p,
                 pinf_mode, seed, offset, STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                 NSUB: tl.constexpr, SUB: tl.constexpr):
    """Gumbel winner among the finite {x >= lo} passing min-p (lo may be -inf). pinf_mode: the
    row has +inf entries; draw among them (x remapped to 0 on +inf, -inf elsewhere)."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    lo_read = tl.where(pinf_mode, NEG_INF, lo)
    b_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    b_i = tl.full([NSUB, SUB], 0, tl.int32) - 1
    offs = tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo_read, NSUB)
    raw = load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo_read, NSUB)
        raw_n = load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        tmax = tl.load(tilemax_ptr + t)
        if pinf_mode | ((tmax >= lo) & (tl.exp((tmax - m) * inv_t) >= min_p)):
            x = values(raw, mix_c, mix_pinf, SOURCE)
            if pinf_mode:
                x = tl.where(x == POS_INF, 0.0, NEG_INF)
            keep = (x >= lo) & (x > NEG_INF) & (tl.exp((x - m) * inv_t) >= min_p)
            g = gumbel_tile(start, seed, offset, STREAM, NSUB, SUB)
            sc = tl.where(keep, (x - m) * inv_t + g, NEG_INF)
            up = sc > b_s
            b_s = tl.where(up, sc, b_s)
            b_i = tl.where(up, offs, b_i)
        raw = raw_n
        t += 1
    best_idx, _bs = _lane_argbest(b_s, b_i)
    return best_idx


@triton.jit
def row_param(ptr, stride, scalar, row, HAS: tl.constexpr, DTYPE: tl.constexpr):
    """Row `row` of a per-row parameter tensor, or the scalar shared by every row."""
    if HAS:
        return tl.load(ptr + row * stride).to(DTYPE)
    else:
        return tl.full([], 0, DTYPE) + scalar


@triton.jit
def load_row_params(row, temp_ptr, stride_temp, temp_s, topk_ptr, stride_topk, topk_s, topp_ptr, stride_topp,
                    topp_s, minp_ptr, stride_minp, minp_s, seed_ptr, stride_seed, seed_s, off_ptr, stride_off,
                    off_s, HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
                    HAS_MINP: tl.constexpr, HAS_SEED: tl.constexpr, HAS_OFF: tl.constexpr):
    """Row `row`'s (temperature, top_k, top_p, min_p, seed, offset), each from its per-row
    tensor or its scalar (the launchers pass them as RowParams, me_kernels/_validate.py)."""
    return (row_param(temp_ptr, stride_temp, temp_s, row, HAS_TEMP, tl.float32),
            row_param(topk_ptr, stride_topk, topk_s, row, HAS_TOPK, tl.int32),
            row_param(topp_ptr, stride_topp, topp_s, row, HAS_TOPP, tl.float32),
            row_param(minp_ptr, stride_minp, minp_s, row, HAS_MINP, tl.float32),
            row_param(seed_ptr, stride_seed, seed_s, row, HAS_SEED, tl.int64),
            row_param(off_ptr, stride_off, off_s, row, HAS_OFF, tl.int64))

