// Block quantization: one fp16 scale per block and one b-bit code per weight, b in {1, 2, 4, 8}.
// Code sets (symmetric): b=1 {-1, +1}; b=2 {-1, 0, +1}; b=4 -7..7; b=8 -127..127. A weight is
// scale * code. Scale: absmax / max code for b >= 2 (rounded up to fp16 so no code clips), mean
// |w| for b = 1 (the error-minimising scale for signs). Codes are stored offset to be unsigned,
// packed LSB first: weight j of a block sits at bits [j*b, j*b + b) of the block's bytes.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "half.h"

namespace spatium::quant {

inline constexpr bool valid_bits(int bits) {
  return bits == 1 || bits == 2 || bits == 4 || bits == 8;
}

// Largest code magnitude: 1, 1, 7, 127.
inline constexpr int max_code(int bits) { return bits == 1 ? 1 : (1 << (bits - 1)) - 1; }

// Stored unsigned value of a code, and back.
inline constexpr int offset(int bits) { return bits == 1 ? 0 : max_code(bits); }
inline constexpr uint32_t to_stored(int bits, int code) {
  return static_cast<uint32_t>(bits == 1 ? (code > 0 ? 1 : 0) : code + offset(bits));
}
inline constexpr int from_stored(int bits, uint32_t stored) {
  return bits == 1 ? (stored ? 1 : -1) : static_cast<int>(stored) - offset(bits);
}
// Whether a stored value is a code of the set (b = 2 has one unused value, b = 4 and 8 one each).
inline constexpr bool valid_stored(int bits, uint32_t stored) {
  return stored <= (bits == 1 ? 1u : static_cast<uint32_t>(2 * max_code(bits)));
}

// Bytes holding `count` codes of `bits` bits.
inline constexpr int64_t code_bytes(int bits, int64_t count) { return (count * bits + 7) / 8; }

inline uint32_t get_stored(const uint8_t* codes, int bits, int64_t j) {
  const int64_t bit = j * bits;
  return (codes[bit >> 3] >> (bit & 7)) & ((1u << bits) - 1u);
}
inline void set_stored(uint8_t* codes, int bits, int64_t j, uint32_t stored) {
  const int64_t bit = j * bits;
  const auto mask = static_cast<uint8_t>(((1u << bits) - 1u) << (bit & 7));
  codes[bit >> 3] = static_cast<uint8_t>((codes[bit >> 3] & ~mask) | (stored << (bit & 7)));
}

// Quantizes weights w[0, count) into codes (code_bytes(bits, count) bytes) and returns the fp16
// scale. A block whose weights are not all finite gets a NaN scale, so NaN/Inf propagate.
uint16_t quantize_block(const float* w, int64_t count, int bits, uint8_t* codes);

// Writes scale * code for codes [0, count) into out.
void dequantize_block(const uint8_t* codes, int64_t count, int bits, uint16_t scale, float* out);

// Number of non-zero codes among [0, count).
int64_t count_nonzero(const uint8_t* codes, int64_t count, int bits);

}  // namespace spatium::quant
