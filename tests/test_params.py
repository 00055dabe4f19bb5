"""One validator for the sampling arguments: SamplingParams (Python scalars) applies exactly the
rules of the kernels' own checks, and temperature=inf is accepted everywhere."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import me_kernels as K
from me_kernels import SamplingParams
from me_kernels import reference as R
from me_kernels._validate import sampling_params

CASES = [  # (field, value, error or None)
    ("temperature", 0.0, None), ("temperature", 0.5, None), ("temperature", math.inf, None), ("temperature", 3, None),
    ("temperature", -0.5, ValueError), ("temperature", math.nan, ValueError), ("temperature", "hot", TypeError),
    ("temperature", True, TypeError), ("temperature", None, TypeError),
    ("top_k", 0, None), ("top_k", 7, None), ("top_k", 2**40, None),
    ("top_k", -1, ValueError), ("top_k", 2.5, TypeError), ("top_k", True, TypeError),
    ("top_p", 1.0, None), ("top_p", 0.3, None), ("top_p", 1, None),
    ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError), ("top_p", math.nan, ValueError), ("top_p", "x", TypeError),
    ("min_p", 0.0, None), ("min_p", 1.0, None), ("min_p", 0.2, None),
    ("min_p", -0.1, ValueError), ("min_p", 1.01, ValueError), ("min_p", math.inf, ValueError),
]


@pytest.mark.parametrize("field,value,error", CASES, ids=[f"{f}={v!r}" for f, v, _ in CASES])
def test_same_rule_as_the_kernels(field, value, error):
    x = torch.zeros(2, 5)
    if error is None:
        params = SamplingParams(**{field: value})
        assert getattr(params, field) == value
        assert type(getattr(params, field)) is (int if field == "top_k" else float)
        # accepted by the kernels' own check too (called directly: launching is not the point)
        kernel_value = sampling_params(2, x.device, **params.kwargs())[["temperature", "top_k", "top_p", "min_p"].index(
            field)].scalar
        assert kernel_value == (min(value, 2**31 - 1) if field == "top_k" else value)  # top_k: int32 in the kernels
        return
    with pytest.raises(error, match=field) as from_params:
        SamplingParams(**{field: value})
    with pytest.raises(error, match=field) as from_kernel:
        K.sample(x, **{field: value})
    assert str(from_params.value) == str(from_kernel.value)  # the same rule function, the same message


def test_messages_name_the_allowed_range():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"temperature must be in \[0, inf\]"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\]"):
        SamplingParams(min_p=2)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SamplingParams(top_k=-3)


def test_frozen_defaults_and_kwargs():
    params = SamplingParams()
    assert params.kwargs() == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_k = 3  # type: ignore[misc]
    assert SamplingParams(0.7, 5, 0.9, 0.1).kwargs() == {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.1}


def test_infinite_temperature_is_uniform_over_the_kept_set():
    x = torch.tensor([[3.0, 1.0, 0.5, -2.0, float("-inf")]])
    # the kernel (Triton under the interpreter, or the CPU op) draws the reference's tokens ...
    seeds = torch.arange(24)
    rows = x.expand(24, 5)
    assert torch.equal(K.sample(rows, temperature=math.inf, top_k=3, seed=seeds),
                       R.sample_reference(rows, temperature=math.inf, top_k=3, seed=seeds))
    # ... and the reference's draws are uniform over the top-3 set
    tokens = R.sample_reference(x.expand(6000, 5), temperature=math.inf, top_k=3, seed=torch.arange(6000))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[3:].sum() == 0  # outside the top-3 set (and -inf) never drawn
    assert counts[:3].min() > 1800  # 2000 each expected (sd 37): uniform over the kept set


def test_runtime_uses_the_same_params():
    from me_runtime import arguments, decode

    assert decode.SamplingParams is SamplingParams
    assert arguments.check_sampling(math.inf, 0, 1.0, 0.0).temperature == math.inf
    with pytest.raises(ValueError, match="temperature"):
        arguments.check_sampling(-1.0, 0, 1.0, 0.0)
