// Activation-map kernels: a learnable map's backward (every function's value per element, the
// switch gains, and for a factored map their sums per cell) and the argmax that turns logits
// into a table, full and factored, at the size of a 256-neuron layer and a batch of 64.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "core/activation_kernels.h"

namespace spatium::act {
namespace {

constexpr int64_t kNeurons = 256, kBatch = 64, kCells = 64;

// ns_per_call: the time of one call (the results script reports it).
void report_calls(benchmark::State& state) {
  state.counters["ns_per_call"] = benchmark::Counter(
      static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

std::vector<float> normal(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// One backward of a batch: every sample's row of neurons, through the functions of `fns`
// (relu everywhere, or any of the 12), gains into per-neuron rows (a factored map's layout) and,
// when Totals, per-cell sums. ns per call (kBatch x kNeurons elements).
template <bool Mixed, bool Totals>
void BM_SwitchBackward(benchmark::State& state) {
  const auto x = normal(kBatch * kNeurons, 1), grad = normal(kBatch * kNeurons, 2);
  std::vector<uint8_t> fns(kBatch * kNeurons, 0);
  std::mt19937 rng(3);
  if (Mixed) {
    for (auto& f : fns) f = static_cast<uint8_t>(rng() % kNumFns);
  }
  std::vector<float> grad_x(x.size()), gains(kNumFns * kNeurons), totals(kCells * kNumFns);
  for (auto _ : state) {
    for (int64_t b = 0; b < kBatch; ++b) {
      const int64_t i = b * kNeurons;
      switch_backward(fns.data() + i, x.data() + i, grad.data() + i, kNeurons, grad_x.data() + i,
                      gains.data(), kNeurons,
                      Totals ? totals.data() + (b % kCells) * kNumFns : nullptr);
    }
    benchmark::DoNotOptimize(gains.data());
    benchmark::ClobberMemory();
  }
  report_calls(state);
}
BENCHMARK(BM_SwitchBackward<false, false>)->Name("switch_backward_64x256/relu");
BENCHMARK(BM_SwitchBackward<true, false>)->Name("switch_backward_64x256/mixed");
BENCHMARK(BM_SwitchBackward<true, true>)->Name("switch_backward_64x256/mixed_with_cell_sums");

// The table of a whole map (64 cells x kNeurons): full logits (function-major per cell) or
// factored ones (neuron logits, a cell's logits and the initial functions). ns per call.
void BM_ArgmaxFull(benchmark::State& state) {
  const auto logits = normal(kCells * kNumFns * kNeurons, 4);
  std::vector<uint8_t> table(kCells * kNeurons);
  for (auto _ : state) {
    for (int64_t c = 0; c < kCells; ++c) {
      argmax_columns(logits.data() + c * kNumFns * kNeurons, kNeurons, kNeurons,
                     table.data() + c * kNeurons);
    }
    benchmark::DoNotOptimize(table.data());
  }
  report_calls(state);
}
BENCHMARK(BM_ArgmaxFull)->Name("map_argmax_256_neurons/full");

void BM_ArgmaxFactored(benchmark::State& state) {
  const auto neuron = normal(kNumFns * kNeurons, 5), cell = normal(kCells * kNumFns, 6);
  std::vector<uint8_t> initial(kCells * kNeurons), table(kCells * kNeurons);
  std::mt19937 rng(7);
  for (auto& f : initial) f = static_cast<uint8_t>(rng() % kNumFns);
  for (auto _ : state) {
    for (int64_t c = 0; c < kCells; ++c) {
      argmax_factored(neuron.data(), kNeurons, cell.data() + c * kNumFns,
                      initial.data() + c * kNeurons, 4.0f, kNeurons, table.data() + c * kNeurons);
    }
    benchmark::DoNotOptimize(table.data());
  }
  report_calls(state);
}
BENCHMARK(BM_ArgmaxFactored)->Name("map_argmax_256_neurons/factored");

}  // namespace
}  // namespace spatium::act
