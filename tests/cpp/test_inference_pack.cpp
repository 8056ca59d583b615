// The integer inference kernels against the float product with the dequantized weights: the
// int32 sums are exact, so the only error is the activations' rounding to int8, which the test
// reproduces to compute the exact expected value.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/cpu_features.h"
#include "core/inference_pack.h"
#include "core/spatial_memory.h"
#include "random_memory.h"

namespace spatium {
namespace {

using test_support::random_memory;

// The instruction sets this CPU runs: the best, and AVX2 as well where the best is AVX-512.
std::vector<InferencePack::Isa> isas() {
  std::vector<InferencePack::Isa> found;
  if (InferencePack::best_isa() == InferencePack::Isa::kAvx512Vnni) {
    found.push_back(InferencePack::Isa::kAvx512Vnni);
  }
  const cpu::Features& f = cpu::features();
  if (f.avx2 && f.fma_f16c) found.push_back(InferencePack::Isa::kAvx2);
  return found;
}

// The weights the kernels multiply: the dequantized ones, nf4's levels rounded to 1/127 as the
// pack stores them.
std::vector<float> kernel_weights(const SpatialMemory& m) {
  const PackedView v = m.view();
  const int64_t out = v.out_features, in = v.in_features;
  std::vector<float> dense(static_cast<size_t>(out * in));
  v.dequantize_rows(0, out, dense.data(), in);
  if (v.format != quant::kNf4) return dense;
  PackedView::Cursor cursor = v.cursor_at(0);
  for (int64_t n = 0; n < out; ++n) {
    v.visit_blocks(n, cursor, [&](int64_t r, int64_t block, int64_t offset) {
      const float scale = half_to_float(v.scales[block]);
      const int64_t size = v.region_size(r);
      for (int64_t i = 0; i < size; ++i) {
        const float level = quant::kNf4Levels[quant::get_stored(v.codes + offset, 4, size, i)];
        dense[n * in + v.region_begin[r] + i] = scale * (std::nearbyint(127.0f * level) / 127.0f);
      }
    });
  }
  return dense;
}

// With AVX-512, batches under 8 rows take the VNNI kernel, others AMX where the CPU has it.
// Each sum starts from its slot's bias.
TEST(InferencePack, SumsOfIntegerProductsAreExact) {
  if (!InferencePack::cpu_supported()) GTEST_SKIP() << "no AVX2 or AVX-512 VNNI on this CPU";
  for (const InferencePack::Isa isa : isas()) {
  for (int bits : {1, 2, 4, 8, quant::kOdd2, quant::kNf4}) {
    for (int region_bits : {0, 3, 6, 7}) {
     for (int64_t batch : {3, 11, 40}) {
      const int64_t out = 37, in = 150;
      const SpatialMemory m = random_memory(out, in, bits, region_bits, bits + region_bits);
      const PackedView view = m.view();
      const InferencePack pack(view);
      std::mt19937_64 rng(5);
      std::normal_distribution<float> normal;
      std::vector<float> x(static_cast<size_t>(batch * in));
      for (auto& v : x) v = normal(rng);
      InferencePack::Rows rows;
      ASSERT_TRUE(pack.quantize(x.data(), batch, in, rows, isa));
      std::vector<float> y(static_cast<size_t>(batch * out), -1.0f), bias(static_cast<size_t>(out));
      for (int64_t s = 0; s < out; ++s) bias[s] = 0.25f * static_cast<float>(s) - 3.0f;
      pack.linear_groups(0, pack.groups(), rows, bias.data(), y.data(), out, isa);
      // Expected: the kernels' weights times the rounded activations, in double.
      const std::vector<float> dense = kernel_weights(m);
      for (int64_t b = 0; b < batch; ++b) {
        std::vector<double> rounded(static_cast<size_t>(in));
        for (int64_t r = 0; r < m.num_regions(); ++r) {
          double largest = 0.0;
          for (int64_t i = m.region_begin(r); i < m.region_begin(r + 1); ++i) {
            largest = std::max(largest, std::fabs(static_cast<double>(x[b * in + i])));
          }
          const float scale = static_cast<float>(largest) / 127.0f;
          const float inverse = largest > 0.0 ? 127.0f / static_cast<float>(largest) : 0.0f;
          for (int64_t i = m.region_begin(r); i < m.region_begin(r + 1); ++i) {
            rounded[i] = std::nearbyint(x[b * in + i] * inverse) * static_cast<double>(scale);
          }
        }
        for (int64_t n = 0; n < out; ++n) {  // outputs and bias in neuron order, whatever the slots
          double expected = bias[n], magnitude = std::fabs(bias[n]);
          for (int64_t i = 0; i < in; ++i) {
            expected += static_cast<double>(dense[n * in + i]) * rounded[i];
            magnitude += std::fabs(static_cast<double>(dense[n * in + i]) * rounded[i]);
          }
          // float32 scale products and accumulation across blocks
          ASSERT_NEAR(y[b * out + n], expected, 1e-5 * magnitude + 1e-7)
              << InferencePack::isa_name(isa) << " bits " << bits << " region_bits "
              << region_bits << " batch " << batch
              << " row " << b << " neuron " << n;
        }
      }
     }
    }
  }
  }
}

// A NaN or an infinity anywhere, in a whole vector of a region or in its tail (150 inputs
// in regions of 8, 64 and 128: tails of AVX2's 8 lanes and AVX-512's 16), makes quantize
// refuse the rows; finite extremes do not.
TEST(InferencePack, QuantizeRefusesNonFiniteInputs) {
  const int64_t batch = 3, in = 150;
  const float specials[] = {std::nanf(""), INFINITY, -INFINITY};
  for (const InferencePack::Isa isa : isas()) {
    for (int region_bits : {3, 6, 7}) {
      const InferencePack pack(random_memory(5, in, 4, region_bits, 1).view());
      std::vector<float> x(static_cast<size_t>(batch * in), 0.5f);
      x[7] = std::numeric_limits<float>::max();
      x[8] = -std::numeric_limits<float>::max();
      InferencePack::Rows rows;
      EXPECT_TRUE(pack.quantize(x.data(), batch, in, rows, isa));
      for (const float special : specials) {
        for (int64_t at : {int64_t{0}, int64_t{17}, int64_t{63}, int64_t{127}, in + 140,
                           batch * in - 1}) {
          std::vector<float> bad = x;
          bad[static_cast<size_t>(at)] = special;
          EXPECT_FALSE(pack.quantize(bad.data(), batch, in, rows, isa))
              << InferencePack::isa_name(isa) << " region_bits " << region_bits << " at " << at
              << " value " << special;
        }
      }
    }
  }
}

// Even neurons hold the first half of the regions, odd ones the second: in index order every
// group of 16 needs every region, gathered by what they hold each group needs half. The pack
// gathers them, and every neuron's output still lands in its own column.
TEST(InferencePack, GathersNeuronsThatShareRegions) {
  if (!InferencePack::cpu_supported()) GTEST_SKIP() << "no AVX2 or AVX-512 VNNI on this CPU";
  const int64_t out = 64, in = 64, regions = 8;  // regions of 8 inputs
  std::mt19937_64 rng(7);
  const SpatialMemory m = test_support::memory_with_blocks(
      out, in, 4, 3, [](int64_t n, int64_t r) { return (r < regions / 2) == (n % 2 == 0); }, rng);
  ASSERT_EQ(m.num_regions(), regions);
  const InferencePack pack(m.view());
  const std::vector<int32_t>& order = pack.neuron_order();
  ASSERT_EQ(static_cast<int64_t>(order.size()), out);
  for (int64_t s = 0; s < out; ++s) {  // each group all even or all odd
    EXPECT_EQ(order[s] % 2, order[s / InferencePack::kGroup * InferencePack::kGroup] % 2) << s;
  }
  std::vector<int32_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t n = 0; n < out; ++n) ASSERT_EQ(sorted[n], n);  // a permutation
  // Half the panels of the index order: a panel is 16 scales and one 64-byte chunk here. A
  // group's 16 even or odd neurons fall in two blocks of 16: two placements a group.
  const int64_t groups = out / InferencePack::kGroup, panels = groups * (regions / 2);
  EXPECT_EQ(pack.bytes(), panels * (64 + 16 * 2 + 4) + out * 4 +
                              2 * groups * static_cast<int64_t>(sizeof(InferencePack::Placement)) +
                              (panels + 1 + 2 * (groups + 1) + 2 * (regions + 1)) * 8);
  // A one-hot input on input i gives each neuron holding i its weight there, the others 0, plus
  // its bias, in the neuron's place whichever slot holds it.
  std::vector<float> bias(static_cast<size_t>(out));
  for (int64_t n = 0; n < out; ++n) bias[n] = 0.5f * static_cast<float>(n);
  const std::vector<float> dense = kernel_weights(m);
  for (int64_t i : {0, 40}) {
    std::vector<float> x(static_cast<size_t>(in), 0.0f);
    x[i] = 1.0f;
    for (const InferencePack::Isa isa : isas()) {
      InferencePack::Rows rows;
      ASSERT_TRUE(pack.quantize(x.data(), 1, in, rows, isa));
      std::vector<float> y(static_cast<size_t>(out), -1.0f);
      pack.linear_groups(0, pack.groups(), rows, bias.data(), y.data(), out, isa);
      for (int64_t n = 0; n < out; ++n) {
        EXPECT_FLOAT_EQ(y[n], bias[n] + dense[n * in + i])
            << InferencePack::isa_name(isa) << " input " << i << " neuron " << n;
      }
    }
  }
}

// Groups run in parallel because each writes only its own neurons' outputs, though with a
// gathered order it shares blocks of 16 neurons with other groups (masked stores). Run one group
// at a time over a sentinel: it sets exactly its neurons, to what the whole call gives them.
TEST(InferencePack, EachGroupWritesOnlyItsNeurons) {
  if (!InferencePack::cpu_supported()) GTEST_SKIP() << "no AVX2 or AVX-512 VNNI on this CPU";
  const int64_t out = 40, in = 64, regions = 8;  // the last group holds 8 neurons
  std::mt19937_64 rng(11);
  const SpatialMemory m = test_support::memory_with_blocks(
      out, in, 4, 3, [](int64_t n, int64_t r) { return (r < regions / 2) == (n % 2 == 0); }, rng);
  const InferencePack pack(m.view());
  const std::vector<int32_t>& order = pack.neuron_order();
  ASSERT_EQ(static_cast<int64_t>(order.size()), out);  // gathered, so groups share blocks
  constexpr float kUntouched = -12345.0f;
  std::vector<float> bias(static_cast<size_t>(out));
  for (int64_t n = 0; n < out; ++n) bias[n] = 0.25f * static_cast<float>(n);
  for (const InferencePack::Isa isa : isas()) {
    for (int64_t batch : {3, 11}) {  // one partial tile of rows; a whole tile and a partial one
      std::vector<float> x(static_cast<size_t>(batch * in));
      std::normal_distribution<float> normal;
      for (auto& v : x) v = normal(rng);
      InferencePack::Rows rows;
      ASSERT_TRUE(pack.quantize(x.data(), batch, in, rows, isa));
      std::vector<float> whole(static_cast<size_t>(batch * out));
      pack.linear_groups(0, pack.groups(), rows, bias.data(), whole.data(), out, isa);
      for (int64_t g = 0; g < pack.groups(); ++g) {
        std::vector<char> mine(static_cast<size_t>(out), 0);
        for (int64_t s = g * 16; s < std::min<int64_t>(out, g * 16 + 16); ++s) mine[order[s]] = 1;
        std::vector<float> y(static_cast<size_t>(batch * out), kUntouched);
        pack.linear_groups(g, g + 1, rows, bias.data(), y.data(), out, isa);
        for (int64_t b = 0; b < batch; ++b) {
          for (int64_t n = 0; n < out; ++n) {
            EXPECT_EQ(y[b * out + n], mine[n] ? whole[b * out + n] : kUntouched)
                << InferencePack::isa_name(isa) << " batch " << batch << " group " << g
                << " row " << b << " neuron " << n;
          }
        }
      }
    }
  }
}

// The VNNI kernel reads rows laid out in tiles, the AVX2 one plain rows: rows quantized for one
// are refused by the other rather than read wrongly.
TEST(InferencePack, RefusesRowsQuantizedForAnotherKernel) {
  if (isas().size() < 2) GTEST_SKIP() << "one instruction set on this CPU";
  const int64_t batch = 3, in = 150;
  const InferencePack pack(random_memory(20, in, 4, 6, 1).view());
  const std::vector<float> x(static_cast<size_t>(batch * in), 0.5f);
  std::vector<float> y(static_cast<size_t>(batch * 20));
  InferencePack::Rows tiled, plain;
  ASSERT_TRUE(pack.quantize(x.data(), batch, in, tiled, InferencePack::Isa::kAvx512Vnni));
  ASSERT_TRUE(pack.quantize(x.data(), batch, in, plain, InferencePack::Isa::kAvx2));
  EXPECT_THROW(pack.linear_groups(0, pack.groups(), tiled, nullptr, y.data(), 20,
                                  InferencePack::Isa::kAvx2),
               std::invalid_argument);
  EXPECT_THROW(pack.linear_groups(0, pack.groups(), plain, nullptr, y.data(), 20,
                                  InferencePack::Isa::kAvx512Vnni),
               std::invalid_argument);
}

TEST(InferencePack, RefusesRegionsWhoseSumsCouldOverflow) {
  std::vector<uint64_t> codes(70000);
  std::iota(codes.begin(), codes.end(), uint64_t{0});
  SpatialMemory eight(1, codes, 8, 17);
  EXPECT_THROW(InferencePack{eight.view()}, std::invalid_argument);
  SpatialMemory four(1, codes, 4, 17);
  EXPECT_NO_THROW(InferencePack{four.view()});
}

}  // namespace
}  // namespace spatium
