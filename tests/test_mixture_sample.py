"""me_kernels.mixture_sample: the conventional-ensemble (CE) step (its log-probabilities:
tests/test_mixture_logprobs.py)."""
from __future__ import annotations

import os

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R
from me_kernels._philox import STREAM_MIXTURE
from me_kernels.mixture import mixture_sample_thresholds

from _sampling_testlib import assert_tokens_match, chi2_check, exact_probs, llm_like_logits

NEG, INF, NAN = float("-inf"), float("inf"), float("nan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MIX_CONFIGS = [dict(), dict(temperature=0.0), dict(top_p=0.9), dict(top_k=20, top_p=0.8, temperature=0.7),
               dict(min_p=0.05), dict(top_k=3)]


@pytest.mark.parametrize("params", MIX_CONFIGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "plain")
def test_mixture_sample_matches_reference(kernel_device, params):
    gen = _gen(3)
    m, b, v = (3, 6, 512) if kernel_device.type == "cpu" else (3, 128, 32000)
    logits = torch.stack([llm_like_logits(b, v, gen) for _ in range(m)])
    weights = torch.rand(b, m, generator=gen) + 0.1
    seeds = torch.randint(0, 2**40, (b,), generator=gen)
    got = K.mixture_sample(logits.to(kernel_device), weights.to(kernel_device), seed=seeds.to(kernel_device),
                           offset=4, **params)
    want = R.mixture_sample_reference(logits, weights, seed=seeds, offset=4, **params)
    x = R.mixture_logprobs_reference(logits, weights)
    assert_tokens_match(got, want, x, seed=seeds, offset=4, stream=STREAM_MIXTURE, **params)


def test_mixture_thresholds_through_refinement(kernel_device):
    """A small candidate capacity forces the bracket-refinement path on the mixture values."""
    gen = _gen(4)
    m, b, v = 2, 4, 1200
    logits = torch.randn(m, b, v, generator=gen) * 0.5
    w = torch.tensor([0.6, 0.4])
    x = R.mixture_logprobs_reference(logits, w)
    for params in (dict(top_p=0.7), dict(top_k=25, top_p=0.9)):
        tokens, info = mixture_sample_thresholds(logits.to(kernel_device), w.to(kernel_device), cap=16,
                                                 seed=torch.arange(b).to(kernel_device), **params)
        ref = R.sampling_thresholds_reference(x, torch.ones(b), torch.full((b,), params.get("top_k", 0)),
                                              torch.full((b,), params["top_p"]), torch.zeros(b))
        t_star = torch.maximum(info[:, 0], info[:, 1]).cpu()
        # Mixture values differ from the reference's by float rounding: compare kept sets with a
        # margin (no value may lie within 1e-5 of the threshold for a strict comparison).
        kept_kernel = x >= t_star[:, None]
        near = ((x - t_star[:, None]).abs() < 1e-5).any(dim=1)
        assert torch.equal(kept_kernel[~near], ref["kept"][~near])
        assert (info[:, 2] >= 3).all()
        assert_tokens_match(tokens, R.mixture_sample_reference(logits, w, seed=torch.arange(b), **params), x,
                            seed=torch.arange(b), stream=STREAM_MIXTURE, **params)


def test_mixture_sample_chi_square(kernel_device):
    """Exact mixture probabilities: two members over 6 tokens (reference: many draws; kernel:
    end to end with fewer draws under the interpreter)."""
    l = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -2.0], [-1.0, 0.0, 2.5, 1.0, 0.2, 0.0]])
    w = torch.tensor([0.7, 0.3])
    mix = torch.log(0.7 * torch.softmax(l[0].double(), -1) + 0.3 * torch.softmax(l[1].double(), -1))
    for params, n_kernel in ((dict(), 100), (dict(top_p=0.8, temperature=0.8), 150)):
        probs = exact_probs(mix.tolist(), **params)
        n = 30000
        tokens = R.mixture_sample_reference(l[:, None, :].expand(-1, n, -1), w, seed=torch.arange(n), **params)
        chi2_check(tokens, probs, f"mixture reference {params}")
        if kernel_device.type == "cpu" and not params:
            continue  # interpreter budget: the plain mixture draw is checked row by row against the reference
        n = n_kernel if kernel_device.type == "cpu" else 100000
        logits = l[:, None, :].expand(-1, n, -1).to(kernel_device)
        tokens = K.mixture_sample(logits, w.to(kernel_device), seed=torch.arange(n, device=kernel_device) + 9,
                                  **params)
        chi2_check(tokens, probs, f"mixture kernel {params}")


def test_mixture_sample_special_rows(kernel_device):
    l = torch.randn(2, 4, 48, generator=_gen(5))
    l[0, 0, 3] = NAN           # -> -1
    l[:, 1, :] = NEG           # -> -1
    l[1, 2, [7, 8]] = INF      # member 1 uniform over {7, 8}; with weight 0.5 they dominate
    w = torch.tensor([0.5, 0.5])
    got = K.mixture_sample(l.to(kernel_device), w.to(kernel_device), seed=torch.arange(4).to(kernel_device),
                           top_p=0.5, temperature=0.5)
    assert got[:2].tolist() == [-1, -1] and int(got[2]) in (7, 8) and int(got[3]) >= 0
    assert torch.equal(got.cpu(), R.mixture_sample_reference(l, w, seed=torch.arange(4), top_p=0.5, temperature=0.5))


def test_mixture_sample_bf16_non_contiguous(kernel_device):
    gen = _gen(6)
    full = torch.randn(3, 4, 2, 304, generator=gen).bfloat16().to(kernel_device)
    logits = full[:, :, -1, :]  # [M, B, V] view, row stride 2 * V
    assert not logits.is_contiguous()
    w = torch.tensor([1.0, 2.0, 3.0], device=kernel_device)
    seeds = torch.arange(4, device=kernel_device)
    a = K.mixture_sample(logits, w, top_k=10, seed=seeds)
    assert torch.equal(a, K.mixture_sample(logits.contiguous(), w, top_k=10, seed=seeds))
    assert torch.equal(a.cpu(), R.mixture_sample_reference(logits.cpu(), w.cpu(), top_k=10, seed=seeds.cpu()))
    lp = K.mixture_logprobs(logits, w)
    assert torch.allclose(lp.cpu(), R.mixture_logprobs_reference(logits.cpu(), w.cpu()), atol=1e-5)


def test_mixture_cpu_reference_path(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    l = torch.randn(2, 3, 112, generator=_gen(7))
    w = torch.tensor([0.3, 0.7])
    assert torch.equal(K.mixture_sample(l, w, top_p=0.9, seed=torch.arange(3)),
                       R.mixture_sample_reference(l, w, top_p=0.9, seed=torch.arange(3)))


MIX_ERRORS = [
    (lambda: K.mixture_sample(torch.zeros(2, 5), torch.ones(2)), ValueError, "logits must be 3-D"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5), torch.ones(3)), ValueError, "3 member weights but there are 2"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5), torch.ones(4, 2)), ValueError, "has 4 rows but the batch has B=3"),
    (lambda: K.mixture_sample(torch.zeros(0, 3, 5), torch.ones(0)), ValueError, "at least one member"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5), torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5), torch.zeros(2)), ValueError, "all zero"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5), torch.ones(2), top_k=-1), ValueError, "top_k"),
    (lambda: K.mixture_sample(torch.zeros(2, 3, 5, dtype=torch.int32), torch.ones(2)), TypeError, "float32"),
]


@pytest.mark.parametrize("call,exc,match", MIX_ERRORS, ids=[m for _, _, m in MIX_ERRORS])
def test_mixture_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
def test_cuda_mixture_large():
    gen = _gen(8)
    m, b, v = 3, 64, 152064
    logits = torch.stack([llm_like_logits(b, v, gen) for _ in range(m)]).bfloat16()
    w = torch.tensor([0.5, 0.3, 0.2])
    seeds = torch.arange(b)
    got = K.mixture_sample(logits.cuda(), w.cuda(), top_p=0.9, seed=seeds.cuda())
    want = R.mixture_sample_reference(logits.cuda(), w.cuda(), top_p=0.9, seed=seeds.cuda())
    x = R.mixture_logprobs_reference(logits, w)
    assert_tokens_match(got, want, x, top_p=0.9, seed=seeds, stream=STREAM_MIXTURE)
    lp = K.mixture_logprobs(logits.cuda(), w.cuda())
    assert torch.allclose(lp.cpu(), x, atol=2e-5)


def test_mixture_is_batch_invariant_bitwise(kernel_device):
    # The per-member log-sum-exp is merged from per-chunk partials: the chunking must depend on
    # the vocabulary only, or a row's values change with the batch size (and the GPU's SM count).
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 8, 8000, generator=gen) * 6).to(kernel_device)
    w = torch.tensor([0.5, 0.3, 0.2], device=kernel_device)
    seeds = torch.arange(8, device=kernel_device)
    tokens = K.mixture_sample(logits, w, top_p=0.9, seed=seeds, offset=2)
    for b in (0, 5):
        one = K.mixture_sample(logits[:, b : b + 1], w, top_p=0.9, seed=seeds[b : b + 1], offset=2)
        assert int(one[0]) == int(tokens[b])
