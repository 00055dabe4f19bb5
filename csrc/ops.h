// Host-side entry points of the me_kernels._C ops (torch types). Registered in bindings.cpp.
// CPU implementations live in csrc/cpu/, CUDA dispatch (checks + launch) in csrc/cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace me {

// Stable counting sort of rows by member id.
//   members: int32 [T], values in [0, num_members)
//   returns order int32 [T] (row indices grouped by member, ascending within a member) and
//   offsets int32 [num_members + 1] (segment m is order[offsets[m]:offsets[m+1]]).
std::tuple<at::Tensor, at::Tensor> group_rows_cpu(const at::Tensor& members, int64_t num_members);

// out[t] = x[t] @ weight[members[t]].T (+ bias[members[t]]), fp32 accumulation.
//   x [T, K], members int32 [T], weight [M, N, K], bias [M, N] or None -> out [T, N] (x's dtype)
at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);

// Philox-4x32-10 uniforms of the sampling ops' random streams (see me_kernels/_random.py for the
// counter / key layout): float32 [B, n] for int64 seed [B] / offset [B]. CPU only: the Triton
// kernels draw their own numbers on the GPU; this is the torch reference path's fast helper.
at::Tensor philox_uniforms_cpu(const at::Tensor& seed, const at::Tensor& offset, int64_t stream, int64_t n);

#ifdef ME_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> group_rows_cuda(const at::Tensor& members, int64_t num_members);
at::Tensor grouped_linear_cuda(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias);
#endif

}  // namespace me
