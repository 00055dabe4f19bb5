// Stable counting sort of rows by member id, one thread block, no host synchronisation.
//
// Pass 1 builds the per-member histogram with shared-memory atomics and scans it into segment
// starts. Pass 2 walks the rows in tiles of one block: inside a warp, rows with the same member
// find each other with __match_any_sync and take consecutive slots in lane order; across warps,
// a per-warp histogram scanned in warp order keeps the result stable (row order within a member).
// Rows whose member is outside [0, M) form an extra trailing segment, so nothing is written out
// of bounds and the caller can see them after offsets[M].
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace me {
namespace kernels {

template <int kThreads>
__global__ void __launch_bounds__(kThreads) group_rows_kernel(const int32_t* __restrict__ members, int64_t T,
                                                              int32_t M, int32_t* __restrict__ order,
                                                              int32_t* __restrict__ offsets) {
  static_assert(kThreads % 32 == 0, "whole warps");
  constexpr int kWarps = kThreads / 32;
  extern __shared__ int32_t smem[];
  const int S = M + 1;              // segments: the M members, then the invalid rows
  int32_t* cursor = smem;           // [S] next free slot of each segment
  int32_t* warp_base = smem + S;    // [kWarps][S] per-warp counts, then per-warp start slots
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int s = tid; s < S; s += kThreads) cursor[s] = 0;
  __syncthreads();
  // Histogram: lanes of a warp with the same member add their count once (a batch has few
  // members, so per-thread atomics would all contend for the same few counters). The loop runs
  // whole tiles so every lane takes part in __match_any_sync.
  for (int64_t tile = 0; tile < T; tile += kThreads) {
    const int64_t t = tile + tid;
    int seg = -1;
    if (t < T) {
      const int32_t m = members[t];
      seg = (m >= 0 && m < M) ? m : M;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, seg);
    if (seg >= 0 && lane == __ffs(peers) - 1) atomicAdd(&cursor[seg], __popc(peers));
  }
  __syncthreads();
  if (tid == 0) {
    int32_t run = 0;
    for (int s = 0; s < S; ++s) {
      const int32_t count = cursor[s];
      cursor[s] = run;
      offsets[s] = run;  // offsets[M] = number of valid rows = start of the invalid segment
      run += count;
    }
  }
  __syncthreads();

  for (int64_t tile = 0; tile < T; tile += kThreads) {
    const int64_t t = tile + tid;
    const bool active = t < T;
    int seg = -1;
    if (active) {
      const int32_t m = members[t];
      seg = (m >= 0 && m < M) ? m : M;
    }
    for (int i = tid; i < kWarps * S; i += kThreads) warp_base[i] = 0;
    __syncthreads();
    const unsigned peers = __match_any_sync(0xffffffffu, seg);
    const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
    if (active && rank_in_warp == 0) warp_base[warp * S + seg] = __popc(peers);
    __syncthreads();
    for (int s = tid; s < S; s += kThreads) {
      int32_t run = cursor[s];
      for (int w = 0; w < kWarps; ++w) {
        const int32_t count = warp_base[w * S + s];
        warp_base[w * S + s] = run;
        run += count;
      }
      cursor[s] = run;
    }
    __syncthreads();
    if (active) order[warp_base[warp * S + seg] + rank_in_warp] = static_cast<int32_t>(t);
    __syncthreads();  // warp_base is cleared for the next tile
  }
}

}  // namespace kernels
}  // namespace me
