"""The counter-based random numbers every sampling op draws: Philox-4x32-10 in torch
(me_kernels._philox) and in Triton (me_kernels._random), bit-identical, with distinct streams."""
from __future__ import annotations

import numpy as np
import torch

from me_kernels._ops import uniforms_torch
from me_kernels._philox import STREAM_MEMBER, STREAM_MIXTURE, STREAM_TOKEN, philox4x32_10_torch
from me_kernels._random import uniforms_triton

from _sampling_testlib import chi2_check


def test_philox_known_answer_vectors():
    """Random123's known-answer vectors for Philox-4x32-10."""
    m = 0xFFFFFFFF
    ctr = torch.tensor([[0, 0, 0, 0], [m, m, m, m], [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    key = torch.tensor([[0, 0], [m, m], [0xA4093822, 0x299F31D0]])
    out = torch.stack(philox4x32_10_torch(*ctr.t(), *key.t()), dim=1).tolist()
    assert out == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                   [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                   [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]


def test_kernel_uniforms_are_bit_identical_to_torch(kernel_device):
    seeds = torch.tensor([0, 1, 12345, 2**40 + 3, -5, 2**63 - 1], device=kernel_device)
    offsets = torch.tensor([0, 7, 2**33 + 1, 1, 99, 2**62], device=kernel_device)
    for stream in (STREAM_TOKEN, STREAM_MEMBER, STREAM_MIXTURE):
        got = uniforms_triton(seeds, offsets, stream, 301)
        assert torch.equal(got.cpu(), uniforms_torch(seeds.cpu(), offsets.cpu(), stream, 301))
    assert float(got.min()) > 0 and float(got.max()) < 1


def test_streams_and_offsets_are_distinct():
    s = torch.tensor([3, 3])
    a = uniforms_torch(s, torch.tensor([5, 6]), STREAM_TOKEN, 64)
    b = uniforms_torch(s, torch.tensor([5, 6]), STREAM_MEMBER, 64)
    c = uniforms_torch(s, torch.tensor([5, 6]), STREAM_MIXTURE, 64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)
    # Uniform and uncorrelated across streams (10^5 pairs).
    u = uniforms_torch(torch.arange(4000), torch.zeros(4000, dtype=torch.int64), STREAM_TOKEN, 25).flatten()
    v = uniforms_torch(torch.arange(4000), torch.zeros(4000, dtype=torch.int64), STREAM_MEMBER, 25).flatten()
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.02
    chi2_check((u * 20).long(), np.full(20, 0.05), "uniform histogram")
