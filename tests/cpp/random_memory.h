// A memory for the C++ tests: `out` neurons over `in` default-layout inputs, about two thirds of
// the blocks active, weights drawn from N(0, 1); the same seed gives the same memory.
#pragma once

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/spatial_memory.h"

namespace spatium::test_support {

inline SpatialMemory random_memory(int64_t out, int64_t in, int bits, int region_bits,
                                   uint64_t seed) {
  std::vector<uint64_t> inputs(static_cast<size_t>(in));
  std::iota(inputs.begin(), inputs.end(), uint64_t{0});
  SpatialMemory memory(out, std::move(inputs), bits, region_bits);
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> mask(static_cast<size_t>(out * memory.num_regions()));
  for (auto& m : mask) m = rng() % 3 != 0;
  memory.set_active(mask.data());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> latent(static_cast<size_t>(out * in));
  for (auto& w : latent) w = normal(rng);
  memory.quantize_rows(0, out, latent.data(), in);
  return memory;
}

}  // namespace spatium::test_support
