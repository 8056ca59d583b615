// The activation-map ops (CPU impls, parallel): spatium::activation applies one of the 12
// functions of core/activations.h elementwise; activation_map applies, per sample and neuron,
// the function its (neuron, cell) holds in a table; activation_mixture applies the
// probability-weighted sum of all 12 (a learnable map while training). Each has a backward op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

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

// --- activation maps: per (neuron, cell) one function (a table) or a mixture (probabilities) ---
constexpr int64_t kCells = 64;

// pre [B, N] float, cells [B] int64 in [0, 64): checked, contiguous.
void check_map_inputs(const at::Tensor& pre, const at::Tensor& cells, const char* op) {
  check_float(pre, "pre");
  TORCH_CHECK_VALUE(pre.dim() == 2, op, ": pre must be [batch, neurons], got ", pre.sizes());
  TORCH_CHECK_TYPE(cells.scalar_type() == at::kLong, op, ": cells must be int64");
  TORCH_CHECK_VALUE(cells.dim() == 1 && cells.size(0) == pre.size(0), op,
                    ": cells must be [batch] = [", pre.size(0), "], got ", cells.sizes());
  if (cells.numel() > 0) {
    TORCH_CHECK_VALUE(cells.min().item<int64_t>() >= 0 && cells.max().item<int64_t>() < kCells,
                      op, ": cells must be in [0, 64)");
  }
}

void check_table(const at::Tensor& table, int64_t neurons) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kByte, "activation_map: table must be uint8");
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == neurons && table.size(1) == kCells,
                    "activation_map: table must be [", neurons, ", 64], got ", table.sizes());
  if (table.numel() > 0) {
    TORCH_CHECK_VALUE(table.max().item<uint8_t>() < act::kNumFns,
                      "activation_map: table holds a function index >= ", act::kNumFns);
  }
}

void check_probs(const at::Tensor& probs, const at::Tensor& pre) {
  TORCH_CHECK_TYPE(probs.scalar_type() == pre.scalar_type(),
                   "activation_mixture: probs must have pre's dtype");
  TORCH_CHECK_VALUE(probs.dim() == 3 && probs.size(0) == pre.size(1) && probs.size(1) == kCells &&
                        probs.size(2) == act::kNumFns,
                    "activation_mixture: probs must be [", pre.size(1), ", 64, ", act::kNumFns,
                    "], got ", probs.sizes());
}

// Parallel over neurons: each task owns whole columns of pre/out and rows of table/probs.
template <class Body>
void for_neurons(const at::Tensor& pre, Body body) {
  const int64_t neurons = pre.size(1);
  at::parallel_for(0, neurons, std::max<int64_t>(1, kGrain / std::max<int64_t>(pre.size(0), 1)),
                   body);
}

// out[b, n] = op(the function of (n, cells[b]), pre[b, n]), times grad[b, n] when given: the
// forward (op = apply) and backward (op = derivative) of a fixed map.
template <class Op>
at::Tensor map_elementwise(const at::Tensor& pre_in, const at::Tensor& cells_in,
                           const at::Tensor& table_in, const at::Tensor* grad_in, const char* op,
                           Op fn_op) {
  check_map_inputs(pre_in, cells_in, op);
  check_table(table_in, pre_in.size(1));
  TORCH_CHECK_VALUE(grad_in == nullptr || (grad_in->sizes() == pre_in.sizes() &&
                                           grad_in->scalar_type() == pre_in.scalar_type()),
                    op, ": grad must match pre");
  const at::Tensor pre = pre_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor table = table_in.contiguous();
  const at::Tensor grad = grad_in != nullptr ? grad_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(pre);
  const int64_t batch = pre.size(0), neurons = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "activation_map", [&] {
    const scalar_t* x = pre.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* c = cells.const_data_ptr<int64_t>();
    const uint8_t* t = table.const_data_ptr<uint8_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_neurons(pre, [&](int64_t n0, int64_t n1) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t i = b * neurons + n;
          const scalar_t value = fn_op(static_cast<act::Fn>(t[n * kCells + c[b]]), x[i]);
          o[i] = g != nullptr ? g[i] * value : value;
        }
      }
    });
  });
  return out;
}

at::Tensor activation_map_cpu(const at::Tensor& pre, const at::Tensor& cells,
                              const at::Tensor& table) {
  return map_elementwise(pre, cells, table, nullptr, "activation_map",
                         [](act::Fn fn, auto v) { return act::apply(fn, v); });
}

at::Tensor activation_map_backward_cpu(const at::Tensor& grad, const at::Tensor& pre,
                                       const at::Tensor& cells, const at::Tensor& table) {
  return map_elementwise(pre, cells, table, &grad, "activation_map_backward",
                         [](act::Fn fn, auto v) { return act::derivative(fn, v); });
}

at::Tensor activation_mixture_cpu(const at::Tensor& pre_in, const at::Tensor& cells_in,
                                  const at::Tensor& probs_in) {
  check_map_inputs(pre_in, cells_in, "activation_mixture");
  check_probs(probs_in, pre_in);
  const at::Tensor pre = pre_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  at::Tensor out = at::empty_like(pre);
  const int64_t batch = pre.size(0), neurons = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "activation_mixture", [&] {
    const scalar_t* x = pre.const_data_ptr<scalar_t>();
    const int64_t* c = cells.const_data_ptr<int64_t>();
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    for_neurons(pre, [&](int64_t n0, int64_t n1) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t n = n0; n < n1; ++n) {
          const scalar_t* w = p + (n * kCells + c[b]) * act::kNumFns;
          const scalar_t v = x[b * neurons + n];
          scalar_t sum = 0;
          for (int k = 0; k < act::kNumFns; ++k) sum += w[k] * act::apply(static_cast<act::Fn>(k), v);
          y[b * neurons + n] = sum;
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> activation_mixture_backward_cpu(const at::Tensor& grad_in,
                                                                   const at::Tensor& pre_in,
                                                                   const at::Tensor& cells_in,
                                                                   const at::Tensor& probs_in) {
  check_map_inputs(pre_in, cells_in, "activation_mixture_backward");
  check_probs(probs_in, pre_in);
  TORCH_CHECK_VALUE(grad_in.sizes() == pre_in.sizes() && grad_in.scalar_type() == pre_in.scalar_type(),
                    "activation_mixture_backward: grad must match pre");
  const at::Tensor pre = pre_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor probs = probs_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor grad_pre = at::empty_like(pre);
  at::Tensor grad_probs = at::zeros_like(probs);
  const int64_t batch = pre.size(0), neurons = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "activation_mixture_backward", [&] {
    const scalar_t* x = pre.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const int64_t* c = cells.const_data_ptr<int64_t>();
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_pre.mutable_data_ptr<scalar_t>();
    scalar_t* gp = grad_probs.mutable_data_ptr<scalar_t>();
    // Each task owns its neurons' rows of grad_probs: no two tasks write the same element.
    for_neurons(pre, [&](int64_t n0, int64_t n1) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t i = b * neurons + n, cell = (n * kCells + c[b]) * act::kNumFns;
          scalar_t slope = 0;
          for (int k = 0; k < act::kNumFns; ++k) {
            const auto fn = static_cast<act::Fn>(k);
            slope += p[cell + k] * act::derivative(fn, x[i]);
            gp[cell + k] += g[i] * act::apply(fn, x[i]);
          }
          gx[i] = g[i] * slope;
        }
      }
    });
  });
  return {grad_pre, grad_probs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spatium, m) {
  m.def("activation(Tensor x, int fn) -> Tensor");
  m.def("activation_backward(Tensor grad, Tensor x, int fn) -> Tensor");
  m.def("activation_map(Tensor pre, Tensor cells, Tensor table) -> Tensor");
  m.def("activation_map_backward(Tensor grad, Tensor pre, Tensor cells, Tensor table) -> Tensor");
  m.def("activation_mixture(Tensor pre, Tensor cells, Tensor probs) -> Tensor");
  m.def(
      "activation_mixture_backward(Tensor grad, Tensor pre, Tensor cells, Tensor probs) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spatium, CPU, m) {
  m.impl("activation", &activation_cpu);
  m.impl("activation_backward", &activation_backward_cpu);
  m.impl("activation_map", &activation_map_cpu);
  m.impl("activation_map_backward", &activation_map_backward_cpu);
  m.impl("activation_mixture", &activation_mixture_cpu);
  m.impl("activation_mixture_backward", &activation_mixture_backward_cpu);
}

}  // namespace spatium
