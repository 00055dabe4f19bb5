// CUDA dispatch of me::grouped_linear: argument checks, device guard, layout adaptation, workspace,
// launch on the current stream. The launch plan depends on shapes only (never on the routing), and
// nothing here reads device memory, so a call can be captured in a CUDA graph and replayed with
// other member ids.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#include <limits>

#include "checks.h"
#include "launchers.h"
#include "ops.h"

namespace me {
namespace {

DType to_launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "grouped_linear: unsupported dtype ", t);
  return DType::kFloat32;  // not reached
}

// SM count of a device, queried once (cudaDeviceGetAttribute is a host-side query, no sync; the
// cache keeps it off the per-call path). Only torch's light c10/cuda headers are needed here.
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const auto slot = static_cast<size_t>(device);
  if (slot < cache.size()) {
    const int cached = cache[slot].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess && count > 0, "grouped_linear: cannot read the SM count of cuda:", int(device), ": ",
              cudaGetErrorString(err));
  if (slot < cache.size()) cache[slot].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace

at::Tensor grouped_linear_cuda(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias) {
  check_grouped_linear_args(x, members, weight, bias);
  TORCH_CHECK_VALUE(x.is_cuda(), "grouped_linear_cuda: tensors must be CUDA tensors, got ", x.device());
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  const int64_t M = weight.size(0);
  const int64_t N = weight.size(1);
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(T < kInt32Max, "grouped_linear: x must have fewer than 2^31 - 1 rows, got T=", T);
  TORCH_CHECK_VALUE(K * static_cast<int64_t>(x.element_size()) < kInt32Max, "grouped_linear: K=", K,
                    " is too large (a row of x must be < 2 GiB)");
  TORCH_CHECK_VALUE(N <= int64_t{65535} * 64, "grouped_linear: N must be <= ", int64_t{65535} * 64, ", got ", N);
  TORCH_CHECK_VALUE(T <= kGroupedLinearDecodeMaxRows || M <= kGroupRowsMaxMembers,
                    "grouped_linear: on CUDA, batches with more than ", kGroupedLinearDecodeMaxRows,
                    " rows support at most ", kGroupRowsMaxMembers, " members, got M=", M);

  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return out;

  // x: any row stride is used as is; rows whose elements are not contiguous are copied once.
  const at::Tensor x_rows = (x.stride(1) == 1 || K <= 1) ? x : x.contiguous();
  const int64_t x_row_stride = (T == 1) ? K : x_rows.stride(0);
  // weight / bias / members: contiguous views cost nothing; anything else is copied (documented).
  const at::Tensor w = weight.contiguous();
  const at::Tensor ids = members.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  GroupedLinearProblem problem{};
  problem.x = x_rows.data_ptr();
  problem.x_row_stride = x_row_stride;
  problem.members = ids.data_ptr<int32_t>();
  problem.weight = w.data_ptr();
  problem.bias = b.defined() ? b.data_ptr() : nullptr;
  problem.out = out.data_ptr();
  problem.T = T;
  problem.N = N;
  problem.K = K;
  problem.M = M;
  problem.dtype = to_launcher_dtype(x.scalar_type());

  const int num_sms = multiprocessor_count(x.device().index());
  GroupedLinearPlan plan{};
  TORCH_CHECK_VALUE(plan_grouped_linear(problem, num_sms, &plan) == cudaSuccess,
                    "grouped_linear: unsupported sizes T=", T, ", N=", N, ", K=", K, ", M=", M);
  // Workspace (group_rows output, split-K partials and counters) from the caching allocator: sized
  // from T, N, K, M only, so graph capture sees the same allocation on every replay.
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  }
  const cudaError_t err = launch_grouped_linear(problem, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "grouped_linear: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace me
