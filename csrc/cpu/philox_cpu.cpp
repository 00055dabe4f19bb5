// CPU Philox-4x32-10 uniforms for the sampling ops' torch reference path (me_kernels._random).
//
// The Triton kernels draw their own numbers on the GPU; on the CPU the reference path needs the
// same numbers for a whole vocabulary every step, and ~200 int64 tensor ops per call cost
// milliseconds there. This computes exactly the same words (same counter / key layout, same
// uniform mapping; tests check bit equality with the torch implementation) in one pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "checks.h"
#include "ops.h"

namespace me {
namespace {

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

}  // namespace

at::Tensor philox_uniforms_cpu(const at::Tensor& seed, const at::Tensor& offset, int64_t stream, int64_t n) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && offset.scalar_type() == at::kLong,
                   "philox_uniforms: seed and offset must be int64, got ", seed.scalar_type(), " and ",
                   offset.scalar_type());
  TORCH_CHECK_VALUE(seed.dim() == 1 && offset.dim() == 1 && seed.size(0) == offset.size(0),
                    "philox_uniforms: seed and offset must be 1-D [B] of one length, got ", seed.sizes(), " and ",
                    offset.sizes());
  TORCH_CHECK_VALUE(seed.device().is_cpu() && offset.device().is_cpu(), "philox_uniforms: CPU tensors only");
  TORCH_CHECK_VALUE(n >= 0 && n < (int64_t{1} << 34), "philox_uniforms: n must be in [0, 2^34), got ", n);
  TORCH_CHECK_VALUE(stream >= 0 && stream <= 0xFFFFFFFFll, "philox_uniforms: stream must fit in 32 bits, got ", stream);
  const auto s = seed.contiguous();
  const auto o = offset.contiguous();
  const int64_t rows = s.size(0);
  auto out = at::empty({rows, n}, s.options().dtype(at::kFloat));
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* op = o.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const int64_t quads = (n + 3) / 4;
  at::parallel_for(0, rows * quads, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / quads, q = job % quads;
      const uint64_t key = static_cast<uint64_t>(sp[row]);
      const uint64_t off = static_cast<uint64_t>(op[row]);
      uint32_t c[4] = {static_cast<uint32_t>(q), static_cast<uint32_t>(off), static_cast<uint32_t>(off >> 32),
                       static_cast<uint32_t>(stream)};
      philox4x32_10(c, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
      float* row_out = dst + row * n;
      for (int w = 0; w < 4 && 4 * q + w < n; ++w) {
        // ((r >> 9) + 0.5) * 2^-23: exact in fp32, strictly inside (0, 1)
        row_out[4 * q + w] = (static_cast<float>(c[w] >> 9) + 0.5f) * 1.1920928955078125e-07f;
      }
    }
  });
  return out;
}

}  // namespace me
