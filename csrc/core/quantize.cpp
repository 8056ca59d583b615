#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace spatium::quant {
namespace {

// Compiled for AVX-512, AVX2 and the baseline; the loader picks one for this CPU.
[[gnu::target_clones("avx512f", "avx2", "default")]] void decode_any(const uint8_t* codes,
                                                                      int64_t count, int bits,
                                                                      float scale, float* out) {
  switch (bits) {
    case 1: decode_planes<1>(codes, count, scale, out); return;
    case 2: decode_planes<2>(codes, count, scale, out); return;
    case 4: decode_planes<4>(codes, count, scale, out); return;
    default: decode_planes<8>(codes, count, scale, out); return;
  }
}

// Where the scale search of a width starts (a clipping ratio of absmax / max_code) and how
// many Lloyd steps refine it, chosen by measurement on 4096 x 4096 Gaussian and Student-t
// (df 3) weights, blocks of 64 (docs/architecture.md). A step costs about as much as the rest
// of the block's quantization, which runs at every training step: 4 bits takes one (error
// 0.0933 -> 0.0921; a second gives 0.0915), 2 bits none (one more: 0.365 -> 0.359), 8 bits
// gains nothing from any.
struct ScaleSearch {
  double start;
  int steps;
};
constexpr ScaleSearch scale_search(int bits) {
  return bits == 2 ? ScaleSearch{0.8, 0} : bits == 4 ? ScaleSearch{0.95, 1} : ScaleSearch{1.0, 0};
}

// Lane-wise partial results in vector registers (GCC vector extensions), the lanes combined
// at the end: GCC leaves omp simd reductions over blocks this short mostly scalar.
using Lanes = float __attribute__((vector_size(64)));
using DoubleLanes = double __attribute__((vector_size(64)));
using FloatsOfDoubleLanes = float __attribute__((vector_size(32)));
using IntLanes = int32_t __attribute__((vector_size(64)));
inline constexpr int64_t kLanes = sizeof(Lanes) / sizeof(float);
inline constexpr int64_t kDoubleLanes = sizeof(DoubleLanes) / sizeof(double);

// Combines the lanes of a vector pairwise (halves, then quarters, ...): a tree of depth
// log2(lanes) rather than a serial chain through every lane.
template <class V, class Combine>
[[gnu::always_inline]] inline auto combine_lanes(const V& lanes, Combine combine) {
  V v = lanes;  // (by reference: a 64-byte vector by value has an ISA-dependent ABI)
  for (int width = static_cast<int>(sizeof(V) / sizeof(v[0])) / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) v[k] = combine(v[k], v[k + width]);
  }
  return v[0];
}
inline constexpr auto kAdd = [](auto a, auto b) { return a + b; };
inline constexpr auto kMax = [](auto a, auto b) { return a > b ? a : b; };

// Adding and subtracting it rounds half to even (in the default rounding mode) for
// |x| <= 2^51: the vector extensions have no nearbyint. Only -ffast-math could fold it away.
inline constexpr double kRoundingShift = 6755399441055744.0;  // 1.5 * 2^52
inline constexpr float kFloatRoundingShift = 12582912.0f;      // 1.5 * 2^23: |x| <= 2^22

// One Lloyd step: the nearest codes for `scale`, then the least-squares scale for those codes.
// Codes come from a product with the reciprocal, in double (fp32 weights convert exactly), and
// the sums are exact for any block whose weights span under 2^21 in magnitude, so the result
// does not depend on the order of summation (the reference computes it with other sums). The
// largest weight always gets a non-zero code (|scale| <= absmax), so the denominator is >= 1.
template <int Bits>
[[gnu::always_inline]] inline double refit_scale(const float* w, int64_t count, double scale) {
  constexpr auto lo = static_cast<double>(min_code(Bits)), hi = static_cast<double>(max_code(Bits));
  const double inverse = 1.0 / scale;
  const DoubleLanes lo_lanes = DoubleLanes{} + lo, hi_lanes = DoubleLanes{} + hi;
  // Two accumulators each, alternating: halves the chain of dependent adds.
  DoubleLanes wq_lanes[2] = {}, qq_lanes[2] = {};
  const auto accumulate = [&](int64_t j, int a) {
    FloatsOfDoubleLanes f;
    std::memcpy(&f, w + j, sizeof(f));
    const DoubleLanes x = __builtin_convertvector(f, DoubleLanes);
    DoubleLanes q = x * inverse;  // clamped first: then rounding is in range, and the same
    q = q < lo_lanes ? lo_lanes : q;
    q = q > hi_lanes ? hi_lanes : q;
    q = (q + kRoundingShift) - kRoundingShift;
    wq_lanes[a] += x * q;
    qq_lanes[a] += q * q;
  };
  int64_t j = 0;
  for (; j + 2 * kDoubleLanes <= count; j += 2 * kDoubleLanes) {
    accumulate(j, 0);
    accumulate(j + kDoubleLanes, 1);
  }
  if (j + kDoubleLanes <= count) {
    accumulate(j, 0);
    j += kDoubleLanes;
  }
  wq_lanes[0] += wq_lanes[1];
  qq_lanes[0] += qq_lanes[1];
  double wq = combine_lanes(wq_lanes[0], kAdd), qq = combine_lanes(qq_lanes[0], kAdd);
  for (; j < count; ++j) {
    const double q = std::nearbyint(std::clamp(static_cast<double>(w[j]) * inverse, lo, hi));
    wq += static_cast<double>(w[j]) * q;
    qq += q * q;
  }
  return wq / qq;
}

// The fp16 nearest a non-zero scale, its magnitude kept within [the smallest subnormal, 65504].
uint16_t scale_to_half(double scale) {
  uint16_t magnitude = float_to_half(static_cast<float>(std::fabs(scale)));
  magnitude = std::clamp<uint16_t>(magnitude, 1, kHalfMax);
  return scale < 0.0 ? static_cast<uint16_t>(magnitude | 0x8000u) : magnitude;
}

// Packs stored values [0, count) into planar codes (see quantize.h), plane by plane.
template <int Bits>
[[gnu::always_inline]] inline void pack_planes(const uint32_t* stored, int64_t count,
                                               uint8_t* codes) {
  const int64_t bytes = code_bytes(Bits, count);
  for (int64_t i = 0; i < bytes; ++i) codes[i] = 0;
  for (int p = 0; p * bytes < count; ++p) {
    const int64_t begin = p * bytes;
    const int64_t len = std::min(bytes, count - begin);
    for (int64_t i = 0; i < len; ++i) {
      codes[i] = static_cast<uint8_t>(codes[i] | (stored[begin + i] << (p * Bits)));
    }
  }
}

bool all_finite(const float* w, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    if (!std::isfinite(w[j])) return false;
  }
  return true;
}

// What the scales need to know of a block. abs_sum is NaN or Inf when a weight is, or when
// finite weights overflow it (which an exact check then tells apart).
struct BlockStats {
  float largest, negated_smallest, abs_sum;
};

[[gnu::always_inline]] inline BlockStats block_stats(const float* w, int64_t count) {
  Lanes largest = {}, negated_smallest = {}, abs_sum = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    Lanes v;
    std::memcpy(&v, w + j, sizeof(v));
    largest = largest > v ? largest : v;
    negated_smallest = negated_smallest > -v ? negated_smallest : -v;
    abs_sum += v < 0 ? -v : v;
  }
  BlockStats stats{combine_lanes(largest, kMax), combine_lanes(negated_smallest, kMax),
                   combine_lanes(abs_sum, kAdd)};
  for (; j < count; ++j) {
    stats.largest = std::max(stats.largest, w[j]);
    stats.negated_smallest = std::max(stats.negated_smallest, -w[j]);
    stats.abs_sum += std::fabs(w[j]);
  }
  return stats;
}

// Quantizes a block into `codes` through `stored` (count values of scratch) and returns the
// scale.
template <int Bits>
[[gnu::always_inline]] inline uint16_t quantize_with(const float* w, int64_t count,
                                                     const BlockStats& stats, uint32_t* stored,
                                                     uint8_t* codes) {
  const auto [largest, negated_smallest, abs_sum] = stats;
  constexpr uint32_t zero = to_stored(Bits, 0);
  const auto constant = [&](uint16_t scale) {
    std::fill(stored, stored + count, zero);
    pack_planes<Bits>(stored, count, codes);
    return scale;
  };
  if (!std::isfinite(abs_sum) && !all_finite(w, count)) return constant(kHalfNaN);
  if constexpr (Bits == 1) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) stored[j] = w[j] >= 0.0f ? 1u : 0u;
    pack_planes<Bits>(stored, count, codes);
    return count > 0 ? float_to_half(abs_sum / static_cast<float>(count)) : 0;
  } else {
    const float absmax = std::max(largest, negated_smallest);
    if (absmax == 0.0f) return constant(0);
    // The extra level (max_code) goes to the side of the largest magnitude.
    const double sign = largest >= negated_smallest ? 1.0 : -1.0;
    constexpr ScaleSearch search = scale_search(Bits);
    double scale = sign * search.start * static_cast<double>(absmax) / max_code(Bits);
    for (int step = 0; step < search.steps; ++step) scale = refit_scale<Bits>(w, count, scale);
    const uint16_t scale_half = scale_to_half(scale);
    const float s = half_to_float(scale_half);
    // The nearest codes for the stored scale (clamped first, then rounded: the same).
    constexpr auto lo = static_cast<float>(min_code(Bits)), hi = static_cast<float>(max_code(Bits));
    const Lanes lo_lanes = Lanes{} + lo, hi_lanes = Lanes{} + hi;
    int64_t j = 0;
    for (; j + kLanes <= count; j += kLanes) {
      Lanes q;
      std::memcpy(&q, w + j, sizeof(q));
      q /= s;
      q = q < lo_lanes ? lo_lanes : q;
      q = q > hi_lanes ? hi_lanes : q;
      q = (q + kFloatRoundingShift) - kFloatRoundingShift;
      const IntLanes code = __builtin_convertvector(q, IntLanes) + offset(Bits);
      std::memcpy(stored + j, &code, sizeof(code));
    }
    for (; j < count; ++j) {
      const float q = std::nearbyint(std::clamp(w[j] / s, lo, hi));
      stored[j] = static_cast<uint32_t>(static_cast<int32_t>(q) + offset(Bits));
    }
    pack_planes<Bits>(stored, count, codes);
    return scale_half;
  }
}

// Compiled for AVX-512, AVX2 and the baseline; the loader picks one for this CPU.
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] uint16_t quantize_any(
    const float* w, int64_t count, int bits, uint32_t* stored, uint8_t* codes) {
  const BlockStats stats = block_stats(w, count);
  switch (bits) {
    case 1: return quantize_with<1>(w, count, stats, stored, codes);
    case 2: return quantize_with<2>(w, count, stats, stored, codes);
    case 4: return quantize_with<4>(w, count, stats, stored, codes);
    default: return quantize_with<8>(w, count, stats, stored, codes);
  }
}

}  // namespace

uint16_t quantize_block(const float* w, int64_t count, int bits, uint8_t* codes) {
  // Values before packing: on the stack for usual blocks (a thread_local costs a call per
  // block in a shared library), in a reused buffer for larger ones.
  constexpr int64_t kOnStack = 256;
  if (count <= kOnStack) {
    uint32_t stored[kOnStack];
    return quantize_any(w, count, bits, stored, codes);
  }
  thread_local std::vector<uint32_t> stored;
  stored.resize(static_cast<size_t>(count));
  return quantize_any(w, count, bits, stored.data(), codes);
}

void dequantize_block(const uint8_t* codes, int64_t count, int bits, uint16_t scale_half,
                      float* out) {
  decode_any(codes, count, bits, half_to_float(scale_half), out);
}

void decode_block(const uint8_t* codes, int64_t count, int bits, float* out) {
  decode_any(codes, count, bits, 1.0f, out);
}

int64_t count_nonzero(const uint8_t* codes, int64_t count, int bits) {
  // Decoded plane by plane (vectorized) rather than code by code through get_stored's divisions.
  thread_local std::vector<float> decoded;
  decoded.resize(static_cast<size_t>(count));
  decode_block(codes, count, bits, decoded.data());
  return std::count_if(decoded.begin(), decoded.end(), [](float code) { return code != 0.0f; });
}

}  // namespace spatium::quant
