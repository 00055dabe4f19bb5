// Torch-free declarations of the CUDA launchers (defined in csrc/*.cu). The .cu files include
// only CUDA headers, so CI compiles them with nvcc alone; csrc/cuda/*.cpp adapts torch tensors.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace me {

// Maximum num_members the CUDA group_rows kernel handles (its per-warp histograms live in
// shared memory). Ensembles are far smaller; the dispatch layer rejects larger values.
constexpr int kGroupRowsMaxMembers = 256;

// Stable counting sort of T rows by member id in one thread block (no host sync). Rows whose
// member is outside [0, M) are placed after offsets[M] (in row order) and counted in nothing.
cudaError_t launch_group_rows(const int32_t* members, int64_t T, int32_t M, int32_t* order, int32_t* offsets,
                              cudaStream_t stream);

}  // namespace me
