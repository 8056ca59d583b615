#include "core/activation_kernels.h"

#include <gtest/gtest.h>

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

TEST(ActivationKernels, TableAndMixturePickTheSameValuesAsOneFunction) {
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
  // A one-hot mixture: weight 1 on the table's function.
  std::vector<float> w(kNumFns * xs.size(), 0.0f), grad_w(w.size(), 0.0f);
  for (size_t i = 0; i < xs.size(); ++i) w[fns[i] * xs.size() + i] = 1.0f;
  std::vector<float> mixed(xs.size()), mixed_grad(xs.size());
  apply_mixture(w.data(), n, xs.data(), n, mixed.data());
  mixture_backward(w.data(), n, xs.data(), grad.data(), n, mixed_grad.data(), grad_w.data());
  for (int f = 0; f < kNumFns; ++f) {
    const auto fn = static_cast<Fn>(f);
    const std::vector<float> one = run_one(fn, xs, nullptr);
    const std::vector<float> one_grad = run_one(fn, xs, grad.data());
    for (size_t i = 0; i < xs.size(); ++i) {
      EXPECT_EQ(grad_w[f * xs.size() + i], grad[i] * one[i]);
      if (fns[i] != f) continue;
      EXPECT_TRUE(same_bits(mapped[i], one[i])) << kNames[f] << " at " << xs[i];
      EXPECT_TRUE(same_bits(mapped_grad[i], one_grad[i])) << kNames[f] << "' at " << xs[i];
      EXPECT_EQ(mixed[i], one[i]) << kNames[f] << " at " << xs[i];
      EXPECT_EQ(mixed_grad[i], one_grad[i]) << kNames[f] << "' at " << xs[i];
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

// The softmax over each column's 12 logits and its backward, function-major, against a
// double-precision softmax: whole chunks of 256 columns and partial ones, rows spaced by ld.
TEST(ActivationKernels, SoftmaxColumnsAndBackwardMatchDouble) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int64_t n : {1, 37, 300}) {
    const int64_t ld = n + 3;
    const auto size = static_cast<size_t>(kNumFns * ld);
    std::vector<float> logits(size), grad(size);
    for (auto& v : logits) v = normal(rng);
    for (auto& v : grad) v = normal(rng);
    std::vector<float> probs(size, -1.0f), grad_logits(size, -1.0f);
    softmax_columns(logits.data(), ld, n, probs.data());
    softmax_columns_backward(grad.data(), probs.data(), ld, n, grad_logits.data());
    for (int64_t j = 0; j < n; ++j) {
      double largest = -INFINITY, total = 0.0, dot = 0.0, p[kNumFns];
      for (int k = 0; k < kNumFns; ++k) largest = std::max(largest, double(logits[k * ld + j]));
      for (int k = 0; k < kNumFns; ++k) total += p[k] = std::exp(logits[k * ld + j] - largest);
      for (int k = 0; k < kNumFns; ++k) {
        ASSERT_NEAR(probs[k * ld + j], p[k] / total, 1e-6) << n << " " << j << " " << k;
        dot += double(grad[k * ld + j]) * double(probs[k * ld + j]);
      }
      for (int k = 0; k < kNumFns; ++k) {
        const double expected = probs[k * ld + j] * (grad[k * ld + j] - dot);
        ASSERT_NEAR(grad_logits[k * ld + j], expected, 1e-5 * (1 + std::fabs(expected)));
      }
    }
    // the columns past n are left alone
    for (int k = 0; k < kNumFns; ++k) ASSERT_EQ(probs[k * ld + n], -1.0f);
    for (int k = 0; k < kNumFns; ++k) ASSERT_EQ(grad_logits[k * ld + n], -1.0f);
  }
}

}  // namespace
}  // namespace spatium::act
