// IEEE 754 binary16 <-> binary32 conversion (round to nearest, ties to even), torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace spatium {

inline constexpr uint16_t kHalfMax = 0x7BFF;  // 65504
inline constexpr uint16_t kHalfNaN = 0x7E00;

inline uint16_t float_to_half(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  const auto sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7FFFFFFFu;
  if (f > 0x7F800000u) return sign | kHalfNaN;
  if (f >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to infinity
  if (f < 0x38800000u) {                        // below 2^-14: subnormal half (or zero)
    float magnitude;
    std::memcpy(&magnitude, &f, sizeof(f));
    // Exact scaling by 2^24 (the subnormal unit), then round to nearest even.
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));
  }
  uint32_t h = (f - 0x38000000u) >> 13;  // rebias exponent 127 -> 15, keep 10 mantissa bits
  const uint32_t rest = f & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry bumps the exponent
  return sign | static_cast<uint16_t>(h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  uint32_t f;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    std::memcpy(&f, &magnitude, sizeof(f));
    f |= sign;
  } else if (exponent == 31) {
    f = sign | 0x7F800000u | (mantissa << 13);
  } else {
    f = sign | ((exponent + 112) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &f, sizeof(f));
  return out;
}

}  // namespace spatium
