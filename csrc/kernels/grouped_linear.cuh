// Grouped linear: out[t] = x[t] @ weight[members[t]].T (+ bias[members[t]]), fp32 accumulation.
//
// Design rationale
// ================
// Shapes: x [T, K] (rows may be strided), weight [M, N, K] contiguous, out [T, N]. In an ME step
// each request picked a member, so rows of one batch use different weights. Two regimes:
//
// 1. Decode path (a member has 1..16 rows): memory bound. A member with r rows does 2*r*N*K FLOPs
//    on 2*N*K weight bytes (bf16): at most 16 FLOP/B, far below the H100 ridge (~300 FLOP/B for
//    dense bf16 tensor cores vs 3.35 TB/s). The only thing that matters is to stream each CHOSEN
//    member's weights once, at full bandwidth, and to read nothing of the others.
//    * Work unit: a block of 4 warps owns 32 weight rows (two 16-row MMA tiles) of one member and a
//      range of K ("split"); the warps interleave over 64-byte k-blocks of that range, so at any
//      time a block reads 32 rows x 512 contiguous bytes (whole sectors, DRAM-page friendly).
//    * Swapped MMA: the weight tile is the MMA's A operand (16 rows) and the member's x rows are
//      B (8 columns per group, 2 groups for 16 rows). Tensor cores make 1..16 rows cost the same;
//      padding columns are zeros and are never stored. Each thread loads its 16-byte chunks straight
//      from global memory into registers (no shared memory, see the k-permutation in
//      mma_sm80.cuh), weights with an evict-first hint. x chunks (at most 16 rows x K, shared by all
//      blocks) come from L1/L2; each one feeds 32 weight rows, so x traffic is <= 1/2 of the weight
//      traffic and never reaches DRAM twice.
//    * Bytes in flight: a thread issues 4 k-blocks x 4 weight rows x 16 B = 256 B of weight loads
//      before the first MMA uses them (32 KB per block; __launch_bounds__(128, 1) keeps ptxas from
//      trading these registers for occupancy by sinking loads next to their MMAs). Covering HBM
//      latency needs ~3.35 TB/s x ~0.7 us ~ 2.3 MB in flight, i.e. about one such block per SM;
//      when N is small (ceil(N/32) < SMs / 2), split-K raises the grid to >= one block per SM for
//      a single chosen member: grid = ceil(N/32) x k_splits x slots.
//    * Split-K reduction: each split writes fp32 partials [split, t, n]; the last block of a tile to
//      arrive (atomic counter) sums the splits in split order (deterministic), adds the bias and
//      stores. Partials are 4 * k_splits * T * N bytes (<= a few % of the weight bytes).
//    * Grouping: for T <= 16 (the decode step) the kernel groups rows itself: warp 0 reads the <= 16
//      member ids, slot s of the grid takes the s-th distinct valid member (in order of first
//      appearance) and its rows; slots = min(M, T), so members no row chose have no block at all.
//      For T > 16 the rows come from group_rows (order/offsets) and block z = member m works only if
//      1 <= count(m) <= 16; others exit at once.
//    Expected bound: sum over distinct chosen members of 2*N*K bytes / HBM bandwidth, plus launch.
//
// 2. Chunk path (a member has > 16 rows: catch-up chunks, prefill): a tiled tensor-core GEMM over
//    the member's rows in group_rows order.
//    * Tile 64 rows x BN (128, or 64 when the grid would otherwise not fill the GPU) x 64-byte
//      k-blocks, 4 warps as 2 x 2 (warp tile 32 x BN/2), cp.async multi-stage pipeline (3 stages for
//      BN = 128, 4 for BN = 64; <= 48 KB static shared memory, so no opt-in attribute and nothing
//      to set during graph capture). Rows of the x tile are gathered through `order` by cp.async
//      with zero fill for padding rows / past-K chunks.
//    * Shared-memory rows are 64 B with the 16-byte chunks XOR-swizzled by (row / 2) % 4, so the
//      cp.async writes and the fragment reads are bank-conflict free. bf16/fp16 fragments come
//      from ldmatrix.x4 (ready-made MMA operands, no register shuffles): per warp and k-block,
//      4 + BN/16 ldmatrix feed 2 x BN/16 x 2 MMAs m16n8k16 (32 for BN = 128: 128 KFLOP per 6 KB
//      of shared-memory reads, ~21 FLOP/B). fp32 uses 16-byte ld.shared in the permuted k order of
//      mma_sm80.cuh and 3xTF32 MMAs.
//    * BM = 64 keeps the padding per member below 64 rows (at T = 512, M = 4, ~128 rows/member: a
//      128-row tile would waste up to half of the MMAs).
//    * Grid: x = row tiles, sized from T and M only: ceil(T/64) + min(M, T/17) >= sum over members
//      with > 16 rows of ceil(count/64); y = ceil(N/BN). Each block finds its (member, tile) from
//      offsets with a warp scan; blocks beyond the real tile count exit. Row tiles are the fastest
//      grid dimension, so the blocks that share a weight tile run together and the member's weights
//      come from DRAM about once (x, T*K, is re-read per column tile from L2).
//    Expected bound: max(chosen members' weight bytes / HBM bandwidth, FLOPs / mma.sync peak). A
//    dense GEMM with the same FLOPs reads ONE weight; M members read up to M times more bytes.
//
// Selection needs no host sync: for T <= 16 every member has <= 16 rows (decode only, one launch);
// for T > 16 group_rows, the decode kernel and the chunk kernel are launched back to back and
// each member's rows are handled by the kernel its count (read on device) selects.
//
// Out-of-range member ids: their rows are written as NaN (by the decode kernel's blocks with
// split = 0 and slot = 0); nothing is read or written out of bounds.
//
// fp32: same kernels with 3xTF32 MMAs (near-fp32 accuracy, see mma_sm80.cuh). Unaligned inputs
// (K * sizeof(T) or the x row stride not a multiple of 16 B, or an offset base pointer) take the
// kVec = false instantiations: element-wise guarded loads, same tiling.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/mma_sm80.cuh"

namespace me {
namespace kernels {

// ---- decode path -------------------------------------------------------------------------------

constexpr int kDecodeMaxRows = 16;  // rows of one member handled by the decode path
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeTileN = 32;  // weight rows per block: two 16-row MMA tiles
// k-blocks per warp whose loads are all issued before the first MMA uses them (256 B of weights
// per thread in flight; fp32 needs twice the registers per operand for the 3xTF32 split).
template <typename T>
constexpr int decode_unroll() {
  return sizeof(T) == 4 ? 2 : 4;
}
constexpr int kDecodeMaxSplits = 8;

struct DecodeParams {
  const void* x;
  int64_t x_row_stride;     // elements
  const int32_t* members;   // direct mode
  const int32_t* order;     // group_rows mode
  const int32_t* offsets;   // group_rows mode, [M + 1]
  const void* weight;       // [M, N, K] contiguous
  const void* bias;         // [M, N] contiguous, or nullptr
  void* out;                // [T, N] contiguous
  float* partials;          // [k_splits, T, N] when k_splits > 1
  int32_t* counters;        // [gridDim.z, gridDim.x], zeroed, when k_splits > 1
  int32_t T, N, K, M;
  int32_t k_splits;
  int32_t kblocks_per_split;
};

// kGroups: 8-row groups of x (1 when every member has <= 8 rows). kDirect: group the <= 16 rows
// in the kernel from `members` (T <= 16); else read order/offsets. kVec: 16-byte aligned rows.
template <typename T, int kGroups, bool kDirect, bool kVec>
__global__ void __launch_bounds__(kDecodeThreads, 1)
    grouped_linear_decode_kernel(const DecodeParams p) {
  static_assert(kGroups == 1 || kGroups == 2, "at most 16 rows per member");
  using Ops = MmaOps<T>;
  constexpr int kUnroll = decode_unroll<T>();

  __shared__ int32_t s_rows[kDecodeMaxRows];
  __shared__ int32_t s_count;
  __shared__ int32_t s_member;
  __shared__ uint32_t s_bad_rows;  // direct mode: bit t set when members[t] is out of range
  __shared__ int32_t s_is_last;
  __shared__ float s_red[kDecodeWarps][kDecodeMaxRows][kDecodeTileN + 1];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int slot = blockIdx.z;
  const int n0 = blockIdx.x * kDecodeTileN;
  const int64_t N = p.N;
  T* out = static_cast<T*>(p.out);

  if (warp == 0) {
    if constexpr (kDirect) {
      const unsigned lower = (1u << lane) - 1u;
      const bool in = lane < p.T;
      const int32_t id = in ? p.members[lane] : 0;
      const bool valid = in && id >= 0 && id < p.M;
      const int key = valid ? id : (in ? -1 : -2);
      const unsigned peers = __match_any_sync(0xffffffffu, key);
      const bool first = (peers & lower) == 0u;  // first row of its member
      const unsigned firsts = __ballot_sync(0xffffffffu, valid && first);
      const unsigned chosen =
          __ballot_sync(0xffffffffu, ((firsts >> lane) & 1u) && __popc(firsts & lower) == slot);
      unsigned rows = 0u;
      int member = -1;
      if (chosen != 0u) {  // warp-uniform
        const int src = __ffs(chosen) - 1;
        rows = __shfl_sync(0xffffffffu, peers, src);
        member = __shfl_sync(0xffffffffu, id, src);
      }
      if ((rows >> lane) & 1u) s_rows[__popc(rows & lower)] = lane;
      const unsigned bad = __ballot_sync(0xffffffffu, in && !valid);
      if (lane == 0) {
        s_count = __popc(rows);
        s_member = member;
        s_bad_rows = bad;
      }
    } else {
      const int32_t begin = p.offsets[slot];
      const int32_t count = p.offsets[slot + 1] - begin;
      const bool mine = count >= 1 && count <= kDecodeMaxRows;
      if (mine && lane < count) s_rows[lane] = p.order[begin + lane];
      if (lane == 0) {
        s_count = mine ? count : 0;
        s_member = slot;
      }
    }
  }
  __syncthreads();

  // Rows with an out-of-range member id get NaN, written once per column tile.
  if (blockIdx.y == 0 && slot == 0) {
    const T nan_value = Elem<T>::from_float(NAN);
    if constexpr (kDirect) {
      const uint32_t bad = s_bad_rows;
      for (int i = tid; i < p.T * kDecodeTileN; i += kDecodeThreads) {
        const int t = i / kDecodeTileN;
        const int n = n0 + i % kDecodeTileN;
        if (((bad >> t) & 1u) && n < N) out[t * N + n] = nan_value;
      }
    } else {
      const int32_t first_bad = p.offsets[p.M];
      const int64_t n_bad = static_cast<int64_t>(p.T) - first_bad;
      for (int64_t i = tid; i < n_bad * kDecodeTileN; i += kDecodeThreads) {
        const int64_t t = p.order[first_bad + i / kDecodeTileN];
        const int n = n0 + static_cast<int>(i % kDecodeTileN);
        if (n < N) out[t * N + n] = nan_value;
      }
    }
  }

  const int R = s_count;
  if (R == 0) return;  // block-uniform: no member for this slot, or not a decode-sized member
  const int member = s_member;

  const int g = lane >> 2;
  const int q = lane & 3;
  const int64_t row_bytes = static_cast<int64_t>(p.K) * sizeof(T);
  const int kblocks = static_cast<int>((row_bytes + kKBlockBytes - 1) / kKBlockBytes);

  // This thread's weight rows: tile i, half h -> row n0 + 16 i + 8 h + g.
  const char* w_member = static_cast<const char*>(p.weight) + static_cast<int64_t>(member) * N * row_bytes;
  const char* w_row[2][2];
  bool w_ok[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 16 * i + 8 * h + g;
      w_ok[i][h] = n < N;
      w_row[i][h] = w_member + (w_ok[i][h] ? n : 0) * row_bytes;
    }
  }
  // This thread's x rows: group j -> the member's row 8 j + g.
  const char* x_row[kGroups];
  bool x_ok[kGroups];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int r = 8 * j + g;
    x_ok[j] = r < R;
    x_row[j] = static_cast<const char*>(p.x) + (x_ok[j] ? s_rows[r] * p.x_row_stride * static_cast<int64_t>(sizeof(T)) : 0);
  }

  const int kb_begin = blockIdx.y * p.kblocks_per_split;
  const int kb_end = min(kb_begin + p.kblocks_per_split, kblocks);

  float acc[2][kGroups][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kGroups; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  for (int kb = kb_begin + warp; kb < kb_end; kb += kDecodeWarps * kUnroll) {
    uint4 wv[kUnroll][2][2];
    uint4 xv[kUnroll][kGroups];
    // All loads of the unrolled k-blocks first, so they are in flight together.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int kbu = kb + u * kDecodeWarps;
      const bool in_k = kbu < kb_end;
      const int64_t off = static_cast<int64_t>(kbu) * kKBlockBytes + 16 * q;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[u][i][h] = (in_k && w_ok[i][h]) ? load_chunk<T, kVec, true>(w_row[i][h], off, row_bytes) : zero_chunk();
#pragma unroll
      for (int j = 0; j < kGroups; ++j)
        xv[u][j] = (in_k && x_ok[j]) ? load_chunk<T, kVec, false>(x_row[j], off, row_bytes) : zero_chunk();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      typename Ops::B b[kGroups];
#pragma unroll
      for (int j = 0; j < kGroups; ++j) b[j] = Ops::make_b(xv[u][j]);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const typename Ops::A a = Ops::make_a(wv[u][i][0], wv[u][i][1]);
#pragma unroll
        for (int j = 0; j < kGroups; ++j) Ops::mma_kblock(acc[i][j], a, b[j]);
      }
    }
  }

  // Swapped MMA: c0, c1 -> weight row g, x rows 2q, 2q+1; c2, c3 -> weight row g + 8.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kGroups; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_red[warp][8 * j + 2 * q + (c & 1)][16 * i + g + 8 * (c >> 1)] = acc[i][j][c];
  __syncthreads();

  const T* bias = static_cast<const T*>(p.bias);
  const int64_t bias_row = static_cast<int64_t>(member) * N;
  // Consecutive threads take consecutive columns of one row: coalesced stores.
  for (int e = tid; e < R * kDecodeTileN; e += kDecodeThreads) {
    const int r = e / kDecodeTileN;
    const int nl = e % kDecodeTileN;
    const int n = n0 + nl;
    if (n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) v += s_red[w][r][nl];
    const int64_t t = s_rows[r];
    if (p.k_splits == 1) {
      if (bias != nullptr) v += Elem<T>::to_float(bias[bias_row + n]);
      out[t * N + n] = Elem<T>::from_float(v);
    } else {
      p.partials[(static_cast<int64_t>(blockIdx.y) * p.T + t) * N + n] = v;
    }
  }
  if (p.k_splits == 1) return;

  // Split-K: the last block of this (slot, column tile) to arrive reduces all splits.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(&p.counters[slot * gridDim.x + blockIdx.x], 1);
    s_is_last = prev == p.k_splits - 1;
  }
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  for (int e = tid; e < R * kDecodeTileN; e += kDecodeThreads) {
    const int r = e / kDecodeTileN;
    const int n = n0 + e % kDecodeTileN;
    if (n >= N) continue;
    const int64_t t = s_rows[r];
    float v = 0.f;
    for (int s = 0; s < p.k_splits; ++s) v += __ldcg(&p.partials[(static_cast<int64_t>(s) * p.T + t) * N + n]);
    if (bias != nullptr) v += Elem<T>::to_float(bias[bias_row + n]);
    out[t * N + n] = Elem<T>::from_float(v);
  }
}

// ---- chunk path --------------------------------------------------------------------------------

constexpr int kChunkBM = 64;
constexpr int kChunkThreads = 128;
constexpr int kChunkMinRows = kDecodeMaxRows + 1;

template <int kBN>
struct ChunkConfig {
  static_assert(kBN == 64 || kBN == 128, "BN is 64 or 128");
  static constexpr int kStages = kBN == 128 ? 3 : 4;  // (64 + BN) x 64 B per stage, <= 48 KB total
  static constexpr int kWarpN = kBN / 2;              // warps are 2 (rows) x 2 (columns)
  static constexpr int kNTiles = kWarpN / 8;          // 8-column MMA tiles per warp
  static constexpr int kAChunks = kChunkBM * 4 / kChunkThreads;  // 16-byte chunks per thread per stage
  static constexpr int kBChunks = kBN * 4 / kChunkThreads;
};

struct ChunkParams {
  const void* x;
  int64_t x_row_stride;  // elements
  const int32_t* order;
  const int32_t* offsets;
  const void* weight;
  const void* bias;
  void* out;
  int32_t T, N, K, M;
};

// Number of row tiles the chunk kernel's grid must provide (an upper bound of the real count).
inline int64_t chunk_row_tiles_bound(int64_t T, int64_t M) {
  const int64_t members_with_chunks = T / kChunkMinRows < M ? T / kChunkMinRows : M;
  return (T + kChunkBM - 1) / kChunkBM + members_with_chunks;
}

template <typename T, int kBN, bool kVec>
__global__ void __launch_bounds__(kChunkThreads, 1)
    grouped_linear_chunk_kernel(const ChunkParams p) {
  using Cfg = ChunkConfig<kBN>;
  using Ops = MmaOps<T>;
  constexpr int kStages = Cfg::kStages;

  __shared__ __align__(128) uint8_t s_a[kStages][kChunkBM * kKBlockBytes];
  __shared__ __align__(128) uint8_t s_b[kStages][kBN * kKBlockBytes];
  __shared__ int32_t s_rows[kChunkBM];
  __shared__ int32_t s_member;
  __shared__ int32_t s_row_begin;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // Which member, and which 64-row tile of its rows, this block computes: members with more than
  // kDecodeMaxRows rows own ceil(count / 64) consecutive tiles, in member order.
  if (warp == 0) {
    const int target = blockIdx.x;
    int member = -1;
    int row_begin = 0;
    int base = 0;
    for (int m0 = 0; m0 < p.M; m0 += 32) {
      const int m = m0 + lane;
      int tiles = 0;
      int32_t begin = 0;
      if (m < p.M) {
        begin = p.offsets[m];
        const int32_t count = p.offsets[m + 1] - begin;
        tiles = count >= kChunkMinRows ? (count + kChunkBM - 1) / kChunkBM : 0;
      }
      int incl = tiles;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += v;
      }
      const int first = base + incl - tiles;
      const bool hit = tiles > 0 && target >= first && target < base + incl;
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      if (hits != 0u) {  // warp-uniform
        const int src = __ffs(hits) - 1;
        member = __shfl_sync(0xffffffffu, m, src);
        row_begin = __shfl_sync(0xffffffffu, begin + (target - first) * kChunkBM, src);
        break;
      }
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      s_member = member;
      s_row_begin = row_begin;
    }
  }
  __syncthreads();
  const int member = s_member;
  if (member < 0) return;  // block-uniform: more tiles in the grid than rows need
  const int row_begin = s_row_begin;
  const int rows = min(kChunkBM, p.offsets[member + 1] - row_begin);
  if (tid < kChunkBM) s_rows[tid] = tid < rows ? p.order[row_begin + tid] : 0;
  __syncthreads();

  const int64_t N = p.N;
  const int64_t row_bytes = static_cast<int64_t>(p.K) * sizeof(T);
  const int kblocks = static_cast<int>((row_bytes + kKBlockBytes - 1) / kKBlockBytes);
  const int n0 = blockIdx.y * kBN;
  const int part = tid & 3;  // which 16-byte chunk of a 64-byte row slice this thread copies

  // Copy assignments (fixed over K): A row tid/4 + 32c of the tile, B row tid/4 + 32c.
  const char* x_base = static_cast<const char*>(p.x);
  const char* a_src[Cfg::kAChunks];
  bool a_ok[Cfg::kAChunks];
#pragma unroll
  for (int c = 0; c < Cfg::kAChunks; ++c) {
    const int r = (tid >> 2) + 32 * c;
    a_ok[c] = r < rows;
    a_src[c] = x_base + (a_ok[c] ? s_rows[r] * p.x_row_stride * static_cast<int64_t>(sizeof(T)) : 0);
  }
  const char* w_member = static_cast<const char*>(p.weight) + static_cast<int64_t>(member) * N * row_bytes;
  const char* b_src[Cfg::kBChunks];
  bool b_ok[Cfg::kBChunks];
#pragma unroll
  for (int c = 0; c < Cfg::kBChunks; ++c) {
    const int n = n0 + (tid >> 2) + 32 * c;
    b_ok[c] = n < N;
    b_src[c] = w_member + (b_ok[c] ? n : 0) * row_bytes;
  }

  auto load_stage = [&](int stage, int kb) {
    const int64_t off = static_cast<int64_t>(kb) * kKBlockBytes + 16 * part;
#pragma unroll
    for (int c = 0; c < Cfg::kAChunks; ++c) {
      uint8_t* dst = &s_a[stage][swizzled_offset((tid >> 2) + 32 * c, part)];
      if constexpr (kVec) {
        const bool ok = a_ok[c] && off < row_bytes;
        cp_async_16(dst, ok ? a_src[c] + off : x_base, ok ? 16 : 0);
      } else {
        sts128(dst, a_ok[c] ? load_chunk_elementwise<T>(a_src[c], off, row_bytes) : zero_chunk());
      }
    }
#pragma unroll
    for (int c = 0; c < Cfg::kBChunks; ++c) {
      uint8_t* dst = &s_b[stage][swizzled_offset((tid >> 2) + 32 * c, part)];
      if constexpr (kVec) {
        const bool ok = b_ok[c] && off < row_bytes;
        cp_async_16(dst, ok ? b_src[c] + off : w_member, ok ? 16 : 0);
      } else {
        sts128(dst, b_ok[c] ? load_chunk_elementwise<T>(b_src[c], off, row_bytes) : zero_chunk());
      }
    }
  };

  // Pipeline: stage kb % kStages holds k-block kb. Group accounting: one commit per prologue
  // stage and per iteration (possibly empty), so wait_group<kStages - 2> at iteration kb
  // guarantees that the groups of k-blocks 0..kb have landed.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kblocks) load_stage(s, s);
    cp_async_commit();
  }

  const int g = lane >> 2;
  const int q = lane & 3;
  const int warp_m = warp >> 1;
  const int warp_n = warp & 1;
  float acc[2][Cfg::kNTiles][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  for (int kb = 0; kb < kblocks; ++kb) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // k-block kb visible to all; everyone is done with k-block kb - 1
    const int next = kb + kStages - 1;
    if (next < kblocks) load_stage(next % kStages, next);  // overwrites k-block kb - 1's stage
    cp_async_commit();

    const uint8_t* sa = s_a[kb % kStages];
    const uint8_t* sb = s_b[kb % kStages];
    if constexpr (sizeof(T) == 2) {
      // bf16 / fp16: ldmatrix builds the MMA fragments directly (standard k order).
#pragma unroll
      for (int s = 0; s < 2; ++s) {  // k16 steps: chunks 2s and 2s + 1 of the k-block
        uint32_t a[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {  // matrices: rows 0-7 / 8-15 (lane bit 3) x k lo / hi (lane bit 4)
          const int row = 32 * warp_m + 16 * i + (lane & 7) + 8 * ((lane >> 3) & 1);
          ldmatrix_x4(a[i], sa + swizzled_offset(row, 2 * s + (lane >> 4)));
        }
#pragma unroll
        for (int jj = 0; jj < Cfg::kNTiles / 2; ++jj) {  // two 8-column tiles per ldmatrix
          // matrices: tile 2jj k lo, tile 2jj k hi, tile 2jj+1 k lo, tile 2jj+1 k hi
          const int row = Cfg::kWarpN * warp_n + 16 * jj + (lane & 7) + 8 * (lane >> 4);
          uint32_t b[4];
          ldmatrix_x4(b, sb + swizzled_offset(row, 2 * s + ((lane >> 3) & 1)));
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            Ops::mma_k16(acc[i][2 * jj], a[i], b[0], b[1]);
            Ops::mma_k16(acc[i][2 * jj + 1], a[i], b[2], b[3]);
          }
        }
      }
    } else {
      // fp32: 16-byte loads in the permuted k order of mma_sm80.cuh, split for 3xTF32.
      typename Ops::A a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = 32 * warp_m + 16 * i + g;
        a[i] = Ops::make_a(lds128(sa + swizzled_offset(r, q)), lds128(sa + swizzled_offset(r + 8, q)));
      }
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; ++j) {
        const typename Ops::B b = Ops::make_b(lds128(sb + swizzled_offset(Cfg::kWarpN * warp_n + 8 * j + g, q)));
#pragma unroll
        for (int i = 0; i < 2; ++i) Ops::mma_kblock(acc[i][j], a[i], b);
      }
    }
  }
  cp_async_wait<0>();

  // c0, c1 -> tile row g, columns 2q, 2q+1; c2, c3 -> tile row g + 8.
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t bias_row = static_cast<int64_t>(member) * N;
  const bool paired = (N & 1) == 0;  // then (t * N + n) is even for even n: aligned 2-element stores
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 32 * warp_m + 16 * i + 8 * h + g;
      if (r >= rows) continue;
      T* out_row = out + static_cast<int64_t>(s_rows[r]) * N;
#pragma unroll
      for (int j = 0; j < Cfg::kNTiles; ++j) {
        const int n = n0 + Cfg::kWarpN * warp_n + 8 * j + 2 * q;
        if (n >= N) continue;
        float v0 = acc[i][j][2 * h];
        float v1 = acc[i][j][2 * h + 1];
        if (bias != nullptr) {
          v0 += Elem<T>::to_float(bias[bias_row + n]);
          if (n + 1 < N) v1 += Elem<T>::to_float(bias[bias_row + n + 1]);
        }
        if (paired) {
          Elem<T>::store2(out_row + n, v0, v1);
        } else {
          out_row[n] = Elem<T>::from_float(v0);
          if (n + 1 < N) out_row[n + 1] = Elem<T>::from_float(v1);
        }
      }
    }
  }
}

}  // namespace kernels
}  // namespace me
