"""grouped_linear, a compiled op of the extension (issue 4): torch.ops.me.grouped_linear (its row
grouping, torch.ops.me.group_rows: tests/test_group_rows.py).

Every result is compared with an independent fp64 oracle (per-member torch.matmul) on fresh random
inputs, with a tolerance derived from the dtype and K: output rounding (unit roundoff of the dtype
times |out|) plus the fp32 accumulation error bound (K fp32 ulps of sum_k |x_k w_k|). CPU cases run the C++ ops;
the same cases run the CUDA kernels on a GPU (marker `gpu`), plus the CUDA-only behaviour: NaN rows
for out-of-range ids, CUDA-graph capture and replay with a changed routing, no host sync, the
decode / chunk path boundary, split-K and unaligned layouts.
"""
from __future__ import annotations

import math

import pytest
import torch

import me_kernels
from me_kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Output rounding: unit roundoff of the dtype (relative to |out|).
OUT_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def acc_eps(dtype, K):
    """Error of the fp32 accumulation per unit of sum_k |x_k w_k|: K additions of at most one fp32
    ulp each (tensor-core accumulation may truncate), plus, for fp32 inputs on CUDA, the 3xTF32
    split (~3 * 2^-22 per product). bf16 / fp16 products are exact in fp32."""
    return (K + 32) * 2.0**-23 + (2.0**-19 if dtype == torch.float32 else 0.0)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DECODE_MAX_ROWS = 16  # csrc/launchers.h kGroupedLinearDecodeMaxRows


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_problem(T, K, N, M, dtype, device, *, bias=True, seed=0, members=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen).to(dtype)
    weight = (torch.randn(M, N, K, generator=gen) / math.sqrt(max(K, 1))).to(dtype)
    b = torch.randn(M, N, generator=gen).to(dtype) if bias else None
    if members is None:
        members = torch.randint(0, M, (T,), generator=gen, dtype=torch.int32)
    members = torch.as_tensor(members, dtype=torch.int32)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(members), to(weight), to(b)


def oracle(x, members, weight, bias):
    """fp64 per-member torch.matmul; rows with an out-of-range id are NaN. Also returns the
    error scale sum_k |x[t, k] w[m, n, k]| (+ |bias|) of every output."""
    T, N, M = x.shape[0], weight.shape[1], weight.shape[0]
    out = torch.full((T, N), float("nan"), dtype=torch.float64, device=x.device)
    scale = torch.zeros((T, N), dtype=torch.float64, device=x.device)
    ids = members.to(torch.int64)
    for m in range(M):
        rows = (ids == m).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        xs = x.index_select(0, rows).double()
        w = weight[m].double()
        y = xs @ w.T
        s = xs.abs() @ w.abs().T
        if bias is not None:
            y = y + bias[m].double()
            s = s + bias[m].double().abs()
        out[rows] = y
        scale[rows] = s
    return out, scale


def assert_matches_oracle(got, x, members, weight, bias):
    assert got.dtype == x.dtype and got.shape == (x.shape[0], weight.shape[1])
    ref, scale = oracle(x, members, weight, bias)
    g = got.double()
    valid = ~torch.isnan(ref)
    err = (g - ref).abs()
    tol = OUT_EPS[x.dtype] * ref.abs() + acc_eps(x.dtype, x.shape[1]) * scale + 1e-30
    bad = valid & ~(err <= tol)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {int(valid.sum())} outputs off; worst err {float(err[valid].max())} "
        f"at tol {float(tol[bad].min())}"
    )
    return ref


def run(x, members, weight, bias):
    return me_kernels.grouped_linear(x, members, weight, bias)


# ---------------------------------------------------------------------------------------------
# grouped_linear: values (CPU and CUDA)
# ---------------------------------------------------------------------------------------------

SHAPES = [  # T, K, N, M
    (1, 8, 8, 1),
    (1, 33, 17, 3),  # odd K and N, T = 1
    (7, 64, 40, 4),
    (16, 96, 72, 2),  # the largest all-decode batch on CUDA
    (37, 300, 70, 5),
    (130, 96, 130, 3),  # chunk path on CUDA (~43 rows per member)
    (0, 16, 8, 2),  # empty batch
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,K,N,M", SHAPES)
def test_random_routings(device, dtype, bias, T, K, N, M):
    x, members, weight, b = make_problem(T, K, N, M, dtype, device, bias=bias, seed=T + 7 * K + N)
    out = run(x, members, weight, b)
    assert out.device.type == device
    assert_matches_oracle(out, x, members, weight, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize("K,N", [(8, 4), (7, 3), (33, 17), (260, 130)])
def test_cpu_gemv_rows_and_tails(dtype, rows, K, N):
    # The CPU op's fused GEMV (few rows per member): every row count around its thresholds and
    # row pairs, K not a multiple of the 8-wide loads, N not a multiple of the 4-row weight
    # blocks, with and without bias, all rows on one member and spread over three.
    for members in ([0] * rows, [i % 3 for i in range(rows)]):
        for bias in (True, False):
            x, ids, w, b = make_problem(rows, K, N, 3, dtype, "cpu", bias=bias, seed=rows + K, members=members)
            assert_matches_oracle(run(x, ids, w, b), x, ids, w, b)


def test_cpu_gemv_weight_with_column_stride():
    # A weight whose K dimension is not unit-stride takes the GEMM path; same values.
    x, ids, w, b = make_problem(3, 24, 12, 2, torch.bfloat16, "cpu")
    w_strided = w.transpose(1, 2).contiguous().transpose(1, 2)  # [M, N, K] with stride(2) = N
    assert w_strided.stride(2) != 1
    assert_matches_oracle(run(x, ids, w_strided, b), x, ids, w_strided, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 16, 40])
def test_all_rows_on_one_member_others_unread(device, dtype, T):
    # Unchosen members hold NaN: any contribution from them would show in the output.
    x, _, weight, b = make_problem(T, 72, 48, 4, dtype, device)
    weight[[0, 1, 3]] = float("nan")
    b[[0, 1, 3]] = float("nan")
    members = torch.full((T,), 2, dtype=torch.int32, device=device)
    out = run(x, members, weight, b)
    assert bool(torch.isfinite(out).all())
    assert_matches_oracle(out, x, members, weight, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [3, 40])
def test_accumulates_in_fp32(device, dtype, T):
    # 4096 ones sum to 4096 exactly in fp32; a bf16 / fp16 accumulator would stop at 256 / 2048.
    K = 4096
    x = torch.ones(T, K, dtype=dtype, device=device)
    weight = torch.ones(2, 8, K, dtype=dtype, device=device)
    bias = torch.full((2, 8), 0.5, dtype=dtype, device=device)
    members = (torch.arange(T) % 2).to(torch.int32).to(device)
    assert bool((run(x, members, weight, None) == 4096).all())
    expected = torch.tensor(4096.5).to(dtype).item()  # one rounding of the fp32 sum + bias
    assert bool((run(x, members, weight, bias) == expected).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_is_added_before_the_single_rounding(device, dtype):
    # Each member's bias cancels its row's product: rounding the product to the dtype before
    # adding the bias would leave an error of ~ulp(product), far above the tolerance. Positive
    # inputs make |product| = sum |x w|, the scale of the accumulation tolerance.
    M = 6
    members = torch.randperm(M, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    x, members, weight, _ = make_problem(M, 256, 16, M, dtype, device, bias=False, members=members)
    x, weight = x.abs(), weight.abs()
    prod = torch.einsum("tk,tnk->tn", x.double(), weight[members.long()].double())
    bias = torch.empty(M, 16, dtype=dtype, device=device)
    bias[members.long()] = (-prod).to(dtype)
    assert_matches_oracle(run(x, members, weight, bias), x, members, weight, bias)


@pytest.mark.parametrize("device", DEVICES)
def test_members_with_no_rows(device):
    x, _, weight, b = make_problem(25, 40, 24, 7, torch.float32, device)
    members = torch.tensor([1, 5] * 12 + [1], dtype=torch.int32, device=device)
    assert_matches_oracle(run(x, members, weight, b), x, members, weight, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_dimensions(device, dtype):
    x, members, weight, b = make_problem(0, 16, 8, 2, dtype, device)
    assert run(x, members, weight, b).shape == (0, 8)
    x, members, weight, b = make_problem(5, 16, 0, 2, dtype, device)
    assert run(x, members, weight, b).shape == (5, 0)
    # K = 0: the product is empty, the output is the bias (or 0).
    x, members, weight, b = make_problem(5, 0, 6, 2, dtype, device)
    out = run(x, members, weight, b)
    torch.testing.assert_close(out, b[members.long()], rtol=0, atol=0)
    assert bool((run(x, members, weight, None) == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [5, 60])
@pytest.mark.parametrize("layout", ["col_stride", "row_stride", "transposed", "offset", "broadcast"])
def test_non_contiguous_x(device, dtype, T, layout):
    K, N, M = 48, 40, 3
    _, members, weight, b = make_problem(T, K, N, M, dtype, device, seed=T)
    gen = torch.Generator().manual_seed(1)
    if layout == "col_stride":
        x = torch.randn(T, 2 * K, generator=gen).to(dtype).to(device)[:, ::2]
    elif layout == "row_stride":
        x = torch.randn(3 * T, K + 5, generator=gen).to(dtype).to(device)[::3, 2 : K + 2]
    elif layout == "transposed":
        x = torch.randn(K, T, generator=gen).to(dtype).to(device).t()
    elif layout == "offset":  # data pointer not 16-byte aligned
        x = torch.randn(T * K + 1, generator=gen).to(dtype).to(device)[1:].view(T, K)
    else:
        x = torch.randn(1, K, generator=gen).to(dtype).to(device).expand(T, K)
    if layout == "offset":
        assert x.data_ptr() % 16 != 0
    else:
        assert not x.is_contiguous()
    out = run(x, members, weight, b)
    assert_matches_oracle(out, x, members, weight, b)
    torch.testing.assert_close(out, run(x.contiguous(), members, weight, b), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_weight_and_bias(device):
    x, members, weight, b = make_problem(9, 32, 24, 3, torch.float32, device)
    weight_t = weight.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [M, N, K] view
    bias_t = b.t().contiguous().t()
    assert not weight_t.is_contiguous() and not bias_t.is_contiguous()
    assert_matches_oracle(run(x, members, weight_t, bias_t), x, members, weight, b)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_member_ids_are_accepted_by_the_wrapper(device):
    x, members, weight, b = make_problem(6, 16, 8, 3, torch.float32, device)
    torch.testing.assert_close(run(x, members.long(), weight, b), run(x, members, weight, b), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [2**32, -(2**32), 2**32 + 2, 2**40])
def test_int64_ids_beyond_int32_are_not_wrapped_into_valid_ids(device, bad):
    # A plain cast would turn 2**32 into member 0: such ids must be rejected (CPU) or give NaN (CUDA).
    x, members, weight, b = make_problem(6, 16, 8, 3, torch.float32, device)
    ids = members.long()
    ids[2] = bad
    if device == "cpu":
        with pytest.raises(ValueError, match="members\\[2\\]"):
            me_kernels.grouped_linear(x, ids, weight, b)
        with pytest.raises(ValueError, match="members\\[2\\]"):
            me_kernels.group_rows(ids, 3)
    else:
        out = run(x, ids, weight, b)
        assert bool(torch.isnan(out[2]).all()) and bool(torch.isfinite(out[[0, 1, 3, 4, 5]]).all())
        order, offsets = me_kernels.group_rows(ids, 3)
        assert int(offsets[-1]) == 5 and int(order[-1]) == 2


def test_reference_matches_oracle_and_marks_invalid_rows():
    x, _, weight, b = make_problem(6, 20, 12, 3, torch.float32, "cpu")
    members = torch.tensor([0, 2, -1, 1, 3, 2], dtype=torch.int32)
    out = reference.grouped_linear_reference(x, members, weight, b)
    assert bool(torch.isnan(out[[2, 4]]).all())
    assert_matches_oracle(out, x, members, weight, b)


# ---------------------------------------------------------------------------------------------
# grouped_linear: errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device):
    x, members, weight, b = make_problem(4, 8, 6, 3, torch.float32, device)
    op = torch.ops.me.grouped_linear
    with pytest.raises(ValueError, match=r"x must be 2-D \[T, K\]"):
        op(x[0], members, weight, b)
    with pytest.raises(ValueError, match=r"weight must be 3-D \[M, N, K\]"):
        op(x, members, weight[0], b)
    with pytest.raises(ValueError, match=r"members must be 1-D"):
        op(x, members.view(2, 2), weight, b)
    with pytest.raises(ValueError, match="members has 3 rows but x has 4"):
        op(x, members[:3], weight, b)
    with pytest.raises(ValueError, match="x has K=7 but weight"):
        op(x[:, :7], members, weight, b)
    with pytest.raises(ValueError, match=r"bias must be \[M, N\] = \[3, 6\]"):
        op(x, members, weight, b[:, :5])
    with pytest.raises(TypeError, match="members must be int32"):
        op(x, members.long(), weight, b)
    with pytest.raises(TypeError, match="weight dtype"):
        op(x, members, weight.half(), b)
    with pytest.raises(TypeError, match="bias dtype"):
        op(x, members, weight, b.half())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        op(x.double(), members, weight.double(), b.double())
    with pytest.raises(TypeError, match="members must be int32"):
        me_kernels.grouped_linear(x, members.float(), weight, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        me_kernels.grouped_linear(x.tolist(), members, weight, b)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        me_kernels.grouped_linear(x, members, weight, 1.0)


def test_cpu_rejects_out_of_range_ids():
    x, _, weight, b = make_problem(4, 8, 6, 3, torch.float32, "cpu")
    for bad in (-1, 3):
        members = torch.tensor([0, 1, bad, 2], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"members\[2\] = .* outside \[0, num_members=3\)"):
            me_kernels.grouped_linear(x, members, weight, b)


@pytest.mark.gpu
def test_cuda_device_errors():
    x, members, weight, b = make_problem(4, 8, 6, 3, torch.float32, "cuda")
    op = torch.ops.me.grouped_linear
    with pytest.raises(ValueError, match="one device"):
        op(x, members.cpu(), weight, b)
    with pytest.raises(ValueError, match="one device"):
        op(x, members, weight.cpu(), b)
    with pytest.raises(ValueError, match="bias is on"):
        op(x, members, weight, b.cpu())
    # More than 16 rows go through group_rows, which handles at most 256 members on CUDA.
    x, members, weight, _ = make_problem(20, 8, 4, 257, torch.float32, "cuda", bias=False)
    with pytest.raises(ValueError, match="at most 256 members"):
        op(x, members, weight, None)
    x, members, weight, _ = make_problem(16, 8, 4, 257, torch.float32, "cuda", bias=False)
    assert_matches_oracle(op(x, members, weight, None), x, members, weight, None)


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake tensors, dispatch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 5, 40])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(device, T, bias):
    x, members, weight, b = make_problem(T, 24, 16, 3, torch.bfloat16, device, bias=bias)
    torch.library.opcheck(torch.ops.me.grouped_linear.default, (x, members, weight, b))


# ---------------------------------------------------------------------------------------------
# CUDA paths
# ---------------------------------------------------------------------------------------------

# Shapes chosen so that, on any GPU with 32..264 SMs, the planner (csrc/grouped_linear.cu) takes:
#   direct decode with split-K (N / 32 < SMs / 2), direct decode without split-K, decode + chunk
#   with 64-column tiles, chunk with 128-column tiles (row tiles x N / 128 >= SMs), and, for fp32,
#   split-K in the group_rows (T > 16) mode.
CUDA_CASES = [  # T, K, N, M, routing
    (1, 4096, 256, 4, "random"),  # T = 1, split-K
    (3, 1000, 200, 3, "random"),  # partial last k-block, N tail
    (8, 512, 8480, 2, "random"),  # one 8-row group, no split-K (N / 32 >= SMs / 2)
    (9, 256, 96, 2, "random"),  # two 8-row groups
    (16, 1536, 1536, 4, "one"),  # 16 rows on one member: the largest decode tile
    (16, 2048, 128, 20, "random"),  # more members than rows: slots = T
    (17, 256, 136, 2, "16+1"),  # path boundary: 16 rows decode, 1 row decode
    (33, 320, 72, 2, "16+17"),  # 16 rows decode, 17 rows chunk
    (300, 512, 392, 5, "random"),  # mostly chunk, 64-column tiles (fp32: split-K decode launch)
    (1030, 128, 8448, 2, "skewed"),  # chunk with 128-column tiles, one small decode member
    (700, 128, 96, 40, "high"),  # > 32 members: the chunk lookup's warp scan carries across chunks
    (48, 4096, 64, 2, "random"),  # bf16/fp16 split-K decode in the group_rows (T > 16) mode
]


def cuda_members(T, M, routing, gen):
    if routing == "one":
        return torch.full((T,), M - 1, dtype=torch.int32)
    if routing == "16+1":
        return torch.tensor([0] * 16 + [1], dtype=torch.int32)[torch.randperm(T, generator=gen)]
    if routing == "16+17":
        return torch.tensor([1] * 16 + [0] * 17, dtype=torch.int32)[torch.randperm(T, generator=gen)]
    if routing == "high":  # rows only on members 32..M-1, several of them chunk-sized
        return torch.randint(32, M, (T,), generator=gen, dtype=torch.int32)
    if routing == "skewed":
        ids = torch.zeros(T, dtype=torch.int32)
        ids[torch.randperm(T, generator=gen)[:5]] = 1
        return ids
    return torch.randint(0, M, (T,), generator=gen, dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N,M,routing", CUDA_CASES)
def test_cuda_paths_match_oracle(dtype, T, K, N, M, routing):
    gen = torch.Generator().manual_seed(T * 1000 + N)
    members = cuda_members(T, M, routing, gen)
    x, members, weight, b = make_problem(T, K, N, M, dtype, "cuda", members=members, seed=T + K)
    out = run(x, members, weight, b)
    assert_matches_oracle(out, x, members, weight, b)
    # Deterministic: split-K partials are summed in a fixed order.
    assert torch.equal(out, run(x, members, weight, b))
    assert_matches_oracle(run(x, members, weight, None), x, members, weight, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,N", [(5, 77, 33), (40, 77, 33), (12, 1001, 520), (200, 1001, 130)])
def test_cuda_unaligned_rows(dtype, T, K, N):
    # K * sizeof(dtype) not a multiple of 16 bytes: the element-wise load variants.
    x, members, weight, b = make_problem(T, K, N, 3, dtype, "cuda", seed=K + T)
    assert_matches_oracle(run(x, members, weight, b), x, members, weight, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 6, 16, 50, 200])
def test_cuda_out_of_range_ids_give_nan_rows(dtype, T):
    # T = 200: the valid members are chunk-sized (> 16 rows) next to the bad rows.
    M = 3
    gen = torch.Generator().manual_seed(T)
    members = torch.randint(0, M, (T,), generator=gen, dtype=torch.int32)
    bad_rows = torch.randperm(T, generator=gen)[: max(1, T // 4)]
    members[bad_rows] = torch.tensor([-1, M, 2**31 - 1, -(2**31)] * T, dtype=torch.int32)[: len(bad_rows)]
    x, members, weight, b = make_problem(T, 64, 40, M, dtype, "cuda", members=members)
    out = run(x, members, weight, b)
    assert bool(torch.isnan(out[bad_rows.cuda()]).all())
    ref = assert_matches_oracle(out, x, members, weight, b)
    assert int(torch.isnan(ref).any(1).sum()) == len(bad_rows)
    assert bool(torch.isfinite(out[~torch.isnan(ref).any(1)]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8, 16, 96])
def test_cuda_no_host_sync(T):
    x, members, weight, b = make_problem(T, 128, 96, 3, torch.bfloat16, "cuda")
    run(x, members, weight, b)  # first call outside: one-time SM-count query, allocator warmup
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run(x, members, weight, b)
        me_kernels.group_rows(members, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_oracle(out, x, members, weight, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("T,K,N,M", [(4, 2048, 256, 4), (16, 512, 640, 3), (90, 256, 200, 4)])
def test_cuda_graph_replay_with_changed_routing(dtype, T, K, N, M):
    x, members, weight, b = make_problem(T, K, N, M, dtype, "cuda", seed=T)
    static_x, static_members = x.clone(), members.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as torch recommends
        run(static_x, static_members, weight, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x, static_members, weight, b)
    gen = torch.Generator().manual_seed(100 + T)
    routings = [
        torch.randint(0, M, (T,), generator=gen, dtype=torch.int32),
        torch.full((T,), M - 1, dtype=torch.int32),  # everything on one member
        torch.arange(T, dtype=torch.int32) % M,
        torch.where(torch.arange(T) % 5 == 0, -1, torch.arange(T) % 2).to(torch.int32),  # NaN rows
    ]
    for i, routing in enumerate(routings):
        static_members.copy_(routing)
        static_x.copy_(torch.randn(T, K, generator=gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        ref = assert_matches_oracle(static_out, static_x, static_members, weight, b)
        invalid = torch.isnan(ref).any(1)
        assert bool(torch.isnan(static_out[invalid]).all()), f"routing {i}"
        eager = run(static_x, static_members, weight, b)
        assert torch.equal(eager[~invalid], static_out[~invalid]), f"routing {i}"
