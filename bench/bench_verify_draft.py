"""Microbenchmark of me_kernels.verify_draft, the verification step of exact CE by drafting
(pytest-benchmark).

Each case times one implementation on one (B, J, dtype) with M = 3 members, V = 32000: the M
members' logits at J drafted positions [M, B, J, V], the drafter's logits [B, J, V] and the
drafted ids [B, J] -> (num_accepted, token):
    me_kernels  the Triton kernels (mixture log-probs, thresholds of the p and q rows, one
                program per position, per-row combine)
    reference   the torch reference (me_kernels.reference.verify_draft_reference), on the GPU
for B in {1, 8}, J in {3, 5}, fp32 and bf16, top-p 0.9 and temperature 0.7 + top-k 50 + top-p 0.9.
Timing and the recorded keys: bench/_benchlib.py (`measure`); the bytes are those of the two
logits tensors, which any implementation must read once.

On a machine without CUDA every GPU case is skipped at run time; a tiny CPU smoke case still runs
the public function (CPU path) so this file cannot rot.
"""

from __future__ import annotations

import pytest
import torch

import me_kernels as K
from me_kernels import reference as R

from _benchlib import (DTYPES, MIXTURE_MEMBERS, SAMPLE_CONFIGS, copy_bandwidth, cuda, measure,  # noqa: F401
                       rotating_logits)

VOCAB = 32000
CASES = [(cfg, b, j, dt) for cfg in SAMPLE_CONFIGS for dt in DTYPES for b in (1, 8) for j in (3, 5)]
VERIFY_IMPLS = ["me_kernels", "reference"]


def _case_id(case):
    cfg, b, j, dt = case
    return f"{cfg}-B{b}-J{j}-V{VOCAB}-{dt}"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", VERIFY_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_verify_draft(benchmark, cuda, copy_bandwidth, case, impl):
    cfg, b, j, dt = case
    params = SAMPLE_CONFIGS[cfg]
    m = MIXTURE_MEMBERS
    targets, target_bytes = rotating_logits((m, b, j, VOCAB), dt, "cuda")
    drafts, draft_bytes = rotating_logits((b, j, VOCAB), dt, "cuda")
    copies = min(targets.shape[0], drafts.shape[0])
    weights = torch.tensor([0.5, 0.3, 0.2], device=cuda)
    seeds = torch.arange(b, device=cuda, dtype=torch.int64)
    # Drafts as the runtime makes them (outside the timing): position i from q_i at offset + i.
    tokens = torch.stack([K.sample(drafts[0][:, i], seed=seeds, offset=1 + i, **params) for i in range(j)], dim=1)
    state = {"i": 0}

    def next_inputs():
        state["i"] = (state["i"] + 1) % copies
        return targets[state["i"]], drafts[state["i"]]

    benchmark.group = f"verify_draft-{cfg}-M{m}-B{b}-J{j}-V{VOCAB}-{dt}"
    info = dict(op="verify_draft", config=cfg, M=m, B=b, J=j, V=VOCAB, dtype=dt, impl=impl)
    if impl == "me_kernels":
        def fn():
            t, d = next_inputs()
            return K.verify_draft(t, d, tokens, weights, seed=seeds, offset=1, **params)
    else:
        def fn():
            t, d = next_inputs()
            return R.verify_draft_reference(t, d, tokens, weights, seed=seeds, offset=1, **params)
    measure(benchmark, fn, target_bytes + draft_bytes, copy_bandwidth, **info)


# --------------------------------------------------------------------------------------------
# CPU smoke (runs everywhere)
# --------------------------------------------------------------------------------------------


def test_verify_draft_cpu_smoke(benchmark):
    """Tiny CPU case through the public function, so the harness is exercised without a GPU."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 2, 3, 128, generator=gen)
    draft = target[0] + 0.3 * torch.randn(2, 3, 128, generator=gen)
    tokens = draft.argmax(dim=2)
    w = torch.tensor([0.5, 0.3, 0.2])
    n, tok = benchmark.pedantic(lambda: K.verify_draft(target, draft, tokens, w, seed=torch.arange(2), top_p=0.9),
                                rounds=2, iterations=1)
    assert n.shape == (2,) and ((n >= 0) & (n <= 3)).all()
    assert ((tok == -1) == (n == 3)).all() and (tok < 128).all()
    benchmark.extra_info.update(op="smoke", device="cpu")
