"""Plain torch reference implementations of every me_kernels op.

These define the semantics. Tests and benchmarks compare the kernels against them, and CPU
tensors use them when the Triton interpreter is not enabled (and the compiled ops fall back to
them when me_kernels._C is not built).
"""
from __future__ import annotations

import torch

from ._philox import (STREAM_ACCEPT, STREAM_MEMBER, STREAM_MIXTURE, STREAM_RESIDUAL, STREAM_TOKEN, gumbel_torch,
                      philox_uniforms_torch)

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


# --------------------------------------------------------------------------------------------
# Sampling, member selection and mixtures (sort-based; the semantics of me_kernels.sampling,
# me_kernels.selection and me_kernels.mixture)
# --------------------------------------------------------------------------------------------
#
# Semantics shared with the kernels (one row b at a time; every parameter may differ per row):
#   * x = logits (fp32). A row containing NaN, or whose entries are all -inf, yields -1.
#     +inf logits are the limit of a logit growing without bound: a row with +inf entries
#     draws uniformly among them (greedy: the lowest-index one) and the transforms keep that
#     whole tie class. Implemented by remapping x to 0 on the +inf entries and -inf elsewhere.
#   * m = max finite x; the temperature-scaled weights are e_i = exp((x_i - m) / T) (computed as
#     (x_i - m) * (1 / T) in fp32). T = 0 (or 1 / T overflowing) is greedy: the lowest index of
#     the maximum. T = inf weighs every finite token equally, except that a token whose x_i - m
#     overflows the fp32 range (a row spanning more than it) weighs 0 at every temperature.
#   * Truncation in Hugging Face's order, each a threshold on x (the kept set is always
#     {x >= threshold}, so it is index-independent and keeps ties):
#       top-k (k > 0):  tau_k = k-th largest x (every token tying it is kept; k >= #finite: all);
#       top-p (p < 1):  over the top-k set, Z_k = sum of e over it, tau_p = the largest value v
#                       with sum(e_i : x_i >= v) >= p * Z_k (the crossing token and its ties kept);
#       min-p (mp > 0): keep e_i >= mp (i.e. p_i >= mp * p_max).
#   * Draw: Gumbel-max over the kept set, argmax_i (x_i - m) / T + G_i, with G_i the Gumbel noise
#     of element i in the Philox stream of the call (me_kernels._random): bit-identical to what
#     the kernels draw. Ties of the score resolve to the lowest index.
#   * Per-row tensor parameters out of range (possible only for device tensors, which are not
#     read on the host) yield -1 for that row.


def _row_values(value, batch: int, device, dtype) -> torch.Tensor:
    """Python scalar or tensor ([B] or 0-dim) -> tensor [B] of `dtype` on `device`."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device)
        if t.dim() == 0:
            t = t.reshape(1).expand(batch)
        return t.to(dtype)
    return torch.full((batch,), value, dtype=dtype, device=device)


def _row_seeds(value, batch: int, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return _row_values(value, batch, device, torch.int64)
    v = int(value) & ((1 << 64) - 1)
    if v >= 1 << 63:
        v -= 1 << 64
    return torch.full((batch,), v, dtype=torch.int64, device=device)


def _sampling_rows(batch, device, temperature, top_k, top_p, min_p):
    temp = _row_values(temperature, batch, device, torch.float32)
    if isinstance(top_k, torch.Tensor):
        k = top_k.to(device=device).to(torch.int64).clamp(max=(1 << 31) - 1)
        k = (k.reshape(1).expand(batch) if k.dim() == 0 else k).to(torch.int64)
    else:
        k = torch.full((batch,), min(int(top_k), (1 << 31) - 1), dtype=torch.int64, device=device)
    p = _row_values(top_p, batch, device, torch.float32)
    mp = _row_values(min_p, batch, device, torch.float32)
    bad = torch.isnan(temp) | (temp < 0) | (k < 0) | torch.isnan(p) | (p <= 0) | (p > 1)
    bad |= torch.isnan(mp) | (mp < 0) | (mp > 1)
    return temp, k, p, mp, bad


def _prepare_rows(x: torch.Tensor):
    """fp32 [B, V] -> (x with +inf remapped and NaN rows blanked, invalid-row mask, has +inf)."""
    nan_row = torch.isnan(x).any(dim=1)
    pinf = x == float("inf")
    has_pinf = pinf.any(dim=1)
    neg = torch.full_like(x, float("-inf"))
    x = torch.where(has_pinf[:, None], torch.where(pinf, torch.zeros_like(x), neg), x)
    x = torch.where(nan_row[:, None], neg, x)
    no_finite = ~(x > float("-inf")).any(dim=1)
    return x, nan_row | no_finite, has_pinf


def _no_nan(t: torch.Tensor, value: float) -> torch.Tensor:
    """NaN -> value, every other entry unchanged (torch.nan_to_num would also turn inf into the
    largest finite float: temperature = inf must stay inf)."""
    return torch.where(torch.isnan(t), torch.full_like(t, value), t)


def _scaled(x: torch.Tensor, m: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:
    """(x - m) * inv_t in fp32 for rows x [B, V], m and inv_t [B]. At T = inf (inv_t = 0) on a row
    whose finite values span more than the fp32 range, x - m overflows to -inf and -inf * 0 is NaN:
    such a token weighs 0 (-inf), as when x - m overflows at any other temperature."""
    s = (x - m[:, None]) * inv_t[:, None]
    return torch.where(torch.isnan(s) & (x > float("-inf")), torch.full_like(s, float("-inf")), s)


def sampling_thresholds_reference(x: torch.Tensor, temperature, top_k, top_p, min_p, *, sort: bool = True):
    """Sort-based truncation thresholds for fp32 logits x [B, V] without NaN or +inf (remap
    first). Parameters are tensors [B]. Returns a dict with m (row max), inv_t (1 / T), tau_k,
    tau_p (-inf where the filter is off), z (sum of e), z_k (mass of the top-k set) and kept
    (bool [B, V], the kept set; for greedy rows every entry equal to the maximum).
    sort=False may be passed when top-k and top-p are known to be off for every row."""
    neg = float("-inf")
    finite = x > neg
    n_fin = finite.sum(dim=1)
    m = x.max(dim=1).values
    m_safe = torch.where(m > neg, m, torch.zeros_like(m))
    greedy = temperature == 0
    inv_t = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature)
    greedy = greedy | torch.isinf(inv_t)
    inv_t = torch.where(greedy, torch.ones_like(inv_t), inv_t)

    def weight(v: torch.Tensor) -> torch.Tensor:
        e = torch.exp(_scaled(v, m_safe, inv_t))
        return torch.where(v > neg, e, torch.zeros_like(e))

    if not sort:
        neg_row = torch.full_like(m_safe, neg)
        z = weight(x).sum(dim=1)
        kept = finite & (weight(x) >= min_p[:, None])
        kept = torch.where(greedy[:, None], finite & (x == m[:, None]), kept)
        return {"m": m_safe, "inv_t": inv_t, "greedy": greedy, "tau_k": neg_row, "tau_p": neg_row, "z": z, "z_k": z,
                "kept": kept}
    sv = torch.sort(x, dim=1, descending=True).values
    es = weight(sv)
    k_eff = torch.where((top_k > 0) & (top_k < n_fin), top_k, torch.zeros_like(top_k))
    kth = sv.gather(1, (k_eff - 1).clamp(min=0)[:, None])[:, 0]
    tau_k = torch.where(k_eff > 0, kth, torch.full_like(kth, neg))
    z = es.sum(dim=1)
    z_k = torch.where(sv >= tau_k[:, None], es, torch.zeros_like(es)).sum(dim=1)
    theta = top_p * z_k
    reach = (torch.cumsum(es, dim=1) >= theta[:, None]) & (sv > neg)
    first = torch.where(reach.any(dim=1), reach.to(torch.int8).argmax(dim=1), (n_fin - 1).clamp(min=0))
    tau_p = torch.where(top_p < 1, sv.gather(1, first[:, None])[:, 0], torch.full_like(kth, neg))
    t_star = torch.maximum(tau_k, tau_p)
    kept = finite & (x >= t_star[:, None]) & (weight(x) >= min_p[:, None])
    kept = torch.where(greedy[:, None], finite & (x == m[:, None]), kept)
    return {"m": m_safe, "inv_t": inv_t, "greedy": greedy, "tau_k": tau_k, "tau_p": tau_p, "z": z,
            "z_k": z_k, "kept": kept}


def kept_mask_reference(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """bool [B, V]: the tokens that `sample` may return for each row (after +inf remapping; all
    False for a row that yields -1)."""
    x, invalid, _ = _prepare_rows(logits.to(torch.float32))
    temp, k, p, mp, bad = _sampling_rows(x.shape[0], x.device, temperature, top_k, top_p, min_p)
    kept = sampling_thresholds_reference(x, _no_nan(temp.clamp(min=0), 0.0), k.clamp(min=0),
                                         _no_nan(p, 1.0), _no_nan(mp, 0.0))["kept"]
    return kept & ~(invalid | bad)[:, None]


def _draw_from_scores(x, invalid, temperature, top_k, top_p, min_p, seed, offset, stream, uniforms):
    """Shared tail of sample / mixture_sample references: x fp32 [B, V] (+inf remapped)."""
    batch, vocab = x.shape
    temp, k, p, mp, bad = _sampling_rows(batch, x.device, temperature, top_k, top_p, min_p)
    # Host-known parameters that switch top-k and top-p off need no sort (the CPU path's plain
    # sampling); tensor parameters are not inspected (that could synchronise a device).
    no_sort = not isinstance(top_k, torch.Tensor) and top_k == 0 and not isinstance(top_p, torch.Tensor) and top_p >= 1
    th = sampling_thresholds_reference(x, _no_nan(temp.clamp(min=0), 0.0), k.clamp(min=0),
                                       _no_nan(p, 1.0), _no_nan(mp, 0.0), sort=not no_sort)
    g = gumbel_torch(_row_seeds(seed, batch, x.device), _row_seeds(offset, batch, x.device), stream, vocab, uniforms)
    score = _scaled(x, th["m"], th["inv_t"]) + g
    score = torch.where(th["kept"], score, torch.full_like(score, float("-inf")))
    token = score.argmax(dim=1)
    token = torch.where(th["greedy"], x.argmax(dim=1), token)
    return torch.where(invalid | bad, torch.full_like(token, -1), token)


def sample_reference(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0,
                     offset=0, stream: int | None = None, uniforms=None) -> torch.Tensor:
    """Sort-based reference of me_kernels.sample: int64 [B] (see the semantics above).

    Vectorised over the batch (no Python loop over rows): this is also the CPU path. `stream`
    defaults to the token stream of `sample`. `uniforms(seed, offset, stream, n)` computes the
    Philox uniforms (default: me_kernels._philox.philox_uniforms_torch; any replacement must
    draw the same numbers, like the compiled CPU helper the registered CPU op passes).
    """
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    x, invalid, _ = _prepare_rows(logits.to(torch.float32))
    return _draw_from_scores(x, invalid, temperature, top_k, top_p, min_p, seed, offset,
                             STREAM_TOKEN if stream is None else stream, uniforms)


def _weight_rows(weights: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [M] or [B, M] -> (fp32 [B, M], bad-row mask [B])."""
    w = weights.to(torch.float32)
    if w.dim() == 1:
        w = w[None, :].expand(batch, -1)
    bad = (torch.isnan(w) | torch.isinf(w) | (w < 0)).any(dim=1) | ~(w.sum(dim=1) > 0)
    return w, bad


def select_members_reference(weights: torch.Tensor, *, seed=0, offset=0, batch: int | None = None,
                             uniforms=None) -> torch.Tensor:
    """Reference of me_kernels.select_members: int32 [B], argmax_m log w_m + G_m in Philox stream
    STREAM_MEMBER; -1 for a bad weight row (NaN, negative, infinite, all zero). `uniforms`: as
    for `sample_reference`."""
    b = weights.shape[0] if weights.dim() == 2 else int(batch)
    w, bad = _weight_rows(weights, b)
    if b == 0:
        return torch.empty(0, dtype=torch.int32, device=weights.device)
    g = gumbel_torch(_row_seeds(seed, b, w.device), _row_seeds(offset, b, w.device), STREAM_MEMBER, w.shape[1],
                     uniforms)
    score = torch.where(w > 0, torch.log(w) + g, torch.full_like(g, float("-inf")))
    j = score.argmax(dim=1)
    return torch.where(bad, torch.full_like(j, -1), j).to(torch.int32)


def mixture_logprobs_reference(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_m wbar_m softmax(logits[m]) as float32 [B, V], wbar = w / sum(w) per row.

    Members with zero weight are ignored. A member with +inf logits contributes the uniform
    distribution over its +inf entries. Rows with bad weights, or where a member of positive
    weight has a NaN or no logit above -inf, are NaN.
    """
    num_members, batch, vocab = logits.shape
    l = logits.to(torch.float32)
    w, bad = _weight_rows(weights, batch)  # [B, M]
    has_nan = torch.isnan(l).any(dim=2)  # [M, B], before the +inf remap below erases the NaN
    pinf = l == float("inf")
    has_pinf = pinf.any(dim=2)  # [M, B]
    neg = torch.full_like(l, float("-inf"))
    l = torch.where(has_pinf[..., None], torch.where(pinf, torch.zeros_like(l), neg), l)
    positive = (w > 0).t()  # [M, B]
    member_bad = (has_nan | ~(l > float("-inf")).any(dim=2)) & positive
    bad = bad | member_bad.any(dim=0)
    lse = torch.logsumexp(l, dim=2)  # [M, B]
    log_w = torch.log(w / w.sum(dim=1, keepdim=True)).t()  # [M, B]
    c = torch.where(positive, log_w - lse, torch.full_like(lse, float("-inf")))
    y = torch.where(positive[..., None], l + c[..., None], neg)
    out = torch.logsumexp(y, dim=0)
    return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def mixture_sample_reference(logits: torch.Tensor, weights: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0,
                             min_p=0.0, seed=0, offset=0, uniforms=None) -> torch.Tensor:
    """Reference of me_kernels.mixture_sample: the transforms applied to the mixture
    log-probabilities, then a draw in Philox stream STREAM_MIXTURE. int64 [B]; -1 for rows whose
    mixture is NaN (bad weights or a bad member row). `uniforms`: as for `sample_reference`."""
    x = mixture_logprobs_reference(logits, weights)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    invalid = torch.isnan(x).any(dim=1)
    x = torch.where(invalid[:, None], torch.full_like(x, float("-inf")), x)
    invalid = invalid | ~(x > float("-inf")).any(dim=1)
    return _draw_from_scores(x, invalid, temperature, top_k, top_p, min_p, seed, offset, STREAM_MIXTURE,
                             uniforms)


def me_step_reference(logits: torch.Tensor, weights: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0,
                      min_p=0.0, seed=0, offset=0, shared: bool = False,
                      uniforms=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of me_kernels.me_step: (sample(logits, ..., seed, offset),
    select_members(weights, seed, offset + 1)); with shared=True row 0's weights, seed and offset
    draw one member for every row. `uniforms`: as for `sample_reference`."""
    batch = logits.shape[0]
    tokens = sample_reference(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              seed=seed, offset=offset, uniforms=uniforms)
    seeds = _row_seeds(seed, batch, logits.device)
    offsets = _row_seeds(offset, batch, logits.device) + 1
    if not shared:
        members = select_members_reference(weights, seed=seeds, offset=offsets, batch=batch, uniforms=uniforms)
        return tokens, members
    if batch == 0:
        return tokens, torch.empty(0, dtype=torch.int32, device=logits.device)
    w0 = weights[0] if weights.dim() == 2 else weights
    one = select_members_reference(w0, seed=seeds[:1], offset=offsets[:1], batch=1, uniforms=uniforms)
    return tokens, one.expand(batch).clone()


# --------------------------------------------------------------------------------------------
# Speculative verification of drafted tokens (exact CE by drafting)
# --------------------------------------------------------------------------------------------
#
# Semantics of me_kernels.verify_draft, for one row b (every position j < num_drafts[b]):
#   p_j = the distribution mixture_sample draws from at position j: the transforms applied to
#         log sum_m w_m softmax(target_logits[m, b, j]);
#   q_j = the distribution sample draws from for draft_logits[b, j] (the drafter's own logits);
#   x_j = draft_tokens[b, j], drawn from q_j by the caller.
# Position j is accepted when u_j * q_j(x_j) < p_j(x_j), u_j the uniform of (seed, offset + j) in
# STREAM_ACCEPT (so with probability min(1, p_j(x_j) / q_j(x_j))). num_accepted = the number of
# leading accepted positions n; if n < num_drafts[b] the token at position n is drawn from the
# residual normalise(max(0, p_n - q_n)) by Gumbel-max with the noise of (seed, offset + n) in
# STREAM_RESIDUAL (from p_n when the residual is empty, which only float rounding can cause);
# else the residual token is -1. The row then emits draft_tokens[b, :n] and, when n <
# num_drafts[b], the residual token. Greedy rows (temperature 0) have one-hot p and q (lowest
# index of the maximum): a draft is accepted iff it is the mixture's argmax, the residual token is
# the mixture's argmax. A draft id outside [0, V) is rejected; an invalid drafter row (NaN, no
# finite logit) has q = 0 (its draft is rejected, the residual is p). A row whose mixture is
# invalid at a position it reaches, or whose parameters are out of range, returns (0, -1).
# Every decision at position j uses only the noise of offset + j: the emitted token at absolute
# position offset + j does not depend on where a round of drafts began or ended.


def transformed_probs_reference(x: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution `sample` draws from: fp32 logits x [B, V] -> (probs fp32 [B, V], invalid
    bool [B]). Greedy rows are one-hot at the lowest index of the maximum; invalid rows (NaN, no
    finite value, parameters out of range) are all zero."""
    x, invalid, _ = _prepare_rows(x.to(torch.float32))
    temp, k, p, mp, bad = _sampling_rows(x.shape[0], x.device, temperature, top_k, top_p, min_p)
    th = sampling_thresholds_reference(x, _no_nan(temp.clamp(min=0), 0.0), k.clamp(min=0), _no_nan(p, 1.0),
                                       _no_nan(mp, 0.0))
    e = torch.exp(_scaled(x, th["m"], th["inv_t"]))
    e = torch.where(th["kept"], e, torch.zeros_like(e))
    probs = e / e.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    one_hot = torch.zeros_like(probs).scatter_(1, x.argmax(dim=1, keepdim=True), 1.0)
    probs = torch.where(th["greedy"][:, None], one_hot, probs)
    invalid = invalid | bad
    return torch.where(invalid[:, None], torch.zeros_like(probs), probs), invalid


def _per_position(value, batch: int, positions: int):
    """A per-row parameter (scalar or [B] / 0-dim tensor) -> one value per (row, position), rows
    major, as a [B * positions] tensor (scalars stay scalars)."""
    if isinstance(value, torch.Tensor):
        v = value.reshape(1).expand(batch) if value.dim() == 0 else value
        return v.repeat_interleave(positions)
    return value


def verify_draft_reference(target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_tokens: torch.Tensor,
                           weights: torch.Tensor, *, num_drafts=None, temperature=1.0, top_k=0, top_p=1.0,
                           min_p=0.0, seed=0, offset=0, uniforms=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of me_kernels.verify_draft (semantics above).

    target_logits [M, B, J, V] (every member's logits at each drafted position), draft_logits
    [B, J, V] (the drafter's logits there), draft_tokens int64 [B, J], weights [M] or [B, M],
    num_drafts int [B] (positions of each row that hold a draft; default J). Returns
    (num_accepted int64 [B], residual_token int64 [B]). `uniforms`: as for `sample_reference`.
    """
    num_members, batch, positions, vocab = target_logits.shape
    dev = target_logits.device
    if batch == 0 or positions == 0:
        return (torch.zeros(batch, dtype=torch.int64, device=dev), torch.full((batch,), -1, dtype=torch.int64, device=dev))
    w = weights.to(torch.float32)
    w = (w[None, :].expand(batch, -1) if w.dim() == 1 else w).repeat_interleave(positions, dim=0)  # [B*J, M]
    mix = mixture_logprobs_reference(target_logits.reshape(num_members, batch * positions, vocab), w)
    mix_bad = torch.isnan(mix).any(dim=1)
    mix = torch.where(mix_bad[:, None], torch.full_like(mix, float("-inf")), mix)
    args = [_per_position(v, batch, positions) for v in (temperature, top_k, top_p, min_p)]
    p, p_bad = transformed_probs_reference(mix, *args)
    q, q_bad = transformed_probs_reference(draft_logits.reshape(batch * positions, vocab), *args)
    p, q = p.reshape(batch, positions, vocab), q.reshape(batch, positions, vocab)
    p_bad = (p_bad | mix_bad).reshape(batch, positions)
    q_bad = q_bad.reshape(batch, positions)

    tokens = draft_tokens.to(torch.int64)
    in_range = (tokens >= 0) & (tokens < vocab)
    safe = tokens.clamp(0, vocab - 1)[..., None]
    p_x = torch.where(in_range, p.gather(2, safe)[..., 0], torch.zeros_like(tokens, dtype=torch.float32))
    q_x = torch.where(in_range, q.gather(2, safe)[..., 0], torch.zeros_like(tokens, dtype=torch.float32))
    seeds = _row_seeds(seed, batch, dev)
    offsets = _row_seeds(offset, batch, dev)
    steps = torch.arange(positions, device=dev)
    pos_seeds = seeds.repeat_interleave(positions)
    pos_offsets = (offsets[:, None] + steps[None, :]).reshape(-1)
    u = (uniforms or philox_uniforms_torch)(pos_seeds, pos_offsets, STREAM_ACCEPT, 1).reshape(batch, positions)
    # u * 0 < p_x would accept the draft of an invalid drafter row: it is rejected (the residual
    # max(0, p - 0) is then p itself, so the emitted token still follows p exactly)
    accept = (u * q_x < p_x) & ~p_bad & ~q_bad
    n_drafts = (torch.full((batch,), positions, dtype=torch.int64, device=dev) if num_drafts is None
                else _row_values(num_drafts, batch, dev, torch.int64).clamp(0, positions))
    live = steps[None, :] < n_drafts[:, None]
    accepted = torch.cumprod((accept & live).to(torch.int64), dim=1).sum(dim=1)

    # the residual draw at every position (only the one at `accepted` is used)
    r = (p - q).clamp(min=0)
    r = torch.where((r.sum(dim=2) > 0)[..., None], r, p)
    g = gumbel_torch(pos_seeds, pos_offsets, STREAM_RESIDUAL, vocab, uniforms).reshape(batch, positions, vocab)
    score = torch.where(r > 0, torch.log(r) + g, torch.full_like(r, float("-inf")))
    residual = score.argmax(dim=2)
    greedy = _row_values(temperature, batch, dev, torch.float32) == 0
    residual = torch.where(greedy[:, None], p.argmax(dim=2), residual)
    at = accepted.clamp(max=positions - 1)[:, None]
    token = residual.gather(1, at)[:, 0]
    token = torch.where(accepted < n_drafts, token, torch.full_like(token, -1))
    # a row that reaches a position with an invalid mixture, or with bad parameters, fails
    reached_bad = (p_bad & (steps[None, :] <= accepted[:, None]) & live).any(dim=1)
    temp, k, tp, mp, bad = _sampling_rows(batch, dev, temperature, top_k, top_p, min_p)
    failed = reached_bad | bad
    accepted = torch.where(failed, torch.zeros_like(accepted), accepted)
    token = torch.where(failed, torch.full_like(token, -1), token)
    return accepted, token
