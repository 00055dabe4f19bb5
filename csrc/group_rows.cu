// Launcher of the group_rows kernel (torch-free; see launchers.h).
#include "launchers.h"
#include "kernels/group_rows.cuh"

namespace me {

cudaError_t launch_group_rows(const int32_t* members, int64_t T, int32_t M, int32_t* order, int32_t* offsets,
                              cudaStream_t stream) {
  constexpr int kThreads = 1024;
  if (M < 1 || M > kGroupRowsMaxMembers || T < 0) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(M + 1) * (kThreads / 32 + 1) * sizeof(int32_t);
  kernels::group_rows_kernel<kThreads><<<1, kThreads, smem, stream>>>(members, T, M, order, offsets);
  return cudaGetLastError();
}

}  // namespace me
