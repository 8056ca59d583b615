// CPU kernels of the Morton ops (morton_encode, morton_decode), in parallel over positions.
#include <ATen/Parallel.h>

#include <atomic>
#include <mutex>
#include <set>

#include "core/morton.h"
#include "kernels.h"
#include "morton_checks.h"

namespace spatium::cpu {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;  // positions per parallel task

// Lowers `first` to `candidate` if smaller: the first failure across parallel tasks.
void keep_min(std::atomic<int64_t>& first, int64_t candidate) {
  int64_t seen = first.load();
  while (candidate < seen && !first.compare_exchange_weak(seen, candidate)) {
  }
}

template <class T>
int64_t encode_cpu(const at::Tensor& xyz, at::Tensor& codes) {
  const int64_t n = xyz.size(0);
  const T* in = xyz.const_data_ptr<T>();
  int64_t* out = codes.mutable_data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const auto count = static_cast<size_t>(end - begin);
    const size_t bad = morton::encode_batch(in + 3 * begin, out + begin, count);
    if (bad != count) keep_min(first_bad, begin + static_cast<int64_t>(bad));
  });
  return first_bad.load();
}

}  // namespace

at::Tensor morton_encode(const at::Tensor& xyz_in) {
  const at::Tensor xyz = encode_input(xyz_in);
  at::Tensor codes = at::empty({xyz.size(0)}, xyz.options().dtype(at::kLong));
  const int64_t bad = xyz.scalar_type() == at::kInt ? encode_cpu<int32_t>(xyz, codes)
                                                    : encode_cpu<int64_t>(xyz, codes);
  if (bad < xyz.size(0)) throw_bad_position(xyz, bad);
  return codes;
}

at::Tensor morton_decode(const at::Tensor& codes_in) {
  const at::Tensor codes = decode_input(codes_in);
  const int64_t n = codes.size(0);
  at::Tensor xyz = at::empty({n, 3}, codes.options());
  const int64_t* in = codes.const_data_ptr<int64_t>();
  int64_t* out = xyz.mutable_data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const auto count = static_cast<size_t>(end - begin);
    const size_t bad = morton::decode_batch(in + begin, out + 3 * begin, count);
    if (bad != count) keep_min(first_bad, begin + static_cast<int64_t>(bad));
  });
  if (first_bad.load() < n) throw_bad_code(codes, first_bad.load());
  return xyz;
}

// Test hook: how many distinct threads at::parallel_for really ran `work_items` tasks on. It is
// 1 when the extension was built without OpenMP even if torch has several threads.
int64_t threads_used_by_parallel_for(int64_t work_items) {
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, work_items, 1, [&](int64_t, int64_t) {
    const std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(threads.size());
}

}  // namespace spatium::cpu
