// CPU implementations of me::sample, me::me_step, me::select_members, me::mixture_sample and
// me::mixture_logprobs: the semantics of me_kernels/reference.py, row by row, without sorting
// the vocabulary.
//
// Every draw is the reference's: the same Philox stream (cpu/philox.h), the same fp32 scores
// (x - m) * (1 / T) + G computed with one rounding per operation (the extension is built with
// -ffp-contract=off so nothing is fused), the same kept sets. The thresholds are found by
// selection instead of a sort:
//   * tau_k: std::nth_element on a copy of the row's finite values, O(V);
//   * tau_p: a quickselect on probability mass over the top-k set (3-way partitions around a
//     pivot value, recursing into the side where the cumulative mass crosses p * Z_k), O(V)
//     expected. The reference's cumulative sum accumulates in double (torch's CPU cumsum does)
//     and rounds to fp32 before comparing; so does this, so the crossing is the same up to the
//     summation order of doubles.
// The only differences left are fp32 values the reference's own rounding decides (torch's
// vectorised exp / log and its pairwise fp32 sums against libm and double sums here): a score
// tie or a mass exactly at the threshold within an ulp, which random data practically never hits.
//
// Rows run in parallel (at::parallel_for); each reads its logits through the strides once into
// an fp32 scratch row (one row, never the whole [B, V]).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/philox.h"
#include "ops.h"

namespace me {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr uint32_t kStreamToken = 0, kStreamMember = 1, kStreamMixture = 2, kStreamAccept = 3, kStreamResidual = 4;
constexpr int64_t kMaxTopK = (int64_t{1} << 31) - 1;
// Above every Gumbel value the streams can produce (the largest uniform 1 - 2^-24 gives 16.64):
// an element whose scaled logit plus this is below the best score so far cannot win the draw.
constexpr float kGumbelBound = 17.0f;

// One row's sampling parameters, as the reference sees them (fp32 values, k clamped to 2^31 - 1).
struct RowSampling {
  float temperature;
  int64_t top_k;
  float top_p;
  float min_p;
  uint64_t seed;
  uint64_t offset;

  // The reference's `bad` mask: such a row yields -1.
  bool bad() const {
    return std::isnan(temperature) || temperature < 0 || top_k < 0 || std::isnan(top_p) || top_p <= 0 ||
           top_p > 1 || std::isnan(min_p) || min_p < 0 || min_p > 1;
  }
};

// Upper bounds of the Gumbel noise by the top bits of its Philox word: bound[r >> kBoundShift]
// >= gumbel_from_bits(r) for every r of that bucket (the value at the bucket's largest uniform,
// in double, plus a margin far above the few fp32 ulps of error of the fp32 evaluation). Lets the
// draw skip both logarithms for almost every element that cannot beat the best score so far.
constexpr int kBoundShift = 20;  // 4096 buckets

const float* gumbel_bounds() {
  static const std::vector<float> table = [] {
    std::vector<float> t(std::size_t{1} << (32 - kBoundShift));
    for (std::size_t j = 0; j < t.size(); ++j) {
      const double top = static_cast<double>(((j + 1) << (kBoundShift - 9)) - 1) + 0.5;  // largest r >> 9, + 0.5
      const double u = top * 1.1920928955078125e-07;
      t[j] = static_cast<float>(-std::log(-std::log(u)) + 1e-3);
    }
    return t;
  }();
  return table.data();
}

struct Candidate {
  float x;
  float e;  // exp((x - m) * inv_t)
};

// Per-thread scratch, reused across the rows a thread handles.
struct Workspace {
  std::vector<float> row;
  std::vector<float> other;  // verify_draft: the drafter's row beside the mixture's
  std::vector<float> values;
  std::vector<Candidate> candidates;
  std::vector<float> member_c;
  std::vector<uint8_t> member_pinf;
};

// Greedy: the lowest index of the maximum.
int64_t first_index_of(const float* x, int64_t vocab, float value) {
  for (int64_t i = 0; i < vocab; ++i) {
    if (x[i] == value) return i;
  }
  return 0;  // unreachable: value is an element of x
}

// k-th largest of the row's n_finite finite values (1 <= k < n_finite).
float kth_largest(const float* x, int64_t vocab, int64_t n_finite, int64_t k, Workspace& ws) {
  ws.values.clear();
  ws.values.reserve(n_finite);
  for (int64_t i = 0; i < vocab; ++i) {
    if (x[i] > -kInf) ws.values.push_back(x[i]);
  }
  auto nth = ws.values.begin() + (k - 1);
  std::nth_element(ws.values.begin(), nth, ws.values.end(), std::greater<float>());
  return *nth;
}

float median_of_three(float a, float b, float c) {
  return std::max(std::min(a, b), std::min(std::max(a, b), c));
}

// tau_p over the set {x >= tau_k}: the largest value v whose cumulative mass (in descending
// order of x, accumulated in double, rounded to fp32) reaches top_p * Z_k. Returns -inf when the
// mass never reaches it inside the set (the reference's tau_p then lies below tau_k and
// max(tau_k, tau_p) = tau_k; with top-k off it is the smallest finite value: every finite token).
float top_p_threshold(const float* x, int64_t vocab, float m, float inv_t, float tau_k, float top_p, Workspace& ws) {
  auto& cand = ws.candidates;
  cand.clear();
  double z_k = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = x[i];
    if (v > -kInf && v >= tau_k) {
      float e = std::exp((v - m) * inv_t);
      // T = inf with x - m overflowing: (-inf) * 0 is NaN; such a token weighs 0 (the reference's
      // rule), it must not turn the whole mass into NaN (which switched top-p off).
      if (std::isnan(e)) e = 0.0f;
      cand.push_back({v, e});
      z_k += e;
    }
  }
  const float theta = top_p * static_cast<float>(z_k);
  // Invariant: float(acc) < theta, acc = mass of every candidate above the range [lo, hi).
  double acc = 0.0;
  auto lo = cand.begin(), hi = cand.end();
  while (lo < hi) {
    const float pivot = median_of_three(lo->x, (lo + (hi - lo) / 2)->x, (hi - 1)->x);
    auto greater_end = std::partition(lo, hi, [pivot](const Candidate& c) { return c.x > pivot; });
    auto equal_end = std::partition(greater_end, hi, [pivot](const Candidate& c) { return c.x == pivot; });
    double mass_greater = 0.0;
    for (auto it = lo; it < greater_end; ++it) mass_greater += it->e;
    if (static_cast<float>(acc + mass_greater) >= theta) {
      hi = greater_end;  // the crossing lies strictly above the pivot
      continue;
    }
    acc += mass_greater;
    double mass_equal = 0.0;
    for (auto it = greater_end; it < equal_end; ++it) mass_equal += it->e;
    if (static_cast<float>(acc + mass_equal) >= theta) return pivot;  // crossed inside the tie class
    acc += mass_equal;
    lo = equal_end;
  }
  return -kInf;
}

// The token of one row: x is fp32 [vocab] with +inf already remapped, no NaN, n_finite >= 1
// finite entries and maximum m. Parameters are valid (the caller maps bad rows to -1).
int64_t draw_row(const float* x, int64_t vocab, float m, int64_t n_finite, const RowSampling& p, uint32_t stream,
                 Workspace& ws) {
  bool greedy = p.temperature == 0;
  float inv_t = greedy ? 1.0f : 1.0f / p.temperature;
  if (std::isinf(inv_t)) greedy = true;  // T so small that 1 / T overflows
  if (greedy) return first_index_of(x, vocab, m);

  float tau_k = -kInf;
  if (p.top_k > 0 && p.top_k < n_finite) tau_k = kth_largest(x, vocab, n_finite, p.top_k, ws);
  float threshold = tau_k;
  if (p.top_p < 1) threshold = std::max(tau_k, top_p_threshold(x, vocab, m, inv_t, tau_k, p.top_p, ws));
  const float min_p = p.min_p;

  const float* bound = gumbel_bounds();
  uint32_t words[4 * philox::kBlockQuads];
  // Start from the first maximum (always kept: x = m passes every threshold and e = 1 >= min_p),
  // so the bounds below skip hopeless elements from the first one on.
  int64_t best_index = first_index_of(x, vocab, m);
  philox::words(p.seed, p.offset, stream, static_cast<uint64_t>(best_index) >> 2, words);
  float best = (m - m) * inv_t + philox::gumbel_from_bits(words[best_index & 3]);
  // Element i challenges the best score with its Philox word r. fp32 addition is monotone:
  // scaled + G <= scaled + bound < best cannot win (a tie needs equality), so the two logarithms
  // of G are taken only for plausible winners.
  auto challenge = [&](int64_t i, float scaled, uint32_t r) {
    if (scaled + bound[r >> kBoundShift] < best) return;
    const float score = scaled + philox::gumbel_from_bits(r);
    if (score > best || (score == best && i < best_index)) {
      best = score;
      best_index = i;
    }
  };

  if (threshold == -kInf && min_p == 0) {
    // Every finite token is kept: Philox words for blocks of 4 * kBlockQuads elements at once
    // (vectorised), and whole blocks skipped when even their largest logit cannot win.
    constexpr int64_t kBlock = 4 * philox::kBlockQuads;
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t end = std::min(vocab, start + kBlock);
      float block_max = -kInf;
      for (int64_t i = start; i < end; ++i) block_max = std::max(block_max, x[i]);
      // (x - m) * inv_t is monotone in x, so this bounds every scaled logit of the block.
      if ((block_max - m) * inv_t + kGumbelBound < best) continue;
      philox::words_block(p.seed, p.offset, stream, static_cast<uint64_t>(start) / 4, words);
      for (int64_t i = start; i < end; ++i) {
        const float scaled = (x[i] - m) * inv_t;
        // -inf entries and NaN weights (T = inf with x - m overflowing) are never kept.
        if (!(x[i] > -kInf) || std::isnan(scaled) || i == best_index) continue;
        challenge(i, scaled, words[i - start]);
      }
    }
    return best_index;
  }

  // Truncated rows: few kept elements, Philox words one quad at a time.
  uint64_t cached_quad = std::numeric_limits<uint64_t>::max();
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = x[i];
    if (!(v > -kInf) || v < threshold || i == best_index) continue;
    const float scaled = (v - m) * inv_t;
    // min-p keeps exp(scaled) >= min_p; a NaN weight is never kept (not even with min_p = 0).
    if (min_p == 0 ? std::isnan(scaled) : !(std::exp(scaled) >= min_p)) continue;
    if (scaled + kGumbelBound < best) continue;
    const uint64_t quad = static_cast<uint64_t>(i) >> 2;
    if (quad != cached_quad) {
      philox::words(p.seed, p.offset, stream, quad, words);
      cached_quad = quad;
    }
    challenge(i, scaled, words[i & 3]);
  }
  return best_index;
}

// Reads row `row` of logits [B, V] (any dtype / strides) into ws.row as fp32, remapping +inf
// (a row with +inf entries keeps them as 0 and the rest as -inf). Returns false for a row that
// yields -1 (a NaN, or no finite entry); else sets m and n_finite.
template <typename scalar_t>
bool load_row(const scalar_t* base, int64_t stride_v, int64_t vocab, Workspace& ws, float& m, int64_t& n_finite) {
  ws.row.resize(vocab);
  float* x = ws.row.data();
  bool has_pinf = false;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = static_cast<float>(base[i * stride_v]);
    if (std::isnan(v)) return false;
    has_pinf |= v == kInf;
    x[i] = v;
  }
  if (has_pinf) {
    for (int64_t i = 0; i < vocab; ++i) x[i] = x[i] == kInf ? 0.0f : -kInf;
  }
  m = -kInf;
  n_finite = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    m = std::max(m, x[i]);
    n_finite += x[i] > -kInf;
  }
  return n_finite > 0;
}

// ---- per-row parameters --------------------------------------------------------------------

// A row parameter: a CPU tensor [B] (or 0-dim, possibly expanded with stride 0) or the scalar.
template <typename T>
struct RowParam {
  at::Tensor holder;
  const T* data = nullptr;
  int64_t stride = 0;
  T scalar{};
  T operator()(int64_t row) const { return data ? data[row * stride] : scalar; }
};

template <typename T>
RowParam<T> row_param(const c10::optional<at::Tensor>& tensor, T scalar, int64_t batch, const char* op,
                      const char* name) {
  RowParam<T> param;
  param.scalar = scalar;
  if (!tensor.has_value()) return param;
  const auto& t = *tensor;
  constexpr bool is_float = std::is_same<T, float>::value;
  if (is_float) {
    TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
                     " must be an integer tensor, got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.size(0) == batch), op, ": ", name,
                    " must be 0-D or of shape [B] = [", batch, "], got shape ", t.sizes());
  // [B] parameters are tiny: converting one to the reference's dtype costs nothing.
  param.holder = t.to(is_float ? at::kFloat : at::kLong);
  param.data = param.holder.template data_ptr<T>();
  param.stride = param.holder.dim() == 0 ? 0 : param.holder.stride(0);
  return param;
}

struct SamplingArgs {
  RowParam<float> temperature, top_p, min_p;
  RowParam<int64_t> top_k, seed, offset;

  RowSampling at(int64_t row) const {
    return {temperature(row), std::min(top_k(row), kMaxTopK), top_p(row), min_p(row),
            static_cast<uint64_t>(seed(row)), static_cast<uint64_t>(offset(row))};
  }
};

SamplingArgs sampling_args(int64_t batch, const char* op, const c10::optional<at::Tensor>& temp_t, double temp_s,
                           const c10::optional<at::Tensor>& topk_t, int64_t topk_s,
                           const c10::optional<at::Tensor>& topp_t, double topp_s,
                           const c10::optional<at::Tensor>& minp_t, double minp_s,
                           const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
                           const c10::optional<at::Tensor>& off_t, int64_t off_s) {
  // Python floats become fp32 exactly as torch.full(..., dtype=float32) rounds them.
  return {row_param<float>(temp_t, static_cast<float>(temp_s), batch, op, "temperature"),
          row_param<float>(topp_t, static_cast<float>(topp_s), batch, op, "top_p"),
          row_param<float>(minp_t, static_cast<float>(minp_s), batch, op, "min_p"),
          row_param<int64_t>(topk_t, topk_s, batch, op, "top_k"),
          row_param<int64_t>(seed_t, seed_s, batch, op, "seed"),
          row_param<int64_t>(off_t, off_s, batch, op, "offset")};
}

void check_float_input(const at::Tensor& t, const char* op, const char* name, int64_t dims) {
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be float32, bfloat16 or float16, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

// ---- weights -------------------------------------------------------------------------------

// Weights [M] or [B, M] as fp32 rows (a [M] vector is every row's).
struct WeightRows {
  at::Tensor holder;
  const float* data;
  int64_t stride_row, stride_member, members;
  const float* row(int64_t b) const { return data + b * stride_row; }
};

WeightRows weight_rows(const at::Tensor& weights, const char* op) {
  TORCH_CHECK_VALUE(weights.dim() == 1 || weights.dim() == 2, op, ": weights must be [M] or [B, M], got shape ",
                    weights.sizes());
  TORCH_CHECK_TYPE(weights.is_floating_point(), op, ": weights must be a float tensor, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device().is_cpu(), op, ": weights must be a CPU tensor here, got ", weights.device());
  TORCH_CHECK_VALUE(weights.size(-1) >= 1, op, ": weights must hold at least one member");
  WeightRows w;
  w.holder = weights.to(at::kFloat);
  w.data = w.holder.data_ptr<float>();
  w.stride_row = weights.dim() == 2 ? w.holder.stride(0) : 0;
  w.stride_member = w.holder.stride(-1);
  w.members = w.holder.size(-1);
  return w;
}

// The reference's bad weight row: a NaN, infinite or negative weight, or an fp32 sum <= 0.
// Also returns that sum (accumulated in order, as torch sums a handful of values).
bool bad_weights(const float* w, int64_t stride, int64_t members, float& sum) {
  sum = 0.0f;
  bool bad = false;
  for (int64_t j = 0; j < members; ++j) {
    const float v = w[j * stride];
    bad |= !std::isfinite(v) || v < 0;
    sum += v;
  }
  return bad || !(sum > 0);
}

// argmax_j log w_j + G_j (stream STREAM_MEMBER), -1 for a bad row.
int32_t draw_member(const float* w, int64_t stride, int64_t members, uint64_t seed, uint64_t offset) {
  float sum;
  if (bad_weights(w, stride, members, sum)) return -1;
  int32_t best_index = -1;
  float best = -kInf;
  uint32_t words[4];
  for (int64_t j = 0; j < members; ++j) {
    if ((j & 3) == 0) philox::words(seed, offset, kStreamMember, static_cast<uint64_t>(j) >> 2, words);
    const float v = w[j * stride];
    if (!(v > 0)) continue;
    const float score = std::log(v) + philox::gumbel_from_bits(words[j & 3]);
    if (best_index < 0 || score > best) {
      best = score;
      best_index = static_cast<int32_t>(j);
    }
  }
  return best_index;
}

// ---- mixture -------------------------------------------------------------------------------

// log sum_m wbar_m softmax(l_m) of row b into out[0:V] (fp32). Returns false (out untouched)
// when the row is NaN in the reference: bad weights, or a member of positive weight with a NaN
// or no entry above -inf. logits [M, B, V] of any dtype / strides.
template <typename scalar_t>
bool mixture_row(const scalar_t* logits, int64_t stride_m, int64_t stride_b, int64_t stride_v, int64_t b,
                 int64_t vocab, const float* w, int64_t stride_w, int64_t members, float* out, Workspace& ws) {
  float w_sum;
  if (bad_weights(w, stride_w, members, w_sum)) return false;
  ws.member_c.assign(members, -kInf);  // log wbar_m - logsumexp(l_m), -inf for ignored members
  ws.member_pinf.assign(members, 0);
  for (int64_t j = 0; j < members; ++j) {
    const float wj = w[j * stride_w];
    if (!(wj > 0)) continue;  // zero weight: ignored, whatever its logits hold
    const scalar_t* l = logits + j * stride_m + b * stride_b;
    bool has_pinf = false;
    float mx = -kInf;
    for (int64_t i = 0; i < vocab; ++i) {
      const float v = static_cast<float>(l[i * stride_v]);
      if (std::isnan(v)) return false;
      has_pinf |= v == kInf;
      mx = std::max(mx, v);
    }
    if (has_pinf) mx = 0.0f;  // remapped: 0 on the +inf entries, -inf elsewhere
    if (!(mx > -kInf)) return false;
    // torch.logsumexp: max, sum of exp(l - max), log, + max (the sum in double here).
    double s = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      float v = static_cast<float>(l[i * stride_v]);
      if (has_pinf) v = v == kInf ? 0.0f : -kInf;
      s += std::exp(v - mx);
    }
    const float lse = std::log(static_cast<float>(s)) + mx;
    ws.member_c[j] = std::log(wj / w_sum) - lse;
    ws.member_pinf[j] = has_pinf;
  }
  for (int64_t i = 0; i < vocab; ++i) {
    // torch.logsumexp over the members: max (+-inf -> 0), then the exps summed in member order.
    float y_max = -kInf;
    for (int64_t j = 0; j < members; ++j) {
      if (ws.member_c[j] == -kInf) continue;
      float v = static_cast<float>(logits[j * stride_m + b * stride_b + i * stride_v]);
      if (ws.member_pinf[j]) v = v == kInf ? 0.0f : -kInf;
      y_max = std::max(y_max, v + ws.member_c[j]);
    }
    const float shift = std::isinf(y_max) ? 0.0f : y_max;
    float s = 0.0f;
    for (int64_t j = 0; j < members; ++j) {
      if (ws.member_c[j] == -kInf) continue;
      float v = static_cast<float>(logits[j * stride_m + b * stride_b + i * stride_v]);
      if (ws.member_pinf[j]) v = v == kInf ? 0.0f : -kInf;
      s += std::exp((v + ws.member_c[j]) - shift);
    }
    out[i] = std::log(s) + shift;
  }
  return true;
}

// Rows [0, B) in parallel, one Workspace per chunk of rows.
template <typename F>
void for_each_row(int64_t batch, F&& body) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t b = begin; b < end; ++b) body(b, ws);
  });
}

void sample_rows(const at::Tensor& logits, const SamplingArgs& args, int64_t* tokens) {
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const int64_t stride_b = logits.stride(0), stride_v = logits.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "me_sample_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    for_each_row(batch, [&](int64_t b, Workspace& ws) {
      const RowSampling p = args.at(b);
      float m;
      int64_t n_finite;
      if (p.bad() || !load_row(base + b * stride_b, stride_v, vocab, ws, m, n_finite)) {
        tokens[b] = -1;
        return;
      }
      tokens[b] = draw_row(ws.row.data(), vocab, m, n_finite, p, kStreamToken, ws);
    });
  });
}

void check_sampling_logits(const at::Tensor& logits, const char* op) {
  check_float_input(logits, op, "logits [B, V]", 2);
  TORCH_CHECK_VALUE(logits.size(0) == 0 || logits.size(1) >= 1, op, ": logits must have V >= 1, got shape ",
                    logits.sizes());
}

}  // namespace

at::Tensor sample_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& temp_t, double temp_s,
                      const c10::optional<at::Tensor>& topk_t, int64_t topk_s, const c10::optional<at::Tensor>& topp_t,
                      double topp_s, const c10::optional<at::Tensor>& minp_t, double minp_s,
                      const c10::optional<at::Tensor>& seed_t, int64_t seed_s, const c10::optional<at::Tensor>& off_t,
                      int64_t off_s) {
  check_sampling_logits(logits, "sample");
  const int64_t batch = logits.size(0);
  const auto args = sampling_args(batch, "sample", temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t, minp_s,
                                  seed_t, seed_s, off_t, off_s);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch > 0) sample_rows(logits, args, tokens.data_ptr<int64_t>());
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> me_step_cpu(
    const at::Tensor& logits, const at::Tensor& weights, const c10::optional<at::Tensor>& temp_t, double temp_s,
    const c10::optional<at::Tensor>& topk_t, int64_t topk_s, const c10::optional<at::Tensor>& topp_t, double topp_s,
    const c10::optional<at::Tensor>& minp_t, double minp_s, const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
    const c10::optional<at::Tensor>& off_t, int64_t off_s, bool shared) {
  check_sampling_logits(logits, "me_step");
  const int64_t batch = logits.size(0);
  const auto w = weight_rows(weights, "me_step");
  TORCH_CHECK_VALUE(weights.dim() == 1 || weights.size(0) == batch, "me_step: weights has ", weights.size(0),
                    " rows but the batch has B=", batch);
  const auto args = sampling_args(batch, "me_step", temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t, minp_s,
                                  seed_t, seed_s, off_t, off_s);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  auto members = at::empty({batch}, logits.options().dtype(at::kInt));
  if (batch == 0) return {tokens, members};
  sample_rows(logits, args, tokens.data_ptr<int64_t>());
  int32_t* out = members.data_ptr<int32_t>();
  // The member of step t + 1 is drawn at offset + 1 (wrapping like torch's int64 add).
  auto member_of = [&](int64_t b) {
    return draw_member(w.row(b), w.stride_member, w.members, static_cast<uint64_t>(args.seed(b)),
                       static_cast<uint64_t>(args.offset(b)) + 1);
  };
  if (shared) {
    std::fill(out, out + batch, member_of(0));
  } else {
    for (int64_t b = 0; b < batch; ++b) out[b] = member_of(b);
  }
  return {tokens, members};
}

at::Tensor select_members_cpu(const at::Tensor& weights, const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
                              const c10::optional<at::Tensor>& off_t, int64_t off_s, int64_t batch) {
  const auto w = weight_rows(weights, "select_members");
  if (weights.dim() == 2) batch = weights.size(0);
  TORCH_CHECK_VALUE(batch >= 0, "select_members: batch must be >= 0, got ", batch);
  const auto seed = row_param<int64_t>(seed_t, seed_s, batch, "select_members", "seed");
  const auto offset = row_param<int64_t>(off_t, off_s, batch, "select_members", "offset");
  auto out = at::empty({batch}, weights.options().dtype(at::kInt));
  int32_t* dst = out.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    dst[b] = draw_member(w.row(b), w.stride_member, w.members, static_cast<uint64_t>(seed(b)),
                         static_cast<uint64_t>(offset(b)));
  }
  return out;
}

namespace {

void check_mixture_args(const at::Tensor& logits, const at::Tensor& weights, const char* op) {
  check_float_input(logits, op, "logits [M, B, V]", 3);
  TORCH_CHECK_VALUE(logits.size(0) >= 1, op, ": logits must hold at least one member, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(weights.size(-1) == logits.size(0), op, ": weights has ", weights.size(-1),
                    " member weights but logits has M=", logits.size(0));
  TORCH_CHECK_VALUE(weights.dim() == 1 || weights.size(0) == logits.size(1), op, ": weights has ", weights.size(0),
                    " rows but the batch has B=", logits.size(1));
}

}  // namespace

at::Tensor mixture_logprobs_cpu(const at::Tensor& logits, const at::Tensor& weights) {
  const auto w = weight_rows(weights, "mixture_logprobs");
  check_mixture_args(logits, weights, "mixture_logprobs");
  const int64_t batch = logits.size(1), vocab = logits.size(2);
  auto out = at::empty({batch, vocab}, logits.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "me_mixture_logprobs_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    for_each_row(batch, [&](int64_t b, Workspace& ws) {
      float* row = dst + b * vocab;
      if (!mixture_row(base, logits.stride(0), logits.stride(1), logits.stride(2), b, vocab, w.row(b),
                       w.stride_member, w.members, row, ws)) {
        std::fill(row, row + vocab, std::numeric_limits<float>::quiet_NaN());
      }
    });
  });
  return out;
}

at::Tensor mixture_sample_cpu(const at::Tensor& logits, const at::Tensor& weights,
                              const c10::optional<at::Tensor>& temp_t, double temp_s,
                              const c10::optional<at::Tensor>& topk_t, int64_t topk_s,
                              const c10::optional<at::Tensor>& topp_t, double topp_s,
                              const c10::optional<at::Tensor>& minp_t, double minp_s,
                              const c10::optional<at::Tensor>& seed_t, int64_t seed_s,
                              const c10::optional<at::Tensor>& off_t, int64_t off_s) {
  const auto w = weight_rows(weights, "mixture_sample");
  check_mixture_args(logits, weights, "mixture_sample");
  const int64_t batch = logits.size(1), vocab = logits.size(2);
  const auto args = sampling_args(batch, "mixture_sample", temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t,
                                  minp_s, seed_t, seed_s, off_t, off_s);
  auto tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  int64_t* dst = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "me_mixture_sample_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    for_each_row(batch, [&](int64_t b, Workspace& ws) {
      const RowSampling p = args.at(b);
      ws.row.resize(vocab);
      float* x = ws.row.data();
      if (p.bad() || !mixture_row(base, logits.stride(0), logits.stride(1), logits.stride(2), b, vocab, w.row(b),
                                  w.stride_member, w.members, x, ws)) {
        dst[b] = -1;
        return;
      }
      // The reference draws from the mixture row as it is (nothing to remap: log q <= 0), and
      // yields -1 for a NaN in it or no entry above -inf.
      float m = -kInf;
      int64_t n_finite = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        if (std::isnan(x[i])) {
          n_finite = 0;
          break;
        }
        m = std::max(m, x[i]);
        n_finite += x[i] > -kInf;
      }
      dst[b] = n_finite > 0 ? draw_row(x, vocab, m, n_finite, p, kStreamMixture, ws) : -1;
    });
  });
  return tokens;
}


// ---- verify_draft --------------------------------------------------------------------------

namespace {

// The distribution `sample` draws from for one fp32 row (+inf remapped, no NaN, n_finite >= 1,
// maximum m): the kept set {x >= threshold, exp((x - m) * inv_t) >= min_p} and its mass z, or the
// one-hot greedy row. probability(i) = e_i / z on the kept set (fp32, like the reference's
// e / e.sum()).
struct Distribution {
  bool greedy = false;
  int64_t argmax = 0;
  float m = 0, inv_t = 1, threshold = -kInf, min_p = 0, z = 0;

  bool kept(float x, float& e) const {
    if (!(x > -kInf) || x < threshold) return false;
    const float scaled = (x - m) * inv_t;
    e = std::exp(scaled);
    return min_p == 0 ? !std::isnan(scaled) : e >= min_p;
  }
  float probability(const float* x, int64_t i) const {
    if (greedy) return i == argmax ? 1.0f : 0.0f;
    float e;
    return kept(x[i], e) ? e / z : 0.0f;
  }
};

Distribution distribution(const float* x, int64_t vocab, float m, int64_t n_finite, const RowSampling& p,
                          Workspace& ws) {
  Distribution d;
  d.m = m;
  d.argmax = first_index_of(x, vocab, m);
  d.greedy = p.temperature == 0;
  d.inv_t = d.greedy ? 1.0f : 1.0f / p.temperature;
  if (std::isinf(d.inv_t)) d.greedy = true;
  if (d.greedy) return d;
  float tau_k = -kInf;
  if (p.top_k > 0 && p.top_k < n_finite) tau_k = kth_largest(x, vocab, n_finite, p.top_k, ws);
  d.threshold = tau_k;
  if (p.top_p < 1) d.threshold = std::max(tau_k, top_p_threshold(x, vocab, m, d.inv_t, tau_k, p.top_p, ws));
  d.min_p = p.min_p;
  double z = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    float e;
    if (d.kept(x[i], e)) z += e;
  }
  d.z = static_cast<float>(z);
  return d;
}

// m and n_finite of an fp32 row; false for a NaN or no finite entry.
bool row_stats(const float* x, int64_t vocab, float& m, int64_t& n_finite) {
  m = -kInf;
  n_finite = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(x[i])) return false;
    m = std::max(m, x[i]);
    n_finite += x[i] > -kInf;
  }
  return n_finite > 0;
}

// Gumbel-max draw from max(0, p - q) (from p when that is empty), stream STREAM_RESIDUAL.
int64_t residual_draw(const float* xp, const Distribution& p, const float* xq, const Distribution* q, int64_t vocab,
                      uint64_t seed, uint64_t offset) {
  auto residual = [&](int64_t i, bool use_q) {
    const float pi = p.probability(xp, i);
    if (!use_q) return pi;
    return std::max(0.0f, pi - q->probability(xq, i));
  };
  bool use_q = q != nullptr;
  if (use_q) {
    bool empty = true;
    for (int64_t i = 0; i < vocab && empty; ++i) empty = !(residual(i, true) > 0);
    if (empty) use_q = false;
  }
  constexpr int64_t kBlock = 4 * philox::kBlockQuads;
  uint32_t words[kBlock];
  int64_t best_index = -1;
  float best = -kInf;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t end = std::min(vocab, start + kBlock);
    bool any = false;
    float r[kBlock];
    for (int64_t i = start; i < end; ++i) {
      r[i - start] = residual(i, use_q);
      any |= r[i - start] > 0;
    }
    if (!any) continue;
    philox::words_block(seed, offset, kStreamResidual, static_cast<uint64_t>(start) / 4, words);
    for (int64_t i = start; i < end; ++i) {
      if (!(r[i - start] > 0)) continue;
      const float score = std::log(r[i - start]) + philox::gumbel_from_bits(words[i - start]);
      if (best_index < 0 || score > best) {
        best = score;
        best_index = i;
      }
    }
  }
  return best_index;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> verify_draft_cpu(
    const at::Tensor& target_logits, const at::Tensor& draft_logits, const at::Tensor& draft_tokens,
    const at::Tensor& weights, const c10::optional<at::Tensor>& ndraft_t, int64_t ndraft_s,
    const c10::optional<at::Tensor>& temp_t, double temp_s, const c10::optional<at::Tensor>& topk_t, int64_t topk_s,
    const c10::optional<at::Tensor>& topp_t, double topp_s, const c10::optional<at::Tensor>& minp_t, double minp_s,
    const c10::optional<at::Tensor>& seed_t, int64_t seed_s, const c10::optional<at::Tensor>& off_t, int64_t off_s) {
  const char* op = "verify_draft";
  check_float_input(target_logits, op, "target_logits [M, B, J, V]", 4);
  check_float_input(draft_logits, op, "draft_logits [B, J, V]", 3);
  const int64_t members = target_logits.size(0), batch = target_logits.size(1), span = target_logits.size(2),
                vocab = target_logits.size(3);
  TORCH_CHECK_VALUE(draft_logits.size(0) == batch && draft_logits.size(1) == span && draft_logits.size(2) == vocab,
                    op, ": draft_logits must be [B, J, V] = [", batch, ", ", span, ", ", vocab, "], got shape ",
                    draft_logits.sizes());
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.size(0) == batch && draft_tokens.size(1) == span, op,
                    ": draft_tokens must be [B, J] = [", batch, ", ", span, "], got shape ", draft_tokens.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(draft_tokens.scalar_type(), false), op, ": draft_tokens must be integer, got ",
                   draft_tokens.scalar_type());
  const auto w = weight_rows(weights, op);
  TORCH_CHECK_VALUE(w.members == members, op, ": weights has ", w.members, " member weights but target_logits has M=",
                    members);
  TORCH_CHECK_VALUE(weights.dim() == 1 || weights.size(0) == batch, op, ": weights has ", weights.size(0),
                    " rows but the batch has B=", batch);
  const auto args = sampling_args(batch, op, temp_t, temp_s, topk_t, topk_s, topp_t, topp_s, minp_t, minp_s, seed_t,
                                  seed_s, off_t, off_s);
  const auto ndraft = row_param<int64_t>(ndraft_t, ndraft_s, batch, op, "num_drafts");
  const at::Tensor tokens_in = draft_tokens.to(at::kLong);
  const int64_t* tok = tokens_in.data_ptr<int64_t>();
  const int64_t tok_sb = tokens_in.stride(0), tok_sj = tokens_in.stride(1);
  auto accepted = at::zeros({batch}, target_logits.options().dtype(at::kLong));
  auto token = at::full({batch}, -1, target_logits.options().dtype(at::kLong));
  int64_t* acc_out = accepted.data_ptr<int64_t>();
  int64_t* tok_out = token.data_ptr<int64_t>();
  if (batch == 0 || span == 0) return {accepted, token};
  // the target's row (b, j) is a [M, ., V] slice: a [M, B*J, V] view of it for mixture_row
  // The drafter's logits may have another dtype than the members' (the op's contract, as on CUDA):
  // the two are dispatched separately.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(), "me_verify_draft_cpu", [&] {
    using target_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, draft_logits.scalar_type(), "me_verify_draft_cpu_q",
                                    [&] {
      const target_t* target = target_logits.data_ptr<target_t>();
      const scalar_t* draft = draft_logits.data_ptr<scalar_t>();
      const int64_t t_sm = target_logits.stride(0), t_sb = target_logits.stride(1), t_sj = target_logits.stride(2),
                    t_sv = target_logits.stride(3);
      const int64_t d_sb = draft_logits.stride(0), d_sj = draft_logits.stride(1), d_sv = draft_logits.stride(2);
      for_each_row(batch, [&](int64_t b, Workspace& ws) {
        const RowSampling p = args.at(b);
        if (p.bad()) return;  // (0, -1)
        const int64_t n_drafts = std::min(std::max<int64_t>(ndraft(b), 0), span);
        std::vector<float> xp(vocab);
        for (int64_t j = 0; j < n_drafts; ++j) {
          // p_j: the transformed mixture (mixture_row reads row "b" of a [M, ., V] view at b * t_sb + j * t_sj)
          float mp;
          int64_t nfp;
          if (!mixture_row(target + j * t_sj, t_sm, t_sb, t_sv, b, vocab, w.row(b), w.stride_member, w.members,
                           xp.data(), ws) ||
              !row_stats(xp.data(), vocab, mp, nfp)) {
            acc_out[b] = 0;  // the mixture is undefined at a position the row reaches: (0, -1)
            tok_out[b] = -1;
            return;
          }
          const Distribution dp = distribution(xp.data(), vocab, mp, nfp, p, ws);
          // q_j: the drafter's transformed distribution (q = 0 for an invalid drafter row)
          float mq;
          int64_t nfq;
          const bool q_valid = load_row(draft + b * d_sb + j * d_sj, d_sv, vocab, ws, mq, nfq);
          std::swap(ws.row, ws.other);
          Distribution dq;
          if (q_valid) dq = distribution(ws.other.data(), vocab, mq, nfq, p, ws);
          const int64_t x = tok[b * tok_sb + j * tok_sj];
          float px = 0, qx = 0;
          if (x >= 0 && x < vocab) {
            px = dp.probability(xp.data(), x);
            qx = q_valid ? dq.probability(ws.other.data(), x) : 0.0f;
          }
          uint32_t words[4];
          philox::words(p.seed, p.offset + static_cast<uint64_t>(j), kStreamAccept, 0, words);
          if (q_valid && philox::uniform_from_bits(words[0]) * qx < px) {  // an invalid drafter row's draft is rejected
            acc_out[b] = j + 1;
            continue;
          }
          tok_out[b] = dp.greedy ? dp.argmax
                                 : residual_draw(xp.data(), dp, ws.other.data(), q_valid ? &dq : nullptr, vocab, p.seed,
                                                 p.offset + static_cast<uint64_t>(j));
          return;
        }
      });
    });
  });
  return {accepted, token};
}

}  // namespace me
