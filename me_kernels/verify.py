"""Speculative verification of drafted tokens: the device half of exact CE by drafting.

ME drafts up to J tokens per request; every member then scores them in one multi-token forward;
`verify_draft` accepts a leading run of the drafts and draws a correction token so that the
emitted tokens follow CE's distribution exactly (for every temperature / top-k / top-p / min-p).
Semantics: the "Speculative verification" section of me_kernels.reference
(`verify_draft_reference`). For row b and drafted position j:

    p_j = the distribution mixture_sample draws from (transforms applied to the mixture),
    q_j = the distribution sample draws from for draft_logits[b, j],
    accept x_j iff u_j * q_j(x_j) < p_j(x_j)      u_j: Philox (seed, offset + j), STREAM_ACCEPT,
    residual at the first rejection n: Gumbel-max over max(0, p_n - q_n)   (STREAM_RESIDUAL).

Design
------
Four steps (four to six launches), no host synchronisation, no [B, J, V] probability tensor:
1. `mixture_logprobs` (me_kernels.mixture) of the B * J positions: x_p fp32 [B * J, V].
2. Only when top-k or top-p may be on: the `sample` kernel's debug entry on the x_p rows and on
   the draft rows gives each row's truncation thresholds tau_k, tau_p (the kept set is
   {x >= max(tau_k, tau_p)} & {exp((x - max) / T) >= min_p}), found without sorting by the
   row pipeline of me_kernels._rows. Its tokens are discarded.
3. `_verify_position_kernel`, one program per (b, j): B * J programs give the GPU J times the
   parallelism of a program per row at small B. Three passes over the two rows of the position:
   (a) NaN / +inf / finite counts and the max, (b) the kept-set normalisers Z_p and Z_q,
   (c) the residual draw with p_i = e_i / Z_p and q_i = e_i / Z_q computed on the fly, as if j
   were the first rejection (plus the Gumbel winner over p itself, for a residual that rounding
   left empty). The acceptance flag of j needs p_j(x_j) and q_j(x_j): two scalar loads.
   Greedy rows stop after (a): p and q are one-hot.
4. `_verify_combine_kernel`, one program per row: the leading-accept count n, the residual
   token of position n, and the failure rule (a row reaching an invalid mixture -> (0, -1)).

Every decision at position j uses only the noise of (seed, offset + j), so a position's outcome
does not depend on the batch, on J, or on where a round of drafts began.

Layout (as Liger-Kernel's ops): the Triton kernels, their launcher, the registered torch op
(me::verify_draft; schema in me_kernels._ops), then the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _ops
from ._dispatch import eager, on_device, use_triton
from ._philox import STREAM_ACCEPT, STREAM_RESIDUAL
from ._random import gumbel_tile, uniform_at
from ._row_passes import NEG_INF, POS_INF, load_row_params, row_param, tile_offsets
from ._rows import block_config
from ._validate import (SAMPLING_ROW_NAMES, RowParam, RowParams, check_draft_inputs, check_weights, count_param,
                        sampling_row_params)
from .mixture import _launch_logprobs
from .sampling import _launch_sample

__all__ = ["verify_draft"]

_ACCEPT_STREAM = tl.constexpr(STREAM_ACCEPT)
_RESIDUAL_STREAM = tl.constexpr(STREAM_RESIDUAL)
_NO_INDEX = tl.constexpr(2147483647)
_FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny, the reference's clamp


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_values(ptr, stride_v, offs, V, pinf_mode):
    """fp32 values of a tile; rows holding +inf are remapped to 0 on the +inf entries and -inf
    elsewhere (the limit of a logit growing without bound, as in the reference)."""
    x = tl.load(ptr + offs.to(tl.int64) * stride_v, mask=offs < V, other=NEG_INF).to(tl.float32)
    return tl.where(pinf_mode, tl.where(x == POS_INF, 0.0, NEG_INF), x)


@triton.jit
def _kept_weights(x, m, inv_t, tau, min_p):
    """exp((x - m) / T) on the kept set {x >= tau} & {weight >= min_p}, 0 elsewhere."""
    e = tl.exp((x - m) * inv_t)
    keep = (x > NEG_INF) & (x >= tau) & (e >= min_p)
    return tl.where(keep, e, 0.0)


@triton.jit
def _row_stats(ptr, stride_v, V, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Pass (a) over one row: (#NaN, #+inf, #finite, max finite, lowest index of that max,
    lowest +inf index). Per-lane accumulators, reduced once after the loop."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    zeros_i = tl.full([NSUB, SUB], 0, tl.int32)
    cnt_nan = zeros_i
    cnt_pinf = zeros_i
    cnt_fin = zeros_i
    first_pinf = zeros_i + _NO_INDEX
    lmax = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    lidx = zeros_i
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        offs = tile_offsets(t * BLOCK, NSUB, SUB)
        x = tl.load(ptr + offs.to(tl.int64) * stride_v, mask=offs < V, other=NEG_INF).to(tl.float32)
        is_pinf = x == POS_INF
        fin = (x > NEG_INF) & (x < POS_INF)
        cnt_nan += (x != x).to(tl.int32)
        cnt_pinf += is_pinf.to(tl.int32)
        cnt_fin += fin.to(tl.int32)
        first_pinf = tl.minimum(first_pinf, tl.where(is_pinf, offs, _NO_INDEX))
        xf = tl.where(fin, x, NEG_INF)
        up = xf > lmax  # strict: a lane keeps its lowest index of the maximum
        lidx = tl.where(up, offs, lidx)
        lmax = tl.where(up, xf, lmax)
        t += 1
    m = tl.max(lmax)
    amax = tl.min(tl.where(lmax == m, lidx, _NO_INDEX))
    return tl.sum(cnt_nan), tl.sum(cnt_pinf), tl.sum(cnt_fin), m, amax, tl.min(first_pinf)


@triton.jit
def _kept_mass(ptr, stride_v, V, pinf_mode, m, inv_t, tau, min_p, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Pass (b) over one row: Z = the sum of the kept weights."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    acc = tl.full([NSUB, SUB], 0.0, tl.float32)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        offs = tile_offsets(t * BLOCK, NSUB, SUB)
        acc += _kept_weights(_load_values(ptr, stride_v, offs, V, pinf_mode), m, inv_t, tau, min_p)
        t += 1
    return tl.sum(acc)


@triton.jit
def _prob_at(ptr, stride_v, idx, ok, pinf_mode, m, inv_t, tau, min_p, z, greedy, top):
    """The transformed probability of element idx of one row (0 where not ok)."""
    safe = tl.where(ok, idx, 0)
    x = tl.load(ptr + safe * stride_v).to(tl.float32)
    x = tl.where(pinf_mode, tl.where(x == POS_INF, 0.0, NEG_INF), x)
    p = tl.math.div_rn(_kept_weights(x, m, inv_t, tau, min_p), z)
    p = tl.where(greedy, tl.where(idx == top, 1.0, 0.0), p)
    return tl.where(ok, p, 0.0)


@triton.jit
def _lane_argbest(score, idx):
    """Lowest index among the best per-lane scores (-1 if every score is -inf)."""
    bs = tl.max(score)
    bi = tl.min(tl.where((score == bs) & (idx >= 0), idx, _NO_INDEX))
    return tl.where(bs > NEG_INF, bi, -1)


@triton.jit
def _residual_draw(p_ptr, q_ptr, stride_qv, V, p_pinf, q_pinf, q_valid, p_m, q_m, inv_t, p_tau, q_tau, min_p, zp, zq,
                   seed, offset, NSUB: tl.constexpr, SUB: tl.constexpr):
    """Pass (c): the Gumbel-max draw from max(0, p - q), or from p when that is all zero."""
    BLOCK: tl.constexpr = NSUB * SUB
    n_tiles = (V + BLOCK - 1) // BLOCK
    r_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    r_i = tl.full([NSUB, SUB], -1, tl.int32)
    p_s = tl.full([NSUB, SUB], NEG_INF, tl.float32)
    p_i = tl.full([NSUB, SUB], -1, tl.int32)
    t = 0
    while t < n_tiles:  # a while loop: the interpreter cannot range() over runtime scalars
        start = t * BLOCK
        offs = tile_offsets(start, NSUB, SUB)
        # div_rn: the reference's IEEE division (a GPU's default fp32 division is approximate);
        # it does not broadcast, hence the explicit [NSUB, SUB] denominators.
        e_p = _kept_weights(_load_values(p_ptr, 1, offs, V, p_pinf), p_m, inv_t, p_tau, min_p)
        e_q = _kept_weights(_load_values(q_ptr, stride_qv, offs, V, q_pinf), q_m, inv_t, q_tau, min_p)
        p = tl.math.div_rn(e_p, tl.zeros_like(e_p) + zp)
        q = tl.math.div_rn(e_q, tl.zeros_like(e_q) + zq)
        q = tl.where(q_valid, q, 0.0)
        r = tl.maximum(p - q, 0.0)
        g = gumbel_tile(start, seed, offset, _RESIDUAL_STREAM, NSUB, SUB)
        sr = tl.where(r > 0.0, tl.log(tl.where(r > 0.0, r, 1.0)) + g, NEG_INF)
        sp = tl.where(p > 0.0, tl.log(tl.where(p > 0.0, p, 1.0)) + g, NEG_INF)
        up = sr > r_s
        r_s = tl.where(up, sr, r_s)
        r_i = tl.where(up, offs, r_i)
        up = sp > p_s
        p_s = tl.where(up, sp, p_s)
        p_i = tl.where(up, offs, p_i)
        t += 1
    from_r = _lane_argbest(r_s, r_i)
    return tl.where(from_r >= 0, from_r, _lane_argbest(p_s, p_i))


@triton.jit(do_not_specialize=["temp_s", "topk_s", "topp_s", "minp_s", "seed_s", "off_s", "J"])
def _verify_position_kernel(
    mix_ptr, stride_xr, V, J,
    draft_ptr, stride_db, stride_dj, stride_dv,
    tok_ptr, stride_tb, stride_tj,
    tau_p_ptr, tau_q_ptr,
    temp_ptr, stride_temp, temp_s,
    topk_ptr, stride_topk, topk_s,
    topp_ptr, stride_topp, topp_s,
    minp_ptr, stride_minp, minp_s,
    seed_ptr, stride_seed, seed_s: tl.int64,
    off_ptr, stride_off, off_s: tl.int64,
    acc_ptr, bad_ptr, res_ptr,
    HAS_TAU: tl.constexpr,
    HAS_TEMP: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr,
    HAS_SEED: tl.constexpr, HAS_OFF: tl.constexpr,
    NSUB: tl.constexpr, SUB: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64)  # b * J + j
    b = pos // J
    j = pos % J
    temp, top_k, top_p, min_p, seed, offset = load_row_params(
        b, temp_ptr, stride_temp, temp_s, topk_ptr, stride_topk, topk_s, topp_ptr, stride_topp, topp_s, minp_ptr,
        stride_minp, minp_s, seed_ptr, stride_seed, seed_s, off_ptr, stride_off, off_s,
        HAS_TEMP, HAS_TOPK, HAS_TOPP, HAS_MINP, HAS_SEED, HAS_OFF)
    offset = offset + j
    params_bad = (temp != temp) | (temp < 0.0) | (top_k < 0) | (top_p != top_p) | (top_p <= 0.0) | (top_p > 1.0)
    params_bad = params_bad | (min_p != min_p) | (min_p < 0.0) | (min_p > 1.0)
    inv_t = tl.math.div_rn(1.0, tl.where(temp > 0.0, temp, 1.0))
    greedy = (temp == 0.0) | (inv_t == POS_INF)
    inv_t = tl.where(greedy, 1.0, inv_t)

    p_ptr = mix_ptr + pos * stride_xr
    q_ptr = draft_ptr + b * stride_db + j * stride_dj
    # (a) validity, max and the greedy token of both rows
    n_nan, n_pinf, n_fin, mx, amax, first_pinf = _row_stats(p_ptr, 1, V, NSUB, SUB)
    p_invalid = (n_nan > 0) | ((n_fin == 0) & (n_pinf == 0))
    p_pinf = n_pinf > 0
    p_m = tl.where(p_pinf, 0.0, tl.where(mx > NEG_INF, mx, 0.0))
    p_top = tl.where(p_pinf, first_pinf, amax)
    n_nan, n_pinf, n_fin, mx, amax, first_pinf = _row_stats(q_ptr, stride_dv, V, NSUB, SUB)
    q_invalid = (n_nan > 0) | ((n_fin == 0) & (n_pinf == 0))
    q_pinf = n_pinf > 0
    q_m = tl.where(q_pinf, 0.0, tl.where(mx > NEG_INF, mx, 0.0))
    q_top = tl.where(q_pinf, first_pinf, amax)
    p_tau = tl.full([], NEG_INF, tl.float32)
    q_tau = tl.full([], NEG_INF, tl.float32)
    if HAS_TAU:  # a +inf row keeps its whole +inf class: no threshold
        p_tau = tl.where(p_pinf, NEG_INF, tl.maximum(tl.load(tau_p_ptr + pos * 4), tl.load(tau_p_ptr + pos * 4 + 1)))
        q_tau = tl.where(q_pinf, NEG_INF, tl.maximum(tl.load(tau_q_ptr + pos * 4), tl.load(tau_q_ptr + pos * 4 + 1)))
    draws = ~greedy & ~p_invalid & ~params_bad
    # (b) the normalisers of the kept sets
    zp = tl.full([], 1.0, tl.float32)
    zq = tl.full([], 1.0, tl.float32)
    if draws:
        zp = tl.maximum(_kept_mass(p_ptr, 1, V, p_pinf, p_m, inv_t, p_tau, min_p, NSUB, SUB), _FP32_TINY)
        zq = tl.maximum(_kept_mass(q_ptr, stride_dv, V, q_pinf, q_m, inv_t, q_tau, min_p, NSUB, SUB), _FP32_TINY)
    # acceptance of the drafted token (an id outside [0, V) has p = q = 0: rejected)
    x = tl.load(tok_ptr + b * stride_tb + j * stride_tj).to(tl.int64)
    in_range = (x >= 0) & (x < V)
    p_x = _prob_at(p_ptr, 1, x, in_range & ~p_invalid, p_pinf, p_m, inv_t, p_tau, min_p, zp, greedy, p_top)
    q_x = _prob_at(q_ptr, stride_dv, x, in_range & ~q_invalid, q_pinf, q_m, inv_t, q_tau, min_p, zq, greedy, q_top)
    u = tl.sum(uniform_at(tl.zeros([1], tl.int32), seed, offset, _ACCEPT_STREAM), 0)
    # an invalid drafter row has q = 0, and u * 0 < p(x) must not accept its draft
    accept = (u * q_x < p_x) & ~p_invalid & ~q_invalid
    # (c) the residual token of this position, used only if it is the first rejection. Greedy:
    # p and q are one-hot, so the residual is p's token whether or not q agrees.
    token = p_top
    if draws:
        token = _residual_draw(p_ptr, q_ptr, stride_dv, V, p_pinf, q_pinf, ~q_invalid, p_m, q_m, inv_t, p_tau,
                               q_tau, min_p, zp, zq, seed, offset, NSUB, SUB)
    tl.store(acc_ptr + pos, accept.to(tl.int8))
    tl.store(bad_ptr + pos, (p_invalid | params_bad).to(tl.int8))
    tl.store(res_ptr + pos, token.to(tl.int64))


@triton.jit(do_not_specialize=["J", "nd_s"])
def _verify_combine_kernel(acc_ptr, bad_ptr, res_ptr, J, nd_ptr, stride_nd, nd_s, n_out_ptr, tok_out_ptr,
                           HAS_ND: tl.constexpr, J_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, J_PAD)
    in_j = jj < J
    n_drafts = row_param(nd_ptr, stride_nd, nd_s, row, HAS_ND, tl.int64)
    n_drafts = tl.minimum(tl.maximum(n_drafts, 0), J)  # device values are not checked on the host
    live = in_j & (jj < n_drafts)
    accept = tl.load(acc_ptr + row * J + jj, mask=in_j, other=0) != 0
    bad = tl.load(bad_ptr + row * J + jj, mask=in_j, other=0) != 0
    residual = tl.load(res_ptr + row * J + jj, mask=in_j, other=-1)
    n = tl.min(tl.where(accept & live, J_PAD, jj))  # the first position that stops the run
    token = tl.sum(tl.where(jj == n, residual, 0))
    token = tl.where(n < n_drafts, token, -1)
    failed = tl.max((bad & live & (jj <= n)).to(tl.int32)) > 0
    tl.store(n_out_ptr + row, tl.where(failed, 0, n).to(tl.int64))
    tl.store(tok_out_ptr + row, tl.where(failed, -1, token).to(tl.int64))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _per_position(param: RowParam, positions: int) -> RowParam:
    """A row parameter repeated for each of the row's positions (rows major)."""
    if param.tensor is None:
        return param
    return RowParam(param.tensor.repeat_interleave(positions), param.scalar)


def _may_truncate(rows: RowParams) -> bool:
    """Whether some row may use top-k or top-p (tensor parameters are not read: that could
    synchronise the device), i.e. whether thresholds must be searched."""
    k, p = rows["top_k"], rows["top_p"]
    return k.tensor is not None or p.tensor is not None or k.scalar != 0 or p.scalar < 1.0


def _thresholds(rows_2d: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """float32 [R, 4] of the sample kernel's debug entry; [:, 0] = tau_k, [:, 1] = tau_p."""
    info = torch.empty((rows_2d.shape[0], 4), dtype=torch.float32, device=rows_2d.device)
    _launch_sample(rows_2d, rows, debug=info)
    return info


def _launch_verify(target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_tokens: torch.Tensor,
                   weights: torch.Tensor, num_drafts: RowParam, rows: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    num_members, batch, positions, vocab = target_logits.shape
    device = target_logits.device
    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    tokens = torch.full((batch,), -1, dtype=torch.int64, device=device)
    if batch == 0 or positions == 0:
        return num_accepted, tokens
    n_pos = batch * positions
    # 1. the mixture at every position (reshape copies only targets whose B and J do not merge)
    w = weights if weights.dim() == 1 else weights.repeat_interleave(positions, dim=0)
    mix = _launch_logprobs(target_logits.reshape(num_members, n_pos, vocab), w)
    # 2. truncation thresholds of the p rows and the q rows
    has_tau = _may_truncate(rows)
    if has_tau:
        pos_rows = RowParams(temperature=_per_position(rows["temperature"], positions),
                             top_k=_per_position(rows["top_k"], positions),
                             top_p=_per_position(rows["top_p"], positions),
                             min_p=_per_position(rows["min_p"], positions),
                             seed=RowParam(None, 0), offset=RowParam(None, 0))
        tau_p = _thresholds(mix, pos_rows)
        tau_q = _thresholds(draft_logits.reshape(n_pos, vocab), pos_rows)
    else:
        tau_p = tau_q = mix  # never read (HAS_TAU is False)
    # 3. per position: acceptance flag, failure flag, residual token
    accept = torch.empty(n_pos, dtype=torch.int8, device=device)
    bad = torch.empty(n_pos, dtype=torch.int8, device=device)
    residual = torch.empty(n_pos, dtype=torch.int64, device=device)
    cfg = block_config(vocab, interpreted=device.type != "cuda")
    dummy = residual
    with on_device(device):
        _verify_position_kernel[(n_pos,)](
            mix, mix.stride(0), vocab, positions,
            draft_logits, draft_logits.stride(0), draft_logits.stride(1), draft_logits.stride(2),
            draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
            tau_p, tau_q,
            *rows.kernel_args(dummy),
            accept, bad, residual,
            HAS_TAU=has_tau, **rows.has_flags(),
            NSUB=cfg["NSUB"], SUB=cfg["SUB"], num_warps=cfg["num_warps"],
        )
        # 4. per row: leading accepted count and the residual token at the first rejection
        nd_ptr, nd_stride, nd_scalar = num_drafts.kernel_args(dummy)
        _verify_combine_kernel[(batch,)](
            accept, bad, residual, positions, nd_ptr, nd_stride, nd_scalar, num_accepted, tokens,
            HAS_ND=num_drafts.tensor is not None, J_PAD=triton.next_power_of_2(positions), num_warps=1,
        )
    return num_accepted, tokens


# --------------------------------------------------------------------------------------------
# Registered op: the CUDA implementation of me::verify_draft (CPU: me_kernels._ops)
# --------------------------------------------------------------------------------------------


def _verify_draft_cuda(target_logits, draft_logits, draft_tokens, weights, ndraft_t, ndraft_s,
                       *row) -> tuple[torch.Tensor, torch.Tensor]:
    use_triton(target_logits.device)  # raises if the kernels were imported for the interpreter
    return _launch_verify(target_logits, draft_logits, draft_tokens, weights, RowParam(ndraft_t, ndraft_s),
                          RowParams.from_flat(SAMPLING_ROW_NAMES, row))


_ops.register_cuda("verify_draft", _verify_draft_cuda)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def verify_draft(target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_tokens: torch.Tensor,
                 weights: torch.Tensor | list[float], *, num_drafts: int | torch.Tensor | None = None,
                 temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                 top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                 seed: int | torch.Tensor = 0, offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafted tokens against the CE mixture (speculative sampling): accept a leading run
    and draw the correction token, so the emitted tokens follow `mixture_sample`'s distribution.

    Args:
        target_logits: [M, B, J, V] float32 / bfloat16 / float16, every member's logits at the J
            drafted positions of each row (position j scores draft_tokens[b, j]; any strides).
        draft_logits: [B, J, V] float32 / bfloat16 / float16, the drafter's logits from which
            draft_tokens[b, j] was drawn with `sample` and the same parameters.
        draft_tokens: [B, J] integer; an id outside [0, V) is rejected.
        weights: [M] or [B, M] member weights (as for `mixture_logprobs`).
        num_drafts: None (every row holds J drafts), an int, or an integer tensor [B] in [0, J]:
            the positions of each row that hold a draft (later positions are ignored).
        temperature, top_k, top_p, min_p: as for `sample`, applied to the mixture (p) and to the
            draft logits (q) at every position of the row.
        seed, offset: as for `sample`. Position j of row b uses (seed[b], offset[b] + j): the
            acceptance uniform in Philox stream STREAM_ACCEPT, the residual draw in
            STREAM_RESIDUAL, so a position's outcome depends only on its absolute offset.
    Returns:
        (num_accepted int64 [B], token int64 [B]). Row b emits draft_tokens[b, :num_accepted[b]]
        then, if num_accepted[b] < num_drafts[b], `token[b]` (the residual draw from
        max(0, p - q) at the first rejection; greedy: the mixture's argmax); else token[b] is -1.
        Position j is accepted with probability min(1, p_j(x_j) / q_j(x_j)). A row that reaches
        a position whose mixture is undefined (see `mixture_logprobs`), or has a bad device
        parameter, gives (0, -1).

    No host synchronisation (the call can be captured in a CUDA graph with device weights and parameters).

    Example::

        >>> drafts = torch.stack([sample(l, top_p=0.9, seed=s, offset=t0 + j) for j, l in enumerate(steps)], 1)
        >>> target = torch.stack([m(ids_with_drafts).logits[:, -J - 1:-1] for m in members])  # [M, B, J, V]
        >>> n, tok = verify_draft(target, draft_logits, drafts, weights, top_p=0.9, seed=s, offset=t0)
        >>> emitted = [drafts[b, :n[b]].tolist() + ([tok[b].item()] if tok[b] >= 0 else []) for b in range(B)]
    """
    num_members, batch, positions, _vocab = check_draft_inputs(target_logits, draft_logits, draft_tokens)
    device = target_logits.device
    weights = check_weights(weights, "weights", device, num_members=num_members, batch=batch)
    nd = count_param(num_drafts, "num_drafts", batch, device, positions)
    rows = sampling_row_params(batch, device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               seed=seed, offset=offset)
    if eager() and use_triton(device):
        return _launch_verify(target_logits, draft_logits, draft_tokens, weights, nd, rows)
    return torch.ops.me.verify_draft(target_logits, draft_logits, draft_tokens, weights, nd.tensor, nd.scalar,
                                     *rows.flat())
