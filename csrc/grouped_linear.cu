// Planner and launcher of the grouped-linear kernels (torch-free; see launchers.h and the design
// notes at the top of kernels/grouped_linear.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>

#include "kernels/grouped_linear.cuh"
#include "launchers.h"

namespace me {
namespace {

using kernels::kDecodeMaxRows;

static_assert(kGroupedLinearDecodeMaxRows == kDecodeMaxRows, "one decode/chunk boundary");

// Split-K partials are only worth their traffic when they stay small next to the weights.
constexpr int64_t kMaxPartialBytes = int64_t{8} << 20;
constexpr size_t kWorkspaceAlign = 256;

size_t align_up(size_t v) { return (v + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int element_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int kGroups, bool kDirect>
cudaError_t launch_decode(const kernels::DecodeParams& p, dim3 grid, bool vec16, cudaStream_t stream) {
  if (vec16) {
    kernels::grouped_linear_decode_kernel<T, kGroups, kDirect, true><<<grid, kernels::kDecodeThreads, 0, stream>>>(p);
  } else {
    kernels::grouped_linear_decode_kernel<T, kGroups, kDirect, false><<<grid, kernels::kDecodeThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, int kBN>
cudaError_t launch_chunk(const kernels::ChunkParams& p, dim3 grid, bool vec16, cudaStream_t stream) {
  if (vec16) {
    kernels::grouped_linear_chunk_kernel<T, kBN, true><<<grid, kernels::kChunkThreads, 0, stream>>>(p);
  } else {
    kernels::grouped_linear_chunk_kernel<T, kBN, false><<<grid, kernels::kChunkThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const GroupedLinearProblem& pr, const GroupedLinearPlan& plan, void* workspace,
                         cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  int32_t* order = plan.direct ? nullptr : reinterpret_cast<int32_t*>(ws + plan.order_offset);
  int32_t* offsets = plan.direct ? nullptr : reinterpret_cast<int32_t*>(ws + plan.offsets_offset);
  int32_t* counters = plan.k_splits > 1 ? reinterpret_cast<int32_t*>(ws + plan.counters_offset) : nullptr;
  float* partials = plan.k_splits > 1 ? reinterpret_cast<float*>(ws + plan.partials_offset) : nullptr;
  const int32_t M = static_cast<int32_t>(pr.M);
  cudaError_t err;

  if (!plan.direct) {
    err = launch_group_rows(pr.members, pr.T, M, order, offsets, stream);
    if (err != cudaSuccess) return err;
  }
  if (plan.k_splits > 1) {
    err = cudaMemsetAsync(counters, 0, plan.counters_bytes, stream);
    if (err != cudaSuccess) return err;
  }

  kernels::DecodeParams dp{};
  dp.x = pr.x;
  dp.x_row_stride = pr.x_row_stride;
  dp.members = pr.members;
  dp.order = order;
  dp.offsets = offsets;
  dp.weight = pr.weight;
  dp.bias = pr.bias;
  dp.out = pr.out;
  dp.partials = partials;
  dp.counters = counters;
  dp.T = static_cast<int32_t>(pr.T);
  dp.N = static_cast<int32_t>(pr.N);
  dp.K = static_cast<int32_t>(pr.K);
  dp.M = M;
  dp.k_splits = plan.k_splits;
  dp.kblocks_per_split = plan.kblocks_per_split;
  const dim3 decode_grid(static_cast<unsigned>(ceil_div(pr.N, kernels::kDecodeTileN)),
                         static_cast<unsigned>(plan.k_splits), static_cast<unsigned>(plan.decode_slots));
  if (plan.direct) {
    err = plan.decode_groups == 1 ? launch_decode<T, 1, true>(dp, decode_grid, plan.vec16, stream)
                                  : launch_decode<T, 2, true>(dp, decode_grid, plan.vec16, stream);
  } else {
    err = launch_decode<T, 2, false>(dp, decode_grid, plan.vec16, stream);
  }
  if (err != cudaSuccess || plan.direct) return err;

  kernels::ChunkParams cp{};
  cp.x = pr.x;
  cp.x_row_stride = pr.x_row_stride;
  cp.order = order;
  cp.offsets = offsets;
  cp.weight = pr.weight;
  cp.bias = pr.bias;
  cp.out = pr.out;
  cp.T = dp.T;
  cp.N = dp.N;
  cp.K = dp.K;
  cp.M = M;
  const dim3 chunk_grid(static_cast<unsigned>(kernels::chunk_row_tiles_bound(pr.T, pr.M)),
                        static_cast<unsigned>(ceil_div(pr.N, plan.chunk_bn)));
  return plan.chunk_bn == 128 ? launch_chunk<T, 128>(cp, chunk_grid, plan.vec16, stream)
                              : launch_chunk<T, 64>(cp, chunk_grid, plan.vec16, stream);
}

}  // namespace

cudaError_t plan_grouped_linear(const GroupedLinearProblem& pr, int num_sms, GroupedLinearPlan* plan) {
  const int64_t es = element_bytes(pr.dtype);
  if (plan == nullptr || pr.T < 0 || pr.N < 0 || pr.K < 0 || pr.M < 1 || num_sms < 1) return cudaErrorInvalidValue;
  // 32-bit indices inside the kernels; grid y of the chunk kernel is ceil(N / 64) <= 65535.
  if (pr.T >= INT32_MAX || pr.K * es >= INT32_MAX || pr.M >= INT32_MAX || ceil_div(pr.N, 64) > 65535)
    return cudaErrorInvalidValue;
  const bool direct = pr.T <= kDecodeMaxRows;
  if (!direct && pr.M > kGroupRowsMaxMembers) return cudaErrorInvalidValue;

  GroupedLinearPlan p{};
  p.direct = direct;
  const int64_t row_bytes = pr.K * es;
  p.vec16 = row_bytes % 16 == 0 && aligned16(pr.x) && aligned16(pr.weight) &&
            (pr.T <= 1 || (pr.x_row_stride * es) % 16 == 0);
  p.decode_groups = (direct && pr.T <= 8) ? 1 : 2;
  p.decode_slots = static_cast<int>(direct ? std::min(pr.M, pr.T) : pr.M);

  // Split-K: a decode block keeps ~32 KB of weight loads in flight, so about one block per SM
  // saturates HBM. When even a single chosen member would leave more than half of the SMs idle,
  // split K to reach >= one block per SM (each warp keeps >= one unrolled step per split). Without
  // split-K there is no counter memset and no partial traffic, so it is used only when needed.
  const int64_t kblocks = ceil_div(row_bytes, kernels::kKBlockBytes);
  const int64_t n_tiles = ceil_div(pr.N, kernels::kDecodeTileN);
  const int64_t unroll = es == 4 ? kernels::decode_unroll<float>() : kernels::decode_unroll<__nv_bfloat16>();
  int64_t splits = 1;
  if (n_tiles > 0 && 2 * n_tiles < num_sms && kblocks > 0) {
    const int64_t wanted = ceil_div(int64_t{num_sms}, n_tiles);
    const int64_t by_k = std::max<int64_t>(1, kblocks / (kernels::kDecodeWarps * unroll));
    splits = std::min<int64_t>({kernels::kDecodeMaxSplits, wanted, by_k});
  }
  if (splits > 1 && splits * pr.T * pr.N * 4 > kMaxPartialBytes) splits = 1;
  const int64_t per_split = kblocks == 0 ? 0 : ceil_div(kblocks, splits);
  p.k_splits = per_split == 0 ? 1 : static_cast<int>(ceil_div(kblocks, per_split));  // no empty split
  p.kblocks_per_split = static_cast<int>(per_split);

  // Chunk column tile: 128 (more MMAs per shared-memory byte) when the row tiles x 128-column tiles
  // give at least one block per SM (up to 3 such blocks fit on an SM), else 64 to fill the GPU.
  if (!direct) {
    const int64_t wide_blocks = ceil_div(pr.T, kernels::kChunkBM) * ceil_div(pr.N, 128);
    p.chunk_bn = wide_blocks >= int64_t{num_sms} ? 128 : 64;
  }

  size_t off = 0;
  if (!direct) {
    p.order_offset = off;
    off += align_up(static_cast<size_t>(pr.T) * sizeof(int32_t));
    p.offsets_offset = off;
    off += align_up(static_cast<size_t>(pr.M + 1) * sizeof(int32_t));
  }
  if (p.k_splits > 1) {
    p.counters_bytes = static_cast<size_t>(p.decode_slots) * static_cast<size_t>(n_tiles) * sizeof(int32_t);
    p.counters_offset = off;
    off += align_up(p.counters_bytes);
    p.partials_offset = off;
    off += align_up(static_cast<size_t>(p.k_splits) * static_cast<size_t>(pr.T) * static_cast<size_t>(pr.N) *
                    sizeof(float));
  }
  p.workspace_bytes = off;
  *plan = p;
  return cudaSuccess;
}

cudaError_t launch_grouped_linear(const GroupedLinearProblem& pr, const GroupedLinearPlan& plan, void* workspace,
                                  cudaStream_t stream) {
  if (pr.T == 0 || pr.N == 0) return cudaSuccess;  // empty output: nothing to compute or to mark
  if (plan.workspace_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  switch (pr.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(pr, plan, workspace, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(pr, plan, workspace, stream);
    case DType::kFloat16:
      return launch_typed<__half>(pr, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace me
