// Warp-level building blocks shared by the grouped-linear kernels (sm_80+, also used on sm_90):
// element traits, 16-byte global / shared loads, cp.async, and one "k-block" of tensor-core MMA.
//
// The k-block convention
// ----------------------
// Both kernels walk K in k-blocks of 64 BYTES per row (32 bf16/fp16 elements or 16 fp32). In a
// warp, lane = 4 * g + q (g = lane / 4 in 0..7, q = lane % 4 in 0..3), and thread (g, q) owns bytes
// [16q, 16q + 16) of the k-block for its rows: it fetches them with ONE 16-byte load per row
// (global: 4 lanes read 64 contiguous bytes of a row, whole 32-byte sectors; shared: rows are
// 64 bytes apart, so each quarter-warp touches 128 contiguous bytes and the load is bank-conflict
// free without any swizzle).
//
// The MMA instructions expect a fixed, interleaved assignment of k indices to lanes. A dot product
// does not care about the order of k, so we feed the instruction a PERMUTED k: the "logical" k of
// the instruction is mapped to a physical k inside the k-block, identically for A and for B (the
// map depends only on the logical k, and both operands index it the same way), so
//   sum_logical_k A[m][perm(k)] * B[perm(k)][n] = sum_physical_k A[m][k] * B[k][n].
// With the 16 bytes of a thread held as four 32-bit registers v[0..3]:
//   * bf16/fp16, m16n8k16 (registers hold 2 elements): step s in {0, 1} uses v[2s] for logical
//     k {2q, 2q+1} and v[2s+1] for logical k {2q+8, 2q+9}; physical k = 8q + 4s + {0,1} and
//     8q + 4s + {2,3}. Over q and s this covers the 32 elements of the k-block exactly once.
//   * fp32 as tf32, m16n8k8 (one element per register): step s uses v[2s] for logical k q and
//     v[2s+1] for logical k q+4; physical k = 4q + 2s and 4q + 2s + 1: the 16 elements once each.
// PTX fragment layouts used (PTX ISA "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"):
//   A (16 x k): register 0 -> row g, 1 -> row g+8, 2 -> row g (upper k half), 3 -> row g+8 (upper)
//   B (k x 8):  register 0 -> column g (lower k half), 1 -> column g (upper k half)
//   C (16 x 8): c0, c1 -> row g, columns 2q, 2q+1; c2, c3 -> row g+8, columns 2q, 2q+1.
// So an A fragment is built from two rows' 16-byte chunks ("lo" = row g, "hi" = row g+8) and a B
// fragment from one row's chunk (B is stored N x K, i.e. "col" layout, which is what .row.col wants).
// The decode kernel (operands straight from global memory) and the fp32 chunk path use this
// permuted order; the bf16/fp16 chunk path uses ldmatrix from shared memory, which yields the
// instruction's own (contiguous) k order for both operands. Each kernel uses one order for A and B.
//
// fp32 inputs use 3xTF32: v = big + small with big = tf32(v), small = tf32(v - big), and
// a*b ~= a_small*b_big + a_big*b_small + a_big*b_big. The dropped term and the rounding of the small
// parts are ~2^-22 relative per product, i.e. close to fp32 FMA accuracy (plain TF32 would be 2^-11).
// Non-finite fp32 inputs are not bit-faithful: inf * (exactly-tf32 value) can give NaN instead of inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace me {
namespace kernels {

constexpr int kKBlockBytes = 64;

// ---- element traits --------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
  __device__ __forceinline__ static void store2(float* dst, float a, float b) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static void store2(__nv_bfloat16* dst, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
  }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static void store2(__half* dst, float a, float b) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
  }
};

// ---- 16-byte chunk loads ----------------------------------------------------------------------

__device__ __forceinline__ uint4 zero_chunk() { return make_uint4(0u, 0u, 0u, 0u); }

// Element-wise fallback for rows that are not 16-byte aligned (odd K, odd strides, offset views):
// loads the elements of [off, off + 16) that lie below row_bytes, zero elsewhere. Little-endian
// packing, so the registers hold exactly what a 16-byte vector load would.
template <typename T>
__device__ __forceinline__ uint4 load_chunk_elementwise(const char* row, int64_t off, int64_t row_bytes) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (off + 4 * e < row_bytes) w[e] = *reinterpret_cast<const uint32_t*>(row + off + 4 * e);
    }
  } else {
    static_assert(sizeof(T) == 2, "16-bit or 32-bit elements");
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (off + 2 * e < row_bytes) {
        const uint32_t bits = *reinterpret_cast<const uint16_t*>(row + off + 2 * e);
        w[e >> 1] |= bits << (16 * (e & 1));
      }
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Chunk [off, off + 16) of a row of row_bytes bytes, zero past the end. kVec: the row start and
// row_bytes are multiples of 16, so a chunk is entirely inside or entirely outside the row.
// kStream: data read exactly once (weights in the decode path) -> evict-first cache hint.
template <typename T, bool kVec, bool kStream>
__device__ __forceinline__ uint4 load_chunk(const char* row, int64_t off, int64_t row_bytes) {
  if constexpr (kVec) {
    if (off >= row_bytes) return zero_chunk();
    const uint4* p = reinterpret_cast<const uint4*>(row + off);
    if constexpr (kStream) {
      return __ldcs(p);
    } else {
      return __ldg(p);
    }
  } else {
    return load_chunk_elementwise<T>(row, off, row_bytes);
  }
}

__device__ __forceinline__ uint4 lds128(const void* smem_ptr) {
  uint4 v;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

__device__ __forceinline__ void sts128(void* smem_ptr, uint4 v) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// ldmatrix .x4: lanes 8j..8j+7 give the row addresses (16 contiguous bytes each) of 8x8 b16
// matrix j; register j of lane 4g + q receives elements (row g, columns 2q, 2q+1) of matrix j,
// which is exactly the mma.m16n8k16 fragment of that 8x8 block.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared-memory tiles hold rows of one 64-byte k-block (four 16-byte chunks). Chunk c of row r is
// stored at chunk c ^ ((r >> 1) & 3): any 8 consecutive rows at one chunk (an ldmatrix phase), and
// 2 consecutive rows x 4 chunks (a quarter-warp of 16-byte loads or cp.async writes), then fall in
// 8 distinct 16-byte bank groups, i.e. no bank conflicts.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kKBlockBytes + 16 * (chunk ^ ((row >> 1) & 3));
}

// 16-byte asynchronous global->shared copy; src_bytes = 0 writes 16 zero bytes without reading
// (the source address must still be a valid global address).
__device__ __forceinline__ void cp_async_16(void* smem_ptr, const void* gmem_ptr, int src_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem_ptr), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- one k-block of MMA ------------------------------------------------------------------------

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

// MmaOps<T>: make_a builds the A fragment of a 16-row tile from the thread's 16-byte chunks of
// rows g ("lo") and g + 8 ("hi"); make_b the B fragment of an 8-column tile from its chunk of
// column g; mma_kblock adds the product over one 64-byte k-block. Fragments are built once per
// k-block and reused across tiles (the A quads interleave two rows, so building them costs moves).
template <typename T>
struct MmaOps;

// bf16 / fp16: step s (k16) uses registers 2s and 2s+1 of each chunk.
template <typename T, bool kBf16>
struct MmaOps16 {
  // One k16 step with ready-made fragments (e.g. from ldmatrix): a = A quad, b0/b1 = B pair.
  __device__ __forceinline__ static void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) {
      mma_m16n8k16_bf16(d, a[0], a[1], a[2], a[3], b0, b1);
    } else {
      mma_m16n8k16_f16(d, a[0], a[1], a[2], a[3], b0, b1);
    }
  }
  struct A {
    uint32_t q[2][4];
  };
  struct B {
    uint32_t q[2][2];
  };
  __device__ __forceinline__ static A make_a(uint4 lo, uint4 hi) {
    return A{{{lo.x, hi.x, lo.y, hi.y}, {lo.z, hi.z, lo.w, hi.w}}};
  }
  __device__ __forceinline__ static B make_b(uint4 c) { return B{{{c.x, c.y}, {c.z, c.w}}}; }
  __device__ __forceinline__ static void mma_kblock(float (&d)[4], const A& a, const B& b) {
#pragma unroll
    for (int s = 0; s < 2; ++s) mma_k16(d, a.q[s], b.q[s][0], b.q[s][1]);
  }
};

template <>
struct MmaOps<__nv_bfloat16> : MmaOps16<__nv_bfloat16, true> {};
template <>
struct MmaOps<__half> : MmaOps16<__half, false> {};

// fp32 as 3xTF32: step s (k8) uses elements 2s and 2s+1 of each chunk, split into big + small.
template <>
struct MmaOps<float> {
  struct A {
    uint32_t big[2][4];
    uint32_t small[2][4];
  };
  struct B {
    uint32_t big[2][2];
    uint32_t small[2][2];
  };
  __device__ __forceinline__ static void split(uint32_t bits, uint32_t& big, uint32_t& small) {
    const float v = __uint_as_float(bits);
    big = to_tf32(v);
    const float rest = v - __uint_as_float(big);
    // inf - inf would poison the small part; a non-finite value keeps only its big part.
    small = isfinite(rest) ? to_tf32(rest) : 0u;
  }
  __device__ __forceinline__ static A make_a(uint4 lo, uint4 hi) {
    const uint32_t quads[2][4] = {{lo.x, hi.x, lo.y, hi.y}, {lo.z, hi.z, lo.w, hi.w}};
    A a;
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int r = 0; r < 4; ++r) split(quads[s][r], a.big[s][r], a.small[s][r]);
    return a;
  }
  __device__ __forceinline__ static B make_b(uint4 c) {
    const uint32_t pairs[2][2] = {{c.x, c.y}, {c.z, c.w}};
    B b;
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int r = 0; r < 2; ++r) split(pairs[s][r], b.big[s][r], b.small[s][r]);
    return b;
  }
  __device__ __forceinline__ static void mma_kblock(float (&d)[4], const A& a, const B& b) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      // Small terms first: they are the least significant.
      mma_m16n8k8_tf32(d, a.small[s][0], a.small[s][1], a.small[s][2], a.small[s][3], b.big[s][0], b.big[s][1]);
      mma_m16n8k8_tf32(d, a.big[s][0], a.big[s][1], a.big[s][2], a.big[s][3], b.small[s][0], b.small[s][1]);
      mma_m16n8k8_tf32(d, a.big[s][0], a.big[s][1], a.big[s][2], a.big[s][3], b.big[s][0], b.big[s][1]);
    }
  }
};

}  // namespace kernels
}  // namespace me
