// CPU implementation of me::grouped_linear: rows are grouped by member (stable counting sort),
// then each chosen member runs one GEMM over its rows (bias fused through addmm). Members no row
// chose cost nothing.
//
// The GEMMs run in the input dtype: torch's CPU GEMMs for bf16 / fp16 (oneDNN, or the native
// kernels) multiply and accumulate in fp32 and round once, with the bias added to the fp32
// accumulator before that rounding, which is this op's contract. (Upcasting the weights to fp32
// instead would convert every weight element on every call, 2-5x slower for decode-sized
// batches.) tests/test_grouped_linear.py checks the fp32 accumulation explicitly (sums that bf16 / fp16
// accumulation could not represent) and the single rounding with a cancelling bias.
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace me {

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_grouped_linear_args(x, members, weight, bias);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "grouped_linear_cpu: tensors must be on the CPU, got ", x.device());
  const int64_t T = x.size(0);
  const int64_t M = weight.size(0);
  const int64_t N = weight.size(1);
  auto out = at::empty({T, N}, x.options());
  auto [order, offsets] = group_rows_cpu(members, M);  // also rejects ids outside [0, M)
  if (T == 0 || N == 0) return out;

  const auto rows_all = order.to(at::kLong);
  const int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m) {
    if (off[m + 1] == off[m]) continue;
    const bool all_rows = off[m + 1] - off[m] == T;  // one member: no gather / scatter
    const auto rows = rows_all.slice(0, off[m], off[m + 1]);
    const auto xs = all_rows ? x : x.index_select(0, rows);
    const auto w = weight[m].t();
    auto y = bias.has_value() ? at::addmm((*bias)[m], xs, w) : at::mm(xs, w);
    if (all_rows) return y;
    out.index_copy_(0, rows, y);
  }
  return out;
}

}  // namespace me
