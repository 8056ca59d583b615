#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "core/morton.h"

namespace spatium::morton {
namespace {

// The definition, bit by bit: bit i of x, y, z goes to bit 3i, 3i+1, 3i+2.
uint64_t reference_encode(uint64_t x, uint64_t y, uint64_t z) {
  uint64_t code = 0;
  for (int i = 0; i < 16; ++i) {
    code |= ((x >> i) & 1) << (3 * i);
    code |= ((y >> i) & 1) << (3 * i + 1);
    code |= ((z >> i) & 1) << (3 * i + 2);
  }
  return code;
}

std::vector<uint16_t> edge_values() {
  std::vector<uint16_t> v = {0, 1, 0xFFFF, 0xFFFE, 0x7FFF, 0x5555, 0xAAAA};
  for (int i = 0; i < 16; ++i) v.push_back(static_cast<uint16_t>(1u << i));
  return v;
}

std::vector<Impl> available_impls() {
  std::vector<Impl> impls;
  for (Impl impl : kAllImpls) {
    if (available(impl)) impls.push_back(impl);
  }
  return impls;
}

TEST(Morton, ScalarMatchesReferenceOnEdgeValues) {
  for (uint16_t x : edge_values()) {
    for (uint16_t y : edge_values()) {
      for (uint16_t z : edge_values()) {
        const uint64_t expected = reference_encode(x, y, z);
        ASSERT_EQ(encode(x, y, z), expected);
        ASSERT_EQ(encode_point(x, y, z), expected);
        ASSERT_EQ(decode(expected), (Position{x, y, z}));
        ASSERT_EQ(decode_point(expected), (Position{x, y, z}));
        if (available(Impl::Bmi2)) {
          ASSERT_EQ(encode_bmi2(x, y, z), expected);
          ASSERT_EQ(decode_bmi2(expected), (Position{x, y, z}));
        }
      }
    }
  }
}

TEST(Morton, ExtremesAndOrder) {
  EXPECT_EQ(encode(0, 0, 0), 0u);
  EXPECT_EQ(encode(0xFFFF, 0xFFFF, 0xFFFF), kCodeLimit - 1);
  EXPECT_EQ(encode(1, 0, 0), 1u);
  EXPECT_EQ(encode(0, 1, 0), 2u);
  EXPECT_EQ(encode(0, 0, 1), 4u);
  // Along one axis Morton order is the axis order.
  for (uint16_t x = 1; x < 1000; ++x) ASSERT_LT(encode(x - 1, 7, 9), encode(x, 7, 9));
}

template <class T>
void check_batch_round_trip(size_t n) {
  std::mt19937_64 rng(12345);
  std::vector<T> xyz(3 * n);
  for (auto& v : xyz) v = static_cast<T>(rng() & 0xFFFF);
  std::vector<int64_t> expected(n);
  for (size_t i = 0; i < n; ++i) {
    expected[i] = static_cast<int64_t>(reference_encode(xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2]));
  }
  for (Impl impl : available_impls()) {
    SCOPED_TRACE(name(impl));
    std::vector<int64_t> codes(n, -1);
    ASSERT_EQ(encode_batch(xyz.data(), codes.data(), n, impl), n);
    ASSERT_EQ(codes, expected);
    std::vector<T> back(3 * n, -1);
    ASSERT_EQ(decode_batch(codes.data(), back.data(), n, impl), n);
    ASSERT_EQ(back, xyz);
  }
}

TEST(Morton, BatchRoundTripOneMillionInt64) { check_batch_round_trip<int64_t>(1000000); }
TEST(Morton, BatchRoundTripOneMillionInt32) { check_batch_round_trip<int32_t>(1000000); }

TEST(Morton, BatchHandlesEveryTailLength) {
  for (size_t n = 0; n < 40; ++n) check_batch_round_trip<int64_t>(n);
}

TEST(Morton, BatchReportsFirstOutOfRangeCoordinate) {
  const size_t n = 100;
  for (int64_t bad : {int64_t{-1}, int64_t{65536}, int64_t{1} << 40, INT64_MIN}) {
    for (size_t row : {size_t{0}, size_t{37}, n - 1}) {
      for (int col = 0; col < 3; ++col) {
        std::vector<int64_t> xyz(3 * n, 5);
        xyz[3 * row + col] = bad;
        xyz[3 * (n - 1)] = -7;  // a later bad row must not hide the first one
        std::vector<int64_t> codes(n);
        for (Impl impl : available_impls()) {
          ASSERT_EQ(encode_batch(xyz.data(), codes.data(), n, impl), row) << name(impl);
        }
      }
    }
  }
  std::vector<int32_t> xyz32 = {1, 2, 3, 4, -5, 6};
  std::vector<int64_t> codes(2);
  for (Impl impl : available_impls()) EXPECT_EQ(encode_batch(xyz32.data(), codes.data(), 2, impl), 1u);
}

TEST(Morton, BatchReportsFirstOutOfRangeCode) {
  const size_t n = 50;
  for (int64_t bad : {int64_t{-1}, static_cast<int64_t>(kCodeLimit), INT64_MAX, INT64_MIN}) {
    std::vector<int64_t> codes(n, 12345);
    codes[20] = bad;
    codes[40] = -1;
    std::vector<int64_t> xyz(3 * n);
    for (Impl impl : available_impls()) {
      ASSERT_EQ(decode_batch(codes.data(), xyz.data(), n, impl), 20u) << name(impl);
    }
  }
  std::vector<int64_t> top = {static_cast<int64_t>(kCodeLimit - 1)};
  std::vector<int32_t> xyz(3);
  EXPECT_EQ(decode_batch(top.data(), xyz.data(), 1), 1u);
  EXPECT_EQ(xyz, (std::vector<int32_t>{0xFFFF, 0xFFFF, 0xFFFF}));
}

}  // namespace
}  // namespace spatium::morton
