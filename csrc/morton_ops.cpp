// Schemas and CPU impls of the Morton ops: spatium::morton_encode, spatium::morton_decode.
#include "morton_ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <set>

#include "core/morton.h"

namespace spatium {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;  // positions per parallel task

bool is_integer(const at::Tensor& t) {
  return at::isIntegralType(t.scalar_type(), /*includeBool=*/false);
}

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

at::Tensor morton_encode_cpu(const at::Tensor& xyz_in) {
  const at::Tensor xyz = encode_input(xyz_in);
  at::Tensor codes = at::empty({xyz.size(0)}, xyz.options().dtype(at::kLong));
  const int64_t bad = xyz.scalar_type() == at::kInt ? encode_cpu<int32_t>(xyz, codes)
                                                    : encode_cpu<int64_t>(xyz, codes);
  if (bad < xyz.size(0)) throw_bad_position(xyz, bad);
  return codes;
}

at::Tensor morton_decode_cpu(const at::Tensor& codes_in) {
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

}  // namespace

at::Tensor encode_input(const at::Tensor& xyz) {
  TORCH_CHECK_VALUE(xyz.dim() == 2 && xyz.size(1) == 3,
                    "morton_encode: expected positions of shape [N, 3], got ", xyz.sizes());
  TORCH_CHECK_TYPE(is_integer(xyz), "morton_encode: expected an integer tensor, got ",
                   xyz.scalar_type());
  const bool native = xyz.scalar_type() == at::kInt || xyz.scalar_type() == at::kLong;
  return (native ? xyz : xyz.to(at::kLong)).contiguous();
}

at::Tensor decode_input(const at::Tensor& codes) {
  TORCH_CHECK_VALUE(codes.dim() == 1, "morton_decode: expected codes of shape [N], got ",
                    codes.sizes());
  TORCH_CHECK_TYPE(is_integer(codes), "morton_decode: expected an integer tensor, got ",
                   codes.scalar_type());
  return codes.to(at::kLong).contiguous();
}

void throw_bad_position(const at::Tensor& xyz, int64_t row) {
  const at::Tensor values = xyz[row].to(at::kCPU, at::kLong);
  const int64_t* v = values.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(false, "morton_encode: coordinates must be in [0, ", morton::kMaxCoord,
                    "], got (", v[0], ", ", v[1], ", ", v[2], ") at row ", row);
}

void throw_bad_code(const at::Tensor& codes, int64_t index) {
  TORCH_CHECK_VALUE(false, "morton_decode: codes must be in [0, 2^", morton::kCodeBits,
                    "), got ", codes[index].item<int64_t>(), " at index ", index);
}

TORCH_LIBRARY(spatium, m) {
  m.def("morton_encode(Tensor xyz) -> Tensor");
  m.def("morton_decode(Tensor codes) -> Tensor");
  m.def("_threads_used_by_parallel_for(int work_items) -> int", &threads_used_by_parallel_for);
}

TORCH_LIBRARY_IMPL(spatium, CPU, m) {
  m.impl("morton_encode", &morton_encode_cpu);
  m.impl("morton_decode", &morton_decode_cpu);
}

}  // namespace spatium
