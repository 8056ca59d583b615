// Randomized damage to the arrays the kernels walk and to bloom images. PackedView::layout_error
// must refuse every inconsistent set of arrays; whatever it accepts, every kernel walks without
// leaving the arrays (which the sanitizer build checks byte by byte). 10,000 cases each.
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/bloom.h"
#include "core/quantize.h"
#include "core/spatial_memory.h"
#include "random_memory.h"

namespace spatium {
namespace {

constexpr int kCases = 10000;

// The arrays of one memory, owned, so that they can be damaged.
struct Arrays {
  std::vector<int64_t> region_begin;
  std::vector<uint64_t> bitmap;
  std::vector<int64_t> block_begin;
  std::vector<int64_t> code_begin;
  std::vector<uint16_t> scales;
  std::vector<uint8_t> codes;
  int64_t out_features = 0;
  int64_t in_features = 0;
};

using test_support::random_memory;

Arrays arrays_of(const SpatialMemory& m) {
  return Arrays{m.region_begins(), m.bitmap(), m.block_begin(), m.code_begin(),
                m.scales(),        m.codes(),  m.out_features(), m.in_features()};
}

PackedView view_over(Arrays& a, int bits) {
  PackedView v;
  v.format = bits;
  v.out_features = a.out_features;
  v.in_features = a.in_features;
  v.num_regions = static_cast<int64_t>(a.region_begin.size()) - 1;
  v.region_begin = a.region_begin.data();
  v.bitmap = a.bitmap.data();
  v.block_begin = a.block_begin.data();
  v.code_begin = a.code_begin.data();
  v.scales = a.scales.data();
  v.codes = a.codes.data();
  return v;
}

ArrayLengths lengths_of(const Arrays& a) {
  auto n = [](const auto& vec) { return static_cast<int64_t>(vec.size()); };
  return ArrayLengths{n(a.region_begin), n(a.bitmap), n(a.block_begin),
                      n(a.code_begin),   n(a.scales), n(a.codes)};
}

// One random damage: an element set to anything or nudged, or an array resized.
template <class T>
void damage(std::vector<T>& values, std::mt19937_64& rng) {
  const uint64_t kind = rng() % 4;
  if (kind == 3 || values.empty()) {
    values.resize(values.size() + rng() % 3 - std::min<size_t>(values.size(), rng() % 3));
    return;
  }
  T& value = values[rng() % values.size()];
  value = kind == 0 ? static_cast<T>(rng()) : static_cast<T>(value + static_cast<T>(rng() % 17) - 8);
}

// Runs every kernel over the whole view: each must stay inside the arrays.
void walk_everything(const PackedView& v) {
  const auto out = static_cast<size_t>(v.out_features), in = static_cast<size_t>(v.in_features);
  std::vector<float> dense(out * in), x(3 * in, 1.0f), y(3 * out);
  std::vector<float> scratch(static_cast<size_t>(v.scratch_floats(3)));
  std::vector<uint8_t> mask(out * in);
  v.dequantize_rows(0, v.out_features, dense.data(), v.in_features);
  v.dequantize_regions(0, v.num_regions, dense.data(), v.in_features);
  v.active_mask_rows(0, v.out_features, mask.data(), v.in_features);
  for (int64_t batch : {1, 3}) {
    v.linear_rows(0, v.out_features, x.data(), batch, v.in_features, y.data(), v.out_features,
                  scratch.data());
    v.linear_t_rows(0, v.out_features, y.data(), batch, v.out_features, x.data(), v.in_features,
                    scratch.data());
  }
  std::vector<uint16_t> scales(v.scales, v.scales + v.total_blocks());
  std::vector<uint8_t> codes(v.codes, v.codes + v.total_code_bytes());
  v.quantize_rows(0, v.out_features, dense.data(), v.in_features, scales.data(), codes.data());
}

TEST(Fuzz, LayoutCheckAcceptsGenuineMemoriesAndRefusesOtherBits) {
  for (int bits : {1, 2, 4, 8}) {
    for (int region_bits : {0, 2, 3, 6}) {
      SpatialMemory m = random_memory(21, 70, bits, region_bits, 7 * bits + region_bits);
      Arrays a = arrays_of(m);
      EXPECT_EQ(view_over(a, bits).layout_error(lengths_of(a)), "");
      for (int other : {1, 2, 4, 8}) {
        // 1- and 2-bit codes of blocks of up to 4 inputs both take a byte: the same layout,
        // read in bounds (as other values)
        const int64_t size = int64_t{1} << region_bits;
        if (quant::code_bytes(other, size) == quant::code_bytes(bits, size)) continue;
        EXPECT_NE(view_over(a, other).layout_error(lengths_of(a)), "") << bits << " as " << other;
      }
    }
  }
}

TEST(Fuzz, KernelsStayInsideEveryAcceptedLayout) {
  std::vector<SpatialMemory> memories;
  memories.push_back(random_memory(7, 90, 1, 3, 1));
  memories.push_back(random_memory(20, 100, 2, 2, 2));
  memories.push_back(random_memory(16, 256, 4, 6, 3));
  memories.push_back(random_memory(9, 40, 8, 3, 4));
  memories.push_back(random_memory(17, 33, 4, 1, 5));
  memories.push_back(random_memory(64, 7, 2, 0, 6));
  std::mt19937_64 rng(2026);
  int accepted = 0, refused = 0;
  for (int c = 0; c < kCases; ++c) {
    const SpatialMemory& m = memories[rng() % memories.size()];
    Arrays a = arrays_of(m);
    const int damages = static_cast<int>(rng() % 4);
    for (int d = 0; d < damages; ++d) {
      switch (rng() % 6) {
        case 0: damage(a.region_begin, rng); break;
        case 1: damage(a.bitmap, rng); break;
        case 2: damage(a.block_begin, rng); break;
        case 3: damage(a.code_begin, rng); break;
        case 4: damage(a.scales, rng); break;
        default: damage(a.codes, rng); break;
      }
    }
    const int bits = rng() % 4 == 0 ? 1 << (rng() % 4) : m.format();
    const PackedView v = view_over(a, bits);
    if (v.num_regions < 1) {
      ++refused;  // an empty region_begin: layout_error must not even read it
      EXPECT_NE(v.layout_error(lengths_of(a)), "");
      continue;
    }
    if (!v.layout_error(lengths_of(a)).empty()) {
      ++refused;
      continue;
    }
    ++accepted;
    walk_everything(v);
  }
  // Both outcomes must occur often, or the fuzzing tests little.
  EXPECT_GT(accepted, kCases / 10);
  EXPECT_GT(refused, kCases / 10);
}

TEST(Fuzz, BloomImagesAreRestoredExactlyOrRefused) {
  std::mt19937_64 rng(11);
  std::vector<uint8_t> image;
  {
    bloom::SplitBlockBloom filter(40);
    std::vector<uint64_t> keys(40);
    for (auto& k : keys) k = rng();
    filter.insert_batch(keys.data(), keys.size());
    image = filter.serialize();
  }
  int restored = 0;
  for (int c = 0; c < kCases; ++c) {
    std::vector<uint8_t> bytes = image;
    const int damages = static_cast<int>(rng() % 3);
    for (int d = 0; d < damages; ++d) damage(bytes, rng);
    if (rng() % 50 == 0) {  // now and then, noise of any length
      bytes.resize(rng() % 96);
      for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    }
    try {
      const auto filter = bloom::SplitBlockBloom::deserialize(bytes.data(), bytes.size());
      EXPECT_EQ(filter.serialize(), bytes);
      ++restored;
    } catch (const std::invalid_argument&) {
    }
  }
  EXPECT_GT(restored, 0);
}

}  // namespace
}  // namespace spatium
