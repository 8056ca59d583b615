#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/activations.h"

namespace spatium::act {
namespace {

const std::vector<double> kPoints = {-25.0, -3.0, -1.5, -0.7, -0.1, 0.1, 0.3, 1.0, 2.5, 6.0, 25.0};

TEST(Activations, ValuesAtKnownPoints) {
  EXPECT_EQ(apply(Fn::Relu, -2.0), 0.0);
  EXPECT_EQ(apply(Fn::Relu, 2.0), 2.0);
  EXPECT_DOUBLE_EQ(apply(Fn::LeakyRelu, -2.0), -0.02);
  EXPECT_DOUBLE_EQ(apply(Fn::Elu, -1.0), std::exp(-1.0) - 1.0);
  EXPECT_NEAR(apply(Fn::Gelu, 1.0), 0.8413447460685429, 1e-15);
  EXPECT_NEAR(apply(Fn::Silu, 1.0), 1.0 / (1.0 + std::exp(-1.0)), 1e-15);
  EXPECT_DOUBLE_EQ(apply(Fn::Sigmoid, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(apply(Fn::Tanh, 0.5), std::tanh(0.5));
  EXPECT_NEAR(apply(Fn::Softplus, 0.0), std::log(2.0), 1e-15);
  EXPECT_EQ(apply(Fn::Softplus, 30.0), 30.0);
  EXPECT_EQ(apply(Fn::Identity, -3.5), -3.5);
  EXPECT_DOUBLE_EQ(apply(Fn::Sin, 1.0), std::sin(1.0));
  EXPECT_DOUBLE_EQ(apply(Fn::Gaussian, 2.0), std::exp(-4.0));
  EXPECT_EQ(apply(Fn::Abs, -3.0), 3.0);
}

TEST(Activations, DerivativesMatchCentralDifferences) {
  for (int f = 0; f < kNumFns; ++f) {
    const auto fn = static_cast<Fn>(f);
    for (double x : kPoints) {
      const double h = 1e-6;
      const double numeric = (apply(fn, x + h) - apply(fn, x - h)) / (2 * h);
      EXPECT_NEAR(derivative(fn, x), numeric, 1e-6 * (1 + std::fabs(numeric)))
          << kNames[f] << " at " << x;
    }
  }
}

TEST(Activations, KinksTakeTheLeftDerivative) {
  EXPECT_EQ(derivative(Fn::Relu, 0.0), 0.0);
  EXPECT_EQ(derivative(Fn::LeakyRelu, 0.0), kLeakySlope);
  EXPECT_EQ(derivative(Fn::Abs, 0.0), 0.0);
  EXPECT_EQ(derivative(Fn::Elu, 0.0), 1.0);  // exp(0): continuous there
}

TEST(Activations, FloatAndDoubleAgree) {
  for (int f = 0; f < kNumFns; ++f) {
    for (double x : kPoints) {
      const auto fn = static_cast<Fn>(f);
      EXPECT_NEAR(apply(fn, static_cast<float>(x)), apply(fn, x), 1e-5 * (1 + std::fabs(x)));
      EXPECT_NEAR(derivative(fn, static_cast<float>(x)), derivative(fn, x), 1e-5);
    }
  }
}

}  // namespace
}  // namespace spatium::act
