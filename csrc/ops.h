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

// Sampling, member selection and mixtures on the CPU (cpu/sampling_cpu.cpp): the semantics and
// the Philox draws of me_kernels/reference.py, thresholds by selection (no sort of the row).
// Per-row parameters are an optional CPU tensor [B] (or 0-dim / stride 0) else the scalar.
//   sample: logits [B, V] fp32 / bf16 / fp16 (any strides) -> int64 [B] (-1: NaN row, no finite
//     logit, or a bad parameter)
//   me_step: + weights [M] or [B, M] -> (tokens int64 [B], members int32 [B] drawn at offset + 1;
//     shared: row 0's draw for every row)
//   select_members: weights [M] (batch rows) or [B, M] -> int32 [B] (-1: bad weight row)
//   mixture_sample: logits [M, B, V], weights [M] or [B, M] -> int64 [B]
//   mixture_logprobs: logits [M, B, V], weights -> float32 [B, V] (NaN rows for bad rows)
at::Tensor sample_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& temp_t, double temp_s,
                      const c10::optional<at::Tensor>& topk_t, int64_t topk_s, const c10::optional<at::Tensor>& topp_t,
                      double topp_s, const c10::optional<at::Tensor>& minp_t, double minp_s,
                      const c10::optional<at::Tensor>& seed_t, int64_t seed_s, const c10::optional<at::Tensor>& off_t,
                      int64_t off_s);
std::tuple<at::Tensor, at::Tensor> me_step_cpu(
    const at::Tensor& logits, const at::Tensor& weights, const c10::optional<at::Tensor>& temp_t, double temp_s,
    const c10::optional<at::Tensor>& topk_t, int64_t topk_s, const c10::optional<at::Tensor>& topp_t, double topp_s,
    const c10::optional<at::Tensor>& minp_t, double minp_s, const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
    const c10::optional<at::Tensor>& off_t, int64_t off_s, bool shared);
at::Tensor select_members_cpu(const at::Tensor& weights, const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
                              const c10::optional<at::Tensor>& off_t, int64_t off_s, int64_t batch);
at::Tensor mixture_sample_cpu(const at::Tensor& logits, const at::Tensor& weights,
                              const c10::optional<at::Tensor>& temp_t, double temp_s,
                              const c10::optional<at::Tensor>& topk_t, int64_t topk_s,
                              const c10::optional<at::Tensor>& topp_t, double topp_s,
                              const c10::optional<at::Tensor>& minp_t, double minp_s,
                              const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
                              const c10::optional<at::Tensor>& off_t, int64_t off_s);
at::Tensor mixture_logprobs_cpu(const at::Tensor& logits, const at::Tensor& weights);
//   verify_draft: target_logits [M, B, J, V], draft_logits [B, J, V] (same float dtype), draft_tokens
//     int [B, J], weights [M] or [B, M], num_drafts int [B] or scalar -> (accepted int64 [B],
//     residual token int64 [B]): me_kernels.reference.verify_draft_reference, positions up to the
//     first rejection only.
std::tuple<at::Tensor, at::Tensor> verify_draft_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_logits, const at::Tensor& draft_tokens,
    const at::Tensor& weights, const c10::optional<at::Tensor>& ndraft_t, int64_t ndraft_s,
    const c10::optional<at::Tensor>& temp_t, double temp_s, const c10::optional<at::Tensor>& topk_t, int64_t topk_s,
    const c10::optional<at::Tensor>& topp_t, double topp_s, const c10::optional<at::Tensor>& minp_t, double minp_s,
    const c10::optional<at::Tensor>& seed_t, int64_t seed_s, const c10::optional<at::Tensor>& off_t, int64_t off_s);

#ifdef ME_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> group_rows_cuda(const at::Tensor& members, int64_t num_members);
at::Tensor grouped_linear_cuda(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias);
#endif

}  // namespace me
