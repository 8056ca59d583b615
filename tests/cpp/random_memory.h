// Memories for the C++ tests: default-layout inputs, chosen or random active blocks, weights
// drawn from N(0, 1); the same seed gives the same memory.
#pragma once

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/spatial_memory.h"

namespace spatium::test_support {

// `out` neurons over `in` default-layout inputs with the blocks active(neuron, region) says,
// weights drawn from N(0, 1) by `rng`.
template <class Active>
SpatialMemory memory_with_blocks(int64_t out, int64_t in, int bits, int region_bits,
                                 Active active, std::mt19937_64& rng) {
  std::vector<uint64_t> inputs(static_cast<size_t>(in));
  std::iota(inputs.begin(), inputs.end(), uint64_t{0});
  SpatialMemory memory(out, std::move(inputs), bits, region_bits);
  const int64_t regions = memory.num_regions();
  std::vector<uint8_t> mask(static_cast<size_t>(out * regions));
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t r = 0; r < regions; ++r) mask[n * regions + r] = active(n, r);
  }
  memory.set_active(mask.data());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> latent(static_cast<size_t>(out * in));
  for (auto& w : latent) w = normal(rng);
  memory.quantize_rows(0, out, latent.data(), in);
  return memory;
}

// `out` neurons over `in` inputs, about two thirds of the blocks active.
inline SpatialMemory random_memory(int64_t out, int64_t in, int bits, int region_bits,
                                   uint64_t seed) {
  std::mt19937_64 rng(seed);
  return memory_with_blocks(
      out, in, bits, region_bits, [&rng](int64_t, int64_t) { return rng() % 3 != 0; }, rng);
}

}  // namespace spatium::test_support
