// Block quantization: one fp16 scale per block and one b-bit code per weight. A store's code
// format is its width b in {1, 2, 4, 8} (integer codes), kNf4 (4-bit indices into the
// NormalFloat levels) or kOdd2 (2-bit odd codes); every function taking `format` takes any.
// An integer-code weight is scale * code. Codes are stored offset to be unsigned:
// stored = code + offset(b).
//   b = 1: codes {-1, +1}, scale mean |w| (the error-minimising scale for signs).
//   b >= 2: codes -offset(b) .. offset(b) + 1, i.e. {-1, 0, 1, 2}, -7..8, -127..128: every
//   stored value is a code, and the one extra level sits on the side the scale's sign picks
//   (a negative scale puts it on the negative side). The scale minimises the block's squared
//   error: it starts from a clipping ratio of absmax / max_code and is refined by Lloyd
//   steps (nearest codes for the scale, then the least-squares scale for those codes), all
//   chosen by measurement (docs/architecture.md). Its magnitude saturates at fp16's 65504, so
//   a block holds magnitudes up to 65504 * max_code(b); larger weights are clipped there.
// A kOdd2 weight is scale * code with the odd codes {-3, -1, 1, 3} (stored = (code + 3) / 2):
// four evenly spaced levels symmetric about zero, without a zero level. On bell-shaped weights
// they err less than the integer codes' {-1, 0, 1, 2} (whose extra level serves one side
// only), and a model trained with them learns more (docs/architecture.md). The scale is found
// like the integer codes'.
// An kNf4 weight is scale * kNf4Levels[stored]: 16 levels in [-1, 1], denser near 0 (the
// quantiles of a normal distribution, as QLoRA's NormalFloat4), which follow bell-shaped and
// heavy-tailed weights better than evenly spaced codes. Its scale is found like the integer
// codes' (the side of the largest magnitude gets the 8 positive levels, Lloyd steps refine it);
// a stored index is the nearest level (ties to the lower one).
//
// Packing is planar: a block of `count` codes takes q = code_bytes(bits, count) bytes; code j
// sits in byte j % q at bit (j / q) * bits. Each bit plane of the bytes thus holds a contiguous
// run of codes, and decoding a plane is one branch-free, vectorizable loop.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "half.h"

namespace spatium::quant {

inline constexpr bool valid_bits(int bits) {
  return bits == 1 || bits == 2 || bits == 4 || bits == 8;
}

// The NormalFloat4 code format: 4-bit indices into kNf4Levels. A value no width can take, so a
// format is one int wherever a width was.
inline constexpr int kNf4 = 0x14;
// The 2-bit odd-code format (see the top), a value no width can take either.
inline constexpr int kOdd2 = 0x12;
inline constexpr bool valid_format(int format) {
  return valid_bits(format) || format == kNf4 || format == kOdd2;
}
// Bits per code of a format.
inline constexpr int width(int format) {
  return format == kNf4 ? 4 : format == kOdd2 ? 2 : format;
}
// The odd code of a 1-bit or kOdd2 stored value: 2 * stored - 1 (+-1) or 2 * stored - 3.
inline constexpr int odd_code(int bits, int stored) { return 2 * stored - ((1 << bits) - 1); }

// NormalFloat4: 7 negative levels, 0 and 8 positive ones (Dettmers et al., QLoRA, 2023). A
// macro so that CUDA code can put the same values in constant memory.
#define SPATIUM_NF4_LEVELS                                                                      \
  -1.0f, -0.6961928010f, -0.5250730515f, -0.3949174881f, -0.2844413817f, -0.1847734302f,       \
      -0.0910500363f, 0.0f, 0.0795802996f, 0.1609302014f, 0.2461123019f, 0.3379152417f,        \
      0.4407098293f, 0.5626170039f, 0.7229568362f, 1.0f
inline constexpr float kNf4Levels[16] = {SPATIUM_NF4_LEVELS};
// Stored index of the level 0.
inline constexpr uint32_t kNf4Zero = 7;

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
// The value of a stored code before its block's scale: the integer code, or the kNf4 level.
template <int Format>
[[gnu::always_inline]] inline float level(uint32_t stored) {
  if constexpr (Format == kNf4) {
    return kNf4Levels[stored];
  } else {
    // Arithmetic, not from_stored's select: GCC turns scale * (s ? 1 : -1) into a sign flip,
    // which flips a NaN scale's sign too.
    const auto value = static_cast<int>(stored);
    if constexpr (Format == 1 || Format == kOdd2) {
      return static_cast<float>(odd_code(width(Format), value));
    } else {
      return static_cast<float>(value - offset(Format));
    }
  }
}

// level<Format> for a format known at run time.
inline float level_of(int format, uint32_t stored) {
  switch (format) {
    case 1: return level<1>(stored);
    case 2: return level<2>(stored);
    case 4: return level<4>(stored);
    case kOdd2: return level<kOdd2>(stored);
    case kNf4: return level<kNf4>(stored);
    default: return level<8>(stored);
  }
}

// Bytes holding `count` codes of `bits` bits.
inline constexpr int64_t code_bytes(int bits, int64_t count) { return (count * bits + 7) / 8; }

// Stored value of code j of a block of `count` codes (point access; kernels decode planes).
inline uint32_t get_stored(const uint8_t* codes, int bits, int64_t count, int64_t j) {
  const int64_t bytes = code_bytes(bits, count);
  return (codes[j % bytes] >> ((j / bytes) * bits)) & ((1u << bits) - 1u);
}

// decode_planes (below) 8 bytes at a time across every plane, for an integer or odd-code
// format: faster where a plane is shorter than a vector (a 64-weight block's 1-bit planes hold
// 8 values). Whole planes of whole 8-byte runs only: false, with nothing written, otherwise.
template <int Format>
[[gnu::always_inline]] inline bool decode_runs(const uint8_t* codes, int64_t count, float scale,
                                               float* out) {
  static_assert(Format != kNf4, "nf4 levels are not integers");
  constexpr int bits = width(Format);
  constexpr int32_t mask = (1 << bits) - 1;
  constexpr int per_byte = 8 / bits;
  const int64_t bytes = code_bytes(bits, count);
  if (count != bytes * per_byte || bytes % 8 != 0) return false;
  using Bytes = uint8_t __attribute__((vector_size(8)));
  using Ints = int32_t __attribute__((vector_size(32)));
  using Floats = float __attribute__((vector_size(32)));
  for (int64_t i = 0; i < bytes; i += 8) {
    Bytes run;
    std::memcpy(&run, codes + i, sizeof(run));
    const Ints wide = __builtin_convertvector(run, Ints);
    for (int p = 0; p < per_byte; ++p) {
      const Ints stored = (wide >> (p * bits)) & mask;
      // level<Format> lane by lane: odd codes 2 stored - (2^bits - 1), else stored - offset
      const Ints code =
          Format == 1 || Format == kOdd2 ? 2 * stored - mask : stored - offset(Format);
      const Floats values = scale * __builtin_convertvector(code, Floats);
      std::memcpy(out + p * bytes + i, &values, sizeof(values));
    }
  }
  return true;
}

// Decodes a block's codes times `scale` into out[0, count), plane by plane (see the top).
// Header-inline so that kernels compiled for a wider ISA inline it.
template <int Format>
[[gnu::always_inline]] inline void decode_planes(const uint8_t* codes, int64_t count, float scale,
                                                 float* out) {
  constexpr int bits = width(Format);
  constexpr uint32_t mask = (1u << bits) - 1u;
  constexpr int per_byte = 8 / bits;
  // 1-bit planes are too short for the loop below to vectorize. (At 2 bits decode_runs is
  // faster too, but the batch-1 kernel that inlines this is then slower: dense decodes call
  // decode_runs themselves.)
  if constexpr (Format == 1) {
    if (decode_runs<1>(codes, count, scale, out)) return;
  }
  const int64_t bytes = code_bytes(bits, count);
  for (int p = 0; p < per_byte; ++p) {
    const int64_t begin = p * bytes;
    if (begin >= count) break;
    const int64_t len = count - begin < bytes ? count - begin : bytes;
    const int shift = p * bits;
    float* o = out + begin;
    for (int64_t i = 0; i < len; ++i) o[i] = scale * level<Format>((codes[i] >> shift) & mask);
  }
}

// Quantizes weights w[0, count) into codes (code_bytes(width(format), count) bytes) and returns
// the fp16 scale. A block whose weights are not all finite gets a NaN scale, so NaN/Inf
// propagate.
uint16_t quantize_block(const float* w, int64_t count, int format, uint8_t* codes);

// One block for quantize_blocks: weights w[0, count) into `codes`, the scale into *scale.
struct BlockJob {
  const float* w;
  int64_t count;
  uint8_t* codes;
  uint16_t* scale;
};
// quantize_block on each of jobs[0, n), faster than one by one: the kernel for the format is
// chosen once, and the blocks' scales are found side by side.
void quantize_blocks(const BlockJob* jobs, int64_t n, int format);

// Writes scale * level for codes [0, count) into out.
void dequantize_block(const uint8_t* codes, int64_t count, int format, uint16_t scale,
                      float* out);

// Writes the levels themselves (unscaled) as floats.
void decode_block(const uint8_t* codes, int64_t count, int format, float* out);

// Number of codes among [0, count) whose level is not 0.
int64_t count_nonzero(const uint8_t* codes, int64_t count, int format);

}  // namespace spatium::quant
