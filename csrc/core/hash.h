// Small, fast 64-bit mixing used by the bloom filter and checksums. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace spatium {

// A bijective 64-bit finalizer (xor-shift-multiply): every input bit affects every output bit,
// so sequential keys such as (neuron, region) pairs spread evenly.
constexpr uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Folds `size` bytes into the running hash h, 8 at a time: a checksum that catches any change
// of a saved image (a flipped bit, a resized array).
inline uint64_t hash_bytes(uint64_t h, const void* data, size_t size) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  h = mix64(h ^ size);
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    h = mix64(h + word);
  }
  uint64_t tail = 0;
  if (i < size) std::memcpy(&tail, bytes + i, size - i);  // an empty array may have no data
  return mix64(h + tail);
}

}  // namespace spatium
