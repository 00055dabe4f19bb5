"""Helpers shared by the sampling / selection / mixture tests.

`exact_probs` is an independent float64 statement of the sampling semantics (pure numpy, one
row at a time), used as the ground truth of the chi-square tests; the torch reference and the
kernels are checked against it and against each other.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from me_kernels import reference as R
from me_kernels._philox import gumbel_torch

P_REJECT = 1e-4  # chi-square tests reject below this p-value (fixed seeds: deterministic)


def exact_probs(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray | None:
    """Probabilities of every token of one row after temperature -> top-k -> top-p -> min-p.
    None for a row that yields -1 (NaN, or every logit -inf)."""
    x = np.asarray(row, dtype=np.float64)
    if np.isnan(x).any():
        return None
    if np.isposinf(x).any():
        x = np.where(np.isposinf(x), 0.0, -np.inf)
    finite = np.isfinite(x)
    if not finite.any():
        return None
    m = x[finite].max()
    if temperature == 0:
        p = np.zeros_like(x)
        p[int(np.argmax(np.where(finite, x, -np.inf)))] = 1.0
        return p
    e = np.where(finite, np.exp((np.where(finite, x, m) - m) / temperature), 0.0)
    order = np.argsort(-np.where(finite, x, -np.inf), kind="stable")
    n_fin = int(finite.sum())
    keep = finite.copy()
    if 0 < top_k < n_fin:
        tau_k = x[order[top_k - 1]]
        keep &= x >= tau_k
    if top_p < 1:
        z_k = e[keep].sum()
        cum = 0.0
        tau_p = -np.inf
        for i in order:
            if not keep[i]:
                break
            cum += e[i]
            if cum >= top_p * z_k:
                tau_p = x[i]
                break
        keep &= x >= tau_p
    if min_p > 0:
        keep &= e >= min_p
    p = np.where(keep, e, 0.0)
    return p / p.sum()


def chi2_check(tokens, probs: np.ndarray, what: str) -> float:
    """Chi-square goodness of fit of drawn tokens to `probs`; tokens of probability 0 must never
    appear. Returns the p-value (asserts it is >= P_REJECT)."""
    tokens = np.asarray(torch.as_tensor(tokens).cpu())
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    n = tokens.size
    assert (tokens >= 0).all() and (tokens < probs.size).all(), f"{what}: token out of range"
    counts = np.bincount(tokens, minlength=probs.size)
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"{what}: drew tokens of probability 0: {np.nonzero(counts * zero)[0]}"
    obs, expected = counts[~zero].astype(np.float64), probs[~zero] * n
    # Cells expecting fewer than 5 draws are pooled into one (merged with the smallest other
    # cell if the pool itself is still under 5), as usual for a chi-square test.
    small = expected < 5
    if small.any():
        pool_o, pool_e = obs[small].sum(), expected[small].sum()
        obs, expected = obs[~small], expected[~small]
        if pool_e < 5:
            j = int(np.argmin(expected))
            obs[j] += pool_o
            expected[j] += pool_e
        else:
            obs, expected = np.append(obs, pool_o), np.append(expected, pool_e)
    if obs.size <= 1:
        return 1.0
    pval = stats.chisquare(obs, expected).pvalue
    assert pval >= P_REJECT, f"{what}: chi-square p = {pval:.2e}; counts {obs}, expected {expected.round(1)}"
    return pval


def reference_scores(logits, temperature, top_k, top_p, min_p, seed, offset, stream):
    """Reference Gumbel scores (-inf outside the kept set) and thresholds, for diagnosing mismatches."""
    x, _invalid, _ = R._prepare_rows(logits.to(torch.float32))
    b, v = x.shape
    temp, k, p, mp, _bad = R._sampling_rows(b, x.device, temperature, top_k, top_p, min_p)
    th = R.sampling_thresholds_reference(x, temp.clamp(min=0), k.clamp(min=0), p, mp)
    g = gumbel_torch(R._row_seeds(seed, b, x.device), R._row_seeds(offset, b, x.device), stream, v)
    score = (x - th["m"][:, None]) * th["inv_t"][:, None] + g
    return torch.where(th["kept"], score, torch.full_like(score, float("-inf"))), th, x


def assert_tokens_match(got, want, logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0,
                        stream=0, max_mismatch_frac=0.01):
    """Kernel tokens must equal the reference's. A differing row is accepted only when it is a
    genuine fp32 near-tie: both tokens kept by the reference and their Gumbel scores within 1e-4,
    or the kernel's token sitting exactly on a threshold (a top-p mass within 1e-5 of the target)."""
    got = got.cpu()
    want = want.cpu()
    diff = (got != want).nonzero().flatten().tolist()
    if not diff:
        return
    assert len(diff) <= max(1, int(max_mismatch_frac * got.numel())), \
        f"{len(diff)} of {got.numel()} rows differ: rows {diff[:10]} got {got[diff[:10]].tolist()} want {want[diff[:10]].tolist()}"
    score, th, x = reference_scores(logits.cpu(), _cpu(temperature), _cpu(top_k), _cpu(top_p), _cpu(min_p),
                                    _cpu(seed), _cpu(offset), stream)
    for r in diff:
        g, w = int(got[r]), int(want[r])
        assert g >= 0 and w >= 0, f"row {r}: got {g}, want {w}"
        sg, sw = float(score[r, g]), float(score[r, w])
        near_tie = sg > float("-inf") and abs(sg - sw) <= 1e-4 * max(1.0, abs(sw))
        on_edge = bool(x[r, g] == torch.maximum(th["tau_k"][r], th["tau_p"][r])) or bool(
            x[r, w] == torch.maximum(th["tau_k"][r], th["tau_p"][r]))
        assert near_tie or on_edge, f"row {r}: kernel token {g} (score {sg}) vs reference {w} (score {sw})"


def borderline_rows(x: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rel=1e-5) -> torch.Tensor:
    """bool [B]: rows whose kept set depends on fp32 rounding (a top-p crossing within `rel` of
    its target, or a value within `rel` of the min-p cut); kernels using a different exp or
    summation order may legitimately resolve them differently."""
    b = x.shape[0]
    temp, k, p, mp, _ = R._sampling_rows(b, x.device, temperature, top_k, top_p, min_p)
    th = R.sampling_thresholds_reference(x, temp, k, p, mp)
    e = torch.exp((x - th["m"][:, None]) * th["inv_t"][:, None]).double()
    e = torch.where(x > float("-inf"), e, torch.zeros_like(e))
    order = torch.argsort(x, dim=1, descending=True)
    es = e.gather(1, order)
    sv = x.gather(1, order)
    in_k = sv >= th["tau_k"][:, None]
    cum = torch.cumsum(es * in_k, dim=1)
    theta = p.double() * (es * in_k).sum(dim=1)
    # Only the cumulative mass at the end of each group of equal values decides the kept set.
    group_end = torch.ones_like(in_k)
    group_end[:, :-1] = sv[:, :-1] != sv[:, 1:]
    close_p = (((cum - theta[:, None]).abs() <= rel * theta[:, None]) & group_end).any(dim=1) & (p < 1)
    close_m = ((e - mp.double()[:, None]).abs() <= rel * mp.double()[:, None]).any(dim=1) & (mp > 0)
    return close_p | close_m


def _cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def llm_like_logits(batch: int, vocab: int, generator: torch.Generator, *, scale: float = 3.0) -> torch.Tensor:
    """Rows shaped like next-token logits: a Zipf-like decreasing profile over a random
    permutation plus noise (a few dominant tokens, a long tail)."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -scale * torch.log(ranks)
    rows = []
    for _ in range(batch):
        perm = torch.randperm(vocab, generator=generator)
        rows.append(base[perm] + torch.randn(vocab, generator=generator))
    return torch.stack(rows)
