// CUDA dispatch of me::group_rows: checks, device guard, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "launchers.h"
#include "ops.h"

namespace me {

std::tuple<at::Tensor, at::Tensor> group_rows_cuda(const at::Tensor& members, int64_t num_members) {
  check_group_rows_args(members, num_members);
  TORCH_CHECK_VALUE(members.is_cuda(), "group_rows_cuda: members must be a CUDA tensor, got ", members.device());
  TORCH_CHECK_VALUE(num_members <= kGroupRowsMaxMembers, "group_rows: num_members must be <= ", kGroupRowsMaxMembers,
                    " on CUDA, got ", num_members);
  const int64_t T = members.size(0);
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "group_rows: T must be < 2^31, got ", T);
  const c10::cuda::CUDAGuard guard(members.device());
  const auto m = members.contiguous();
  auto order = at::empty({T}, m.options());
  auto offsets = at::empty({num_members + 1}, m.options());
  // Ids are not validated here: that would need a device->host copy. Out-of-range rows are
  // placed after offsets[M] instead, and nothing is written out of bounds.
  const cudaError_t err = launch_group_rows(m.data_ptr<int32_t>(), T, static_cast<int32_t>(num_members),
                                            order.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                            c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "group_rows: CUDA launch failed: ", cudaGetErrorString(err));
  return {order, offsets};
}

}  // namespace me
