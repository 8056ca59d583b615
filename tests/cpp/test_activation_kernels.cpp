#include "core/activation_kernels.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

namespace spatium::act {
namespace {

// A dense sweep over the range that matters, the points where branches switch, and far out.
std::vector<float> sweep() {
  std::vector<float> xs;
  for (int i = -4000; i <= 4000; ++i) xs.push_back(static_cast<float>(i) * 0.01f);
  for (float x : {0.0f, -0.0f, 1e-7f, -1e-7f, 0.125f, -0.25f, -0.5f, 20.0f, 20.001f, 87.0f,
                  -87.0f, -88.0f, 200.0f, -200.0f, 1e4f, -12345.678f}) {
    xs.push_back(x);
  }
  return xs;
}

std::vector<float> run_one(Fn fn, const std::vector<float>& xs, const float* grad) {
  std::vector<float> out(xs.size());
  apply_one(fn, xs.data(), grad, static_cast<int64_t>(xs.size()), out.data());
  return out;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

TEST(ActivationKernels, FloatValuesAndSlopesAreWithinAFewUlpOfDouble) {
  const std::vector<float> xs = sweep();
  const std::vector<float> ones(xs.size(), 1.0f);
  for (int f = 0; f < kNumFns; ++f) {
    const auto fn = static_cast<Fn>(f);
    const std::vector<float> values = run_one(fn, xs, nullptr);
    const std::vector<float> slopes = run_one(fn, xs, ones.data());
    for (size_t i = 0; i < xs.size(); ++i) {
      const double v = apply(fn, double{xs[i]}), s = derivative(fn, double{xs[i]});
      // 8 ulp relative, or absolute near 0 (slopes such as 1 - tanh^2 are differences from 1).
      EXPECT_NEAR(values[i], v, 1e-6 * std::fabs(v) + 1e-7) << kNames[f] << " at " << xs[i];
      EXPECT_NEAR(slopes[i], s, 1e-6 * std::fabs(s) + 3e-7) << kNames[f] << "' at " << xs[i];
    }
  }
}

TEST(ActivationKernels, ReluFamilyIsExact) {
  const std::vector<float> xs = sweep();
  const std::vector<float> relu = run_one(Fn::Relu, xs, nullptr);
  const std::vector<float> abs = run_one(Fn::Abs, xs, nullptr);
  for (size_t i = 0; i < xs.size(); ++i) {
    EXPECT_EQ(relu[i], xs[i] > 0 ? xs[i] : 0.0f);
    EXPECT_EQ(abs[i], std::fabs(xs[i]));
  }
}

TEST(ActivationKernels, TableAndSwitchBackwardPickTheSameValuesAsOneFunction) {
  const std::vector<float> xs = sweep();
  const auto n = static_cast<int64_t>(xs.size());
  std::mt19937 rng(1);
  std::vector<uint8_t> fns(xs.size());
  std::vector<float> grad(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    fns[i] = static_cast<uint8_t>(rng() % kNumFns);
    grad[i] = static_cast<float>(rng() % 1000) * 0.01f - 5.0f;
  }
  std::vector<float> mapped(xs.size()), mapped_grad(xs.size());
  apply_table<float>(fns.data(), xs.data(), nullptr, n, mapped.data());
  apply_table(fns.data(), xs.data(), grad.data(), n, mapped_grad.data());
  // Gains and their totals accumulate: start them at 1 to see the += .
  std::vector<float> switch_grad(xs.size()), gains(kNumFns * xs.size(), 1.0f);
  std::vector<float> totals(kNumFns, 1.0f);
  switch_backward(fns.data(), xs.data(), grad.data(), n, switch_grad.data(), gains.data(), n,
                  totals.data());
  for (int f = 0; f < kNumFns; ++f) {
    double expected = 0;  // the sum of the gains the kernel wrote, in double
    for (size_t i = 0; i < xs.size(); ++i) expected += gains[f * xs.size() + i] - 1.0;
    EXPECT_NEAR(totals[f] - 1.0, expected, 1e-4 * (1.0 + std::fabs(expected))) << kNames[f];
  }
  std::vector<std::vector<float>> values;
  for (int f = 0; f < kNumFns; ++f) values.push_back(run_one(static_cast<Fn>(f), xs, nullptr));
  for (int f = 0; f < kNumFns; ++f) {
    const auto fn = static_cast<Fn>(f);
    const std::vector<float> one_grad = run_one(fn, xs, grad.data());
    for (size_t i = 0; i < xs.size(); ++i) {
      const float expected = grad[i] * (values[f][i] - values[fns[i]][i]);
      EXPECT_EQ(gains[f * xs.size() + i], 1.0f + expected) << kNames[f] << " at " << xs[i];
      if (fns[i] != f) continue;
      EXPECT_TRUE(same_bits(mapped[i], values[f][i])) << kNames[f] << " at " << xs[i];
      EXPECT_TRUE(same_bits(mapped_grad[i], one_grad[i])) << kNames[f] << "' at " << xs[i];
      EXPECT_TRUE(same_bits(switch_grad[i], one_grad[i])) << kNames[f] << "' at " << xs[i];
    }
  }
}

TEST(ActivationKernels, SimhashSetsABitPerPositiveProjection) {
  constexpr int64_t kBatch = 5, kFeatures = 37;
  constexpr int kBits = 6;
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<float> x(kBatch * kFeatures), p(kBits * kFeatures);
  for (float& v : x) v = normal(rng);
  for (float& v : p) v = normal(rng);
  std::vector<int64_t> cells(kBatch);
  simhash(x.data(), kBatch, kFeatures, p.data(), kBits, cells.data());
  for (int64_t b = 0; b < kBatch; ++b) {
    int64_t expected = 0;
    for (int j = 0; j < kBits; ++j) {
      double dot = 0;
      for (int64_t f = 0; f < kFeatures; ++f) dot += double{x[b * kFeatures + f]} * p[j * kFeatures + f];
      expected |= int64_t{dot > 0} << j;
    }
    EXPECT_EQ(cells[b], expected) << "sample " << b;
  }
}

// The argmax over each column's 12 logits, function-major: the first largest wins, a NaN counts
// as the largest; whole chunks of 256 columns and partial ones, rows spaced by ld.
TEST(ActivationKernels, ArgmaxColumnsTakesTheFirstLargestAndNaN) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> small(-2, 2);  // few values: many ties
  for (int64_t n : {1, 37, 300}) {
    const int64_t ld = n + 3;
    std::vector<float> logits(static_cast<size_t>(kNumFns * ld));
    for (auto& v : logits) v = static_cast<float>(small(rng));
    logits[5 * ld] = NAN;  // column 0: the NaN at 5 wins over a later NaN and every number
    logits[7 * ld] = NAN;
    std::vector<uint8_t> fns(static_cast<size_t>(n) + 1, 99);
    argmax_columns(logits.data(), ld, n, fns.data());
    for (int64_t j = 0; j < n; ++j) {
      int expected = 0;
      for (int k = 1; k < kNumFns; ++k) {
        const float v = logits[k * ld + j], best = logits[expected * ld + j];
        if (!std::isnan(best) && (std::isnan(v) || v > best)) expected = k;
      }
      ASSERT_EQ(fns[j], expected) << n << " " << j;
    }
    ASSERT_EQ(fns[0], 5);
    ASSERT_EQ(fns[n], 99);  // the columns past n are left alone
    std::vector<double> wide(logits.begin(), logits.end());
    std::vector<uint8_t> wide_fns(static_cast<size_t>(n));
    argmax_columns(wide.data(), ld, n, wide_fns.data());
    ASSERT_TRUE(std::equal(wide_fns.begin(), wide_fns.end(), fns.begin()));
  }
}

// A factored map's argmax is argmax_columns over neuron logit + cell logit + the lead of each
// neuron's initial function, whose lead breaks ties towards it and makes up for smaller logits.
TEST(ActivationKernels, ArgmaxFactoredIsTheArgmaxOfTheSummedLogits) {
  std::mt19937 rng(4);
  std::uniform_int_distribution<int> small(-2, 2);  // few values: many ties
  for (int64_t n : {1, 37, 300}) {
    const int64_t ld = n + 3;
    std::vector<float> neuron(static_cast<size_t>(kNumFns * ld)), cell(kNumFns);
    for (auto& v : neuron) v = static_cast<float>(small(rng));
    for (auto& v : cell) v = static_cast<float>(small(rng));
    std::vector<uint8_t> initial(static_cast<size_t>(n));
    for (auto& v : initial) v = static_cast<uint8_t>(rng() % kNumFns);
    for (float lead : {0.0f, 1.0f, 2.5f}) {
      std::vector<float> summed(neuron.size());
      for (int k = 0; k < kNumFns; ++k) {
        for (int64_t j = 0; j < n; ++j) {
          summed[k * ld + j] = neuron[k * ld + j] + cell[k] + (initial[j] == k ? lead : 0.0f);
        }
      }
      std::vector<uint8_t> expected(static_cast<size_t>(n)), fns(static_cast<size_t>(n) + 1, 99);
      argmax_columns(summed.data(), ld, n, expected.data());
      argmax_factored(neuron.data(), ld, cell.data(), initial.data(), lead, n, fns.data());
      ASSERT_TRUE(std::equal(expected.begin(), expected.end(), fns.begin())) << n << " " << lead;
      ASSERT_EQ(fns[n], 99);
      std::vector<double> wide(neuron.begin(), neuron.end()), wide_cell(cell.begin(), cell.end());
      std::vector<uint8_t> wide_fns(static_cast<size_t>(n));
      argmax_factored(wide.data(), ld, wide_cell.data(), initial.data(), double{lead}, n,
                      wide_fns.data());
      ASSERT_TRUE(std::equal(wide_fns.begin(), wide_fns.end(), fns.begin()));
    }
  }
}

}  // namespace
}  // namespace spatium::act
