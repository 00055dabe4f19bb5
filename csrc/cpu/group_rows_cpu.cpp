// CPU implementation of me::group_rows (stable counting sort).
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace me {

std::tuple<at::Tensor, at::Tensor> group_rows_cpu(const at::Tensor& members, int64_t num_members) {
  check_group_rows_args(members, num_members);
  TORCH_CHECK_VALUE(members.device().is_cpu(), "group_rows_cpu: members must be a CPU tensor, got ", members.device());
  const auto m = members.contiguous();
  const int64_t T = m.size(0);
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "group_rows: T must be < 2^31, got ", T);
  const int32_t* ids = m.data_ptr<int32_t>();
  auto offsets = at::zeros({num_members + 1}, m.options());
  auto order = at::empty({T}, m.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  // Reading a CPU tensor costs no device sync, so invalid ids are reported here, not hidden.
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(ids[t] >= 0 && ids[t] < num_members, "group_rows: members[", t, "] = ", ids[t],
                      " is outside [0, num_members=", num_members, ")");
    ++off[ids[t] + 1];
  }
  for (int64_t s = 0; s < num_members; ++s) off[s + 1] += off[s];
  std::vector<int32_t> cursor(off, off + num_members);
  int32_t* out = order.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) out[cursor[ids[t]]++] = static_cast<int32_t>(t);
  return {order, offsets};
}

}  // namespace me
