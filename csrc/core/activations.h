// The 12 activation functions an activation map chooses from, with derivatives.
// Header-only and free of torch and of host-only calls, so CPU kernels inline them and CUDA
// kernels can share them (float32 on the CPU runs the vectorised versions of
// activation_kernels.h, which follow the same conventions). Conventions follow torch.nn.functional: leaky_relu slope 0.01,
// elu alpha 1, exact (erf) gelu, softplus with beta 1 and threshold 20; relu, leaky_relu and
// abs take the derivative at 0 from the left (0, 0.01, 0), as autograd does.
#pragma once

#include <cmath>
#include <cstdint>

namespace spatium::act {

enum class Fn : uint8_t {
  Relu,
  LeakyRelu,
  Elu,
  Gelu,
  Silu,
  Sigmoid,
  Tanh,
  Softplus,
  Identity,
  Sin,
  Gaussian,
  Abs,
};
inline constexpr int kNumFns = 12;
inline constexpr const char* kNames[kNumFns] = {"relu", "leaky_relu", "elu",      "gelu",
                                                 "silu", "sigmoid",    "tanh",     "softplus",
                                                 "identity", "sin",    "gaussian", "abs"};

inline constexpr double kLeakySlope = 0.01;
inline constexpr double kSoftplusThreshold = 20.0;

template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <class T>
inline T apply(Fn fn, T x) {
  switch (fn) {
    case Fn::Relu: return x > T(0) ? x : T(0);
    case Fn::LeakyRelu: return x > T(0) ? x : T(kLeakySlope) * x;
    case Fn::Elu: return x > T(0) ? x : std::expm1(x);
    case Fn::Gelu: return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case Fn::Silu: return x * sigmoid(x);
    case Fn::Sigmoid: return sigmoid(x);
    case Fn::Tanh: return std::tanh(x);
    case Fn::Softplus: return x > T(kSoftplusThreshold) ? x : std::log1p(std::exp(x));
    case Fn::Identity: return x;
    case Fn::Sin: return std::sin(x);
    case Fn::Gaussian: return std::exp(-x * x);
    case Fn::Abs: return std::fabs(x);
  }
  return x;
}

template <class T>
inline T derivative(Fn fn, T x) {
  switch (fn) {
    case Fn::Relu: return x > T(0) ? T(1) : T(0);
    case Fn::LeakyRelu: return x > T(0) ? T(1) : T(kLeakySlope);
    case Fn::Elu: return x > T(0) ? T(1) : std::exp(x);
    case Fn::Gelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
      return cdf + x * pdf;
    }
    case Fn::Silu: {
      const T s = sigmoid(x);
      return s * (T(1) + x * (T(1) - s));
    }
    case Fn::Sigmoid: {
      const T s = sigmoid(x);
      return s * (T(1) - s);
    }
    case Fn::Tanh: {
      const T t = std::tanh(x);
      return T(1) - t * t;
    }
    case Fn::Softplus: return x > T(kSoftplusThreshold) ? T(1) : sigmoid(x);
    case Fn::Identity: return T(1);
    case Fn::Sin: return std::cos(x);
    case Fn::Gaussian: return T(-2) * x * std::exp(-x * x);
    case Fn::Abs: return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
  }
  return T(1);
}

}  // namespace spatium::act
