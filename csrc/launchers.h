// Torch-free declarations of the CUDA launchers (defined in csrc/*.cu). The .cu files include
// only CUDA headers, so CI compiles them with nvcc alone; csrc/cuda/*.cpp adapts torch tensors.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace me {

// Maximum num_members the CUDA group_rows kernel handles (its per-warp histograms live in
// shared memory). Ensembles are far smaller; the dispatch layer rejects larger values.
constexpr int kGroupRowsMaxMembers = 256;

// Stable counting sort of T rows by member id in one thread block (no host sync). Rows whose
// member is outside [0, M) are placed after offsets[M] (in row order) and counted in nothing.
cudaError_t launch_group_rows(const int32_t* members, int64_t T, int32_t M, int32_t* order, int32_t* offsets,
                              cudaStream_t stream);

// ---- grouped_linear ------------------------------------------------------------------------------

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows of one member handled by the decode (GEMV-like) path; more rows go to the chunk (GEMM)
// path. Batches with T <= this take the decode path only, in a single launch.
constexpr int64_t kGroupedLinearDecodeMaxRows = 16;

// out[t] = x[t] @ weight[members[t]].T (+ bias[members[t]]). Pointers are device pointers.
struct GroupedLinearProblem {
  const void* x;          // [T, K], row t at x + t * x_row_stride elements, K contiguous
  int64_t x_row_stride;   // elements
  const int32_t* members; // [T]
  const void* weight;     // [M, N, K] contiguous
  const void* bias;       // [M, N] contiguous, or nullptr
  void* out;              // [T, N] contiguous
  int64_t T, N, K, M;
  DType dtype;
};

// Launch configuration, a pure function of (T, N, K, M, dtype, alignment, SM count): never of the
// routing, so a CUDA graph captured once stays valid for every routing.
struct GroupedLinearPlan {
  bool direct;            // T <= kGroupedLinearDecodeMaxRows: one decode launch, grouping in-kernel
  bool vec16;             // rows 16-byte aligned: vector loads / cp.async
  int decode_groups;      // 8-row groups of x per member in the decode kernel (1 or 2)
  int decode_slots;       // gridDim.z of the decode kernel
  int k_splits;           // decode split-K factor
  int kblocks_per_split;  // 64-byte k-blocks per split
  int chunk_bn;           // chunk kernel column tile (64 or 128), 0 when the chunk kernel is not run
  // Workspace layout (bytes, 256-aligned offsets into one buffer of workspace_bytes).
  size_t order_offset, offsets_offset, counters_offset, partials_offset;
  size_t counters_bytes;
  size_t workspace_bytes;
};

// Checks the sizes the kernels support (returns cudaErrorInvalidValue otherwise) and fills *plan.
cudaError_t plan_grouped_linear(const GroupedLinearProblem& problem, int num_sms, GroupedLinearPlan* plan);

// Enqueues everything on `stream` (group_rows when needed, the counter memset when split-K is
// used, the decode kernel, the chunk kernel). No host synchronisation, no allocation: capturable.
// workspace: plan.workspace_bytes bytes of device memory (may be null when that is 0).
cudaError_t launch_grouped_linear(const GroupedLinearProblem& problem, const GroupedLinearPlan& plan, void* workspace,
                                  cudaStream_t stream);

}  // namespace me
