// CPU implementation of me::grouped_linear: rows are grouped by member (stable counting sort),
// then each chosen member runs one GEMM over its rows. Members no row chose cost nothing.
//
// Accumulation is fp32 for every dtype: bf16/fp16 operands are upcast before the GEMM (CPU
// reduced-precision GEMMs do not promise fp32 accumulation on every ISA). The weight is upcast in
// blocks of output columns, so the temporary stays small (<= ~4 MiB) and cache-resident instead of
// materialising a full fp32 copy of a member's [N, K] matrix per call.
#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"
#include "ops.h"

namespace me {

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_grouped_linear_args(x, members, weight, bias);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "grouped_linear_cpu: tensors must be on the CPU, got ", x.device());
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  const int64_t M = weight.size(0);
  const int64_t N = weight.size(1);
  auto out = at::empty({T, N}, x.options());
  auto [order, offsets] = group_rows_cpu(members, M);  // also rejects ids outside [0, M)
  if (T == 0 || N == 0) return out;

  const bool upcast = x.scalar_type() != at::kFloat;
  // Output columns per weight block: ~4 MiB of fp32 weights, at least 16 columns.
  const int64_t block_n = upcast ? std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(K, 1)) : N;
  const auto rows_all = order.to(at::kLong);
  const int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m) {
    if (off[m + 1] == off[m]) continue;
    const auto rows = rows_all.slice(0, off[m], off[m + 1]);
    auto xs = x.index_select(0, rows);
    if (upcast) xs = xs.to(at::kFloat);
    auto acc = at::empty({xs.size(0), N}, xs.options());
    for (int64_t n0 = 0; n0 < N; n0 += block_n) {
      const int64_t n1 = std::min(N, n0 + block_n);
      auto w = weight[m].slice(0, n0, n1);
      if (upcast) w = w.to(at::kFloat);
      auto acc_block = acc.slice(1, n0, n1);
      if (bias.has_value()) {
        auto b = (*bias)[m].slice(0, n0, n1);
        at::addmm_out(acc_block, upcast ? b.to(at::kFloat) : b, xs, w.t());
      } else {
        at::mm_out(acc_block, xs, w.t());
      }
    }
    out.index_copy_(0, rows, upcast ? acc.to(x.scalar_type()) : acc);
  }
  return out;
}

}  // namespace me
