// The spatial memory's kernels: one neuron's forward over 128 inputs (the seed's unit), a
// 1024 x 1024 layer forward at batch 1 (one thread), and re-quantizing it.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "core/cpu_features.h"
#include "core/inference_pack.h"
#include "core/morton.h"
#include "core/spatial_memory.h"

namespace spatium {
namespace {

std::vector<float> gaussian_weights(int64_t count) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> weights(static_cast<size_t>(count));
  for (auto& w : weights) w = normal(rng);
  return weights;
}

SpatialMemory dense_memory(int64_t out, int64_t in, int bits, int region_bits) {
  std::vector<uint64_t> codes(static_cast<size_t>(in));
  std::iota(codes.begin(), codes.end(), uint64_t{0});
  SpatialMemory memory(out, std::move(codes), bits, region_bits);
  std::vector<uint8_t> mask(static_cast<size_t>(out * memory.num_regions()), 1);
  memory.set_active(mask.data());
  memory.quantize_rows(0, out, gaussian_weights(out * in).data(), in);
  return memory;
}

// A memory like a sparse layer's local start: neuron n holds the `active` regions (cells of the
// input space) nearest a random point of it, quantized from Gaussian weights.
SpatialMemory local_memory(int64_t out, int64_t in, int bits, int region_bits, int64_t active) {
  std::vector<uint64_t> codes(static_cast<size_t>(in));
  std::iota(codes.begin(), codes.end(), uint64_t{0});
  SpatialMemory memory(out, std::move(codes), bits, region_bits);
  const int64_t regions = memory.num_regions();
  std::vector<std::array<float, 3>> centres(static_cast<size_t>(regions));
  for (int64_t r = 0; r < regions; ++r) {
    const morton::Position p = morton::decode(memory.region_key(r) << region_bits);
    centres[r] = {static_cast<float>(p.x), static_cast<float>(p.y), static_cast<float>(p.z)};
  }
  const morton::Position corner = morton::decode(static_cast<uint64_t>(in - 1));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> unit;
  std::vector<uint8_t> mask(static_cast<size_t>(out * regions), 0);
  std::vector<int64_t> nearest(static_cast<size_t>(regions));
  std::vector<float> distance(static_cast<size_t>(regions));
  // Neurons in the Morton order of their points, as a layer places them.
  std::vector<std::pair<uint64_t, std::array<float, 3>>> points(static_cast<size_t>(out));
  for (auto& [code, point] : points) {
    point = {unit(rng) * corner.x, unit(rng) * corner.y, unit(rng) * corner.z};
    code = morton::encode(static_cast<uint16_t>(point[0]), static_cast<uint16_t>(point[1]),
                          static_cast<uint16_t>(point[2]));
  }
  std::sort(points.begin(), points.end());
  for (int64_t n = 0; n < out; ++n) {
    const auto [x, y, z] = points[n].second;
    for (int64_t r = 0; r < regions; ++r) {
      const auto& c = centres[r];
      distance[r] = (c[0] - x) * (c[0] - x) + (c[1] - y) * (c[1] - y) + (c[2] - z) * (c[2] - z);
    }
    std::iota(nearest.begin(), nearest.end(), int64_t{0});
    std::partial_sort(nearest.begin(), nearest.begin() + active, nearest.end(),
                      [&](int64_t a, int64_t b) { return distance[a] < distance[b]; });
    for (int64_t k = 0; k < active; ++k) mask[n * regions + nearest[k]] = 1;
  }
  memory.set_active(mask.data());
  memory.quantize_rows(0, out, gaussian_weights(out * in).data(), in);
  return memory;
}

// Items are weights; ns_per_call is the time of one call (the results script reports it).
void report_calls(benchmark::State& state, int64_t weights) {
  state.SetItemsProcessed(state.iterations() * weights);
  state.counters["ns_per_call"] = benchmark::Counter(
      static_cast<double>(state.iterations()),
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// Args: bits, neurons, inputs.
// The float path's decode: dense fp32 rows from the codes (what each panel of a batched
// forward or backward costs before the matrix product).
void BM_Dequantize(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const int64_t out = state.range(1), in = state.range(2);
  const SpatialMemory memory = dense_memory(out, in, bits, 6);
  const PackedView view = memory.view();
  std::vector<float> dense(static_cast<size_t>(out * in));
  for (auto _ : state) {
    view.dequantize_rows(0, out, dense.data(), in);
    benchmark::DoNotOptimize(dense.data());
    benchmark::ClobberMemory();
  }
  report_calls(state, out * in);
}

void BM_Forward(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const int64_t out = state.range(1), in = state.range(2);
  const SpatialMemory memory = dense_memory(out, in, bits, 6);
  const PackedView view = memory.view();
  std::vector<float> x(static_cast<size_t>(in), 0.5f), y(static_cast<size_t>(out));
  std::vector<float> scratch(static_cast<size_t>(view.scratch_floats(1)));
  for (auto _ : state) {
    view.linear_rows(0, out, x.data(), 1, in, y.data(), out, scratch.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  report_calls(state, out * in);
}

// The integer kernels on `isa` (the best this CPU runs, or AVX2), activations quantized
// inside the loop. Args: bits, neurons, inputs, batch, and the share of regions each neuron
// holds in percent (100: dense; less: a local layout). Items: the dense layer's multiply-adds.
void BM_IntegerForward(benchmark::State& state, InferencePack::Isa isa) {
  const cpu::Features& f = cpu::features();
  const bool runs = isa == InferencePack::Isa::kAvx2 ? f.avx2 && f.fma_f16c : f.avx512_vnni;
  if (!runs) {
    state.SkipWithError("this CPU does not run these kernels");
    return;
  }
  const int bits = static_cast<int>(state.range(0));
  const int64_t out = state.range(1), in = state.range(2), batch = state.range(3);
  const int64_t percent = state.range(4);
  const int64_t regions = in >> 6;
  const SpatialMemory memory = percent == 100
                                   ? dense_memory(out, in, bits, 6)
                                   : local_memory(out, in, bits, 6, regions * percent / 100);
  const InferencePack pack(memory.view());
  std::vector<float> x(static_cast<size_t>(batch * in), 0.5f), y(static_cast<size_t>(batch * out));
  InferencePack::Rows rows;
  for (auto _ : state) {
    if (!pack.quantize(x.data(), batch, in, rows, isa)) {
      state.SkipWithError("non-finite input");
      break;
    }
    pack.linear_groups(0, pack.groups(), rows, nullptr, y.data(), out, isa);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  report_calls(state, batch * out * in);
  state.counters["pack_bytes"] = static_cast<double>(pack.bytes());
}

#if defined(__x86_64__)
// What the VNNI unit does with nothing else to do: independent chains of vpdpbusd, more than
// its latency covers, so one issues every cycle the unit allows. The integer kernels' rate over
// this is their efficiency; an empty asm keeps each sum in its register and the loop as written.
[[gnu::target("avx512f,avx512bw,avx512vnni")]] int64_t vnni_products(int64_t repeats) {
  constexpr int kChains = 12;
  __m512i sums[kChains];  // every loop over it unrolled, so the sums live in registers
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) sums[c] = _mm512_set1_epi32(c);
  const __m512i codes = _mm512_set1_epi8(3), activations = _mm512_set1_epi8(-2);
  for (int64_t i = 0; i < repeats; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) {
      sums[c] = _mm512_dpbusd_epi32(sums[c], codes, activations);
      __asm__ volatile("" : "+v"(sums[c]));
    }
  }
  int64_t total = 0;
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) total += _mm512_reduce_add_epi32(sums[c]);
  return total;
}
#endif

// Items are multiply-adds (64 a vpdpbusd), 50.3 million a call.
void BM_VnniPeak(benchmark::State& state) {
  constexpr int64_t kRepeats = 1 << 16, kProducts = 12 * 64;
#if defined(__x86_64__)
  if (!cpu::features().avx512_vnni) {
    state.SkipWithError("this CPU has no AVX-512 VNNI");
    return;
  }
  for (auto _ : state) benchmark::DoNotOptimize(vnni_products(kRepeats));
  report_calls(state, kRepeats * kProducts);
#else
  state.SkipWithError("x86-64 only");
#endif
}

void BM_Requantize(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const int64_t out = state.range(1), in = state.range(2);
  SpatialMemory memory = dense_memory(out, in, bits, 6);
  const std::vector<float> latent = gaussian_weights(out * in);
  for (auto _ : state) {
    memory.quantize_rows(0, out, latent.data(), in);
    benchmark::ClobberMemory();
  }
  report_calls(state, out * in);
}

void bit_widths(benchmark::internal::Benchmark* b, int64_t out, int64_t in) {
  for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, out, in});
}

BENCHMARK(BM_Forward)->Name("neuron_forward_128")->Apply([](auto* b) { bit_widths(b, 1, 128); });
BENCHMARK(BM_Forward)->Name("layer_forward_1024x1024_batch1")->Apply([](auto* b) {
  bit_widths(b, 1024, 1024);
});
BENCHMARK_CAPTURE(BM_IntegerForward, vnni, InferencePack::Isa::kAvx512Vnni)
    ->Name("integer_forward_1024x1024_batch1")
    ->Apply([](auto* b) { for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, 1024, 1024, 1, 100}); });
BENCHMARK_CAPTURE(BM_IntegerForward, vnni, InferencePack::Isa::kAvx512Vnni)
    ->Name("integer_forward_1024x1024_batch32")
    ->Apply([](auto* b) { for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, 1024, 1024, 32, 100}); });
BENCHMARK_CAPTURE(BM_IntegerForward, vnni, InferencePack::Isa::kAvx512Vnni)
    ->Name("integer_forward_1024x1024_batch256")
    ->Apply([](auto* b) { for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, 1024, 1024, 256, 100}); });
BENCHMARK_CAPTURE(BM_IntegerForward, vnni, InferencePack::Isa::kAvx512Vnni)
    ->Name("integer_forward_4bit")
    ->Apply([](auto* b) {
      for (int64_t size : {1024, 4096}) {
        for (int64_t batch : {1, 32, 256}) {
          for (int64_t percent : {100, 25}) b->Args({4, size, size, batch, percent});
        }
      }
    });
BENCHMARK_CAPTURE(BM_IntegerForward, avx2, InferencePack::Isa::kAvx2)
    ->Name("integer_forward_avx2_1024x1024_batch1")
    ->Apply([](auto* b) { for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, 1024, 1024, 1, 100}); });
BENCHMARK_CAPTURE(BM_IntegerForward, avx2, InferencePack::Isa::kAvx2)
    ->Name("integer_forward_avx2_1024x1024_batch32")
    ->Apply([](auto* b) { for (int64_t bits : {1, 2, 4, 8}) b->Args({bits, 1024, 1024, 32, 100}); });
BENCHMARK(BM_VnniPeak)->Name("vnni_peak");
BENCHMARK(BM_Dequantize)->Name("dequantize_1024x1024")->Apply([](auto* b) {
  bit_widths(b, 1024, 1024);
});
BENCHMARK(BM_Requantize)->Name("requantize_1024x1024")->Apply([](auto* b) {
  bit_widths(b, 1024, 1024);
  b->Args({quant::kNf4, 1024, 1024});  // the format, where the others give the width
});

}  // namespace
}  // namespace spatium
