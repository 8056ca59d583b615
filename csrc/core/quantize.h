// Block quantization: one fp16 scale per block and one b-bit code per weight, b in {1, 2, 4, 8}.
// A weight is scale * code. Codes are stored offset to be unsigned: stored = code + offset(b).
//   b = 1: codes {-1, +1}, scale mean |w| (the error-minimising scale for signs).
//   b >= 2: codes -offset(b) .. offset(b) + 1, i.e. {-1, 0, 1, 2}, -7..8, -127..128: every
//   stored value is a code, and the one extra level sits on the side the scale's sign picks
//   (a negative scale puts it on the negative side). The scale minimises the block's squared
//   error: it starts from a clipping ratio of absmax / max_code and is refined by Lloyd
//   steps (nearest codes for the scale, then the least-squares scale for those codes), all
//   chosen by measurement (docs/architecture.md). Its magnitude saturates at fp16's 65504, so
//   a block holds magnitudes up to 65504 * max_code(b); larger weights are clipped there.
//
// Packing is planar: a block of `count` codes takes q = code_bytes(bits, count) bytes; code j
// sits in byte j % q at bit (j / q) * bits. Each bit plane of the bytes thus holds a contiguous
// run of codes, and decoding a plane is one branch-free, vectorizable loop.
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

// Stored value of code 0 for b >= 2 (1, 7, 127); 1-bit codes have no zero.
inline constexpr int offset(int bits) { return bits == 1 ? 0 : (1 << (bits - 1)) - 1; }
// Smallest and largest code: -1 and 1 for 1 bit, then -1..2, -7..8, -127..128.
inline constexpr int min_code(int bits) { return bits == 1 ? -1 : -offset(bits); }
inline constexpr int max_code(int bits) { return bits == 1 ? 1 : offset(bits) + 1; }

// Stored unsigned value of a code, and back.
inline constexpr uint32_t to_stored(int bits, int code) {
  return static_cast<uint32_t>(bits == 1 ? (code > 0 ? 1 : 0) : code + offset(bits));
}
inline constexpr int from_stored(int bits, uint32_t stored) {
  return bits == 1 ? (stored ? 1 : -1) : static_cast<int>(stored) - offset(bits);
}
// Bytes holding `count` codes of `bits` bits.
inline constexpr int64_t code_bytes(int bits, int64_t count) { return (count * bits + 7) / 8; }

// Stored value of code j of a block of `count` codes (point access; kernels decode planes).
inline uint32_t get_stored(const uint8_t* codes, int bits, int64_t count, int64_t j) {
  const int64_t bytes = code_bytes(bits, count);
  return (codes[j % bytes] >> ((j / bytes) * bits)) & ((1u << bits) - 1u);
}

// Decodes a block's codes times `scale` into out[0, count), plane by plane (see the top).
// Header-inline so that kernels compiled for a wider ISA inline it.
template <int Bits>
[[gnu::always_inline]] inline void decode_planes(const uint8_t* codes, int64_t count, float scale,
                                                 float* out) {
  constexpr uint32_t mask = (1u << Bits) - 1u;
  constexpr int per_byte = 8 / Bits;
  const int64_t bytes = code_bytes(Bits, count);
  for (int p = 0; p < per_byte; ++p) {
    const int64_t begin = p * bytes;
    if (begin >= count) break;
    const int64_t len = count - begin < bytes ? count - begin : bytes;
    const int shift = p * Bits;
    float* o = out + begin;
    for (int64_t i = 0; i < len; ++i) {
      const auto stored = static_cast<int>((codes[i] >> shift) & mask);
      const int code = Bits == 1 ? 2 * stored - 1 : stored - offset(Bits);
      o[i] = scale * static_cast<float>(code);
    }
  }
}

// Quantizes weights w[0, count) into codes (code_bytes(bits, count) bytes) and returns the fp16
// scale. A block whose weights are not all finite gets a NaN scale, so NaN/Inf propagate.
uint16_t quantize_block(const float* w, int64_t count, int bits, uint8_t* codes);

// Writes scale * code for codes [0, count) into out.
void dequantize_block(const uint8_t* codes, int64_t count, int bits, uint16_t scale, float* out);

// Writes the codes themselves (unscaled) as floats: what the matmul kernels multiply, applying
// the scale once per block and row.
void decode_block(const uint8_t* codes, int64_t count, int bits, float* out);

// Number of non-zero codes among [0, count).
int64_t count_nonzero(const uint8_t* codes, int64_t count, int bits);

}  // namespace spatium::quant
