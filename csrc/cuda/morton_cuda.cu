// CUDA kernels of the Morton ops (morton_encode, morton_decode). The bit tricks are the
// constexpr ones of csrc/core/morton.h (device-callable with --expt-relaxed-constexpr).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare
// toolkit (nvcc + runtime) lacks, and these kernels need none of it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "core/morton.h"
#include "kernels.h"
#include "morton_checks.h"

namespace spatium::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // the kernels stride over the rest

int blocks_for(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

// Records the smallest failing index; the host reads it back once after the kernel.
__device__ void note_bad(unsigned long long* first_bad, int64_t i) {
  atomicMin(first_bad, static_cast<unsigned long long>(i));
}

template <class T>
__global__ void encode_kernel(const T* __restrict__ xyz, int64_t* __restrict__ codes, int64_t n,
                              unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const auto x = static_cast<uint64_t>(xyz[3 * i]);
    const auto y = static_cast<uint64_t>(xyz[3 * i + 1]);
    const auto z = static_cast<uint64_t>(xyz[3 * i + 2]);
    if ((x | y | z) > morton::kMaxCoord) note_bad(first_bad, i);
    codes[i] = static_cast<int64_t>(morton::spread3(x) | (morton::spread3(y) << 1) |
                                    (morton::spread3(z) << 2));
  }
}

__global__ void decode_kernel(const int64_t* __restrict__ codes, int64_t* __restrict__ xyz,
                              int64_t n, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const auto c = static_cast<uint64_t>(codes[i]);
    if (c >= morton::kCodeLimit) note_bad(first_bad, i);
    xyz[3 * i] = static_cast<int64_t>(morton::compact3(c));
    xyz[3 * i + 1] = static_cast<int64_t>(morton::compact3(c >> 1));
    xyz[3 * i + 2] = static_cast<int64_t>(morton::compact3(c >> 2));
  }
}

// A device flag initialised to n: no failure unless a kernel lowers it.
at::Tensor failure_flag(const at::Tensor& like, int64_t n) {
  return at::full({1}, n, like.options().dtype(at::kLong));
}

}  // namespace

at::Tensor morton_encode(const at::Tensor& xyz_in) {
  const at::Tensor xyz = encode_input(xyz_in);
  const c10::cuda::CUDAGuard guard(xyz.device());
  const int64_t n = xyz.size(0);
  at::Tensor codes = at::empty({n}, xyz.options().dtype(at::kLong));
  if (n == 0) return codes;
  at::Tensor flag = failure_flag(xyz, n);
  auto* bad = reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (xyz.scalar_type() == at::kInt) {
    encode_kernel<<<blocks_for(n), kThreads, 0, stream>>>(xyz.const_data_ptr<int32_t>(),
                                                          codes.mutable_data_ptr<int64_t>(), n, bad);
  } else {
    encode_kernel<<<blocks_for(n), kThreads, 0, stream>>>(xyz.const_data_ptr<int64_t>(),
                                                          codes.mutable_data_ptr<int64_t>(), n, bad);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t first_bad = flag.item<int64_t>();
  if (first_bad < n) throw_bad_position(xyz, first_bad);
  return codes;
}

at::Tensor morton_decode(const at::Tensor& codes_in) {
  const at::Tensor codes = decode_input(codes_in);
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n = codes.size(0);
  at::Tensor xyz = at::empty({n, 3}, codes.options());
  if (n == 0) return xyz;
  at::Tensor flag = failure_flag(codes, n);
  decode_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      codes.const_data_ptr<int64_t>(), xyz.mutable_data_ptr<int64_t>(), n,
      reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t first_bad = flag.item<int64_t>();
  if (first_bad < n) throw_bad_code(codes, first_bad);
  return xyz;
}

}  // namespace spatium::cuda
