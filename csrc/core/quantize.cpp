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

[[gnu::always_inline]] inline void encode_planes(const int32_t* stored,
                                                                         int64_t count, int bits,
                                                                         uint8_t* codes) {
  const int64_t bytes = code_bytes(bits, count);
  std::memset(codes, 0, static_cast<size_t>(bytes));
  for (int p = 0; p * bytes < count; ++p) {
    const int64_t begin = p * bytes;
    const int64_t len = std::min(bytes, count - begin);
    for (int64_t i = 0; i < len; ++i) {
      codes[i] = static_cast<uint8_t>(codes[i] | (stored[begin + i] << (p * bits)));
    }
  }
}

// Everything but the buffer in one function compiled per ISA: absmax, the finiteness
// check (w - w is NaN exactly for NaN and Inf), rounding and packing all vectorize.
[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] uint16_t quantize_any(
    const float* w, int64_t count, int bits, int32_t* stored, uint8_t* codes) {
  float absmax = 0.0f, abs_sum = 0.0f, not_finite = 0.0f;
#pragma omp simd reduction(max : absmax) reduction(+ : abs_sum, not_finite)
  for (int64_t j = 0; j < count; ++j) {
    const float a = std::fabs(w[j]);
    absmax = std::max(absmax, a);
    abs_sum += a;
    not_finite += w[j] - w[j];
  }
  uint16_t scale_half = 0;
  if (not_finite != 0.0f || std::isnan(not_finite)) {
    for (int64_t j = 0; j < count; ++j) stored[j] = static_cast<int32_t>(to_stored(bits, 0));
    scale_half = kHalfNaN;
  } else if (bits == 1) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) stored[j] = w[j] >= 0.0f ? 1 : 0;
    scale_half = count > 0 ? float_to_half(abs_sum / static_cast<float>(count)) : 0;
  } else {
    const int qmax = max_code(bits);
    scale_half = float_to_half_up(absmax / static_cast<float>(qmax));
    const float scale = half_to_float(scale_half);
    const float limit = static_cast<float>(qmax);
    if (scale > 0.0f) {
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        const float q = std::nearbyint(w[j] / scale);
        stored[j] = static_cast<int32_t>(std::min(std::max(q, -limit), limit)) + qmax;
      }
    } else {
      for (int64_t j = 0; j < count; ++j) stored[j] = qmax;
    }
  }
  encode_planes(stored, count, bits, codes);
  return scale_half;
}

}  // namespace

uint16_t quantize_block(const float* w, int64_t count, int bits, uint8_t* codes) {
  thread_local std::vector<int32_t> buffer;  // stored values before packing, reused
  buffer.resize(static_cast<size_t>(count));
  return quantize_any(w, count, bits, buffer.data(), codes);
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
