"""me_kernels.me_step: the fused ME decode step (the token of step t and the member of t + 1),
against its contract with sample / select_members and the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import me_kernels as K
from me_kernels import reference as R
from me_kernels._validate import RowParam, RowParams
from me_kernels.sampling import _launch_sample

from _sampling_testlib import P_REJECT, assert_tokens_match, chi2_check, exact_probs, llm_like_logits


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# me_step: the contract with sample / select_members
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [dict(), dict(top_p=0.9, temperature=0.8), dict(top_k=7, min_p=0.05),
                                    dict(temperature=0.0)], ids=["plain", "top_p", "top_k+min_p", "greedy"])
def test_me_step_contract(kernel_device, params):
    gen = _gen(31)
    b, v, m = 8, 512, 3
    d = kernel_device
    x = llm_like_logits(b, v, gen).to(d)
    w = torch.rand(b, m, generator=gen).to(d)
    seeds = torch.randint(0, 2**50, (b,), generator=gen).to(d)
    offsets = torch.randint(0, 100, (b,), generator=gen).to(d)
    tokens, members = K.me_step(x, w, seed=seeds, offset=offsets, **params)
    assert tokens.dtype == torch.int64 and members.dtype == torch.int32
    assert torch.equal(tokens, K.sample(x, seed=seeds, offset=offsets, **params))
    assert torch.equal(members, K.select_members(w, seed=seeds, offset=offsets + 1))
    ref_t, ref_m = R.me_step_reference(x.cpu(), w.cpu(), seed=seeds.cpu(), offset=offsets.cpu(), **params)
    assert_tokens_match(tokens, ref_t, x.cpu(), seed=seeds.cpu(), offset=offsets.cpu(), **params)
    assert torch.equal(members.cpu(), ref_m)


def test_me_step_shared_and_shared_weights(kernel_device):
    gen = _gen(32)
    b, v = 6, 304
    d = kernel_device
    x = llm_like_logits(b, v, gen).to(d)
    w_rows = torch.rand(b, 4, generator=gen).to(d)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], device=d)
    seeds = torch.tensor([5, 6, 7, 8, 9, 10], device=d)
    tokens, members = K.me_step(x, w_rows, seed=seeds, offset=4, shared=True, top_p=0.9)
    assert torch.equal(tokens, K.sample(x, seed=seeds, offset=4, top_p=0.9))
    one = K.select_members(w_rows[0], seed=seeds[:1], offset=5)
    assert members.tolist() == [int(one)] * b
    # [M] weights, Python int seed / offset; shared and independent.
    tokens2, members2 = K.me_step(x, w, seed=77, offset=9)
    assert torch.equal(members2, K.select_members(w, seed=77, offset=10, batch=b))
    _, members3 = K.me_step(x, w, seed=77, offset=9, shared=True)
    assert members3.tolist() == [int(K.select_members(w, seed=77, offset=10, batch=1))] * b


def test_me_step_token_and_member_are_independent():
    """Joint frequencies of (token, member) from the fused step factorise (reference path, whose
    random numbers are bit-identical to the kernel's)."""
    n = 20000
    x = torch.zeros(n, 3)
    tokens, members = R.me_step_reference(x, torch.tensor([0.3, 0.7]), seed=torch.arange(n), offset=0)
    table = np.zeros((3, 2))
    np.add.at(table, (tokens.numpy(), members.numpy()), 1)
    assert stats.chi2_contingency(table).pvalue >= P_REJECT
    chi2_check(members.long(), np.array([0.3, 0.7]), "me_step members")
    chi2_check(tokens, exact_probs([0.0, 0.0, 0.0]), "me_step tokens")


def test_me_step_bad_device_weight_row(kernel_device):
    x = torch.randn(3, 48, generator=_gen(2)).to(kernel_device)
    w = torch.tensor([[1.0, 1.0], [0.0, 0.0], [float("nan"), 1.0]], device=kernel_device)
    p = RowParam(None, 1.0)
    rows = RowParams(temperature=p, top_k=RowParam(None, 0), top_p=p, min_p=RowParam(None, 0.0),
                     seed=RowParam(None, 1), offset=RowParam(None, 0))
    tokens, members = _launch_sample(x, rows, weights=w)
    assert members.tolist()[1:] == [-1, -1] and int(members[0]) in (0, 1)
    assert (tokens >= 0).all()


STEP_ERRORS = [
    (lambda: K.me_step(torch.zeros(2, 5), torch.tensor([1.0, -1.0])), ValueError, "non-negative"),
    (lambda: K.me_step(torch.zeros(2, 5), torch.ones(3, 2)), ValueError, "has 3 rows but the batch has B=2"),
    (lambda: K.me_step(torch.zeros(2, 5), torch.ones(2), shared=1), TypeError, "shared must be a bool"),
    (lambda: K.me_step(torch.zeros(2, 5), torch.ones(2), top_p=2.0), ValueError, "top_p"),
    (lambda: K.me_step(torch.zeros(2, 5, 1), torch.ones(2)), ValueError, "logits must be 2-D"),
]


@pytest.mark.parametrize("call,exc,match", STEP_ERRORS, ids=[m for _, _, m in STEP_ERRORS])
def test_me_step_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_me_step_replay():
    """Capture one ME step with device seed / offset tensors; replays with new values give the
    eager results (no host sync inside the step)."""
    gen = _gen(40)
    b, v = 16, 32000
    x = llm_like_logits(b, v, gen).cuda()
    w = torch.rand(b, 3, generator=gen).cuda()
    seeds = torch.arange(b, device="cuda", dtype=torch.int64)
    offsets = torch.zeros(b, device="cuda", dtype=torch.int64)
    params = dict(top_p=0.9, temperature=0.8, top_k=50)
    K.me_step(x, w, seed=seeds, offset=offsets, **params)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, members = K.me_step(x, w, seed=seeds, offset=offsets, **params)
    for step in range(4):
        offsets.fill_(step)
        seeds.copy_(torch.arange(b, device="cuda") * (step + 3))
        x.copy_(llm_like_logits(b, v, gen).cuda())
        graph.replay()
        want_t, want_m = K.me_step(x, w, seed=seeds, offset=offsets, **params)
        assert torch.equal(tokens, want_t) and torch.equal(members, want_m)
