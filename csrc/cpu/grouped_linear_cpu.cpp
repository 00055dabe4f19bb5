// CPU implementation of me::grouped_linear: rows are grouped by member (stable counting sort),
// then each chosen member runs one product over its rows. Members no row chose cost nothing.
//
// Contract (all dtypes): multiply and accumulate in fp32, add the bias to the fp32 accumulator,
// round once to the output dtype. tests/test_grouped_linear.py checks the fp32 accumulation
// explicitly (sums that bf16 / fp16 accumulation could not represent) and the single rounding
// with a cancelling bias.
//
// Three paths, by dtype and by how many rows a member has:
//  * fp32: torch's GEMM (addmm / mm).
//  * bf16 with at most kGemvRows rows (decode): a fused GEMV that widens each bf16 weight to fp32
//    in registers (a 16-bit shift) and accumulates with FMA, rows of the weight in parallel.
//    Many CPUs have no bf16 arithmetic, and there torch's bf16 GEMM runs at a fraction of the
//    fp32 rate (measured here: ~1.5 GMAC/s for decode shapes); the GEMV streams the weights once.
//  * otherwise (prefill-sized, or fp16): the member's weight is widened to fp32 once per call and
//    multiplied in fp32: the widening costs one pass over the weights, amortised over the rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ME_X86 1
#endif

#include "checks.h"
#include "ops.h"

namespace me {
namespace {

constexpr int64_t kGemvRows = 16;  // rows per member up to which the fused GEMV is used
constexpr int64_t kColBlock = 4;   // weight rows (outputs) per pass: independent FMA chains

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// acc[j] = sum_k x[k] * w[j * K + k] for j < cols (cols <= kColBlock); portable version.
void dot_cols_scalar(const float* x, const uint16_t* w, int64_t cols, int64_t K, float* acc) {
  for (int64_t j = 0; j < cols; ++j) {
    const uint16_t* wj = w + j * K;
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += x[k] * bf16_to_float(wj[k]);
    acc[j] = s;
  }
}

#ifdef ME_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16(const uint16_t* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16));
}

// The same with AVX2 + FMA: 8 weights widened per load; one accumulator per weight row, so
// kColBlock FMA chains are in flight (a single chain would be bound by the FMA latency).
__attribute__((target("avx2,fma"))) void dot_cols_avx2(const float* x, const uint16_t* w, int64_t cols, int64_t K,
                                                       float* acc) {
  if (cols < kColBlock) return dot_cols_scalar(x, w, cols, K, acc);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    a0 = _mm256_fmadd_ps(xv, widen_bf16(w + k), a0);
    a1 = _mm256_fmadd_ps(xv, widen_bf16(w + K + k), a1);
    a2 = _mm256_fmadd_ps(xv, widen_bf16(w + 2 * K + k), a2);
    a3 = _mm256_fmadd_ps(xv, widen_bf16(w + 3 * K + k), a3);
  }
  float s[kColBlock] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
  for (; k < K; ++k)
    for (int64_t j = 0; j < kColBlock; ++j) s[j] += x[k] * bf16_to_float(w[j * K + k]);
  for (int64_t j = 0; j < kColBlock; ++j) acc[j] = s[j];
}

bool has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

// y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]) in fp32; x fp32 [R, K] contiguous, w bf16 [N, K]
// contiguous, y fp32 [R, N].
void gemv_bf16(const float* x, int64_t R, const uint16_t* w, int64_t N, int64_t K, const float* bias, float* y) {
#ifdef ME_X86
  const auto dot = has_avx2_fma() ? dot_cols_avx2 : dot_cols_scalar;
#else
  const auto dot = dot_cols_scalar;
#endif
  // ~64 KB of weights per task: enough work to amortise a task, and enough tasks to share.
  const int64_t grain = std::max<int64_t>(kColBlock, (int64_t{1} << 15) / std::max<int64_t>(K, 1));
  at::parallel_for(0, (N + kColBlock - 1) / kColBlock, std::max<int64_t>(1, grain / kColBlock), [&](int64_t b0, int64_t b1) {
    float acc[kColBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * kColBlock;
      const int64_t cols = std::min(kColBlock, N - n);
      for (int64_t r = 0; r < R; ++r) {  // the weight block stays in L1 across the rows
        dot(x + r * K, w + n * K, cols, K, acc);
        for (int64_t j = 0; j < cols; ++j) y[r * N + n + j] = acc[j] + (bias ? bias[n + j] : 0.f);
      }
    }
  });
}

// One member's rows: xs [R, K], w [N, K], bias [N] or undefined -> [R, N] in x's dtype.
at::Tensor member_product(const at::Tensor& xs, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const auto dtype = xs.scalar_type();
  if (dtype == at::kFloat) return bias.has_value() ? at::addmm(*bias, xs, w.t()) : at::mm(xs, w.t());
  const int64_t R = xs.size(0), N = w.size(0), K = w.size(1);
  if (dtype == at::kBFloat16 && R <= kGemvRows) {
    const auto wc = w.contiguous();
    const auto xf = xs.to(at::kFloat).contiguous();
    const auto bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    auto y = at::empty({R, N}, xs.options().dtype(at::kFloat));
    gemv_bf16(xf.data_ptr<float>(), R, reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), N, K,
              bf.defined() ? bf.data_ptr<float>() : nullptr, y.data_ptr<float>());
    return y.to(dtype);
  }
  const auto wf = w.to(at::kFloat);
  const auto xf = xs.to(at::kFloat);
  auto y = bias.has_value() ? at::addmm(bias->to(at::kFloat), xf, wf.t()) : at::mm(xf, wf.t());
  return y.to(dtype);
}

}  // namespace

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
    const c10::optional<at::Tensor> bias_m = bias.has_value() ? c10::optional<at::Tensor>((*bias)[m]) : c10::nullopt;
    auto y = member_product(xs, weight[m], bias_m);
    if (all_rows) return y;
    out.index_copy_(0, rows, y);
  }
  return out;
}

}  // namespace me
