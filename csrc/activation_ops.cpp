// spatium::activation and spatium::activation_backward: one of the 12 activation-map functions
// (core/activations.h) applied elementwise, with its derivative. The building block of the
// activation maps; CPU impls, parallel over elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/activations.h"

namespace spatium {
namespace {

constexpr int64_t kGrain = int64_t{1} << 14;

act::Fn checked_fn(int64_t fn) {
  TORCH_CHECK_VALUE(fn >= 0 && fn < act::kNumFns, "activation: function index must be in [0, ",
                    act::kNumFns, "), got ", fn);
  return static_cast<act::Fn>(fn);
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "activation: ", name, " must be float32 or float64, got ", t.scalar_type());
}

// out[i] = op(in[i]) (and times grad[i] when given), in parallel.
template <class Op>
at::Tensor elementwise(const at::Tensor& x_in, const at::Tensor* grad_in, Op op) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const at::Tensor grad = grad_in != nullptr ? grad_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatium_activation", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = op(in[i]) * (g != nullptr ? g[i] : scalar_t(1));
    });
  });
  return out;
}

at::Tensor activation_cpu(const at::Tensor& x, int64_t fn) {
  check_float(x, "x");
  const act::Fn f = checked_fn(fn);
  return elementwise(x, nullptr, [f](auto v) { return act::apply(f, v); });
}

at::Tensor activation_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t fn) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
                    "activation_backward: grad must match x in shape and dtype");
  const act::Fn f = checked_fn(fn);
  return elementwise(x, &grad, [f](auto v) { return act::derivative(f, v); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spatium, m) {
  m.def("activation(Tensor x, int fn) -> Tensor");
  m.def("activation_backward(Tensor grad, Tensor x, int fn) -> Tensor");
}

TORCH_LIBRARY_IMPL(spatium, CPU, m) {
  m.impl("activation", &activation_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
}

}  // namespace spatium
