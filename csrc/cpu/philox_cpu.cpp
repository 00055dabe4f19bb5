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
#include "cpu/philox.h"
#include "ops.h"

namespace me {

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
      uint32_t c[4];
      philox::words(key, off, static_cast<uint32_t>(stream), static_cast<uint64_t>(q), c);
      float* row_out = dst + row * n;
      for (int w = 0; w < 4 && 4 * q + w < n; ++w) {
        row_out[4 * q + w] = philox::uniform_from_bits(c[w]);
      }
    }
  });
  return out;
}

}  // namespace me
