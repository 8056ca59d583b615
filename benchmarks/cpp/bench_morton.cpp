// Morton encode/decode: one position per call (scalar) and whole arrays (batch), per path.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "core/morton.h"

namespace spatium::morton {
namespace {

constexpr size_t kPositions = 4096;  // a power of two: index with a mask

std::vector<int64_t> random_xyz() {
  std::mt19937_64 rng(42);
  std::vector<int64_t> xyz(3 * kPositions);
  for (auto& v : xyz) v = static_cast<int64_t>(rng() & 0xFFFF);
  return xyz;
}

std::vector<int64_t> random_codes() {
  std::mt19937_64 rng(43);
  std::vector<int64_t> codes(kPositions);
  for (auto& c : codes) c = static_cast<int64_t>(rng() & (kCodeLimit - 1));
  return codes;
}

// Scalar: one call per iteration; DoNotOptimize keeps the compiler from batching calls.
template <uint64_t (*Encode)(uint16_t, uint16_t, uint16_t)>
void BM_EncodeScalar(benchmark::State& state) {
  const auto xyz = random_xyz();
  size_t i = 0;
  for (auto _ : state) {
    const int64_t* p = &xyz[3 * (i++ & (kPositions - 1))];
    benchmark::DoNotOptimize(Encode(static_cast<uint16_t>(p[0]), static_cast<uint16_t>(p[1]),
                                    static_cast<uint16_t>(p[2])));
  }
  state.SetItemsProcessed(state.iterations());
}

template <Position (*Decode)(uint64_t)>
void BM_DecodeScalar(benchmark::State& state) {
  const auto codes = random_codes();
  size_t i = 0;
  for (auto _ : state) {
    // Field by field: keeping the whole 6-byte struct makes the compiler reload it with a wider
    // load than its stores, a store-forwarding stall that would dominate the figure.
    const Position p = Decode(static_cast<uint64_t>(codes[i++ & (kPositions - 1)]));
    benchmark::DoNotOptimize(p.x);
    benchmark::DoNotOptimize(p.y);
    benchmark::DoNotOptimize(p.z);
  }
  state.SetItemsProcessed(state.iterations());
}

uint64_t encode_portable(uint16_t x, uint16_t y, uint16_t z) { return encode(x, y, z); }
Position decode_portable(uint64_t c) { return decode(c); }

bool skip_unavailable(benchmark::State& state, Impl impl) {
  if (available(impl)) return false;
  state.SkipWithError("not available on this CPU");
  return true;
}

void BM_EncodeBatch(benchmark::State& state) {
  const auto impl = static_cast<Impl>(state.range(0));
  if (skip_unavailable(state, impl)) return;
  const auto xyz = random_xyz();
  std::vector<int64_t> codes(kPositions);
  for (auto _ : state) {
    benchmark::DoNotOptimize(encode_batch(xyz.data(), codes.data(), kPositions, impl));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kPositions);
  state.SetLabel(name(impl));
}

void BM_DecodeBatch(benchmark::State& state) {
  const auto impl = static_cast<Impl>(state.range(0));
  if (skip_unavailable(state, impl)) return;
  const auto codes = random_codes();
  std::vector<int64_t> xyz(3 * kPositions);
  for (auto _ : state) {
    benchmark::DoNotOptimize(decode_batch(codes.data(), xyz.data(), kPositions, impl));
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kPositions);
  state.SetLabel(name(impl));
}

void all_impls(benchmark::internal::Benchmark* b) {
  for (Impl impl : kAllImpls) b->Arg(static_cast<int64_t>(impl));
}

BENCHMARK(BM_EncodeScalar<encode_portable>)->Name("morton_encode/scalar/portable");
BENCHMARK(BM_EncodeScalar<encode_bmi2>)->Name("morton_encode/scalar/bmi2");
BENCHMARK(BM_EncodeScalar<encode_point>)->Name("morton_encode/scalar/dispatched");
BENCHMARK(BM_DecodeScalar<decode_portable>)->Name("morton_decode/scalar/portable");
BENCHMARK(BM_DecodeScalar<decode_bmi2>)->Name("morton_decode/scalar/bmi2");
BENCHMARK(BM_DecodeScalar<decode_point>)->Name("morton_decode/scalar/dispatched");
BENCHMARK(BM_EncodeBatch)->Name("morton_encode/batch")->Apply(all_impls);
BENCHMARK(BM_DecodeBatch)->Name("morton_decode/batch")->Apply(all_impls);

}  // namespace
}  // namespace spatium::morton
