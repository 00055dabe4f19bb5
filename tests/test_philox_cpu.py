"""The C++ CPU Philox helper (torch.ops.me.philox_uniforms) draws exactly the numbers of the torch
Philox in me_kernels._philox (which the Triton kernels match), so the CPU reference path can use it."""
from __future__ import annotations

import pytest
import torch

import me_kernels
from me_kernels._ops import uniforms_torch
from me_kernels._philox import STREAM_MEMBER, STREAM_MIXTURE, STREAM_TOKEN
from me_kernels._philox import philox_uniforms_torch as uniforms_pure_torch

pytestmark = pytest.mark.skipif(not me_kernels.EXTENSION_LOADED, reason="needs me_kernels._C")


@pytest.mark.parametrize("stream", [STREAM_TOKEN, STREAM_MEMBER, STREAM_MIXTURE, 7])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1001, 4099])
def test_bit_identical_to_the_torch_philox(stream, n):
    gen = torch.Generator().manual_seed(n * 10 + stream)
    seed = torch.cat([torch.tensor([0, 2**63 - 1, 2**32, 2**32 - 1]), torch.randint(0, 2**62, (4,), generator=gen)])
    offset = torch.cat([torch.tensor([0, 2**62 + 5, 2**32 + 1, 1]), torch.randint(0, 2**40, (4,), generator=gen)])
    fast = torch.ops.me.philox_uniforms(seed, offset, stream, n)
    assert fast.shape == (8, n) and fast.dtype == torch.float32
    assert torch.equal(fast, uniforms_pure_torch(seed, offset, stream, n))
    if n:
        assert float(fast.min()) > 0.0 and float(fast.max()) < 1.0


def test_reference_path_uses_the_compiled_helper_on_cpu():
    seed, offset = torch.tensor([3, 2**50]), torch.tensor([9, 10])
    assert torch.equal(uniforms_torch(seed, offset, STREAM_TOKEN, 37), uniforms_pure_torch(seed, offset, 0, 37))
    # an offset given for all rows at once broadcasts like the pure torch version
    assert torch.equal(uniforms_torch(seed, torch.tensor([4]), 1, 9), uniforms_pure_torch(seed, torch.tensor([4]), 1, 9))


def test_rows_are_independent_of_the_batch():
    seed, offset = torch.tensor([11, 12, 13]), torch.tensor([5, 6, 7])
    whole = torch.ops.me.philox_uniforms(seed, offset, STREAM_TOKEN, 50)
    for b in range(3):
        assert torch.equal(whole[b : b + 1], torch.ops.me.philox_uniforms(seed[b : b + 1], offset[b : b + 1], 0, 50))


def test_argument_errors():
    with pytest.raises(TypeError, match="int64"):
        torch.ops.me.philox_uniforms(torch.tensor([1], dtype=torch.int32), torch.tensor([1]), 0, 4)
    with pytest.raises(ValueError, match="one length"):
        torch.ops.me.philox_uniforms(torch.tensor([1, 2]), torch.tensor([1]), 0, 4)
    with pytest.raises(ValueError, match="n must be"):
        torch.ops.me.philox_uniforms(torch.tensor([1]), torch.tensor([1]), 0, -1)
