#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace spatium::quant {
namespace {

// Compiled for AVX-512, AVX2 and the baseline; the loader picks one for this CPU.
[[gnu::target_clones("avx512f", "avx2", "default")]] void decode_any(const uint8_t* codes,
                                                                      int64_t count, int format,
                                                                      float scale, float* out) {
  switch (format) {
    case 1: decode_planes<1>(codes, count, scale, out); return;
    case 2:
      if (!decode_runs<2>(codes, count, scale, out)) decode_planes<2>(codes, count, scale, out);
      return;
    case 4: decode_planes<4>(codes, count, scale, out); return;
    case kNf4: decode_planes<kNf4>(codes, count, scale, out); return;
    case kOdd2:
      if (!decode_runs<kOdd2>(codes, count, scale, out)) {
        decode_planes<kOdd2>(codes, count, scale, out);
      }
      return;
    default: decode_planes<8>(codes, count, scale, out); return;
  }
}

// Where the scale search of a width starts (a clipping ratio of absmax / max_code) and how
// many Lloyd steps refine it, chosen by measurement on 4096 x 4096 Gaussian and Student-t
// (df 3) weights, blocks of 64 (docs/architecture.md). A step costs about as much as the rest
// of the block's quantization, which runs at every training step: 4 bits takes one (error
// 0.0933 -> 0.0921; a second gives 0.0915), 2 bits none (one more: 0.365 -> 0.359), 8 bits
// gains nothing from any. kNf4 starts at absmax (its levels reach 1) and takes one step (error
// 0.0920 -> 0.0897 Gaussian, 0.111 -> 0.109 Student-t; a second gives 0.0885 / 0.108).
// kOdd2 starts at half of absmax / 3 and takes one step (Gaussian 0.342, Student-t 0.56;
// without it, at the best start for each, 0.347 / 0.598).
struct ScaleSearch {
  double start;
  int steps;
};
constexpr ScaleSearch scale_search(int format) {
  switch (format) {
    case 2: return {0.8, 0};
    case 4: return {0.95, 1};
    case kNf4: return {1.0, 1};
    case kOdd2: return {0.5, 1};
    default: return {1.0, 0};
  }
}

// Smallest and largest level of an integer or odd-code format, in units of the scale.
constexpr int lowest_level(int format) { return format == kOdd2 ? -3 : min_code(format); }
constexpr int highest_level(int format) { return format == kOdd2 ? 3 : max_code(format); }
// Largest level of a format, in units of the scale.
constexpr double top_level(int format) { return format == kNf4 ? 1.0 : highest_level(format); }

// Midpoints between consecutive kNf4 levels, in float32: a value's level index is the number of
// midpoints below it (ties go to the lower level). The reference computes them alike.
constexpr std::array<float, 15> nf4_midpoints() {
  std::array<float, 15> mid{};
  for (size_t k = 0; k < mid.size(); ++k) mid[k] = (kNf4Levels[k] + kNf4Levels[k + 1]) * 0.5f;
  return mid;
}
inline constexpr std::array<float, 15> kNf4Midpoints = nf4_midpoints();

// Lane-wise partial results in vector registers (GCC vector extensions), the lanes combined
// at the end: GCC leaves omp simd reductions over blocks this short mostly scalar.
using Lanes = float __attribute__((vector_size(64)));
using IntLanes = int32_t __attribute__((vector_size(64)));
inline constexpr int64_t kLanes = sizeof(Lanes) / sizeof(float);

// The lower and upper halves of a vector of 2N lanes, as vectors of N lanes.
template <class V, class Half, size_t... Lane>
[[gnu::always_inline]] inline void split_halves(const V& v, Half& low, Half& high,
                                                std::index_sequence<Lane...>) {
  low = __builtin_shufflevector(v, v, Lane...);
  high = __builtin_shufflevector(v, v, (Lane + sizeof...(Lane))...);
}

// Combines the lanes of a vector pairwise (lane k with lane k + half, then again on the
// halves): a tree of depth log2(lanes) rather than a serial chain through every lane, in
// shuffles that stay in registers. Vectors go by reference throughout: by value, a 64-byte
// vector has an ISA-dependent ABI.
template <class V, class Combine>
[[gnu::always_inline]] inline auto combine_lanes(const V& lanes, Combine combine) {
  using Lane = std::remove_cv_t<std::remove_reference_t<decltype(lanes[0])>>;
  constexpr size_t count = sizeof(V) / sizeof(Lane);
  if constexpr (count == 1) {
    return lanes[0];
  } else {
    typedef Lane Half __attribute__((vector_size(sizeof(V) / 2)));
    Half low, high;
    split_halves(lanes, low, high, std::make_index_sequence<count / 2>{});
    combine(low, high);
    return combine_lanes(low, combine);
  }
}
// Combines b into a, lane by lane.
inline constexpr auto kAdd = [](auto& a, const auto& b) { a += b; };
inline constexpr auto kMax = [](auto& a, const auto& b) { a = a > b ? a : b; };

// Adding and subtracting it rounds half to even (in the default rounding mode) for
// |x| <= 2^22: the vector extensions have no nearbyint. Only -ffast-math could fold it away.
inline constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23

// Rounds t half to even in place: a vector of lanes or one float, |t| <= 2^22 (in place: a
// 64-byte vector by value has an ISA-dependent ABI).
template <class V>
[[gnu::always_inline]] inline void round_half_even(V& t) {
  t = (t + kRoundingShift) - kRoundingShift;
}

// Replaces t (in units of the scale) by the nearest level of an integer or odd-code format,
// in place: t clamped to the levels' range first (then rounding is in range, and the same),
// then rounded half to even; odd codes are 2 round((t + 1) / 2) - 1.
template <int Format, class V>
[[gnu::always_inline]] inline void round_to_level(V& t) {
  const V lo = V{} + static_cast<float>(lowest_level(Format));
  const V hi = V{} + static_cast<float>(highest_level(Format));
  t = t < lo ? lo : t;
  t = t > hi ? hi : t;
  if constexpr (Format == kOdd2) {
    V half = (t + 1.0f) * 0.5f;
    round_half_even(half);
    t = half * 2.0f - 1.0f;
  } else {
    round_half_even(t);
  }
}

// ceil(log2(n)) for n >= 1.
constexpr int ceil_log2(int64_t n) {
  int bits = 0;
  while ((int64_t{1} << bits) < n) ++bits;
  return bits;
}

// 2^k for 0 <= k <= 62, exactly.
constexpr double power_of_two(int k) { return static_cast<double>(int64_t{1} << k); }

// Below this absmax a block keeps its starting scale: every scale of such a block, refitted
// or not (a least-squares scale stays within a small multiple of absmax), rounds to fp16's
// smallest subnormal, and the fixed-point factors below stay finite above it.
inline constexpr float kSmallestRefitted = 0x1p-64f;

// The Lloyd steps sum in float32 over fixed-point weights round(w * 2^k / absmax), with
// k = fixed_point_bits(block size, largest factor a weight is multiplied by): every product
// and partial sum is then an integer below 2^24, which float32 holds exactly, so the sums do
// not depend on their order (the reference sums in another order), and 16 lanes do the work
// of 8 doubles.
constexpr int fixed_point_bits(int64_t count, int largest_factor) {
  return std::min(22, 24 - ceil_log2(count) - ceil_log2(largest_factor));
}

// The Lloyd step of an integer or odd-code format: the nearest codes q for a scale (float32
// products with its reciprocal), then the least-squares scale for them, sum(w q) / sum(q q),
// whose two sums this forms in fixed point (k = fixed_point_bits(count, top level)). The
// largest weight always gets a non-zero code (|scale| <= absmax), so sum(q q) >= 1.
template <int Format>
[[gnu::always_inline]] inline void lloyd_sums(const float* w, int64_t count, float inverse,
                                              float to_fixed, float& wq, float& qq) {
  const auto accumulate = [&](auto x, auto& wq_part, auto& qq_part) {
    auto q = x * inverse;
    round_to_level<Format>(q);
    auto fixed = x * to_fixed;
    round_half_even(fixed);
    wq_part += fixed * q;
    qq_part += q * q;
  };
  Lanes wq_lanes = {}, qq_lanes = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    Lanes x;
    std::memcpy(&x, w + j, sizeof(x));
    accumulate(x, wq_lanes, qq_lanes);
  }
  wq = combine_lanes(wq_lanes, kAdd);
  qq = combine_lanes(qq_lanes, kAdd);
  for (; j < count; ++j) accumulate(w[j], wq, qq);
}

// kNf4's Lloyd step. Its levels are not integers, so products with them do not sum exactly;
// instead, per midpoint k, the sum of the weights above it (above[k]) and their count, over
// fixed-point weights (k = fixed_point_bits(count, 1)), exact. A weight's level is
// kNf4Levels[0] plus the steps between consecutive levels of the midpoints below it, so
//   sum w q   = l0 * sum w    + sum_k (l[k+1] - l[k])     * above[k]
//   sum q q   = l0^2 * count  + sum_k (l[k+1]^2 - l[k]^2) * count above[k],
// combined in double in this fixed order: the reference gets the same bits. Levels come from
// float32 products with the scale's reciprocal.
[[gnu::always_inline]] inline double refit_nf4_scale(const float* w, int64_t count, double scale,
                                                     float absmax) {
  constexpr size_t kMid = kNf4Midpoints.size();
  const int bits = fixed_point_bits(count, 1);
  const float inverse = static_cast<float>(1.0 / scale);
  const float to_fixed = static_cast<float>(power_of_two(bits)) / absmax;
  Lanes total = {}, above[kMid] = {}, counted[kMid] = {};
  const Lanes one = Lanes{} + 1.0f, none = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    Lanes x;
    std::memcpy(&x, w + j, sizeof(x));
    const Lanes t = x * inverse;
    Lanes fixed = x * to_fixed;
    round_half_even(fixed);
    total += fixed;
    for (size_t k = 0; k < kMid; ++k) {
      const auto is_above = t > kNf4Midpoints[k];
      above[k] += is_above ? fixed : none;
      counted[k] += is_above ? one : none;
    }
  }
  for (; j < count; ++j) {  // the sums are exact: the tail may go to lane 0
    const float t = w[j] * inverse;
    float fixed = w[j] * to_fixed;
    round_half_even(fixed);
    total[0] += fixed;
    for (size_t k = 0; k < kMid; ++k) {
      if (t > kNf4Midpoints[k]) {
        above[k][0] += fixed;
        counted[k][0] += 1.0f;
      }
    }
  }
  const auto l = [](size_t k) { return static_cast<double>(kNf4Levels[k]); };
  const auto sum = [](const Lanes& lanes) {
    return static_cast<double>(combine_lanes(lanes, kAdd));
  };
  double wq = l(0) * sum(total);
  double qq = l(0) * l(0) * static_cast<double>(count);
  for (size_t k = 0; k < kMid; ++k) {
    wq += (l(k + 1) - l(k)) * sum(above[k]);
    qq += (l(k + 1) * l(k + 1) - l(k) * l(k)) * sum(counted[k]);
  }
  return wq / qq * (static_cast<double>(absmax) / power_of_two(bits));
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
  constexpr int per_byte = 8 / Bits;
  const int64_t bytes = code_bytes(Bits, count);
  if (count == bytes * per_byte) {  // every plane full: each byte in one go
    for (int64_t i = 0; i < bytes; ++i) {
      uint32_t byte = 0;
      for (int p = 0; p < per_byte; ++p) byte |= stored[p * bytes + i] << (p * Bits);
      codes[i] = static_cast<uint8_t>(byte);
    }
    return;
  }
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

// A level's stored value: (code + stored_add) >> stored_shift, that is code + offset, or
// (code + 3) / 2 for odd codes.
constexpr int stored_add(int format) { return format == kOdd2 ? 3 : offset(format); }
constexpr int stored_shift(int format) { return format == kOdd2 ? 1 : 0; }

// The stored values of the levels nearest w[0, kLanes) / s into `stored` (not returned: a
// 64-byte vector by value has an ISA-dependent ABI): integer codes clamped, then rounded;
// kNf4 indices counting the midpoints below (ties to the lower level).
template <int Format>
[[gnu::always_inline]] inline void nearest_stored_lanes(const float* w, float s,
                                                        IntLanes& stored) {
  Lanes t;
  std::memcpy(&t, w, sizeof(t));
  t /= s;
  if constexpr (Format == kNf4) {
    stored = IntLanes{};
    for (float mid : kNf4Midpoints) stored -= t > mid;  // a true lane compares as -1
  } else {
    round_to_level<Format>(t);
    stored = (__builtin_convertvector(t, IntLanes) + stored_add(Format)) >> stored_shift(Format);
  }
}

// nearest_stored_lanes over w[0, count), one by one past the last whole vector.
template <int Format>
[[gnu::always_inline]] inline void nearest_stored(const float* w, int64_t count, float s,
                                                  uint32_t* stored) {
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    IntLanes lanes;
    nearest_stored_lanes<Format>(w + j, s, lanes);
    std::memcpy(stored + j, &lanes, sizeof(lanes));
  }
  if constexpr (Format == kNf4) {
    for (; j < count; ++j) {
      const float t = w[j] / s;
      uint32_t index = 0;
      for (float mid : kNf4Midpoints) index += t > mid ? 1u : 0u;
      stored[j] = index;
    }
  } else {
    for (; j < count; ++j) {
      float q = w[j] / s;
      round_to_level<Format>(q);
      stored[j] = static_cast<uint32_t>((static_cast<int32_t>(q) + stored_add(Format)) >>
                                        stored_shift(Format));
    }
  }
}

// A block's fp16 scale, and whether its codes are all the format's zero rather than the levels
// nearest its weights.
struct BlockScale {
  uint16_t half;
  bool constant;
};

// Blocks whose scales are found together (see block_scales).
inline constexpr int64_t kScalesAtOnce = 16;

// The scales of jobs[0, m), m <= kScalesAtOnce, of count_of(job) weights each (see
// quantize_jobs_with). Step by step over the blocks rather than block by block: a block's
// scale is one long chain of dependent steps (reductions, divisions), and the blocks' steps
// side by side keep the core busy.
template <int Format, class CountOf>
[[gnu::always_inline]] inline void block_scales(const BlockJob* jobs, int64_t m,
                                                CountOf count_of, BlockScale* out) {
  BlockStats stats[kScalesAtOnce];
  bool finite[kScalesAtOnce];
  for (int64_t i = 0; i < m; ++i) {
    stats[i] = block_stats(jobs[i].w, count_of(jobs[i]));
    finite[i] = std::isfinite(stats[i].abs_sum) || all_finite(jobs[i].w, count_of(jobs[i]));
  }
  if constexpr (Format == 1) {
    for (int64_t i = 0; i < m; ++i) {
      const float count = static_cast<float>(count_of(jobs[i]));
      out[i] = !finite[i] ? BlockScale{kHalfNaN, true}
               : count > 0 ? BlockScale{float_to_half(stats[i].abs_sum / count), false}
                           : BlockScale{0, false};
    }
  } else {
    constexpr ScaleSearch search = scale_search(Format);
    float absmax[kScalesAtOnce];
    double scale[kScalesAtOnce];
    for (int64_t i = 0; i < m; ++i) {
      const auto [largest, negated_smallest, abs_sum] = stats[i];
      absmax[i] = std::max(largest, negated_smallest);
      // The extra positive level goes to the side of the largest magnitude.
      const double sign = largest >= negated_smallest ? 1.0 : -1.0;
      scale[i] = sign * search.start * static_cast<double>(absmax[i]) / top_level(Format);
    }
    for (int step = 0; step < search.steps; ++step) {
      if constexpr (Format == kNf4) {
        for (int64_t i = 0; i < m; ++i) {
          if (absmax[i] >= kSmallestRefitted) {
            scale[i] = refit_nf4_scale(jobs[i].w, count_of(jobs[i]), scale[i], absmax[i]);
          }
        }
      } else {
        float inverse[kScalesAtOnce], to_fixed[kScalesAtOnce];
        for (int64_t i = 0; i < m; ++i) {
          inverse[i] = static_cast<float>(1.0 / scale[i]);
          const int bits = fixed_point_bits(count_of(jobs[i]), highest_level(Format));
          to_fixed[i] = static_cast<float>(power_of_two(bits)) / absmax[i];
        }
        float wq[kScalesAtOnce], qq[kScalesAtOnce];
        for (int64_t i = 0; i < m; ++i) {
          if (absmax[i] >= kSmallestRefitted) {
            lloyd_sums<Format>(jobs[i].w, count_of(jobs[i]), inverse[i], to_fixed[i], wq[i], qq[i]);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          if (absmax[i] >= kSmallestRefitted) {
            const int bits = fixed_point_bits(count_of(jobs[i]), highest_level(Format));
            scale[i] = static_cast<double>(wq[i]) / static_cast<double>(qq[i]) *
                       (static_cast<double>(absmax[i]) / power_of_two(bits));
          }
        }
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      out[i] = !finite[i]          ? BlockScale{kHalfNaN, true}
               : absmax[i] == 0.0f ? BlockScale{0, true}
                                   : BlockScale{scale_to_half(scale[i]), false};
    }
  }
}

// Packs the codes of a block for its scale into `codes`: from registers where every plane
// fills whole vectors, else through `stored` (count values of scratch). The 64-weight blocks
// of 2, 4 and 8 bits re-quantize 6-10% faster without the round trip through memory.
template <int Format>
[[gnu::always_inline]] inline void block_codes(const float* w, int64_t count, BlockScale scale,
                                               uint32_t* stored, uint8_t* codes) {
  if (scale.constant) {
    // Level 0, or for odd codes, which have none, +1 (any code times the scale 0 is 0).
    constexpr uint32_t zero =
        Format == kNf4 ? kNf4Zero : Format == kOdd2 ? 2 : to_stored(width(Format), 0);
    std::fill(stored, stored + count, zero);
  } else if constexpr (Format == 1) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) stored[j] = w[j] >= 0.0f ? 1u : 0u;
  } else if (const int64_t bytes = code_bytes(width(Format), count);
             bytes % kLanes == 0 && count == bytes * (8 / width(Format))) {
    // Every plane whole vectors (the usual 64-weight block at 2, 4 and 8 bits): output bytes
    // [g, g + kLanes) gather plane p's codes of weights p * bytes + g on, from registers.
    using ByteLanes = uint8_t __attribute__((vector_size(kLanes)));
    const float s = half_to_float(scale.half);
    for (int64_t g = 0; g < bytes; g += kLanes) {
      IntLanes packed = {}, plane;
      for (int p = 0; p < 8 / width(Format); ++p) {
        nearest_stored_lanes<Format>(w + p * bytes + g, s, plane);
        packed |= plane << (p * width(Format));
      }
      const ByteLanes out = __builtin_convertvector(packed, ByteLanes);
      std::memcpy(codes + g, &out, sizeof(out));
    }
    return;
  } else {
    nearest_stored<Format>(w, count, half_to_float(scale.half), stored);
  }
  pack_planes<width(Format)>(stored, count, codes);
}

// Blocks up to this size keep their values before packing on the stack; larger ones (regions
// of more than 256 inputs) in a heap buffer.
inline constexpr int64_t kOnStack = 256;

// Quantizes jobs[0, n); count_of(job) is a job's block size: its count, or a constant the
// compiler builds into the code (it then unrolls every loop over the block).
template <int Format, class CountOf>
[[gnu::always_inline]] inline void quantize_jobs_with(const BlockJob* jobs, int64_t n,
                                                      CountOf count_of) {
  uint32_t on_stack[kOnStack];
  std::vector<uint32_t> on_heap;
  BlockScale scales[kScalesAtOnce];
  for (int64_t first = 0; first < n; first += kScalesAtOnce) {
    const int64_t m = std::min(kScalesAtOnce, n - first);
    block_scales<Format>(jobs + first, m, count_of, scales);
    for (int64_t i = 0; i < m; ++i) {
      const BlockJob& job = jobs[first + i];
      uint32_t* stored = on_stack;
      if (count_of(job) > kOnStack) {
        on_heap.resize(static_cast<size_t>(count_of(job)));
        stored = on_heap.data();
      }
      block_codes<Format>(job.w, count_of(job), scales[i], stored, job.codes);
      *job.scale = scales[i].half;
    }
  }
}

// Blocks of the default region size (64 inputs) take code with the size built in: 13-27%
// faster, by width, on a 1024 x 1024 layer.
inline constexpr int64_t kUsualBlock = 64;

template <int Format>
[[gnu::always_inline]] inline void quantize_jobs(const BlockJob* jobs, int64_t n) {
  const bool usual =
      std::all_of(jobs, jobs + n, [](const BlockJob& job) { return job.count == kUsualBlock; });
  if (usual) {
    quantize_jobs_with<Format>(jobs, n, [](const BlockJob&) { return kUsualBlock; });
  } else {
    quantize_jobs_with<Format>(jobs, n, [](const BlockJob& job) { return job.count; });
  }
}

// Compiled for AVX-512, AVX2 and the baseline; the loader picks one for this CPU.
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void quantize_any(
    const BlockJob* jobs, int64_t n, int format) {
  switch (format) {
    case 1: return quantize_jobs<1>(jobs, n);
    case 2: return quantize_jobs<2>(jobs, n);
    case 4: return quantize_jobs<4>(jobs, n);
    case kNf4: return quantize_jobs<kNf4>(jobs, n);
    case kOdd2: return quantize_jobs<kOdd2>(jobs, n);
    default: return quantize_jobs<8>(jobs, n);
  }
}

}  // namespace

uint16_t quantize_block(const float* w, int64_t count, int format, uint8_t* codes) {
  uint16_t scale = 0;
  const BlockJob job{w, count, codes, &scale};
  quantize_any(&job, 1, format);
  return scale;
}

void quantize_blocks(const BlockJob* jobs, int64_t n, int format) { quantize_any(jobs, n, format); }

void dequantize_block(const uint8_t* codes, int64_t count, int format, uint16_t scale_half,
                      float* out) {
  decode_any(codes, count, format, half_to_float(scale_half), out);
}

void decode_block(const uint8_t* codes, int64_t count, int format, float* out) {
  decode_any(codes, count, format, 1.0f, out);
}

int64_t count_nonzero(const uint8_t* codes, int64_t count, int format) {
  // Decoded plane by plane (vectorized) rather than code by code through get_stored's divisions.
  thread_local std::vector<float> decoded;
  decoded.resize(static_cast<size_t>(count));
  decode_block(codes, count, format, decoded.data());
  return std::count_if(decoded.begin(), decoded.end(), [](float code) { return code != 0.0f; });
}

}  // namespace spatium::quant
