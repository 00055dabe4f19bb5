// Argument checks shared by the CPU and CUDA dispatch layers. Errors name the argument and
// what was expected; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError /
// TypeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace me {

inline void check_group_rows_args(const at::Tensor& members, int64_t num_members) {
  TORCH_CHECK_TYPE(members.scalar_type() == at::kInt, "group_rows: members must be int32, got ",
                   members.scalar_type());
  TORCH_CHECK_VALUE(members.dim() == 1, "group_rows: members must be 1-D [T], got shape ", members.sizes());
  TORCH_CHECK_VALUE(num_members >= 1, "group_rows: num_members must be >= 1, got ", num_members);
  TORCH_CHECK_VALUE(num_members <= (int64_t)1 << 20, "group_rows: num_members must be <= 2^20, got ", num_members);
}

inline void check_grouped_linear_args(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, "grouped_linear: x must be 2-D [T, K], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3, "grouped_linear: weight must be 3-D [M, N, K], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(members.dim() == 1, "grouped_linear: members must be 1-D [T], got shape ", members.sizes());
  TORCH_CHECK_TYPE(members.scalar_type() == at::kInt, "grouped_linear: members must be int32, got ",
                   members.scalar_type());
  TORCH_CHECK_VALUE(members.size(0) == x.size(0), "grouped_linear: members has ", members.size(0),
                    " rows but x has ", x.size(0));
  TORCH_CHECK_VALUE(weight.size(2) == x.size(1), "grouped_linear: x has K=", x.size(1), " but weight [M, N, K] has K=",
                    weight.size(2));
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "grouped_linear: weight must hold at least one member");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "grouped_linear: x must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "grouped_linear: weight dtype ", weight.scalar_type(),
                   " differs from x dtype ", dtype);
  TORCH_CHECK_VALUE(x.device() == weight.device() && x.device() == members.device(),
                    "grouped_linear: x, members and weight must be on one device, got ", x.device(), ", ",
                    members.device(), ", ", weight.device());
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == weight.size(0) && b.size(1) == weight.size(1),
                      "grouped_linear: bias must be [M, N] = [", weight.size(0), ", ", weight.size(1), "], got shape ",
                      b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == dtype, "grouped_linear: bias dtype ", b.scalar_type(), " differs from x dtype ",
                     dtype);
    TORCH_CHECK_VALUE(b.device() == x.device(), "grouped_linear: bias is on ", b.device(), " but x is on ", x.device());
  }
}

}  // namespace me
