#include "core/activation_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

// no-trapping-math lets the selects between a function's branches vectorise (without it, GCC
// will not evaluate both sides of a floating-point select); results are unchanged, nothing here
// reads FP flags. fp-contract=off keeps a*b+c two roundings wherever it appears, so every kernel
// (and every target clone) gives a function the same bits.
#pragma GCC optimize("no-trapping-math", "fp-contract=off")

namespace spatium::act {
namespace {

// --- float32 functions, branch-free so that loops over them vectorise ---------------------------

template <size_t N>
[[gnu::always_inline]] inline float horner(float x, const float (&c)[N]) {  // c: highest first
  float p = c[0];
  for (size_t i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}

// exp(x) for x <= 0. Results below FLT_MIN come out as 0 (exp(-87) is 1.6e-38).
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  constexpr float kMin = -87.0f;
  const float xc = x < kMin ? kMin : x;
  // Rounded to an integer (in [-126, 0]) by adding and subtracting 1.5 * 2^23, which
  // vectorises where std::nearbyint may not.
  const float k = (xc * float(M_LOG2E) + 12582912.0f) - 12582912.0f;
  // ln 2 in two parts; the first has 12 significant bits, so k times it is exact.
  const float r = (xc - k * 0.693115234375f) - k * 3.19461833e-05f;  // |r| <= ln2 / 2
  const float p = horner(r, {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f,
                             1.0f, 1.0f});
  // 2^k without a float-to-int conversion: 2^23 + 127 + k holds the biased exponent in its low
  // mantissa bits; shifted up, they are the exponent field.
  const float biased = k + 8388735.0f;
  uint32_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < kMin ? 0.0f : p * scale;
}

// expm1(z) for z <= 0, given ez = exp(z): a series near 0, where ez - 1 would cancel.
[[gnu::always_inline]] inline float expm1_nonpositive(float z, float ez) {
  const float p = horner(z, {1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24,
                             1.0f / 6, 0.5f});
  return z > -0.5f ? z + z * z * p : ez - 1.0f;
}

// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3.
[[gnu::always_inline]] inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  const float p = horner(s2, {1.0f / 17, 1.0f / 15, 1.0f / 13, 1.0f / 11, 1.0f / 9, 1.0f / 7,
                              1.0f / 5, 1.0f / 3});
  return 2.0f * s + 2.0f * s * s2 * p;
}

// exp(t^2) erfc(t) for t >= 0: u h(2u - 1) with u = 1 / (1 + t / 2), h a least-squares
// polynomial fit (relative error 3e-7 in float32 over t in [0, 1e4]).
[[gnu::always_inline]] inline float erfcx(float t) {
  const float u = 1.0f / (1.0f + 0.5f * t);
  const float h = horner(2.0f * u - 1.0f,
                         {4.21612e-05f, -3.6601876e-05f, -0.00029938272f, 0.00043067048f,
                          0.0015291572f, -0.003243452f, -0.010751626f, 0.018221669f,
                          0.13973573f, 0.3435803f, 0.51079136f});
  return u * h;
}

struct SinCos {
  float sin, cos;
};

// Reduced by a multiple of pi/2 in double: exact enough (error ~ |x| 1e-16) for any |x| whose
// sine float32 can still tell apart.
[[gnu::always_inline]] inline SinCos sin_cos(float x) {
  const double k = std::nearbyint(double(x) * M_2_PI);
  const float r = float(double(x) - k * M_PI_2), r2 = r * r;  // |r| <= pi / 4
  const double quadrant = k - 4.0 * std::floor(k * 0.25);
  const float s = r + r * r2 * horner(r2, {1.0f / 362880, -1.0f / 5040, 1.0f / 120, -1.0f / 6});
  const float c = 1.0f + r2 * horner(r2, {-1.0f / 3628800, 1.0f / 40320, -1.0f / 720,
                                          1.0f / 24, -0.5f});
  const bool swap = quadrant == 1.0 || quadrant == 3.0;
  const float sin = swap ? c : s, cos = swap ? s : c;
  return {quadrant >= 2.0 ? -sin : sin, quadrant == 1.0 || quadrant == 2.0 ? -cos : cos};
}

// Groups of functions that share an expensive subexpression: a run computes only the groups its
// functions need.
constexpr uint32_t bit(Fn f) { return 1u << static_cast<int>(f); }
constexpr uint32_t kExpGroup =
    bit(Fn::Elu) | bit(Fn::Silu) | bit(Fn::Sigmoid) | bit(Fn::Tanh) | bit(Fn::Softplus);
constexpr uint32_t kGaussGroup = bit(Fn::Gelu) | bit(Fn::Gaussian);
constexpr uint32_t kSinGroup = bit(Fn::Sin);

// Calls sink(fn, value, slope) for every function of the groups asked for, at x. (A sink, not
// arrays indexed by function: the callers' loops then vectorise.)
template <bool kExp, bool kGauss, bool kSin, class Sink>
[[gnu::always_inline]] inline void evaluate(float x, Sink&& sink) {
  const bool positive = x > 0.0f;
  const float ax = std::fabs(x);
  sink(Fn::Relu, positive ? x : 0.0f, positive ? 1.0f : 0.0f);
  sink(Fn::LeakyRelu, positive ? x : float(kLeakySlope) * x, positive ? 1.0f : float(kLeakySlope));
  sink(Fn::Identity, x, 1.0f);
  sink(Fn::Abs, ax, positive ? 1.0f : (x < 0.0f ? -1.0f : 0.0f));
  if constexpr (kExp) {
    const float e = exp_nonpositive(-ax);
    // sigmoid(|x|) and 1 - sigmoid(|x|), neither by cancellation.
    const float big = 1.0f / (1.0f + e), small = e * big;
    const float s = x >= 0.0f ? big : small, s_rest = x >= 0.0f ? small : big;
    sink(Fn::Sigmoid, s, big * small);
    sink(Fn::Silu, x * s, s * (1.0f + x * s_rest));
    const bool linear = x > float(kSoftplusThreshold);
    sink(Fn::Softplus, linear ? x : (positive ? x : 0.0f) + log1p_unit(e), linear ? 1.0f : s);
    sink(Fn::Elu, positive ? x : expm1_nonpositive(-ax, e), positive ? 1.0f : e);
    // tanh(|x|) = -m / (2 + m) with m = expm1(-2|x|).
    const float m = expm1_nonpositive(-2.0f * ax, e * e), t = -m / (2.0f + m);
    const float tanh = x < 0.0f ? -t : t;
    sink(Fn::Tanh, tanh, 1.0f - tanh * tanh);
  }
  if constexpr (kGauss) {
    const float q = exp_nonpositive(-0.5f * x * x), q2 = q * q;  // exp(-x^2 / 2), exp(-x^2)
    sink(Fn::Gaussian, q2, -2.0f * x * q2);
    const float tail = 0.5f * q * erfcx(ax * float(M_SQRT1_2));  // P(N(0, 1) > |x|)
    const float cdf = positive ? 1.0f - tail : tail;
    sink(Fn::Gelu, x * cdf, cdf + x * q * float(0.5 * M_2_SQRTPI * M_SQRT1_2));
  }
  if constexpr (kSin) {
    const SinCos sc = sin_cos(x);
    sink(Fn::Sin, sc.sin, sc.cos);
  }
}

// out[i] = the value (or grad times the slope) of function fn_at(i) at x[i]. In blocks: the
// functions of the groups are evaluated into one row each (a loop that vectorises), then each
// element picks its function's row.
template <bool kExp, bool kGauss, bool kSin, class FnAt>
[[gnu::always_inline]] inline void pick_run(FnAt fn_at, const float* __restrict x,
                                            const float* __restrict grad, int64_t n,
                                            float* __restrict out) {
  constexpr int64_t kBlock = 256;
  float rows[kNumFns][kBlock];  // rows of functions outside the groups are never read
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t size = std::min(kBlock, n - begin);
    const float* xs = x + begin;
    if (grad == nullptr) {
      for (int64_t j = 0; j < size; ++j) {
        evaluate<kExp, kGauss, kSin>(
            xs[j], [&](Fn fn, float value, float) { rows[static_cast<int>(fn)][j] = value; });
      }
      for (int64_t j = 0; j < size; ++j) out[begin + j] = rows[fn_at(begin + j)][j];
    } else {
      for (int64_t j = 0; j < size; ++j) {
        evaluate<kExp, kGauss, kSin>(
            xs[j], [&](Fn fn, float, float slope) { rows[static_cast<int>(fn)][j] = slope; });
      }
      for (int64_t j = 0; j < size; ++j) {
        out[begin + j] = grad[begin + j] * rows[fn_at(begin + j)][j];
      }
    }
  }
}

// pick_run with the groups `used` (a bit per function) needs.
template <class FnAt>
[[gnu::always_inline]] inline void pick_groups(uint32_t used, FnAt fn_at, const float* x,
                                               const float* grad, int64_t n, float* out) {
  const int groups = ((used & kExpGroup) != 0 ? 1 : 0) | ((used & kGaussGroup) != 0 ? 2 : 0) |
                     ((used & kSinGroup) != 0 ? 4 : 0);
  switch (groups) {
    case 0: pick_run<false, false, false>(fn_at, x, grad, n, out); return;
    case 1: pick_run<true, false, false>(fn_at, x, grad, n, out); return;
    case 2: pick_run<false, true, false>(fn_at, x, grad, n, out); return;
    case 3: pick_run<true, true, false>(fn_at, x, grad, n, out); return;
    case 4: pick_run<false, false, true>(fn_at, x, grad, n, out); return;
    case 5: pick_run<true, false, true>(fn_at, x, grad, n, out); return;
    case 6: pick_run<false, true, true>(fn_at, x, grad, n, out); return;
    default: pick_run<true, true, true>(fn_at, x, grad, n, out); return;
  }
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void one_f32(
    Fn fn, const float* x, const float* grad, int64_t n, float* out) {
  const int f = static_cast<int>(fn);
  pick_groups(1u << f, [f](int64_t) { return f; }, x, grad, n, out);
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void table_f32(
    const uint8_t* fns, const float* x, const float* grad, int64_t n, float* out) {
  uint32_t used = 0;
  for (int64_t i = 0; i < n; ++i) used |= 1u << fns[i];
  pick_groups(used, [fns](int64_t i) { return int{fns[i]}; }, x, grad, n, out);
}

// The learnable map's backward, in blocks as pick_run: every function's value into rows first,
// then one loop per function over the block. (Accumulating into gains from inside evaluate's
// sink does not vectorise: GCC cannot tell the stores from the other arrays' loads.) grad_x
// takes only the slopes of the functions the block uses, as the fixed map's backward does.
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void switch_backward_f32(
    const uint8_t* __restrict fns, const float* __restrict x, const float* __restrict grad,
    int64_t n, float* __restrict grad_x, float* __restrict gains, int64_t ld,
    float* __restrict total_gains) {
  constexpr int64_t kBlock = 64;
  float values[kNumFns][kBlock];
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t size = std::min(kBlock, n - begin);
    for (int64_t j = 0; j < size; ++j) {
      evaluate<true, true, true>(x[begin + j], [&](Fn fn, float value, float) {
        values[static_cast<int>(fn)][j] = value;
      });
    }
    const float* g = grad + begin;
    const uint8_t* f = fns + begin;
    uint32_t used = 0;
    float chosen[kBlock];
    for (int64_t j = 0; j < size; ++j) {
      chosen[j] = values[f[j]][j];
      used |= 1u << f[j];
    }
    pick_groups(used, [f](int64_t i) { return int{f[i]}; }, x + begin, g, size, grad_x + begin);
    for (int k = 0; k < kNumFns; ++k) {
      float* gk = gains + k * ld + begin;
      float total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < size; ++j) {
        const float gain = g[j] * (values[k][j] - chosen[j]);
        gk[j] += gain;
        total += gain;
      }
      if (total_gains != nullptr) total_gains[k] += total;
    }
  }
}

template <class T>
[[gnu::always_inline]] inline void simhash_rows(const T* x, int64_t batch, int64_t features,
                                                const T* projections, int bits, int64_t* cells) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* row = x + b * features;
    int64_t cell = 0;
    for (int j = 0; j < bits; ++j) {
      const T* p = projections + j * features;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t f = 0; f < features; ++f) dot += row[f] * p[f];
      cell |= int64_t{dot > 0} << j;
    }
    cells[b] = cell;
  }
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void simhash_f32(
    const float* x, int64_t batch, int64_t features, const float* projections, int bits,
    int64_t* cells) {
  simhash_rows(x, batch, features, projections, bits, cells);
}

// fns[j] = the first index k of the largest logit(k, j) over the 12 functions, for each of n
// columns; a NaN counts as the largest (torch.argmax's rule). One pass per function over
// contiguous columns, so it vectorises.
template <class T, class Logit>
[[gnu::always_inline]] inline void argmax_impl(int64_t n, Logit logit, uint8_t* __restrict fns) {
  constexpr int64_t kChunk = 256;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t size = std::min(kChunk, n - begin);
    // The index as wide as the logit (not uint8): the selects then vectorise lane for lane.
    using Index = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
    T best[kChunk];
    Index index[kChunk];
    for (int64_t j = 0; j < size; ++j) {
      best[j] = logit(0, begin + j);
      index[j] = 0;
    }
    for (int k = 1; k < kNumFns; ++k) {
      for (int64_t j = 0; j < size; ++j) {
        const T v = logit(k, begin + j);
        // Taken when larger, or when it is the first NaN (a NaN best is never replaced).
        const bool take = v > best[j] || (v != v && best[j] == best[j]);
        best[j] = take ? v : best[j];
        index[j] = take ? Index{k} : index[j];
      }
    }
    for (int64_t j = 0; j < size; ++j) fns[begin + j] = static_cast<uint8_t>(index[j]);
  }
}

template <class T>
[[gnu::always_inline]] inline void argmax_columns_impl(const T* __restrict logits, int64_t ld,
                                                       int64_t n, uint8_t* __restrict fns) {
  argmax_impl<T>(n, [=](int k, int64_t j) { return logits[k * ld + j]; }, fns);
}

template <class T>
[[gnu::always_inline]] inline void argmax_factored_impl(const T* __restrict neuron_logits,
                                                        int64_t ld, const T* __restrict cell_logits,
                                                        const uint8_t* __restrict initial, T lead,
                                                        int64_t n, uint8_t* __restrict fns) {
  // Chunk by chunk, the initial functions widened first: comparing bytes with the function
  // index in every pass does not vectorise as well.
  constexpr int64_t kChunk = 256;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t size = std::min(kChunk, n - begin);
    int32_t wide[kChunk];
    for (int64_t j = 0; j < size; ++j) wide[j] = initial[begin + j];
    const T* a = neuron_logits + begin;
    argmax_impl<T>(
        size,
        [&](int k, int64_t j) {
          return (a[k * ld + j] + cell_logits[k]) + (wide[j] == k ? lead : T{0});
        },
        fns + begin);
  }
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void argmax_columns_f32(
    const float* logits, int64_t ld, int64_t n, uint8_t* fns) {
  argmax_columns_impl(logits, ld, n, fns);
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void argmax_factored_f32(
    const float* neuron_logits, int64_t ld, const float* cell_logits, const uint8_t* initial,
    float lead, int64_t n, uint8_t* fns) {
  argmax_factored_impl(neuron_logits, ld, cell_logits, initial, lead, n, fns);
}

}  // namespace

template <>
void simhash<float>(const float* x, int64_t batch, int64_t features, const float* projections,
                    int bits, int64_t* cells) {
  simhash_f32(x, batch, features, projections, bits, cells);
}

template <>
void simhash<double>(const double* x, int64_t batch, int64_t features, const double* projections,
                     int bits, int64_t* cells) {
  simhash_rows(x, batch, features, projections, bits, cells);
}

template <>
void apply_one<float>(Fn fn, const float* x, const float* grad, int64_t n, float* out) {
  one_f32(fn, x, grad, n, out);
}

template <>
void apply_table<float>(const uint8_t* fns, const float* x, const float* grad, int64_t n,
                        float* out) {
  table_f32(fns, x, grad, n, out);
}

template <>
void switch_backward<float>(const uint8_t* fns, const float* x, const float* grad, int64_t n,
                            float* grad_x, float* gains, int64_t ld, float* total_gains) {
  switch_backward_f32(fns, x, grad, n, grad_x, gains, ld, total_gains);
}

// --- float64: the libm-based functions of activations.h ----------------------------------------

template <>
void apply_one<double>(Fn fn, const double* x, const double* grad, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = grad ? grad[i] * derivative(fn, x[i]) : apply(fn, x[i]);
}

template <>
void apply_table<double>(const uint8_t* fns, const double* x, const double* grad, int64_t n,
                         double* out) {
  for (int64_t i = 0; i < n; ++i) apply_one(static_cast<Fn>(fns[i]), x + i, grad ? grad + i : nullptr, 1, out + i);
}

template <>
void switch_backward<double>(const uint8_t* fns, const double* x, const double* grad, int64_t n,
                             double* grad_x, double* gains, int64_t ld, double* total_gains) {
  for (int64_t i = 0; i < n; ++i) {
    const auto chosen = static_cast<Fn>(fns[i]);
    const double value = apply(chosen, x[i]);
    grad_x[i] = grad[i] * derivative(chosen, x[i]);
    for (int k = 0; k < kNumFns; ++k) {
      const double gain = grad[i] * (apply(static_cast<Fn>(k), x[i]) - value);
      gains[k * ld + i] += gain;
      if (total_gains != nullptr) total_gains[k] += gain;
    }
  }
}

template <>
void argmax_columns<float>(const float* logits, int64_t ld, int64_t n, uint8_t* fns) {
  argmax_columns_f32(logits, ld, n, fns);
}

template <>
void argmax_columns<double>(const double* logits, int64_t ld, int64_t n, uint8_t* fns) {
  argmax_columns_impl(logits, ld, n, fns);
}

template <>
void argmax_factored<float>(const float* neuron_logits, int64_t ld, const float* cell_logits,
                            const uint8_t* initial, float lead, int64_t n, uint8_t* fns) {
  argmax_factored_f32(neuron_logits, ld, cell_logits, initial, lead, n, fns);
}

template <>
void argmax_factored<double>(const double* neuron_logits, int64_t ld, const double* cell_logits,
                             const uint8_t* initial, double lead, int64_t n, uint8_t* fns) {
  argmax_factored_impl(neuron_logits, ld, cell_logits, initial, lead, n, fns);
}

}  // namespace spatium::act
