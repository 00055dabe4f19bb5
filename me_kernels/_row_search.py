"""Register-level threshold search of the row pipeline (me_kernels._rows): no memory passes.

Helpers that decide thresholds from values already in registers: the order-preserving fp32 <->
int key maps, the exact threshold among the compacted candidates (`resolve`, a bracket search,
no sort), the bracket update from a pass's pivot counts / masses (`bracket`), the pivots of a
refinement pass (`refine_pivots`) and the better of two Gumbel winners (`better`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._random import gumbel_at
from ._row_passes import NEG_INF, POS_INF

__all__ = ["f2k", "k2f", "resolve", "bracket", "refine_pivots", "better"]


@triton.jit
def f2k(x):
    """fp32 -> int64 key with the same order as the values (-0.0 and +0.0 share key 0), used to
    split brackets evenly and to compare candidates as integers."""
    b = x.to(tl.int32, bitcast=True)
    k = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return tl.where(k == -1, 0, k).to(tl.int64)


@triton.jit
def k2f(k):
    k32 = k.to(tl.int32)
    return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)



@triton.jit
def _candidate_threshold(kv, e, live, base, target, by_mass, P: tl.constexpr):
    """Exact threshold among register candidates, without sorting.

    kv / e: candidate keys (f2k of the values) and weights [CAP]; live: which ones take part;
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
        v_lo = k2f(k_lo)
        v_hi = k2f(k_hi)
        v_piv = f2k(v_lo + (v_hi - v_lo) * ((j + 1).to(tl.float32) / (H + 1)))
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
    return k2f(tl.where(k_lo >= BIG, k_min, k_lo))


@triton.jit
def resolve(cand_v_ptr, cand_i_ptr, n, lo, c_top, w_top, k_eff, tau_k, z_k, c_k, p_on, top_p, m, inv_t, min_p,
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
    e = tl.exp((v - m) * inv_t)
    e = tl.where(valid & (e == e), e, 0.0)  # NaN (T = inf, x - m overflowing) weighs 0, as in pivot_pass
    kv = f2k(v)
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
def bracket(piv, C, W, crit, lo, c_lo, w_lo, hi, c_hi, w_hi):
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
def refine_pivots(lo, c_lo, w_lo, hi, c_hi, w_hi, target, by_mass, m, inv_t, P: tl.constexpr):
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
    k_lo = f2k(lo)
    k_hi = f2k(hi)
    key_piv = k2f(k_lo + ((k_hi - k_lo) * (j - (P - 3)).to(tl.int64)) // 3)
    return tl.where(j < P - 2, val_piv, key_piv)


@triton.jit
def better(i_a, s_a, i_b, s_b):
    """Index of the better of two Gumbel candidates (higher score; lower index on ties)."""
    take_b = (i_b >= 0) & ((i_a < 0) | (s_b > s_a) | ((s_b == s_a) & (i_b < i_a)))
    return tl.where(take_b, i_b, i_a)

