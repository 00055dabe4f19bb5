// CPU implementation of me::grouped_linear: rows are grouped by member (stable counting sort),
// then each chosen member runs one product over its rows. Members no row chose cost nothing.
//
// Contract (all dtypes): multiply and accumulate in fp32, add the bias to the fp32 accumulator,
// round once to the output dtype. tests/test_grouped_linear.py checks the fp32 accumulation
// explicitly (sums that bf16 / fp16 accumulation could not represent) and the single rounding
// with a cancelling bias.
//
// Two paths, by how many rows a member has:
//  * few rows (decode, and ME's short catch-ups; kGemvRows / kGemvRowsHalf): a fused GEMV kernel. It
//    streams each block of kColBlock weight rows from memory once, widens bf16 / fp16 to fp32 in
//    registers, and runs it against the x rows two at a time (8 FMA chains; the block stays in L1
//    for the next pair). Measured on this project's CPU: torch's bf16 GEMM runs decode shapes at a
//    fraction of the fp32 rate, and its fp32 GEMM with 2-3 rows costs 2-3x one row (a GEMV per
//    row), where this kernel's cost grows little with the rows.
//  * more rows (prefill): one GEMM per member: torch's for fp32 and bf16 (its bf16 GEMM
//    accumulates in fp32 and rounds once), fp32 for fp16 (weights widened once per call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ME_X86 1
#endif

#include "checks.h"
#include "ops.h"

namespace me {
namespace {

constexpr int64_t kGemvRows = 16;     // fp32 rows per member up to which the fused GEMV is used
constexpr int64_t kGemvRowsHalf = 4;  // the same for bf16 / fp16 weights
constexpr int64_t kColBlock = 4;   // weight rows (outputs) per block

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }

// acc[r * kColBlock + j] = sum_k x[r, k] * w[j, k] for r < rows, j < cols; portable version.
template <typename W>
void dot_block_scalar(const float* x, int64_t ldx, int64_t rows, const W* w, int64_t ldw, int64_t cols, int64_t K,
                      float* acc) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[r * ldx + k] * to_float(w[j * ldw + k]);
      acc[r * kColBlock + j] = s;
    }
}

#ifdef ME_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// 8 consecutive weights as fp32.
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::BFloat16* p) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(packed), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The same with AVX2 + FMA for a full block of kColBlock weight rows and one or two x rows:
// kColBlock (x2) independent FMA chains (one chain would be bound by the FMA latency).
template <typename W>
__attribute__((target("avx2,fma,f16c"))) void dot_block_avx2(const float* x, int64_t ldx, int64_t rows, const W* w,
                                                             int64_t ldw, int64_t cols, int64_t K, float* acc) {
  if (cols < kColBlock) return dot_block_scalar(x, ldx, rows, w, ldw, cols, K, acc);
  if (rows == 1) {  // decode at batch 1: one x row, no second set of chains
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(v, load8(w + k), a0);
      a1 = _mm256_fmadd_ps(v, load8(w + ldw + k), a1);
      a2 = _mm256_fmadd_ps(v, load8(w + 2 * ldw + k), a2);
      a3 = _mm256_fmadd_ps(v, load8(w + 3 * ldw + k), a3);
    }
    float s[kColBlock] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    for (; k < K; ++k)
      for (int64_t j = 0; j < kColBlock; ++j) s[j] += x[k] * to_float(w[j * ldw + k]);
    for (int64_t j = 0; j < kColBlock; ++j) acc[j] = s[j];
    return;
  }
  for (int64_t r = 0; r < rows; r += 2) {
    const bool two = r + 1 < rows;
    const float* x0 = x + r * ldx;
    const float* x1 = two ? x0 + ldx : x0;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 w0 = load8(w + k), w1 = load8(w + ldw + k), w2 = load8(w + 2 * ldw + k), w3 = load8(w + 3 * ldw + k);
      const __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
      a00 = _mm256_fmadd_ps(v0, w0, a00);
      a01 = _mm256_fmadd_ps(v0, w1, a01);
      a02 = _mm256_fmadd_ps(v0, w2, a02);
      a03 = _mm256_fmadd_ps(v0, w3, a03);
      a10 = _mm256_fmadd_ps(v1, w0, a10);
      a11 = _mm256_fmadd_ps(v1, w1, a11);
      a12 = _mm256_fmadd_ps(v1, w2, a12);
      a13 = _mm256_fmadd_ps(v1, w3, a13);
    }
    float s0[kColBlock] = {hsum256(a00), hsum256(a01), hsum256(a02), hsum256(a03)};
    float s1[kColBlock] = {hsum256(a10), hsum256(a11), hsum256(a12), hsum256(a13)};
    for (; k < K; ++k)
      for (int64_t j = 0; j < kColBlock; ++j) {
        const float wf = to_float(w[j * ldw + k]);
        s0[j] += x0[k] * wf;
        s1[j] += x1[k] * wf;
      }
    for (int64_t j = 0; j < kColBlock; ++j) {
      acc[r * kColBlock + j] = s0[j];
      if (two) acc[(r + 1) * kColBlock + j] = s1[j];
    }
  }
}

bool has_avx2_fma_f16c() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]) in fp32: x fp32 [R, K] contiguous, w [N, K] with
// row stride ldw and unit column stride, bias [N] contiguous or null, y fp32 [R, N]; R <= kGemvRows.
template <typename W, typename B>
void gemv(const float* x, int64_t R, const W* w, int64_t ldw, int64_t N, int64_t K, const B* bias, float* y) {
#ifdef ME_X86
  const auto dot = has_avx2_fma_f16c() ? dot_block_avx2<W> : dot_block_scalar<W>;
#else
  const auto dot = dot_block_scalar<W>;
#endif
  // ~64 KB of weights per task: enough work to amortise a task, and enough tasks to share.
  const int64_t bytes_per_block = kColBlock * K * static_cast<int64_t>(sizeof(W));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(bytes_per_block, 1));
  at::parallel_for(0, (N + kColBlock - 1) / kColBlock, grain, [&](int64_t b0, int64_t b1) {
    float acc[kGemvRows * kColBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * kColBlock;
      const int64_t cols = std::min(kColBlock, N - n);
      dot(x, K, R, w + n * ldw, ldw, cols, K, acc);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < cols; ++j) y[r * N + n + j] = acc[r * kColBlock + j] + (bias ? to_float(bias[n + j]) : 0.f);
    }
  });
}

// One member's rows: xs [R, K], w [N, K], bias [N] or undefined -> [R, N] in x's dtype.
at::Tensor member_product(const at::Tensor& xs, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const auto dtype = xs.scalar_type();
  const int64_t R = xs.size(0), N = w.size(0), K = w.size(1);
  // fp32: the GEMV up to kGemvRows rows; bf16 / fp16: up to kGemvRowsHalf, beyond which torch's
  // bf16 GEMM (a blocked kernel) overtakes a GEMV (measured alone on 1408 x 256 weights: 4 rows
  // 31 us against 39 us, 8 rows 37 us against 71 us; inside a decode forward the GEMM path's
  // gathers and allocations make the GEMV the faster one still at 3-4 rows).
  const int64_t gemv_rows = dtype == at::kFloat ? kGemvRows : kGemvRowsHalf;
  if (R <= gemv_rows && w.stride(1) == 1) {
    const auto xf = xs.to(at::kFloat).contiguous();
    const auto bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* b = bf.defined() ? bf.data_ptr<float>() : static_cast<const float*>(nullptr);
    auto y = at::empty({R, N}, xs.options().dtype(at::kFloat));
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (dtype == at::kFloat) {
      gemv(xp, R, w.data_ptr<float>(), w.stride(0), N, K, b, yp);
    } else if (dtype == at::kBFloat16) {
      gemv(xp, R, w.data_ptr<at::BFloat16>(), w.stride(0), N, K, b, yp);
    } else {
      gemv(xp, R, w.data_ptr<at::Half>(), w.stride(0), N, K, b, yp);
    }
    return dtype == at::kFloat ? y : y.to(dtype);
  }
  if (dtype != at::kHalf) return bias.has_value() ? at::addmm(*bias, xs, w.t()) : at::mm(xs, w.t());
  const auto wf = w.to(at::kFloat);
  const auto xf = xs.to(at::kFloat);
  auto y = bias.has_value() ? at::addmm(bias->to(at::kFloat), xf, wf.t()) : at::mm(xf, wf.t());
  return y.to(dtype);
}

// A decode-sized batch (T <= kGemvRows rows in all): the rows are grouped by member with a host
// loop and run through the GEMV straight from / into the tensors' memory (dtype conversions in
// the loops), without the per-call tensor allocations of the general path, which cost more than
// the products for the small members of a CPU decode step. A member with more rows than the
// GEMV takes for its dtype goes through member_product.
template <typename T_>
at::Tensor small_batch(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t T = x.size(0), K = x.size(1), M = weight.size(0), N = weight.size(1);
  const auto ids = members.contiguous();
  const int32_t* id = ids.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(id[t] >= 0 && id[t] < M, "grouped_linear: members[", t, "] = ", id[t],
                      " is outside [0, num_members=", M, ")");
  auto out = at::empty({T, N}, x.options());
  T_* y_out = out.data_ptr<T_>();
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t gemv_rows = std::is_same_v<T_, float> ? kGemvRows : kGemvRowsHalf;
  const T_* xp = x.data_ptr<T_>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  std::vector<float> xf(T * K), yf(T * N);
  int64_t rows[kGemvRows];
  for (int64_t m = 0; m < M; ++m) {
    int64_t R = 0;
    for (int64_t t = 0; t < T; ++t)
      if (id[t] == m) rows[R++] = t;
    if (R == 0) continue;
    if (R > gemv_rows) {  // prefill-like group: the general product
      const auto idx = at::from_blob(rows, {R}, at::TensorOptions().dtype(at::kLong)).clone();
      const c10::optional<at::Tensor> bias_m = bias.has_value() ? c10::optional<at::Tensor>((*bias)[m]) : c10::nullopt;
      out.index_copy_(0, idx, member_product(x.index_select(0, idx), weight[m], bias_m));
      continue;
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) xf[r * K + k] = to_float(xp[rows[r] * xs0 + k * xs1]);
    const T_* w = weight.data_ptr<T_>() + m * weight.stride(0);
    const T_* b = bias_c.defined() ? bias_c.data_ptr<T_>() + m * N : nullptr;
    gemv(xf.data(), R, w, weight.stride(1), N, K, b, yf.data());
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) y_out[rows[r] * N + n] = static_cast<T_>(yf[r * N + n]);
  }
  return out;
}

}  // namespace

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& members, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_grouped_linear_args(x, members, weight, bias);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "grouped_linear_cpu: tensors must be on the CPU, got ", x.device());
  const int64_t T = x.size(0);
  const int64_t M = weight.size(0);
  const int64_t N = weight.size(1);
  if (T > 0 && N > 0 && T <= kGemvRows && weight.stride(2) == 1) {
    switch (x.scalar_type()) {
      case at::kFloat: return small_batch<float>(x, members, weight, bias);
      case at::kBFloat16: return small_batch<at::BFloat16>(x, members, weight, bias);
      default: return small_batch<at::Half>(x, members, weight, bias);
    }
  }
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
