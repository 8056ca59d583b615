// CPU kernels of the activation-map ops (declared in kernels.h), parallel: spatium::activation
// applies one of the 12 functions of core/activations.h elementwise; activation_map applies,
// per sample and neuron, the function its (neuron, cell) holds in a table, with its backward op.
// A learnable map trains straight through its argmax: map_argmax turns its logits into that
// table, and learnable_map_backward gives the pre-activations' gradient and the logits' (the
// first-order change of the loss were a cell switched to each function), stored cell-major; a
// factored map's ops do the same for logits that are a per-neuron and a per-cell part.
// simhash_cells picks each sample's cell and count_hits_ counts the cells' hits. The kernels
// (core/activation_kernels.h) run over contiguous runs of neurons.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "core/activation_kernels.h"
#include "kernels.h"

namespace spatium::cpu {
namespace {

// Elements (function evaluations) per parallel task: below, a call runs on the calling thread,
// since a parallel region costs more than a batch-1 map.
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

// One function over x (times grad when given), in parallel over chunks.
at::Tensor apply_one(const at::Tensor& x_in, const at::Tensor* grad_in, act::Fn fn) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const at::Tensor grad = grad_in != nullptr ? grad_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "spatium_activation", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
      act::apply_one(fn, in + begin, g != nullptr ? g + begin : nullptr, end - begin, o + begin);
    });
  });
  return out;
}

// --- activation maps: per (neuron, cell) one function, from a table ---------------------------
constexpr int64_t kCells = 64;
constexpr int kHashBits = 6;

// cells [B] int64 in [0, 64), contiguous.
at::Tensor checked_cells(const at::Tensor& cells_in, int64_t batch, const char* op) {
  TORCH_CHECK_TYPE(cells_in.scalar_type() == at::kLong, op, ": cells must be int64");
  TORCH_CHECK_VALUE(cells_in.dim() == 1 && cells_in.size(0) == batch, op,
                    ": cells must be [batch] = [", batch, "], got ", cells_in.sizes());
  at::Tensor cells = cells_in.contiguous();
  const int64_t* c = cells.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(std::all_of(c, c + batch, [](int64_t v) { return v >= 0 && v < kCells; }),
                    op, ": cells must be in [0, 64)");
  return cells;
}

// pre [B, N] float, checked, contiguous.
at::Tensor checked_pre(const at::Tensor& pre, const char* op) {
  check_float(pre, "pre");
  TORCH_CHECK_VALUE(pre.dim() == 2, op, ": pre must be [batch, neurons], got ", pre.sizes());
  return pre.contiguous();
}

// The table [N, 64] as cell-major [64, N] (no copy when it is a view of one, as the module's
// cached table is): a sample's functions are then one contiguous row.
at::Tensor cell_major_table(const at::Tensor& table, int64_t neurons) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kByte, "activation_map: table must be uint8");
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == neurons && table.size(1) == kCells,
                    "activation_map: table must be [", neurons, ", 64], got ", table.sizes());
  at::Tensor t = table.t().contiguous();
  const uint8_t* v = t.const_data_ptr<uint8_t>();
  // A max, not an early-exit search, in a local the check does not see: it vectorises.
  const uint8_t top = [v, n = t.numel()] {
    uint8_t m = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
    return m;
  }();
  TORCH_CHECK_VALUE(top < act::kNumFns,
                    "activation_map: table holds a function index >= ", act::kNumFns);
  return t;
}

// body(b, n0, n1) for every sample b and neuron range [n0, n1), in parallel over neurons: each
// task owns whole columns of the outputs and the neurons' weights.
template <class Body>
void for_neurons(int64_t batch, int64_t neurons, Body body) {
  at::parallel_for(0, neurons, std::max<int64_t>(1, kGrain / std::max<int64_t>(batch, 1)),
                   [&](int64_t n0, int64_t n1) {
                     for (int64_t b = 0; b < batch; ++b) body(b, n0, n1);
                   });
}

// The fixed map's forward (grad undefined) and backward.
at::Tensor map_table(const at::Tensor& pre_in, const at::Tensor& cells_in,
                     const at::Tensor& table_in, const at::Tensor* grad_in, const char* op) {
  const at::Tensor pre = checked_pre(pre_in, op);
  const int64_t batch = pre.size(0), neurons = pre.size(1);
  const at::Tensor cells = checked_cells(cells_in, batch, op);
  const at::Tensor table = cell_major_table(table_in, neurons);
  TORCH_CHECK_VALUE(grad_in == nullptr || (grad_in->sizes() == pre.sizes() &&
                                           grad_in->scalar_type() == pre.scalar_type()),
                    op, ": grad must match pre");
  const at::Tensor grad = grad_in != nullptr ? grad_in->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(pre);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "activation_map", [&] {
    const scalar_t* x = pre.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* c = cells.const_data_ptr<int64_t>();
    const uint8_t* t = table.const_data_ptr<uint8_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_neurons(batch, neurons, [&](int64_t b, int64_t n0, int64_t n1) {
      const int64_t i = b * neurons + n0;
      act::apply_table(t + c[b] * neurons + n0, x + i, g != nullptr ? g + i : nullptr, n1 - n0,
                       o + i);
    });
  });
  return out;
}

// A learnable map backward's inputs, checked: pre [B, N] float, cells [B], the table cell-major,
// grad like pre; all contiguous.
struct SwitchInputs {
  at::Tensor grad, pre, cells, table;
  int64_t batch, neurons;
};

SwitchInputs checked_switch_inputs(const at::Tensor& grad_in, const at::Tensor& pre_in,
                                   const at::Tensor& cells_in, const at::Tensor& table_in,
                                   const char* op) {
  const at::Tensor pre = checked_pre(pre_in, op);
  const int64_t batch = pre.size(0), neurons = pre.size(1);
  TORCH_CHECK_VALUE(grad_in.sizes() == pre.sizes() && grad_in.scalar_type() == pre.scalar_type(),
                    op, ": grad must match pre");
  return {grad_in.contiguous(), pre, checked_cells(cells_in, batch, op),
          cell_major_table(table_in, neurons), batch, neurons};
}

// --- hashing and hit counts --------------------------------------------------------------------

}  // namespace

at::Tensor activation(const at::Tensor& x, int64_t fn) {
  check_float(x, "x");
  return apply_one(x, nullptr, checked_fn(fn));
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& x, int64_t fn) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
                    "activation_backward: grad must match x in shape and dtype");
  return apply_one(x, &grad, checked_fn(fn));
}

at::Tensor activation_map(const at::Tensor& pre, const at::Tensor& cells,
                              const at::Tensor& table) {
  return map_table(pre, cells, table, nullptr, "activation_map");
}

at::Tensor activation_map_backward(const at::Tensor& grad, const at::Tensor& pre,
                                       const at::Tensor& cells, const at::Tensor& table) {
  return map_table(pre, cells, table, &grad, "activation_map_backward");
}

std::tuple<at::Tensor, at::Tensor> learnable_map_backward(const at::Tensor& grad_in,
                                                          const at::Tensor& pre_in,
                                                          const at::Tensor& cells_in,
                                                          const at::Tensor& table_in) {
  const SwitchInputs in =
      checked_switch_inputs(grad_in, pre_in, cells_in, table_in, "learnable_map_backward");
  const int64_t batch = in.batch, neurons = in.neurons;
  at::Tensor grad_pre = at::empty_like(in.pre);
  // Cell-major [64, 12, N], the layout of a learnable map's logits: autograd takes it as is.
  at::Tensor grad_logits = at::zeros({kCells, act::kNumFns, neurons}, in.pre.options());
  AT_DISPATCH_FLOATING_TYPES(in.pre.scalar_type(), "learnable_map_backward", [&] {
    const scalar_t* x = in.pre.const_data_ptr<scalar_t>();
    const scalar_t* g = in.grad.const_data_ptr<scalar_t>();
    const int64_t* c = in.cells.const_data_ptr<int64_t>();
    const uint8_t* t = in.table.const_data_ptr<uint8_t>();
    scalar_t* gx = grad_pre.mutable_data_ptr<scalar_t>();
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    for_neurons(batch, neurons, [&](int64_t b, int64_t n0, int64_t n1) {
      const int64_t i = b * neurons + n0;
      act::switch_backward(t + c[b] * neurons + n0, x + i, g + i, n1 - n0, gx + i,
                           gl + c[b] * act::kNumFns * neurons + n0, neurons);
    });
  });
  return {grad_pre, grad_logits.permute({2, 0, 1})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_map_backward(const at::Tensor& grad_in,
                                                                     const at::Tensor& pre_in,
                                                                     const at::Tensor& cells_in,
                                                                     const at::Tensor& table_in) {
  const SwitchInputs in =
      checked_switch_inputs(grad_in, pre_in, cells_in, table_in, "factored_map_backward");
  const int64_t batch = in.batch, neurons = in.neurons;
  at::Tensor grad_pre = at::empty_like(in.pre);
  // Function-major [12, N], the layout of a factored map's neuron logits: autograd takes it as is.
  at::Tensor grad_neurons = at::zeros({act::kNumFns, neurons}, in.pre.options());
  // Fixed chunks of neurons (not the threads' share), each with its own cell sums, added up in
  // chunk order: the cell logits' gradient does not depend on the number of threads.
  const int64_t chunk = std::max<int64_t>(1, kGrain / std::max<int64_t>(batch, 1));
  const int64_t chunks = neurons == 0 ? 0 : (neurons + chunk - 1) / chunk;
  at::Tensor partial = at::zeros({chunks, kCells, act::kNumFns}, in.pre.options());
  AT_DISPATCH_FLOATING_TYPES(in.pre.scalar_type(), "factored_map_backward", [&] {
    const scalar_t* x = in.pre.const_data_ptr<scalar_t>();
    const scalar_t* g = in.grad.const_data_ptr<scalar_t>();
    const int64_t* c = in.cells.const_data_ptr<int64_t>();
    const uint8_t* t = in.table.const_data_ptr<uint8_t>();
    scalar_t* gx = grad_pre.mutable_data_ptr<scalar_t>();
    scalar_t* gn = grad_neurons.mutable_data_ptr<scalar_t>();
    scalar_t* cell_sums = partial.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t part = first; part < last; ++part) {
        const int64_t n0 = part * chunk, n1 = std::min(neurons, n0 + chunk);
        scalar_t* sums = cell_sums + part * kCells * act::kNumFns;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t i = b * neurons + n0;
          act::switch_backward(t + c[b] * neurons + n0, x + i, g + i, n1 - n0, gx + i, gn + n0,
                               neurons, sums + c[b] * act::kNumFns);
        }
      }
    });
  });
  return {grad_pre, grad_neurons.t(), partial.sum(0)};
}

namespace {

// logits [N, 64, 12], float.
void check_map_logits(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) == kCells && t.size(2) == act::kNumFns, op, ": ",
                    name, " must be [neurons, 64, ", act::kNumFns, "], got ", t.sizes());
}

// [N, 64, 12] as cell-major [64, 12, N] (no copy when a view of one, as a learnable map's
// logits are).
at::Tensor cell_major(const at::Tensor& t) { return t.permute({1, 2, 0}).contiguous(); }

// body(cell) for every cell, in parallel: a cell's rows are a task's own.
template <class Body>
void for_cells(int64_t neurons, Body body) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(neurons * act::kNumFns, 1));
  at::parallel_for(0, kCells, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c);
  });
}

}  // namespace

at::Tensor map_argmax(const at::Tensor& logits_in) {
  check_map_logits(logits_in, "map_argmax", "logits");
  const at::Tensor logits = cell_major(logits_in);
  const int64_t neurons = logits_in.size(0);
  at::Tensor table = at::empty({kCells, neurons}, logits.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "map_argmax", [&] {
    const scalar_t* l = logits.const_data_ptr<scalar_t>();
    uint8_t* out = table.mutable_data_ptr<uint8_t>();
    for_cells(neurons, [&](int64_t c) {
      act::argmax_columns(l + c * act::kNumFns * neurons, neurons, neurons, out + c * neurons);
    });
  });
  return table.t();  // [N, 64], cell-major as the map kernels read it
}

at::Tensor factored_map_argmax(const at::Tensor& neuron_logits_in,
                               const at::Tensor& cell_logits_in, const at::Tensor& initial_in,
                               const at::Tensor& lead_in) {
  const char* op = "factored_map_argmax";
  check_float(neuron_logits_in, "neuron_logits");
  TORCH_CHECK_VALUE(neuron_logits_in.dim() == 2 && neuron_logits_in.size(1) == act::kNumFns, op,
                    ": neuron_logits must be [neurons, ", act::kNumFns, "], got ",
                    neuron_logits_in.sizes());
  const int64_t neurons = neuron_logits_in.size(0);
  TORCH_CHECK_TYPE(cell_logits_in.scalar_type() == neuron_logits_in.scalar_type(), op,
                   ": cell_logits must have neuron_logits' dtype");
  TORCH_CHECK_VALUE(cell_logits_in.dim() == 2 && cell_logits_in.size(0) == kCells &&
                        cell_logits_in.size(1) == act::kNumFns,
                    op, ": cell_logits must be [64, ", act::kNumFns, "], got ",
                    cell_logits_in.sizes());
  TORCH_CHECK_VALUE(lead_in.dim() == 0 && lead_in.scalar_type() == neuron_logits_in.scalar_type(),
                    op, ": lead must be a 0-dim tensor of neuron_logits' dtype");
  const at::Tensor initial = cell_major_table(initial_in, neurons);
  // Function-major [12, N] (no copy when a view of one, as a factored map's logits are).
  const at::Tensor neuron_logits = neuron_logits_in.t().contiguous();
  const at::Tensor cell_logits = cell_logits_in.contiguous();
  at::Tensor table = at::empty({kCells, neurons}, neuron_logits.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(neuron_logits.scalar_type(), "factored_map_argmax", [&] {
    const scalar_t* a = neuron_logits.const_data_ptr<scalar_t>();
    const scalar_t* b = cell_logits.const_data_ptr<scalar_t>();
    const uint8_t* init = initial.const_data_ptr<uint8_t>();
    const auto lead = lead_in.item<scalar_t>();
    uint8_t* out = table.mutable_data_ptr<uint8_t>();
    for_cells(neurons, [&](int64_t c) {
      act::argmax_factored(a, neurons, b + c * act::kNumFns, init + c * neurons,
                           lead, neurons, out + c * neurons);
    });
  });
  return table.t();  // [N, 64], cell-major as the map kernels read it
}

at::Tensor simhash_cells(const at::Tensor& x_in, const at::Tensor& projections_in) {
  check_float(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 2, "simhash_cells: x must be [batch, features], got ",
                    x_in.sizes());
  TORCH_CHECK_VALUE(projections_in.dim() == 2 && projections_in.size(0) == kHashBits &&
                        projections_in.size(1) == x_in.size(1),
                    "simhash_cells: projections must be [", kHashBits, ", ", x_in.size(1),
                    "], got ", projections_in.sizes());
  TORCH_CHECK_TYPE(projections_in.scalar_type() == x_in.scalar_type(),
                   "simhash_cells: projections must have x's dtype");
  const at::Tensor x = x_in.contiguous(), projections = projections_in.contiguous();
  const int64_t batch = x.size(0), features = x.size(1);
  at::Tensor cells = at::empty({batch}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "simhash_cells", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* pp = projections.const_data_ptr<scalar_t>();
    int64_t* out = cells.mutable_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(features, 1));
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      act::simhash(xp + b0 * features, b1 - b0, features, pp, kHashBits, out + b0);
    });
  });
  return cells;
}

// hits[n, c] += the number of samples in cell c, for every neuron n (each neuron sees every
// sample): only the cells that were hit are touched, row by row (cache lines in order).
void count_hits(at::Tensor& hits, const at::Tensor& cells_in) {
  TORCH_CHECK_TYPE(hits.scalar_type() == at::kLong, "count_hits_: hits must be int64");
  TORCH_CHECK_VALUE(hits.dim() == 2 && hits.size(1) == kCells && hits.is_contiguous(),
                    "count_hits_: hits must be contiguous [neurons, 64], got ", hits.sizes());
  TORCH_CHECK_VALUE(cells_in.dim() == 1, "count_hits_: cells must be [batch]");
  const at::Tensor cells = checked_cells(cells_in, cells_in.size(0), "count_hits_");
  std::array<int64_t, kCells> counts{};
  const int64_t* c = cells.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < cells.size(0); ++b) ++counts[static_cast<size_t>(c[b])];
  std::array<int64_t, kCells> hit{};
  int64_t num_hit = 0;
  for (int64_t cell = 0; cell < kCells; ++cell) {
    if (counts[static_cast<size_t>(cell)] > 0) hit[static_cast<size_t>(num_hit++)] = cell;
  }
  int64_t* h = hits.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < hits.size(0); ++n) {
    int64_t* row = h + n * kCells;
    for (int64_t i = 0; i < num_hit; ++i) {
      const auto cell = static_cast<size_t>(hit[static_cast<size_t>(i)]);
      row[cell] += counts[cell];
    }
  }
}

}  // namespace spatium::cpu
