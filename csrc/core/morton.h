// Morton (Z-order) codes of 3D positions: three 16-bit coordinates interleaved into a 48-bit code
// (bit i of x, y, z goes to bit 3i, 3i+1, 3i+2). Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>

namespace spatium::morton {

inline constexpr uint64_t kMaxCoord = 0xFFFF;
inline constexpr int kCodeBits = 48;
inline constexpr uint64_t kCodeLimit = uint64_t{1} << kCodeBits;  // codes are < kCodeLimit

struct Position {
  uint16_t x, y, z;
  friend constexpr bool operator==(Position a, Position b) {
    return a.x == b.x && a.y == b.y && a.z == b.z;
  }
};

// Spreads the low 16 bits of v to every third bit (bit i -> bit 3i).
constexpr uint64_t spread3(uint64_t v) {
  v &= kMaxCoord;
  v = (v | (v << 16)) & 0x00000000FF0000FFull;
  v = (v | (v << 8)) & 0x000000F00F00F00Full;
  v = (v | (v << 4)) & 0x00000C30C30C30C3ull;
  v = (v | (v << 2)) & 0x0000249249249249ull;
  return v;
}

// Inverse of spread3: gathers every third bit (bit 3i -> bit i) into 16 bits.
constexpr uint64_t compact3(uint64_t v) {
  v &= 0x0000249249249249ull;
  v = (v ^ (v >> 2)) & 0x00000C30C30C30C3ull;
  v = (v ^ (v >> 4)) & 0x000000F00F00F00Full;
  v = (v ^ (v >> 8)) & 0x00000000FF0000FFull;
  v = (v ^ (v >> 16)) & kMaxCoord;
  return v;
}

// Portable (magic-bits) scalar encode/decode; constexpr and inlinable everywhere.
constexpr uint64_t encode(uint16_t x, uint16_t y, uint16_t z) {
  return spread3(x) | (spread3(y) << 1) | (spread3(z) << 2);
}
constexpr Position decode(uint64_t code) {
  return {static_cast<uint16_t>(compact3(code)), static_cast<uint16_t>(compact3(code >> 1)),
          static_cast<uint16_t>(compact3(code >> 2))};
}

// BMI2 pdep/pext scalar encode/decode. Callers must check cpu::features().bmi2.
uint64_t encode_bmi2(uint16_t x, uint16_t y, uint16_t z);
Position decode_bmi2(uint64_t code);

// Scalar encode/decode through the faster path of this CPU: pdep/pext where they are not
// microcoded, magic bits elsewhere.
uint64_t encode_point(uint16_t x, uint16_t y, uint16_t z);
Position decode_point(uint64_t code);

// Batch implementations. All give identical results; they differ only in speed.
enum class Impl { Portable, Bmi2, Avx2, Avx512 };
inline constexpr Impl kAllImpls[] = {Impl::Portable, Impl::Bmi2, Impl::Avx2, Impl::Avx512};

const char* name(Impl impl);
bool available(Impl impl);  // whether this CPU can run it
Impl best_batch_impl();     // the fastest available one on this CPU

// Encodes n positions, xyz row-major [n][3] (T = int32_t or int64_t), into codes[n].
// Returns n on success, else the index of the first row with a coordinate outside [0, 65535]
// (codes then hold unspecified values). `impl` must be available.
template <class T>
size_t encode_batch(const T* xyz, int64_t* codes, size_t n, Impl impl = best_batch_impl());

// Decodes n codes into xyz row-major [n][3] (T = int32_t or int64_t). Returns n on success, else
// the index of the first code outside [0, 2^48) (xyz then holds unspecified values).
template <class T>
size_t decode_batch(const int64_t* codes, T* xyz, size_t n, Impl impl = best_batch_impl());

}  // namespace spatium::morton
