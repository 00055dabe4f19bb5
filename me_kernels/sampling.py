"""Fused on-device sampling: temperature -> top-k -> top-p -> min-p -> draw, one launch, no sort.

Semantics: the sampling section of me_kernels.reference (kept sets are thresholds on the logits,
ties kept, the top-p crossing token kept; NaN / all -inf rows -> -1; +inf entries drawn
uniformly). Randomness: Philox-4x32-10 keyed by (seed[b], offset[b]) (me_kernels._random).

Design: one program per row, the row streamed a few times, no sort of V
-----------------------------------------------------------------------
Every decision is a threshold on the row's values: the kept set is {x >= max(tau_k, tau_p)}
intersected with the min-p set {exp((x - m) / T) >= min_p}, and the token is the Gumbel-max
argmax_i (x_i - m) / T + G_i over it. Only tau_k and tau_p need finding, exactly:

1. Stats pass (always): NaN / +inf / finite counts, max m and its lowest index, min, and the max
   of every SUB-element sub-block and of every tile (a small per-row scratch). Greedy, plain
   sampling (the Gumbel winner is tracked on the fly) and NaN / all -inf rows finish here; +inf
   rows take one more pass that draws among the +inf entries.
2. Ladder pass (top-k or top-p on): count C(t) and mass W(t) of {x >= t} at P = 8 pivots below
   m, plus the row's total mass Z. Mass pivots sit at depths 0.5 .. 12.4 x T, count pivots at
   1/64 .. 1/2 of the row's range (geometric); with both filters on they alternate. This
   brackets each threshold: tau_k in [lo, hi) with C(lo) >= k > C(hi); tau_p likewise with
   W(lo) >= top_p * Z_k > W(hi) (Z_k: mass of the top-k set, from phase 1).
3. Candidate pass: the elements of the bracket are compacted (in index order, via a per-tile
   cumsum) into a per-row scratch of CAP slots; when the whole upper set {x >= lo} fits, it is
   compacted instead and every threshold is decided on it. The same pass keeps the Gumbel
   winner among the elements above the bracket, which are kept whatever the exact threshold.
   In registers, the exact threshold among <= CAP candidates is found by a bracket search over
   the candidates (pivots half evenly spaced in value, half in fp32 key space, tightened to the
   candidates left), not by sorting; the token is the better of the two winners.
   If a bracket holds more than CAP elements (flat rows), refinement passes split it with 6
   pivots around an interpolated crossing (linear in counts; in exp((t - m) / T) for masses)
   and 2 at 1/3 and 2/3 of its fp32 key range, which guarantees progress on any row; a bracket
   spanning a single value is its own threshold and needs no candidates.
Passes measured (debug entry sample_thresholds, V = 32000): next-token-shaped rows 3 for top-p,
top-k and top-k + top-p + temperature, 2 for min-p alone; flat rows keeping thousands of tokens
3-5; plain / greedy 1.

Memory: passes after the first read only the sub-blocks whose maximum reaches the current
bracket (masked loads issue no memory traffic) and skip whole tiles by one scalar test, so on
peaked rows they read a small part of the row (the part most likely still in L2).

Inside a pass: 2-D tiles [NSUB, SUB] (one warp per sub-block row, 4 contiguous elements per
thread -> 128-bit loads), per-lane accumulators reduced once after the loop (no block-wide
reduction, hence no barrier, per tile), and an explicit one-tile-ahead prefetch. The Philox
noise (10 rounds per 4 elements) is computed only for tiles holding a possible winner.

Parallelism: one program per row (16 warps for V >= 16384). B of about the SM count fills the
GPU; at small B one SM streams the whole row (splitting a row over several programs needs a
grid-wide sync or several launches per pass; not done). A program reads only its own row and
its own counter-based random numbers, so a row's token does not depend on the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import eager, on_device, use_triton
from ._ops import compiled_op, register_python_op
from ._random import STREAM_TOKEN, gumbel_at, gumbel_tile
from ._validate import check_logits, check_weights, sampling_params, seed_param
from .selection import draw_members

__all__ = ["sample", "me_step", "sample_thresholds"]

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
_TOKEN_STREAM = tl.constexpr(STREAM_TOKEN)
# Bracket refinement stops after this many passes. Unreachable: two pivots per pass at 1/3 and
# 2/3 of the bracket's fp32 key range shrink it at least 3x, so 2**32 keys take <= 22 passes.
_MAX_REFINE = tl.constexpr(24)


# --------------------------------------------------------------------------------------------
# Row pipeline (shared with me_kernels.mixture through the SOURCE switch)
# --------------------------------------------------------------------------------------------


@triton.jit
def _f2k(x):
    """fp32 -> int64 key with the same order as the values (-0.0 and +0.0 share key 0), used to
    split brackets evenly and to compare candidates as integers."""
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return tl.where(k == -1, 0, k).to(tl.int64)


@triton.jit
def _k2f(k):
    k32 = k.to(tl.int32)
    return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)


@triton.jit
def _tile_offsets(start, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Vocabulary offsets of the [NSUB, SUB] tile starting at `start` (row-major)."""
    return start + tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]


@triton.jit
def _load_raw(src_ptr, stride_m, stride_v, offs, mask, mix_c, M, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr):
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
def _values(raw, mix_c, mix_pinf, SOURCE: tl.constexpr):
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
def _stats_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, inv_t, seed, offset,
                want_plain, STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                NSUB: tl.constexpr, SUB: tl.constexpr):
    """Pass 1 over the row, accumulated per lane (no block reductions inside the loop): counts,
    max and its lowest index, min, the maxima of every sub-block and tile, and the plain
    Gumbel-max winner when want_plain."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    offs = _tile_offsets(0, NSUB, SUB)
    raw = _load_raw(src_ptr, stride_m, stride_v, offs, offs < V, mix_c, M, SOURCE, MIX_PAD)
    # Plain sampling compares scores (x - ref) / T + G against a fixed reference, the first tile's
    # max (the row max is not known yet): the same order as (x - m) / T + G up to fp32 rounding.
    x0 = _values(raw, mix_c, mix_pinf, SOURCE)
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
        offs = _tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        raw_n = _load_raw(src_ptr, stride_m, stride_v, offs_n, offs_n < V, mix_c, M, SOURCE, MIX_PAD)
        x = _values(raw, mix_c, mix_pinf, SOURCE)
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
def _pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv, lo_skip, m,
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
    offs = _tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo_skip, NSUB)
    raw = _load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        offs_n = _tile_offsets((t + 1) * BLOCK, NSUB, SUB)
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo_skip, NSUB)
        raw_n = _load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        if tl.load(tilemax_ptr + t) >= lo_skip:
            x = tl.reshape(_values(raw, mix_c, mix_pinf, SOURCE), (NSUB, Q, 4))
            e = tl.where(x > NEG_INF, tl.exp((x - m) * inv_t), 0.0)
            acc_z += tl.sum(e, 2)
            ge = x[None, :, :, :] >= pv
            acc_c += tl.sum(ge.to(tl.int32), 3)
            acc_w += tl.sum(tl.where(ge, e[None, :, :, :], 0.0), 3)
        raw = raw_n
        t += 1
    return tl.sum(tl.sum(acc_c, 2), 1), tl.sum(tl.sum(acc_w, 2), 1), tl.sum(acc_z)


@triton.jit
def _compact_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, hi, m, inv_t,
                  min_p, want_above, cand_v_ptr, cand_i_ptr, seed, offset,
                  STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                  NSUB: tl.constexpr, SUB: tl.constexpr, CAP: tl.constexpr):
    """Writes the elements with lo <= x < hi to the candidate scratch in index order; returns their
    number and, if want_above, the Gumbel winner (index, score) among {x >= hi} passing min-p."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    # The scratch may still be read by a previous _resolve of this program.
    tl.debug_barrier()
    base = 0
    b_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    b_i = tl.full([NSUB, SUB], 0, tl.int32) - 1
    offs = _tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo, NSUB)
    raw = _load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = _tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo, NSUB)
        raw_n = _load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        tmax = tl.load(tilemax_ptr + t)
        if tmax >= lo:
            x = _values(raw, mix_c, mix_pinf, SOURCE)
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
def _sample_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, m, inv_t, min_p,
                 pinf_mode, seed, offset, STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                 NSUB: tl.constexpr, SUB: tl.constexpr):
    """Gumbel winner among the finite {x >= lo} passing min-p (lo may be -inf). pinf_mode: the
    row has +inf entries; draw among them (x remapped to 0 on +inf, -inf elsewhere)."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    lo_read = tl.where(pinf_mode, NEG_INF, lo)
    b_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    b_i = tl.full([NSUB, SUB], 0, tl.int32) - 1
    offs = _tile_offsets(0, NSUB, SUB)
    act = _sub_active(submax_ptr, 0, n_tiles, lo_read, NSUB)
    raw = _load_raw(src_ptr, stride_m, stride_v, offs, act[:, None] & (offs < V), mix_c, M, SOURCE, MIX_PAD)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = _tile_offsets(start, NSUB, SUB)
        offs_n = offs + BLOCK
        act_n = _sub_active(submax_ptr, t + 1, n_tiles, lo_read, NSUB)
        raw_n = _load_raw(src_ptr, stride_m, stride_v, offs_n, act_n[:, None] & (offs_n < V), mix_c, M, SOURCE,
                          MIX_PAD)
        tmax = tl.load(tilemax_ptr + t)
        if pinf_mode | ((tmax >= lo) & (tl.exp((tmax - m) * inv_t) >= min_p)):
            x = _values(raw, mix_c, mix_pinf, SOURCE)
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
def _candidate_threshold(kv, e, live, base, target, by_mass, P: tl.constexpr):
    """Exact threshold among register candidates, without sorting.

    kv / e: candidate keys (_f2k of the values) and weights [CAP]; live: which ones take part;
    base: count (or mass) of the elements above every candidate. The threshold is the largest
    candidate value t with base + #{v >= t} >= target (by_mass: base + sum{e : v >= t} >=
    target). Bracket [lo, hi) in key space with crit(lo) true and crit(hi) false, split by P
    evenly spaced pivots and tightened to the candidates it holds, until it holds a single value.
    If even the smallest candidate misses the target (possible only through fp32 rounding of a
    mass), the smallest candidate is returned (the whole band is kept). Returns the value.
    """
    BIG: tl.constexpr = 1 << 40
    k_lo = tl.min(tl.where(live, kv, BIG))
    k_hi = tl.max(tl.where(live, kv, -BIG)) + 1
    # crit is monotone, so every pivot can fail only when the smallest candidate already misses
    # the target (fp32 rounding of the masses); the band then empties and k_lo becomes BIG.
    k_min = k_lo
    H: tl.constexpr = P // 2
    j = tl.arange(0, P)
    while (k_hi - k_lo) > 1:
        # Half the pivots evenly spaced in value, half in key space (progress on any spread).
        v_lo = _k2f(k_lo)
        v_hi = _k2f(k_hi)
        v_piv = _f2k(v_lo + (v_hi - v_lo) * ((j + 1).to(tl.float32) / (H + 1)))
        k_piv = k_lo + ((k_hi - k_lo) * (j - H + 1).to(tl.int64)) // (H + 1)
        piv = tl.minimum(tl.maximum(tl.where(j < H, v_piv, k_piv), k_lo), k_hi)
        ge = live[None, :] & (kv[None, :] >= piv[:, None])
        amount = tl.where(by_mass, tl.sum(tl.where(ge, e[None, :], 0.0), 1), tl.sum(ge.to(tl.float32), 1))
        crit = (base + amount) >= target
        k_lo = tl.maximum(k_lo, tl.max(tl.where(crit, piv, -BIG), 0))
        k_hi = tl.minimum(k_hi, tl.min(tl.where(crit, BIG, piv), 0))
        # Tighten to the candidates inside [lo, hi): crit is constant between candidate values.
        in_band = live & (kv >= k_lo) & (kv < k_hi)
        k_lo = tl.min(tl.where(in_band, kv, BIG))
        k_hi = tl.max(tl.where(in_band, kv, -BIG)) + 1
    return _k2f(tl.where(k_lo >= BIG, k_min, k_lo))


@triton.jit
def _resolve(cand_v_ptr, cand_i_ptr, n, lo, c_top, w_top, k_eff, tau_k, z_k, c_k, p_on, top_p, m, inv_t, min_p,
             seed, offset, STREAM: tl.constexpr, CAP: tl.constexpr, P: tl.constexpr):
    """Exact thresholds and the best kept candidate from the n compacted candidates.

    The candidates are every element in [lo, hi); c_top / w_top are the count / mass of
    {x >= hi}. If k_eff > 0, tau_k is found here (else tau_k, z_k, c_k are given). If p_on,
    tau_p is found here. Returns (tau_k, z_k, c_k, tau_p, best index or -1, best score).
    """
    ar = tl.arange(0, CAP)
    valid = ar < n
    v = tl.load(cand_v_ptr + ar, mask=valid, other=NEG_INF)
    idx = tl.load(cand_i_ptr + ar, mask=valid, other=0)
    e = tl.where(valid, tl.exp((v - m) * inv_t), 0.0)
    kv = _f2k(v)
    if k_eff > 0:
        tau_k = _candidate_threshold(kv, e, valid, c_top.to(tl.float32), k_eff.to(tl.float32), False, P)
        tau_k = tl.where(n > 0, tau_k, lo)
        ge = valid & (v >= tau_k)
        z_k = w_top + tl.sum(tl.where(ge, e, 0.0), 0)
        c_k = c_top + tl.sum(ge.to(tl.int32), 0)
    tau_p = tl.full([], NEG_INF, tl.float32)
    if p_on:
        tau_p = _candidate_threshold(kv, e, valid & (v >= tau_k), w_top, top_p * z_k, True, P)
        tau_p = tl.where(n > 0, tau_p, lo)
    t_star = tl.maximum(tau_k, tau_p)
    kept = valid & (v >= t_star) & (tl.exp((v - m) * inv_t) >= min_p)
    g = gumbel_at(idx, seed, offset, STREAM)
    sc = tl.where(kept, (v - m) * inv_t + g, NEG_INF)
    bs = tl.max(sc, 0)
    best = tl.min(tl.where((sc == bs) & kept, idx, 2147483647), 0)
    best = tl.where(bs > NEG_INF, best, -1)
    return tau_k, z_k, c_k, tau_p, best, bs


@triton.jit
def _bracket(piv, C, W, crit, lo, c_lo, w_lo, hi, c_hi, w_hi):
    """Tightest [lo, hi) among the current bounds and the pivots, for a criterion that holds
    below the threshold (C(t) >= k, or W(t) >= theta) and fails above it."""
    cand_lo = tl.where(crit, piv, NEG_INF)
    best_lo = tl.max(cand_lo, 0)
    take_lo = best_lo > lo
    sel_lo = crit & (piv == best_lo)
    new_lo = tl.where(take_lo, best_lo, lo)
    new_c_lo = tl.where(take_lo, tl.max(tl.where(sel_lo, C, -1), 0), c_lo)
    new_w_lo = tl.where(take_lo, tl.max(tl.where(sel_lo, W, NEG_INF), 0), w_lo)
    fails = (~crit) & (piv > new_lo)
    best_hi = tl.min(tl.where(fails, piv, POS_INF), 0)
    take_hi = best_hi < hi
    sel_hi = fails & (piv == best_hi)
    new_hi = tl.where(take_hi, best_hi, hi)
    new_c_hi = tl.where(take_hi, tl.max(tl.where(sel_hi, C, -1), 0), c_hi)
    new_w_hi = tl.where(take_hi, tl.max(tl.where(sel_hi, W, NEG_INF), 0), w_hi)
    return new_lo, new_c_lo, new_w_lo, new_hi, new_c_hi, new_w_hi


@triton.jit
def _refine_pivots(lo, c_lo, w_lo, hi, c_hi, w_hi, target, by_mass, m, inv_t, P: tl.constexpr):
    """P pivots inside [lo, hi): P - 2 around an estimate of the crossing (counts interpolated
    linearly in value; masses linearly in exp((t - m) / T), i.e. a uniform density of tokens
    in value), spread +-1.5 %, 5 %, ~17 % of the bracket, and 2 at 1/3 and 2/3 of the
    bracket's fp32 key range, which guarantee progress on any row."""
    span = hi - lo
    f_cnt = (c_lo - target) / tl.maximum(c_lo - c_hi, 1).to(tl.float32)
    f_lin = (w_lo - target) / tl.maximum(w_lo - w_hi, 1e-30)
    u_lo = tl.exp((lo - m) * inv_t)
    u_hi = tl.exp((hi - m) * inv_t)
    u_t = u_hi - (target - w_hi) / tl.maximum(w_lo - w_hi, 1e-30) * (u_hi - u_lo)
    t_hat = m + tl.log(tl.maximum(u_t, 1e-30)) / tl.where(inv_t > 0, inv_t, 1.0)
    f_exp = (t_hat - lo) / span
    f_mass = tl.where((inv_t > 0) & (f_exp == f_exp), f_exp, f_lin)
    f = tl.minimum(tl.maximum(tl.where(by_mass, f_mass, f_cnt), 0.0), 1.0)
    j = tl.arange(0, P)
    spread = 0.015 * tl.exp2(((2 * j - (P - 3)) // 2).to(tl.float32).abs() * 1.737)  # 0.015, 0.05, 0.167
    delta = tl.where(2 * j < P - 2, -spread, spread)
    val_piv = tl.minimum(tl.maximum(lo + (f + delta) * span, lo), hi)
    k_lo = _f2k(lo)
    k_hi = _f2k(hi)
    key_piv = _k2f(k_lo + ((k_hi - k_lo) * (j - (P - 3)).to(tl.int64)) // 3)
    return tl.where(j < P - 2, val_piv, key_piv)


@triton.jit
def _refine(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, c_lo, w_lo, hi, c_hi,
            w_hi, target, by_mass, m, inv_t, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr, NSUB: tl.constexpr,
            SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr):
    """Split [lo, hi) with P pivots per pass until it holds <= CAP elements or a single value.
    Criterion: W(t) >= target if by_mass else C(t) >= target. Returns the bracket and the number
    of passes made."""
    n_pass = 0
    go = ((c_lo - c_hi) > CAP) & ((_f2k(hi) - _f2k(lo)) > 1)
    while go:
        piv = _refine_pivots(lo, c_lo, w_lo, hi, c_hi, w_hi, target, by_mass, m, inv_t, P)
        C, W, _z = _pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv, lo,
                               m, inv_t, SOURCE, MIX_PAD, NSUB, SUB, P)
        crit = tl.where(by_mass, W >= target, C.to(tl.float32) >= target)
        lo, c_lo, w_lo, hi, c_hi, w_hi = _bracket(piv, C, W, crit, lo, c_lo, w_lo, hi, c_hi, w_hi)
        n_pass += 1
        go = ((c_lo - c_hi) > CAP) & ((_f2k(hi) - _f2k(lo)) > 1) & (n_pass < _MAX_REFINE)
    return lo, c_lo, w_lo, hi, c_hi, w_hi, n_pass


@triton.jit
def _better(i_a, s_a, i_b, s_b):
    """Index of the better of two Gumbel candidates (higher score; lower index on ties)."""
    take_b = (i_b >= 0) & ((i_a < 0) | (s_b > s_a) | ((s_b == s_a) & (i_b < i_a)))
    return tl.where(take_b, i_b, i_a)


@triton.jit
def _truncated_draw(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, cand_v_ptr,
                    cand_i_ptr, m, n_fin, x_min, temp, inv_t, top_k, top_p, min_p, seed, offset,
                    STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                    NSUB: tl.constexpr, SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr):
    """Passes 2+ for a row with a finite maximum, T > 0 and some truncation on.

    Ladder pass, then phase 0 finds tau_k (top-k on) and phase 1 tau_p (top-p on), each by
    bracket -> refine -> candidates; a phase whose whole upper set fits in CAP decides everything
    on its candidates. One call site per pass type keeps the compiled kernel small.
    Returns (token, tau_k, tau_p, passes, need_sample_pass): when need_sample_pass is set, the
    token is drawn by one more pass over {x >= max(tau_k, tau_p)} (min-p alone, or a threshold
    that a single value spans).
    """
    k_eff = tl.where((top_k > 0) & (top_k < n_fin), top_k, 0)
    p_on = top_p < 1.0
    top_v = _k2f(_f2k(m) + 1)  # just above the maximum: C = 0, W = 0
    tau_k = tl.full([], NEG_INF, tl.float32)
    tau_p = tl.full([], NEG_INF, tl.float32)
    token = tl.full([], -1, tl.int32)
    done = tl.full([], 0, tl.int32)
    passes = tl.full([], 0, tl.int32)
    piv = tl.full([P], 0, tl.float32)
    C = tl.full([P], 0, tl.int32)
    W = tl.full([P], 0, tl.float32)
    z = tl.full([], 0.0, tl.float32)
    if (k_eff > 0) | p_on:
        # Ladder: pivots below the max in units of T (clamped, so that a huge T still spreads
        # them). With top-p the pass reads the whole row, giving Z; top-k alone skips every
        # sub-block below the lowest pivot.
        # Mass pivots sit at depths 0.5 .. 12.4 (x T) below the max, count pivots at 1/64 .. 1/2
        # of the row's range (geometric); with both filters on they alternate.
        j = tl.arange(0, P)
        jf = j.to(tl.float32)
        d_mass = (0.5 + 0.5 * jf + 0.15 * jf * jf) * tl.minimum(temp, 4.0)
        d_count = (m - x_min) * tl.exp2(-6.0 + jf * (5.0 / (P - 1)))
        use_count = tl.where(p_on, (k_eff > 0) & (j % 2 == 1), k_eff > 0)
        piv = m - tl.where(use_count, d_count, d_mass)
        lo_skip = tl.where(p_on, NEG_INF, tl.min(piv, 0))
        C, W, z = _pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv,
                              lo_skip, m, inv_t, SOURCE, MIX_PAD, NSUB, SUB, P)
        passes += 1
    z_k = z
    c_k = n_fin
    phase = tl.where(k_eff > 0, 0, 1)
    last_phase = tl.where(p_on, 1, 0)
    while (done == 0) & (phase <= last_phase):
        by_mass = phase == 1
        is_final = by_mass | ~p_on  # this phase's threshold is the last one
        target = tl.where(by_mass, top_p * z_k, k_eff.to(tl.float32))
        crit = tl.where(by_mass, W >= target, C.to(tl.float32) >= target)
        b_lo = tl.where(by_mass & (k_eff > 0), tau_k, x_min)
        lo, c_lo, w_lo, hi, c_hi, w_hi = _bracket(piv, C, W, crit, b_lo, tl.where(by_mass, c_k, n_fin),
                                                  tl.where(by_mass, z_k, z), top_v, 0, 0.0)
        upper = c_lo <= CAP  # the whole upper set {x >= lo} fits in the candidate scratch
        if ~upper:
            lo, c_lo, w_lo, hi, c_hi, w_hi, n_ref = _refine(
                src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, c_lo, w_lo, hi,
                c_hi, w_hi, target, by_mass, m, inv_t, SOURCE, MIX_PAD, NSUB, SUB, P, CAP)
            passes += n_ref
        if upper | ((c_lo - c_hi) <= CAP):
            hi_c = tl.where(upper, POS_INF, hi)
            want_above = is_final & ~upper
            n, a_idx, a_s = _compact_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr,
                                          tilemax_ptr, lo, hi_c, m, inv_t, min_p, want_above, cand_v_ptr,
                                          cand_i_ptr, seed, offset, STREAM, SOURCE, MIX_PAD, NSUB, SUB, CAP)
            passes += 1
            # Phase 0 finds tau_k here; top-p is resolved too when the whole upper set is here.
            k_here = tl.where(by_mass, 0, k_eff)
            p_here = p_on & (by_mass | upper)
            tau_k, z_k, c_k, tp, best, bs = _resolve(
                cand_v_ptr, cand_i_ptr, n, lo, tl.where(upper, 0, c_hi), tl.where(upper, 0.0, w_hi), k_here,
                tau_k, z_k, c_k, p_here, top_p, m, inv_t, min_p, seed, offset, STREAM, CAP, 2 * P)
            if p_here:
                tau_p = tp
            if is_final | upper:
                token = _better(a_idx, a_s, best, bs)
                done = 1
        else:
            # A single value spans the bracket: it is the threshold.
            if by_mass:
                tau_p = lo
            else:
                tau_k = lo
                z_k = w_lo
                c_k = c_lo
        phase += 1
    return token, tau_k, tau_p, passes, done == 0


@triton.jit
def _sample_row(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, cand_v_ptr, cand_i_ptr,
                temp, top_k, top_p, min_p, seed, offset, row_ok,
                STREAM: tl.constexpr, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr,
                NSUB: tl.constexpr, SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr):
    """The token of one row (int32, -1 for an invalid row) and debug values
    (tau_k, tau_p, passes over the row)."""
    bad = ~row_ok | (temp != temp) | (temp < 0.0) | (top_k < 0) | (top_p != top_p) | (top_p <= 0.0)
    bad = bad | (top_p > 1.0) | (min_p != min_p) | (min_p < 0.0) | (min_p > 1.0)
    inv_t = tl.math.div_rn(1.0, tl.where(temp > 0.0, temp, 1.0))
    greedy = (temp == 0.0) | (inv_t == POS_INF)
    plain = (top_k == 0) & (top_p >= 1.0) & (min_p <= 0.0)
    inv_t = tl.where(greedy, 1.0, inv_t)
    token = tl.full([], -1, tl.int32)
    tau_k = tl.full([], NEG_INF, tl.float32)
    tau_p = tl.full([], NEG_INF, tl.float32)
    passes = tl.full([], 0, tl.int32)
    # The final sampling pass (one call site) and its parameters.
    need_pass = tl.full([], 0, tl.int1)
    pinf_mode = tl.full([], 0, tl.int1)
    s_m = tl.full([], 0.0, tl.float32)
    s_inv_t = inv_t
    s_min_p = min_p
    if ~bad:
        n_nan, n_pinf, n_fin, first_pinf, m, amax, x_min, w_idx = _stats_pass(
            src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, inv_t, seed, offset,
            plain & ~greedy, STREAM, SOURCE, MIX_PAD, NSUB, SUB)
        passes = 1
        s_m = m
        if n_nan > 0:
            token = -1
        elif n_pinf > 0:
            # +inf entries: the limit distribution is uniform over them.
            token = first_pinf
            need_pass = ~greedy
            pinf_mode = True
            s_m = 0.0
            s_min_p = 0.0
        elif n_fin == 0:
            token = -1
        elif greedy:
            token = amax
        elif plain:
            token = w_idx
        else:
            token, tau_k, tau_p, np_, need_pass = _truncated_draw(
                src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, cand_v_ptr, cand_i_ptr,
                m, n_fin, x_min, temp, inv_t, top_k, top_p, min_p, seed, offset,
                STREAM, SOURCE, MIX_PAD, NSUB, SUB, P, CAP)
            passes += np_
    if need_pass:
        token = _sample_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr,
                             tl.maximum(tau_k, tau_p), s_m, s_inv_t, s_min_p, pinf_mode, seed, offset,
                             STREAM, SOURCE, MIX_PAD, NSUB, SUB)
        passes += 1
    return token, tau_k, tau_p, passes


@triton.jit
def _row_param(ptr, stride, scalar, row, HAS: tl.constexpr, DTYPE: tl.constexpr):
    """Row `row` of a per-row parameter tensor, or the scalar shared by every row."""
    if HAS:
        return tl.load(ptr + row * stride).to(DTYPE)
    else:
        return tl.full([], 0, DTYPE) + scalar


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
    temp = _row_param(temp_ptr, stride_temp, temp_s, row, HAS_TEMP, tl.float32)
    top_k = _row_param(topk_ptr, stride_topk, topk_s, row, HAS_TOPK, tl.int32)
    top_p = _row_param(topp_ptr, stride_topp, topp_s, row, HAS_TOPP, tl.float32)
    min_p = _row_param(minp_ptr, stride_minp, minp_s, row, HAS_MINP, tl.float32)
    seed = _row_param(seed_ptr, stride_seed, seed_s, row, HAS_SEED, tl.int64)
    offset = _row_param(off_ptr, stride_off, off_s, row, HAS_OFF, tl.int64)
    no_mix_c = tl.full([1], 0, tl.float32)
    no_mix_pinf = tl.full([1], 0, tl.int1)
    token, tau_k, tau_p, passes = _sample_row(
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
        mseed = _row_param(seed_ptr, stride_seed, seed_s, src_row, HAS_SEED, tl.int64)
        moff = _row_param(off_ptr, stride_off, off_s, src_row, HAS_OFF, tl.int64) + 1
        mm = tl.arange(0, M_PAD)
        w = tl.load(w_ptr + src_row * stride_wb + mm[None, :] * stride_wm, mask=mm[None, :] < M, other=0.0)
        member = draw_members(w.to(tl.float32), mseed, moff, M, M_PAD)
        tl.store(mem_ptr + row + tl.arange(0, 1), member)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_PIVOTS = 8  # pivots per bracketing pass


def block_config(vocab: int, cap: int | None = None, *, interpreted: bool = False) -> dict:
    """Tile of one loop step: NSUB sub-blocks of SUB elements (one warp per sub-block row, 4
    contiguous elements per thread), CAP candidate slots, P pivots per bracketing pass.

    On the GPU there are three size classes only (each is a separate compilation on a fresh
    machine); under the interpreter the tile and the candidate slots shrink to small rows, whose
    cost there is per operation and per element.
    """
    if vocab >= 16384:
        nsub, sub, warps, default_cap = 16, 128, 16, 4096
    elif vocab >= 2048:
        nsub, sub, warps, default_cap = 8, 128, 8, 2048
    else:
        nsub, sub, warps, default_cap = 4, 128, 4, 1024
        if interpreted:
            sub = min(128, max(4, triton.next_power_of_2(triton.cdiv(vocab, 4))))
            default_cap = min(default_cap, max(16, triton.next_power_of_2(vocab)))
    cap = default_cap if cap is None else cap
    if cap < 2 or cap & (cap - 1):
        raise ValueError(f"cap must be a power of two >= 2, got {cap}")
    return {"NSUB": nsub, "SUB": sub, "CAP": cap, "P": _PIVOTS, "num_warps": warps}


def scratch_for(batch: int, vocab: int, cfg: dict, device) -> tuple[torch.Tensor, ...]:
    """Per-row scratch of the row pipeline: sub-block maxima, tile maxima, candidates."""
    block = cfg["NSUB"] * cfg["SUB"]
    n_tiles = triton.cdiv(vocab, block)
    submax = torch.empty((batch, n_tiles * cfg["NSUB"]), dtype=torch.float32, device=device)
    tilemax = torch.empty((batch, n_tiles), dtype=torch.float32, device=device)
    cand_v = torch.empty((batch, cfg["CAP"]), dtype=torch.float32, device=device)
    cand_i = torch.empty((batch, cfg["CAP"]), dtype=torch.int32, device=device)
    return submax, tilemax, cand_v, cand_i


def _launch_sample(logits, temp, top_k, top_p, min_p, seed, offset, weights=None, shared=False, debug=None,
                   cap=None):
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

    def tensor_args(param):
        t, s = param
        return (t if t is not None else dummy, t.stride(0) if t is not None else 0, s)

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
            *tensor_args(temp), *tensor_args(top_k), *tensor_args(top_p), *tensor_args(min_p),
            *tensor_args(seed), *tensor_args(offset),
            *w_args,
            tokens, members, submax, submax.shape[1], tilemax, tilemax.shape[1], cand_v, cand_i,
            debug if debug is not None else dummy, int(debug is not None),
            HAS_TEMP=temp.tensor is not None, HAS_TOPK=top_k.tensor is not None, HAS_TOPP=top_p.tensor is not None,
            HAS_MINP=min_p.tensor is not None, HAS_SEED=seed.tensor is not None, HAS_OFF=offset.tensor is not None,
            SELECT=select, SHARED=bool(shared), M_PAD=m_pad,
            NSUB=cfg["NSUB"], SUB=cfg["SUB"], P=cfg["P"], CAP=cfg["CAP"], num_warps=cfg["num_warps"],
        )
    return tokens, members


# --------------------------------------------------------------------------------------------
# Registered ops (torch.library) and their implementations
# --------------------------------------------------------------------------------------------


def _scalar_or_tensor(t, s):
    return t if t is not None else s


def _sample_impl(
    logits: torch.Tensor,
    temp_t: torch.Tensor | None, temp_s: float, topk_t: torch.Tensor | None, topk_s: int,
    topp_t: torch.Tensor | None, topp_s: float, minp_t: torch.Tensor | None, minp_s: float,
    seed_t: torch.Tensor | None, seed_s: int, off_t: torch.Tensor | None, off_s: int,
) -> torch.Tensor:
    if use_triton(logits.device):
        from ._validate import RowParam as R

        tokens, _ = _launch_sample(logits, R(temp_t, temp_s), R(topk_t, topk_s), R(topp_t, topp_s),
                                   R(minp_t, minp_s), R(seed_t, seed_s), R(off_t, off_s))
        return tokens
    if _COMPILED and logits.device.type == "cpu":  # TEMP registration shim: the C++ CPU kernel
        return torch.ops.me.sample(logits, temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t, minp_s, seed_t,
                                   seed_s, off_t, off_s)
    return reference.sample_reference(
        logits, temperature=_scalar_or_tensor(temp_t, temp_s), top_k=_scalar_or_tensor(topk_t, topk_s),
        top_p=_scalar_or_tensor(topp_t, topp_s), min_p=_scalar_or_tensor(minp_t, minp_s),
        seed=_scalar_or_tensor(seed_t, seed_s), offset=_scalar_or_tensor(off_t, off_s))


def _sample_fake(logits, *args):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


_COMPILED = compiled_op("sample") and compiled_op("me_step")
register_python_op("sample", _sample_impl, _sample_fake)


def _me_step_impl(
    logits: torch.Tensor, weights: torch.Tensor,
    temp_t: torch.Tensor | None, temp_s: float, topk_t: torch.Tensor | None, topk_s: int,
    topp_t: torch.Tensor | None, topp_s: float, minp_t: torch.Tensor | None, minp_s: float,
    seed_t: torch.Tensor | None, seed_s: int, off_t: torch.Tensor | None, off_s: int, shared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(logits.device):
        from ._validate import RowParam as R

        return _launch_sample(logits, R(temp_t, temp_s), R(topk_t, topk_s), R(topp_t, topp_s), R(minp_t, minp_s),
                              R(seed_t, seed_s), R(off_t, off_s), weights=weights, shared=shared)
    if _COMPILED and logits.device.type == "cpu":  # TEMP registration shim: the C++ CPU kernel
        return torch.ops.me.me_step(logits, weights, temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t, minp_s,
                                    seed_t, seed_s, off_t, off_s, shared)
    return reference.me_step_reference(
        logits, weights, temperature=_scalar_or_tensor(temp_t, temp_s), top_k=_scalar_or_tensor(topk_t, topk_s),
        top_p=_scalar_or_tensor(topp_t, topp_s), min_p=_scalar_or_tensor(minp_t, minp_s),
        seed=_scalar_or_tensor(seed_t, seed_s), offset=_scalar_or_tensor(off_t, off_s), shared=shared)


def _me_step_fake(logits, weights, *args):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b,), dtype=torch.int32)


register_python_op("me_step", _me_step_impl, _me_step_fake)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _flat_params(logits, temperature, top_k, top_p, min_p, seed, offset):
    batch, _ = check_logits(logits)
    device = logits.device
    temp, k, p, mp = sampling_params(batch, device, temperature, top_k, top_p, min_p)
    sd = seed_param(seed, "seed", batch, device)
    off = seed_param(offset, "offset", batch, device)
    return (temp.tensor, temp.scalar, k.tensor, k.scalar, p.tensor, p.scalar, mp.tensor, mp.scalar,
            sd.tensor, sd.scalar, off.tensor, off.scalar)


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0) -> torch.Tensor:
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
    """
    flat = _flat_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    if eager():
        return _sample_impl(logits, *flat)
    return torch.ops.me.sample(logits, *flat)


def me_step(logits, weights, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
            shared=False) -> tuple[torch.Tensor, torch.Tensor]:
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
    """
    flat = _flat_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    weights = check_weights(weights, "weights", logits.device, batch=logits.shape[0])
    if not isinstance(shared, bool):
        raise TypeError(f"shared must be a bool, got {type(shared).__name__}")
    if eager():
        return _me_step_impl(logits, weights, *flat, shared)
    return torch.ops.me.me_step(logits, weights, *flat, shared)


def sample_thresholds(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, cap=None):
    """Debug entry of the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1): returns
    (tokens int64 [B], info float32 [B, 4]) with info[:, 0] = tau_k, info[:, 1] = tau_p (-inf when
    the filter is off or was not needed: greedy / plain / +inf rows) and info[:, 2] = the number
    of passes over the row. The kept set of a truncated row is
    {x >= max(tau_k, tau_p)} & {exp((x - max) / T) >= min_p}. `cap` overrides the candidate
    capacity (a power of two) to exercise the refinement paths on small rows."""
    flat = _flat_params(logits, temperature, top_k, top_p, min_p, seed, offset)
    if not use_triton(logits.device):
        raise RuntimeError("sample_thresholds runs the Triton kernel: use CUDA tensors or TRITON_INTERPRET=1")
    from ._validate import RowParam as R

    t = flat
    info = torch.zeros((logits.shape[0], 4), dtype=torch.float32, device=logits.device)
    tokens, _ = _launch_sample(logits, R(t[0], t[1]), R(t[2], t[3]), R(t[4], t[5]), R(t[6], t[7]), R(t[8], t[9]),
                               R(t[10], t[11]), debug=info, cap=cap)
    return tokens, info
