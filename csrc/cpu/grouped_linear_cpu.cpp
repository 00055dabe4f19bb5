// CPU implementation of me::grouped_linear: one matmul per member over that member's rows,
// accumulated in fp32 (inputs are upcast), written back in x's dtype.
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace me {

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_grouped_linear_args(x, members, weight, bias);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "grouped_linear_cpu: tensors must be on the CPU, got ", x.device());
  const int64_t M = weight.size(0);
  const int64_t N = weight.size(1);
  auto [order, offsets] = group_rows_cpu(members, M);  // also rejects ids outside [0, M)
  auto out = at::empty({x.size(0), N}, x.options());
  const int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; ++m) {
    if (off[m + 1] == off[m]) continue;  // members no row chose cost nothing
    const auto rows = order.slice(0, off[m], off[m + 1]).to(at::kLong);
    auto acc = at::matmul(x.index_select(0, rows).to(at::kFloat), weight[m].to(at::kFloat).t());
    if (bias.has_value()) acc.add_((*bias)[m].to(at::kFloat));
    out.index_copy_(0, rows, acc.to(x.scalar_type()));
  }
  return out;
}

}  // namespace me
