// Split-block bloom filter: insert and lookup, with the filter in cache (4 Ki keys, ~5 KB) and
// far out of it (64 Mi keys, ~80 MB), one key per call and in batches.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "core/bloom.h"

namespace spatium::bloom {
namespace {

constexpr size_t kProbeKeys = 1 << 16;  // a power of two: index with a mask
constexpr size_t kBatch = 4096;

std::vector<uint64_t> random_keys(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> keys(n);
  for (auto& k : keys) k = rng();
  return keys;
}

// A filter sized for `capacity` keys at 1% false positives, with kProbeKeys of them inserted,
// so half of the lookups below hit and half miss.
SplitBlockBloom make_filter(size_t capacity, Kernel kernel) {
  SplitBlockBloom filter = SplitBlockBloom::for_capacity(capacity, 0.01, kernel);
  const auto keys = random_keys(kProbeKeys, 1);
  filter.insert_batch(keys.data(), keys.size());
  return filter;
}

std::vector<uint64_t> mixed_probes() {
  auto probes = random_keys(kProbeKeys, 1);  // the inserted keys...
  const auto absent = random_keys(kProbeKeys / 2, 2);
  for (size_t i = 0; i < absent.size(); ++i) probes[2 * i] = absent[i];  // ...half replaced
  return probes;
}

void label(benchmark::State& state, const SplitBlockBloom& filter) {
  state.SetLabel(std::to_string(filter.size_bytes() / 1024) + " KiB, " +
                 (filter.kernel() == Kernel::Avx2 ? "avx2" : "portable"));
}

SplitBlockBloom filter_for(const benchmark::State& state) {
  return make_filter(static_cast<size_t>(state.range(0)), static_cast<Kernel>(state.range(1)));
}

// One call per key; DoNotOptimize/ClobberMemory keep calls from being merged or dropped.
template <class Call>
void one_key_per_call(benchmark::State& state, const SplitBlockBloom& filter,
                      const std::vector<uint64_t>& keys, Call call) {
  size_t i = 0;
  for (auto _ : state) call(keys[i++ & (kProbeKeys - 1)]);
  state.SetItemsProcessed(state.iterations());
  label(state, filter);
}

// kBatch keys per call, walking through `keys`.
template <class Call>
void batch_per_call(benchmark::State& state, const SplitBlockBloom& filter,
                    const std::vector<uint64_t>& keys, Call call) {
  size_t offset = 0;
  for (auto _ : state) {
    call(keys.data() + offset);
    offset = (offset + kBatch) & (kProbeKeys - 1);
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  label(state, filter);
}

void BM_Lookup(benchmark::State& state) {
  const SplitBlockBloom filter = filter_for(state);
  one_key_per_call(state, filter, mixed_probes(),
                   [&](uint64_t key) { benchmark::DoNotOptimize(filter.might_contain(key)); });
}

void BM_LookupBatch(benchmark::State& state) {
  const SplitBlockBloom filter = filter_for(state);
  std::vector<uint8_t> out(kBatch);
  batch_per_call(state, filter, mixed_probes(), [&](const uint64_t* keys) {
    benchmark::DoNotOptimize(filter.might_contain_batch(keys, kBatch, out.data()));
  });
}

void BM_Insert(benchmark::State& state) {
  SplitBlockBloom filter = filter_for(state);
  one_key_per_call(state, filter, random_keys(kProbeKeys, 3), [&](uint64_t key) {
    filter.insert(key);
    benchmark::ClobberMemory();
  });
}

void BM_InsertBatch(benchmark::State& state) {
  SplitBlockBloom filter = filter_for(state);
  batch_per_call(state, filter, random_keys(kProbeKeys, 3), [&](const uint64_t* keys) {
    filter.insert_batch(keys, kBatch);
    benchmark::ClobberMemory();
  });
}

constexpr int64_t kInCache = 4096;
constexpr int64_t kOutOfCache = int64_t{1} << 26;

void sizes_and_kernels(benchmark::internal::Benchmark* b) {
  for (int64_t capacity : {kInCache, kOutOfCache}) {
    for (Kernel kernel : {Kernel::Portable, Kernel::Auto}) {
      b->Args({capacity, static_cast<int64_t>(kernel)});
    }
  }
}

BENCHMARK(BM_Lookup)->Name("bloom_lookup/scalar")->Apply(sizes_and_kernels);
BENCHMARK(BM_LookupBatch)->Name("bloom_lookup/batch")->Apply(sizes_and_kernels);
BENCHMARK(BM_Insert)->Name("bloom_insert/scalar")->Apply(sizes_and_kernels);
BENCHMARK(BM_InsertBatch)->Name("bloom_insert/batch")->Apply(sizes_and_kernels);

}  // namespace
}  // namespace spatium::bloom
