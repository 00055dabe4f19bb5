"""The row pipeline shared by `sample`, `me_step` and `mixture_sample`: temperature -> top-k ->
top-p -> min-p -> draw for one row, in one program, without sorting the vocabulary.

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

from ._row_passes import NEG_INF, POS_INF, compact_pass, pivot_pass, sample_pass, stats_pass
from ._row_search import bracket, better, f2k, k2f, refine_pivots, resolve

__all__ = ["sample_row", "block_config", "scratch_for"]

# Bracket refinement stops after this many passes. Unreachable: two pivots per pass at 1/3 and
# 2/3 of the bracket's fp32 key range shrink it at least 3x, so 2**32 keys take <= 22 passes.
_MAX_REFINE = tl.constexpr(24)


@triton.jit
def _refine(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, lo, c_lo, w_lo, hi, c_hi,
            w_hi, target, by_mass, m, inv_t, SOURCE: tl.constexpr, MIX_PAD: tl.constexpr, NSUB: tl.constexpr,
            SUB: tl.constexpr, P: tl.constexpr, CAP: tl.constexpr):
    """Split [lo, hi) with P pivots per pass until it holds <= CAP elements or a single value.
    Criterion: W(t) >= target if by_mass else C(t) >= target. Returns the bracket and the number
    of passes made."""
    n_pass = 0
    go = ((c_lo - c_hi) > CAP) & ((f2k(hi) - f2k(lo)) > 1)
    while go:
        piv = refine_pivots(lo, c_lo, w_lo, hi, c_hi, w_hi, target, by_mass, m, inv_t, P)
        C, W, _z = pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv, lo,
                               m, inv_t, SOURCE, MIX_PAD, NSUB, SUB, P)
        crit = tl.where(by_mass, W >= target, C.to(tl.float32) >= target)
        lo, c_lo, w_lo, hi, c_hi, w_hi = bracket(piv, C, W, crit, lo, c_lo, w_lo, hi, c_hi, w_hi)
        n_pass += 1
        go = ((c_lo - c_hi) > CAP) & ((f2k(hi) - f2k(lo)) > 1) & (n_pass < _MAX_REFINE)
    return lo, c_lo, w_lo, hi, c_hi, w_hi, n_pass


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
    top_v = k2f(f2k(m) + 1)  # just above the maximum: C = 0, W = 0
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
        C, W, z = pivot_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, piv,
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
        lo, c_lo, w_lo, hi, c_hi, w_hi = bracket(piv, C, W, crit, b_lo, tl.where(by_mass, c_k, n_fin),
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
            n, a_idx, a_s = compact_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr,
                                          tilemax_ptr, lo, hi_c, m, inv_t, min_p, want_above, cand_v_ptr,
                                          cand_i_ptr, seed, offset, STREAM, SOURCE, MIX_PAD, NSUB, SUB, CAP)
            passes += 1
            # Phase 0 finds tau_k here; top-p is resolved too when the whole upper set is here.
            k_here = tl.where(by_mass, 0, k_eff)
            p_here = p_on & (by_mass | upper)
            tau_k, z_k, c_k, tp, best, bs = resolve(
                cand_v_ptr, cand_i_ptr, n, lo, tl.where(upper, 0, c_hi), tl.where(upper, 0.0, w_hi), k_here,
                tau_k, z_k, c_k, p_here, top_p, m, inv_t, min_p, seed, offset, STREAM, CAP, 2 * P)
            if p_here:
                tau_p = tp
            if is_final | upper:
                token = better(a_idx, a_s, best, bs)
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
def sample_row(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr, cand_v_ptr, cand_i_ptr,
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
        n_nan, n_pinf, n_fin, first_pinf, m, amax, x_min, w_idx = stats_pass(
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
        token = sample_pass(src_ptr, stride_m, stride_v, V, mix_c, mix_pinf, M, submax_ptr, tilemax_ptr,
                             tl.maximum(tau_k, tau_p), s_m, s_inv_t, s_min_p, pinf_mode, seed, offset,
                             STREAM, SOURCE, MIX_PAD, NSUB, SUB)
        passes += 1
    return token, tau_k, tau_p, passes


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
