#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/bloom.h"
#include "core/cpu_features.h"

namespace spatium::bloom {
namespace {

// Inserted keys have the top bit clear, probe keys have it set: the two sets never overlap.
std::vector<uint64_t> random_keys(size_t n, uint64_t seed, bool probe) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> keys(n);
  for (auto& k : keys) k = (rng() >> 1) | (probe ? uint64_t{1} << 63 : 0);
  return keys;
}

double measured_fpr(const SplitBlockBloom& filter, size_t probes) {
  const auto keys = random_keys(probes, 999, /*probe=*/true);
  std::vector<uint8_t> hits(probes);
  return static_cast<double>(filter.might_contain_batch(keys.data(), probes, hits.data())) /
         static_cast<double>(probes);
}

TEST(Bloom, NoFalseNegatives) {
  const auto keys = random_keys(100000, 1, false);
  SplitBlockBloom filter = SplitBlockBloom::for_capacity(keys.size(), 0.01);
  for (size_t i = 0; i < keys.size() / 2; ++i) filter.insert(keys[i]);
  filter.insert_batch(keys.data() + keys.size() / 2, keys.size() - keys.size() / 2);
  for (uint64_t k : keys) ASSERT_TRUE(filter.might_contain(k));
  std::vector<uint8_t> out(keys.size());
  EXPECT_EQ(filter.might_contain_batch(keys.data(), keys.size(), out.data()), keys.size());
}

TEST(Bloom, SequentialKeysHaveNoFalseNegatives) {
  // (neuron, region) keys are small consecutive integers.
  SplitBlockBloom filter = SplitBlockBloom::for_capacity(4096, 0.01);
  for (uint64_t k = 0; k < 4096; ++k) filter.insert(k);
  for (uint64_t k = 0; k < 4096; ++k) ASSERT_TRUE(filter.might_contain(k));
}

class BloomRate : public ::testing::TestWithParam<std::tuple<size_t, double>> {};

TEST_P(BloomRate, FalsePositiveRateWithinOneAndAHalfOfTarget) {
  const auto [n, target] = GetParam();
  SplitBlockBloom filter = SplitBlockBloom::for_capacity(n, target);
  const auto keys = random_keys(n, 7, false);
  filter.insert_batch(keys.data(), n);
  const double fpr = measured_fpr(filter, 2000000);
  EXPECT_LE(fpr, 1.5 * target) << n << " keys, " << filter.num_blocks() << " blocks";
  EXPECT_GE(fpr, target / 1.5) << "filter is oversized for " << n << " keys";
  EXPECT_LE(SplitBlockBloom::expected_fpr(n, filter.num_blocks()), target);
  EXPECT_GT(SplitBlockBloom::expected_fpr(n, filter.num_blocks() - 1), target);
}

INSTANTIATE_TEST_SUITE_P(Sizes, BloomRate,
                         ::testing::Values(std::make_tuple(size_t{100000}, 0.01),
                                           std::make_tuple(size_t{1000000}, 0.01),
                                           std::make_tuple(size_t{100000}, 0.001),
                                           std::make_tuple(size_t{1000000}, 0.05)));

TEST(Bloom, KernelsSetTheSameBits) {
  if (!cpu::features().avx2) GTEST_SKIP() << "no AVX2 on this CPU";
  SplitBlockBloom portable(1000, Kernel::Portable), avx2(1000, Kernel::Avx2);
  const auto keys = random_keys(20000, 3, false);
  portable.insert_batch(keys.data(), keys.size());
  avx2.insert_batch(keys.data(), keys.size());
  EXPECT_TRUE(portable == avx2);
  const auto probes = random_keys(20000, 4, true);
  for (uint64_t k : probes) ASSERT_EQ(portable.might_contain(k), avx2.might_contain(k));
}

TEST(Bloom, ClearRemovesEverything) {
  SplitBlockBloom filter(64);
  const auto keys = random_keys(1000, 5, false);
  filter.insert_batch(keys.data(), keys.size());
  filter.clear();
  EXPECT_EQ(filter.num_blocks(), 64u);
  for (uint64_t k : keys) ASSERT_FALSE(filter.might_contain(k));
}

TEST(Bloom, SerializeRoundTrip) {
  SplitBlockBloom filter = SplitBlockBloom::for_capacity(5000, 0.01);
  const auto keys = random_keys(5000, 6, false);
  filter.insert_batch(keys.data(), keys.size());
  const std::vector<uint8_t> image = filter.serialize();
  EXPECT_EQ(image.size(), filter.size_bytes() + 24);
  const SplitBlockBloom back = SplitBlockBloom::deserialize(image.data(), image.size());
  EXPECT_TRUE(back == filter);
  for (uint64_t k : keys) ASSERT_TRUE(back.might_contain(k));
  EXPECT_EQ(back.serialize(), image);
}

TEST(Bloom, DamagedImagesAreRejected) {
  SplitBlockBloom filter(10);
  const auto keys = random_keys(100, 8, false);
  filter.insert_batch(keys.data(), keys.size());
  const std::vector<uint8_t> image = filter.serialize();
  auto load = [](const std::vector<uint8_t>& bytes) {
    return SplitBlockBloom::deserialize(bytes.data(), bytes.size());
  };
  EXPECT_THROW(SplitBlockBloom::deserialize(nullptr, 0), std::invalid_argument);
  EXPECT_THROW(load({}), std::invalid_argument);
  for (size_t cut : {size_t{1}, size_t{8}, size_t{32}, image.size() - 1}) {
    EXPECT_THROW(load(std::vector<uint8_t>(image.begin(), image.end() - cut)), std::invalid_argument)
        << "truncated by " << cut;
  }
  auto longer = image;
  longer.push_back(0);
  EXPECT_THROW(load(longer), std::invalid_argument);
  // Every single flipped bit is caught: header, body or checksum.
  for (size_t byte = 0; byte < image.size(); ++byte) {
    auto damaged = image;
    damaged[byte] ^= 0x10;
    ASSERT_THROW(load(damaged), std::invalid_argument) << "byte " << byte;
  }
  auto huge = image;
  for (int i = 8; i < 16; ++i) huge[i] = 0xFF;  // absurd block count
  EXPECT_THROW(load(huge), std::invalid_argument);
}

TEST(Bloom, BadArgumentsThrow) {
  EXPECT_THROW(SplitBlockBloom(0), std::invalid_argument);
  EXPECT_THROW(SplitBlockBloom::for_capacity(10, 0.0), std::invalid_argument);
  EXPECT_THROW(SplitBlockBloom::for_capacity(10, 1.0), std::invalid_argument);
  EXPECT_THROW(SplitBlockBloom::for_capacity(10, -0.5), std::invalid_argument);
  EXPECT_EQ(SplitBlockBloom::for_capacity(0, 0.01).num_blocks(), 1u);
  EXPECT_EQ(SplitBlockBloom::expected_fpr(0, 10), 0.0);
}

}  // namespace
}  // namespace spatium::bloom
