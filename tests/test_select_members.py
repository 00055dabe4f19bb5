"""me_kernels.select_members (the fused ME step's member draw: tests/test_me_step.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats

import me_kernels as K
from me_kernels import reference as R
from me_kernels._validate import RowParam, RowParams
from me_kernels.selection import _launch_select_members

from _sampling_testlib import P_REJECT, chi2_check


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# select_members
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 0.0, 3.0, 2.0, 0.5], [2.0, 2.0], [7.0]])
def test_select_members_chi_square(kernel_device, weights):
    n = 20000
    w = torch.tensor(weights, device=kernel_device)
    z = K.select_members(w, seed=torch.arange(n, device=kernel_device) + 11, offset=3)
    assert z.dtype == torch.int32 and z.shape == (n,)
    probs = np.array(weights) / sum(weights)
    chi2_check(z.long(), probs, f"select_members {weights}")
    assert torch.equal(z.cpu(), R.select_members_reference(w.cpu(), seed=torch.arange(n) + 11, offset=3, batch=n))


def test_select_members_per_row_weights(kernel_device):
    n = 6000
    w = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]], device=kernel_device)
    rows = w.repeat(n, 1)
    z = K.select_members(rows, seed=torch.arange(3 * n, device=kernel_device), offset=0).cpu().view(n, 3)
    for r in range(3):
        chi2_check(z[:, r].long(), w[r].cpu().numpy() / float(w[r].sum()), f"row weights {w[r].tolist()}")
    assert (z[:, 1] == 2).all()


def test_select_members_determinism_and_batch_invariance(kernel_device):
    w = torch.tensor([0.25, 0.25, 0.25, 0.25], device=kernel_device)
    seeds = torch.arange(300, device=kernel_device) * 7
    a = K.select_members(w, seed=seeds, offset=5)
    assert torch.equal(a, K.select_members(w, seed=seeds, offset=5))
    assert (a != K.select_members(w, seed=seeds, offset=6)).float().mean() > 0.6
    # Row 123 alone and at another position in another batch.
    alone = K.select_members(w, seed=seeds[123:124], offset=5)
    other = torch.randint(0, 1000, (50,), generator=_gen(1)).to(kernel_device)
    other[17] = seeds[123]
    assert int(alone) == int(a[123]) == int(K.select_members(w, seed=other, offset=5)[17])
    # [M] weights with batch=B equal the broadcast [B, M] weights; int seeds broadcast too.
    assert torch.equal(K.select_members(w, seed=9, offset=1, batch=40),
                       K.select_members(w.expand(40, -1), seed=torch.full((40,), 9, device=kernel_device), offset=1))


def test_select_members_bad_device_weights_yield_minus_one(kernel_device):
    """CUDA weights are not read on the host: bad rows map to -1 in the kernel (called here
    below the host checks, which raise for CPU weights)."""
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, -1.0], [nan, 1.0], [inf, 1.0], [0.0, 3.0]], device=kernel_device)
    z = _launch_select_members(w, RowParams(seed=RowParam(None, 4), offset=RowParam(None, 0)), 6)
    assert z.tolist()[1:] == [-1, -1, -1, -1, 1] and int(z[0]) in (0, 1)
    assert torch.equal(z.cpu(), R.select_members_reference(w.cpu(), seed=4))


def test_select_members_uses_its_own_stream():
    """Same (seed, offset): the member draw is independent of the token draw of `sample`."""
    n = 20000
    seeds = torch.arange(n)
    z = R.select_members_reference(torch.tensor([0.5, 0.5]), seed=seeds, offset=0, batch=n)
    t = R.sample_reference(torch.zeros(n, 2), seed=seeds, offset=0)  # a fair coin from the token stream
    table = np.zeros((2, 2))
    np.add.at(table, (z.numpy(), t.numpy()), 1)
    assert stats.chi2_contingency(table).pvalue >= P_REJECT
    assert 0.45 < float((z.long() == t).float().mean()) < 0.55


SEL_ERRORS = [
    (lambda: K.select_members(torch.tensor([0.5, -0.1]), batch=2), ValueError, "weights must be non-negative"),
    (lambda: K.select_members(torch.tensor([0.5, float("nan")]), batch=2), ValueError, "must not contain NaN"),
    (lambda: K.select_members(torch.tensor([1.0, float("inf")]), batch=2), ValueError, "weights must be finite"),
    (lambda: K.select_members(torch.zeros(3), batch=2), ValueError, "row 0 is all zero"),
    (lambda: K.select_members(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), ValueError, "row 1 is all zero"),
    (lambda: K.select_members(torch.tensor([1, 2])), TypeError, "floating-point"),
    (lambda: K.select_members("0.5,0.5", batch=2), TypeError, "weights must be a torch.Tensor"),
    (lambda: K.select_members(torch.ones(2, 2, 2), batch=2), ValueError, r"shape \[M\] or \[B, M\]"),
    (lambda: K.select_members(torch.ones(0), batch=2), ValueError, "at least one member"),
    (lambda: K.select_members(torch.ones(3)), ValueError, "pass batch=B"),
    (lambda: K.select_members(torch.ones(3), batch=-1), ValueError, "batch must be >= 0"),
    (lambda: K.select_members(torch.ones(3), batch=2.0), TypeError, "batch must be an int"),
    (lambda: K.select_members(torch.ones(2, 3), batch=5), ValueError, "does not match"),
    (lambda: K.select_members(torch.ones(3), seed=torch.zeros(4, dtype=torch.int64), batch=2), ValueError, "seed"),
    (lambda: K.select_members(torch.ones(3), seed="x", batch=2), TypeError, "seed must be an int"),
]


@pytest.mark.parametrize("call,exc,match", SEL_ERRORS, ids=[m for _, _, m in SEL_ERRORS])
def test_select_members_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_select_members_list_weights_and_empty_batch():
    assert K.select_members([1.0, 0.0], seed=3, batch=4).tolist() == [0, 0, 0, 0]
    assert K.select_members(torch.ones(3), batch=0).shape == (0,)


def test_select_members_cpu_reference_path(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    w = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.4, 0.0]])
    seeds = torch.tensor([3, 4])
    assert torch.equal(K.select_members(w, seed=seeds, offset=2), R.select_members_reference(w, seed=seeds, offset=2))
