// Philox-4x32-10 (Salmon et al., SC'11) and the uniform / Gumbel mapping of the sampling ops'
// random streams, torch-free. One definition shared by the CPU helper philox_uniforms and the CPU
// sampling kernels, so both draw exactly the numbers of me_kernels/_random.py (and of the Triton
// kernels): counter = (i >> 2, offset lo, offset hi, stream), key = (seed lo, seed hi), word i & 3.
#pragma once

#include <cmath>
#include <cstdint>

namespace me {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(c[0]) * kM0;
    const uint64_t p1 = static_cast<uint64_t>(c[2]) * kM1;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p1);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kW0;
    k1 += kW1;
  }
}

// The 4 words of elements 4 * quad .. 4 * quad + 3 of the stream (seed, offset, stream).
inline void words(uint64_t seed, uint64_t offset, uint32_t stream, uint64_t quad, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(quad);
  out[1] = static_cast<uint32_t>(offset);
  out[2] = static_cast<uint32_t>(offset >> 32);
  out[3] = stream;
  philox4x32_10(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The words of kBlockQuads consecutive quads from first_quad: out[4 * q + w] is word w of quad
// first_quad + q. Rounds outside, quads inside, so the compiler vectorises the 32 x 32 -> 64-bit
// products across quads (a full-vocabulary draw spends most of its integer work here).
constexpr int kBlockQuads = 16;

inline void words_block(uint64_t seed, uint64_t offset, uint32_t stream, uint64_t first_quad, uint32_t* out) {
  uint32_t c0[kBlockQuads], c1[kBlockQuads], c2[kBlockQuads], c3[kBlockQuads];
  for (int q = 0; q < kBlockQuads; ++q) {
    c0[q] = static_cast<uint32_t>(first_quad + q);
    c1[q] = static_cast<uint32_t>(offset);
    c2[q] = static_cast<uint32_t>(offset >> 32);
    c3[q] = stream;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int q = 0; q < kBlockQuads; ++q) {
      const uint64_t p0 = static_cast<uint64_t>(c0[q]) * kM0;
      const uint64_t p1 = static_cast<uint64_t>(c2[q]) * kM1;
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[q] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[q] ^ k1;
      c1[q] = static_cast<uint32_t>(p1);
      c3[q] = static_cast<uint32_t>(p0);
      c0[q] = n0;
      c2[q] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
  for (int q = 0; q < kBlockQuads; ++q) {
    out[4 * q] = c0[q];
    out[4 * q + 1] = c1[q];
    out[4 * q + 2] = c2[q];
    out[4 * q + 3] = c3[q];
  }
}

// ((r >> 9) + 0.5) * 2^-23: exact in fp32, strictly inside (0, 1).
inline float uniform_from_bits(uint32_t r) {
  return (static_cast<float>(r >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// -log(-log(u)) in fp32, one rounding per operation like the torch reference (never fused).
inline float gumbel_from_bits(uint32_t r) {
  const float inner = std::log(uniform_from_bits(r));
  return -std::log(-inner);
}

}  // namespace philox
}  // namespace me
