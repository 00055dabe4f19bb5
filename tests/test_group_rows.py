"""group_rows, a compiled op of the extension (issue 4): torch.ops.me.group_rows, the stable
counting sort of rows by member that grouped execution uses. CPU cases run the C++ op (or its
torch fallback); the same cases run the CUDA kernel on a GPU (marker `gpu`)."""
from __future__ import annotations

import pytest
import torch

import me_kernels
from me_kernels import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def expected_grouping(members, M):
    ids = members.tolist()
    order = [t for m in range(M) for t, v in enumerate(ids) if v == m]
    offsets = [0]
    for m in range(M):
        offsets.append(offsets[-1] + ids.count(m))
    return order, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "T,M,pattern",
    [
        (0, 3, "random"),
        (1, 1, "random"),
        (17, 4, "random"),
        (300, 7, "random"),
        (2500, 5, "random"),  # several 1024-row tiles of the CUDA kernel
        (64, 6, "one"),  # every row on one member, the others empty
        (50, 9, "sparse"),  # most members empty
        (40, 256, "random"),  # the CUDA kernel's member limit
    ],
)
def test_group_rows_is_a_stable_counting_sort(device, T, M, pattern):
    gen = torch.Generator().manual_seed(T * 31 + M)
    if pattern == "one":
        members = torch.full((T,), M - 2, dtype=torch.int32)
    elif pattern == "sparse":
        members = torch.tensor([1, 4, 7], dtype=torch.int32)[torch.randint(0, 3, (T,), generator=gen)]
    else:
        members = torch.randint(0, M, (T,), generator=gen, dtype=torch.int32)
    order, offsets = me_kernels.group_rows(members.to(device), M)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int32
    assert order.device.type == device and offsets.shape == (M + 1,)
    exp_order, exp_offsets = expected_grouping(members, M)
    assert order.cpu().tolist() == exp_order
    assert offsets.cpu().tolist() == exp_offsets
    ref_order, ref_offsets = reference.group_rows_reference(members, M)
    assert ref_order.tolist() == exp_order and ref_offsets.tolist() == exp_offsets


def test_group_rows_cpu_rejects_out_of_range_ids():
    for bad in (-1, 3, 2**31 - 1):
        members = torch.tensor([0, bad, 1], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"members\[1\].*outside \[0, num_members=3\)"):
            torch.ops.me.group_rows(members, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_group_rows_argument_errors(device):
    members = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="num_members"):
        me_kernels.group_rows(members, 0)
    with pytest.raises(ValueError, match="num_members must be >= 1"):
        torch.ops.me.group_rows(members, 0)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.me.group_rows(members.to(torch.int64), 2)
    with pytest.raises(TypeError, match="int32"):
        me_kernels.group_rows(members.float(), 2)
    with pytest.raises(ValueError, match="1-D"):
        torch.ops.me.group_rows(members.view(2, 2), 2)


@pytest.mark.gpu
def test_group_rows_cuda_puts_out_of_range_ids_last():
    members = torch.tensor([2, -1, 0, 5, 2, 1, 3, 0, -7], dtype=torch.int32)
    order, offsets = torch.ops.me.group_rows(members.cuda(), 3)
    ref_order, ref_offsets = reference.group_rows_reference(members, 3)
    assert order.cpu().tolist() == ref_order.tolist() == [2, 7, 5, 0, 4, 1, 3, 6, 8]
    assert offsets.cpu().tolist() == ref_offsets.tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="256"):
        torch.ops.me.group_rows(members.cuda(), 257)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 5, 40])
def test_opcheck(device, T):
    members = torch.randint(0, 3, (T,), generator=torch.Generator().manual_seed(T), dtype=torch.int32).to(device)
    torch.library.opcheck(torch.ops.me.group_rows.default, (members, 3))
