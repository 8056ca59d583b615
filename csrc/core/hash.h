// Small, fast 64-bit mixing used by the bloom filter and checksums. Torch-free.
#pragma once

#include <cstdint>

namespace spatium {

// A bijective 64-bit finalizer (xor-shift-multiply): every input bit affects every output bit,
// so sequential keys such as (neuron, region) pairs spread evenly.
constexpr uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace spatium
