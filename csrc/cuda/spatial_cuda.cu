// CUDA kernels of the spatial-memory ops (declared in kernels.h): spatial_linear, its input
// gradient, dequantize and active_mask. requantize_ keeps its reference impl for now.
//
// Every op first validates the store as the CPU kernels do (store_checks.h, on a host copy of
// the small index arrays); the kernels then trust the layout. spatial_linear runs batches of up
// to kMaxFusedBatch float32 rows straight from the codes (one warp per neuron, each code read
// once, inactive blocks skipped, the dense weight never built); larger batches, float64 and the
// input gradient dequantize into a workspace and multiply with at::mm (cuBLAS).
//
// The per-code arithmetic is csrc/core's (quant::code_bytes, from_stored, the kNf4 levels; PackedView's bitmap
// walk), device-callable with --expt-relaxed-constexpr. Only c10/cuda headers, as in
// morton_cuda.cu: the matmuls go through at::mm on device tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "core/packed_view.h"
#include "core/quantize.h"
#include "kernels.h"
#include "store_checks.h"

namespace spatium::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// One CTA per directory entry, one warp per neuron: the entry gives the CTA's first cursor and
// the warps' own block counts give the others (a prefix in shared memory, no serial walk).
constexpr int kWarps = static_cast<int>(kDirectoryStride);
constexpr int kThreads = kWarps * kWarp;
// Up to this many float32 rows, spatial_linear runs from the codes; above, a dense workspace
// and cuBLAS amortize better.
constexpr int64_t kMaxFusedBatch = 16;

template <class T>
__device__ T warp_sum(T value) {
  for (int step = kWarp / 2; step > 0; step /= 2) value += __shfl_xor_sync(kFullMask, value, step);
  return value;
}

__device__ float scale_of(const PackedView& v, int64_t block) {
  return __half2float(__ushort_as_half(__ldg(v.scales + block)));
}

// The neuron of this thread's warp, and whether it exists (the last CTA may have spare warps).
__device__ int64_t warp_neuron() {
  return int64_t{blockIdx.x} * kWarps + static_cast<int64_t>(threadIdx.x / kWarp);
}

// The cursor (first block, first code byte) of this warp's neuron: the directory entry of the
// CTA plus the blocks and bytes of the warps before it. Every thread of the CTA must call it
// (it synchronizes the CTA).
__device__ PackedView::Cursor warp_cursor(const PackedView& v, int64_t neuron, bool valid) {
  __shared__ int64_t blocks[kWarps];
  __shared__ int64_t bytes[kWarps];
  const int warp = static_cast<int>(threadIdx.x / kWarp);
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  int64_t count = 0, size = 0;
  if (valid) {
    for (int64_t r = lane; r < v.num_regions; r += kWarp) {
      if (v.is_active(neuron, r)) {
        ++count;
        size += v.region_bytes(r);
      }
    }
  }
  count = warp_sum(count);
  size = warp_sum(size);
  if (lane == 0) {
    blocks[warp] = count;
    bytes[warp] = size;
  }
  __syncthreads();
  PackedView::Cursor cursor{v.block_begin[blockIdx.x], v.code_begin[blockIdx.x]};
  for (int w = 0; w < warp; ++w) {
    cursor.block += blocks[w];
    cursor.offset += bytes[w];
  }
  return cursor;
}

// The kNf4 levels (quantize.h), where device code can index them.
__constant__ float kDeviceNf4Levels[16] = {SPATIUM_NF4_LEVELS};

// The value of a stored code before its block's scale, as quant::level on the host.
template <int Format>
__device__ float device_level(uint32_t stored) {
  if constexpr (Format == quant::kNf4) {
    return kDeviceNf4Levels[stored];
  } else if constexpr (Format == quant::kOdd2) {
    return static_cast<float>(quant::odd_code(2, static_cast<int>(stored)));
  } else {
    return static_cast<float>(quant::from_stored(Format, stored));
  }
}

// Calls visit(j, level) for this lane's codes of a block of `count` codes at `codes`: j = lane,
// lane + 32, ... Planar packing (quantize.h): code j is in byte j % q at bit (j / q) * bits, so
// lanes read consecutive bytes; (plane, byte) = (j / q, j % q) advances without a division.
template <int Format, class Visit>
__device__ void visit_lane_codes(const uint8_t* codes, uint32_t count, uint32_t lane,
                                 Visit&& visit) {
  constexpr int bits = quant::width(Format);
  constexpr uint32_t mask = (1u << bits) - 1u;
  const auto q = static_cast<uint32_t>(quant::code_bytes(bits, count));
  const uint32_t plane_step = kWarp / q, byte_step = kWarp % q;
  uint32_t plane = lane / q, byte = lane % q;
  for (uint32_t j = lane; j < count; j += kWarp) {
    const uint32_t stored = (__ldg(codes + byte) >> (plane * bits)) & mask;
    visit(j, device_level<Format>(stored));
    plane += plane_step;
    byte += byte_step;
    if (byte >= q) {
      byte -= q;
      ++plane;
    }
  }
}

// y[b][n] = x[b] . w_n for b < batch <= Rows (bias-free): one warp per neuron, lanes over a
// block's codes, Rows partial sums per lane, summed across the warp at the end.
template <int Format, int Rows>
__global__ void __launch_bounds__(kThreads)
    linear_kernel(PackedView v, const float* __restrict__ x, int64_t batch, float* __restrict__ y) {
  const int64_t n = warp_neuron();
  const bool valid = n < v.out_features;
  PackedView::Cursor cursor = warp_cursor(v, n, valid);
  if (!valid) return;
  const auto lane = static_cast<uint32_t>(threadIdx.x % kWarp);
  float acc[Rows] = {};
  v.for_each_region(n, [&](int64_t r) {
    const int64_t begin = v.region_begin[r];
    const float scale = scale_of(v, cursor.block);
    const float* xr = x + begin;
    visit_lane_codes<Format>(v.codes + cursor.offset, static_cast<uint32_t>(v.region_size(r)),
                             lane, [&](uint32_t j, float level) {
                             const float w = scale * level;
#pragma unroll
                             for (int b = 0; b < Rows; ++b) {
                               if (b < batch) acc[b] += w * __ldg(xr + b * v.in_features + j);
                             }
                           });
    ++cursor.block;
    cursor.offset += v.region_bytes(r);
  });
#pragma unroll
  for (int b = 0; b < Rows; ++b) {
    const float sum = warp_sum(acc[b]);
    if (lane == static_cast<uint32_t>(b) && b < batch) y[b * v.out_features + n] = sum;
  }
}

// The dense [out, in] weight: scale * level in active blocks (computed in float32, as the
// reference does; exact in float64 too), zeros elsewhere. Each element is written once.
template <int Format, class T>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(PackedView v, T* __restrict__ out) {
  const int64_t n = warp_neuron();
  const bool valid = n < v.out_features;
  PackedView::Cursor cursor = warp_cursor(v, n, valid);
  if (!valid) return;
  const auto lane = static_cast<uint32_t>(threadIdx.x % kWarp);
  T* row = out + n * v.in_features;
  for (int64_t r = 0; r < v.num_regions; ++r) {
    T* block = row + v.region_begin[r];
    const auto count = static_cast<uint32_t>(v.region_size(r));
    if (!v.is_active(n, r)) {
      for (uint32_t j = lane; j < count; j += kWarp) block[j] = T(0);
      continue;
    }
    const float scale = scale_of(v, cursor.block);
    visit_lane_codes<Format>(v.codes + cursor.offset, count, lane, [&](uint32_t j, float level) {
      block[j] = static_cast<T>(scale * level);
    });
    ++cursor.block;
    cursor.offset += v.region_bytes(r);
  }
}

// 1 inside active blocks, 0 elsewhere; reads neither the directory nor the codes.
__global__ void __launch_bounds__(kThreads) active_mask_kernel(PackedView v, bool* __restrict__ out) {
  const int64_t n = warp_neuron();
  if (n >= v.out_features) return;
  const auto lane = static_cast<uint32_t>(threadIdx.x % kWarp);
  bool* row = out + n * v.in_features;
  for (int64_t r = 0; r < v.num_regions; ++r) {
    const bool active = v.is_active(n, r);
    const auto count = static_cast<uint32_t>(v.region_size(r));
    bool* block = row + v.region_begin[r];
    for (uint32_t j = lane; j < count; j += kWarp) block[j] = active;
  }
}

// Calls fn(std::integral_constant<int, format>) for a code format already checked.
template <class Fn>
void with_format(int format, Fn&& fn) {
  switch (format) {
    case 1: fn(std::integral_constant<int, 1>{}); return;
    case 2: fn(std::integral_constant<int, 2>{}); return;
    case 4: fn(std::integral_constant<int, 4>{}); return;
    case quant::kNf4: fn(std::integral_constant<int, quant::kNf4>{}); return;
    case quant::kOdd2: fn(std::integral_constant<int, quant::kOdd2>{}); return;
    default: fn(std::integral_constant<int, 8>{}); return;
  }
}

dim3 grid_of(const PackedView& v) {
  return dim3(static_cast<unsigned>(directory_entries(v.out_features) - 1));
}

// The first CUDA device among an op's tensors, if any.
std::optional<c10::Device> first_cuda_device(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->is_cuda()) return t->device();
  }
  return std::nullopt;
}

// The device every argument must be on: the first CUDA one (the dispatcher chose this impl
// because one is).
c10::Device cuda_device(std::initializer_list<const at::Tensor*> tensors) {
  const std::optional<c10::Device> device = first_cuda_device(tensors);
  TORCH_CHECK_VALUE(device.has_value(), "spatium: a CUDA kernel was given no CUDA tensor");
  return *device;
}

void check_on(const at::Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                    ", the memory on ", device);
}

// A validated view of a store on `device`, pointing at its device arrays. The layout is checked
// exactly as on the CPU (store_checks.h), on a host copy of the four small index arrays (never
// scales or codes), so that a damaged store raises the CPU's error and no kernel reads out of
// bounds. That copy is one device-to-host transfer and stream sync per call: a known cost for
// batch-1 latency, to revisit on a GPU (e.g. by caching the check per store version).
// `flag`, when defined (one int64 on the device), travels back in the same transfer; its value
// goes to *flag_value.
PackedView device_view(const StoreArrays& s, int format, int64_t in_features, int64_t out_features,
                       const c10::Device& device, const at::Tensor& flag = {},
                       int64_t* flag_value = nullptr) {
  check_store(s, out_features, device);
  std::vector<at::Tensor> parts{s.region_begin, s.bitmap, s.block_begin, s.code_begin};
  if (flag.defined()) parts.push_back(flag);
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* p = host.const_data_ptr<int64_t>();
  const int64_t* bitmap = p + s.region_begin.numel();
  const int64_t* block_begin = bitmap + s.bitmap.numel();
  const int64_t* code_begin = block_begin + s.block_begin.numel();
  PackedView v = validated_view(s, IndexArrays{p, bitmap, block_begin, code_begin}, format,
                                in_features, out_features);
  // The kernels index a region's codes in 32 bits; regions lie inside the input.
  TORCH_CHECK_VALUE(in_features <= std::numeric_limits<int32_t>::max(),
                    "spatium: the CUDA kernels take at most 2^31 - 1 inputs, got ", in_features);
  if (flag.defined() && flag_value != nullptr) *flag_value = p[host.numel() - 1];
  v.region_begin = s.region_begin.const_data_ptr<int64_t>();
  v.bitmap = reinterpret_cast<const uint64_t*>(s.bitmap.const_data_ptr<int64_t>());
  v.block_begin = s.block_begin.const_data_ptr<int64_t>();
  v.code_begin = s.code_begin.const_data_ptr<int64_t>();
  v.scales = reinterpret_cast<const uint16_t*>(s.scales.const_data_ptr<at::Half>());
  v.codes = s.codes.const_data_ptr<uint8_t>();
  return v;
}

// The dense [out, in] weight of a validated view, in float32 or float64, on the current device.
at::Tensor dense_weight(const PackedView& v, at::ScalarType dtype, const c10::Device& device) {
  at::Tensor dense =
      at::empty({v.out_features, v.in_features}, at::TensorOptions().dtype(dtype).device(device));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_format(v.format, [&](auto format) {
    if (dtype == at::kDouble) {
      dequantize_kernel<decltype(format)::value, double>
          <<<grid_of(v), kThreads, 0, stream>>>(v, dense.mutable_data_ptr<double>());
    } else {
      dequantize_kernel<decltype(format)::value, float>
          <<<grid_of(v), kThreads, 0, stream>>>(v, dense.mutable_data_ptr<float>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

template <int Format, int Rows>
void launch_linear(const PackedView& v, const float* x, int64_t batch, float* y) {
  linear_kernel<Format, Rows>
      <<<grid_of(v), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(v, x, batch, y);
}

// The fused kernel for 1 <= batch <= kMaxFusedBatch rows: the smallest instantiation that fits.
void fused_linear(const PackedView& v, const float* x, int64_t batch, float* y) {
  with_format(v.format, [&](auto format) {
    constexpr int b = decltype(format)::value;
    if (batch <= 1) {
      launch_linear<b, 1>(v, x, batch, y);
    } else if (batch <= 2) {
      launch_linear<b, 2>(v, x, batch, y);
    } else if (batch <= 4) {
      launch_linear<b, 4>(v, x, batch, y);
    } else if (batch <= 8) {
      launch_linear<b, 8>(v, x, batch, y);
    } else {
      launch_linear<b, 16>(v, x, batch, y);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor spatial_linear(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& region_begin,
                          const at::Tensor& bitmap, const at::Tensor& block_begin,
                          const at::Tensor& code_begin, const at::Tensor& scales,
                          const at::Tensor& codes, int64_t format, int64_t out_features) {
  // `weight` (the latent weight) is there for autograd only: not read, as on the CPU.
  check_rows(x_in, "spatial_linear", "x");
  const int code_format = checked_format(format);
  const at::Tensor no_tensor;
  const at::Tensor& b = bias.has_value() ? *bias : no_tensor;
  const std::optional<c10::Device> found = first_cuda_device(
      {&x_in, &b, &region_begin, &bitmap, &block_begin, &code_begin, &scales, &codes});
  if (!found.has_value()) {
    // Only the unread latent weight is on a GPU: everything the op reads is on the CPU.
    return cpu::spatial_linear(x_in, weight, bias, region_begin, bitmap, block_begin, code_begin,
                               scales, codes, format, out_features);
  }
  const c10::Device device = *found;
  const c10::cuda::CUDAGuard guard(device);
  check_on(x_in, device, "spatial_linear", "x");
  const StoreArrays s{region_begin, bitmap, block_begin, code_begin, scales, codes};
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0);
  // The fused kernel skips inactive blocks, where a dense product adds 0 x NaN = NaN: a batch
  // with a NaN or an infinity takes the dense path instead, so that every batch size gives
  // F.linear's result (the CPU kernels' rule). The flag rides along with the layout's copy.
  const bool small = x.scalar_type() == at::kFloat && batch >= 1 && batch <= kMaxFusedBatch;
  int64_t finite = 0;
  const PackedView v =
      small ? device_view(s, code_format, x.size(1), out_features, device,
                          at::isfinite(x).all().to(at::kLong).reshape({1}), &finite)
            : device_view(s, code_format, x.size(1), out_features, device);
  if (b.defined()) {
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out_features, "spatial_linear: bias must be [",
                      out_features, "], got ", b.sizes());
    check_on(b, device, "spatial_linear", "bias");
  }
  at::Tensor y;
  if (small && finite != 0) {
    y = at::empty({batch, out_features}, x.options());
    fused_linear(v, x.const_data_ptr<float>(), batch, y.mutable_data_ptr<float>());
  } else if (batch == 0) {
    y = at::empty({0, out_features}, x.options());
  } else {
    y = at::mm(x, dense_weight(v, x.scalar_type(), device).t());
  }
  if (b.defined()) y.add_(b);
  return y;
}

at::Tensor spatial_linear_backward_input(const at::Tensor& grad_y_in,
                                         const at::Tensor& region_begin, const at::Tensor& bitmap,
                                         const at::Tensor& block_begin,
                                         const at::Tensor& code_begin, const at::Tensor& scales,
                                         const at::Tensor& codes, int64_t format,
                                         int64_t in_features) {
  check_rows(grad_y_in, "spatial_linear_backward_input", "grad_y");
  const int code_format = checked_format(format);
  const c10::Device device = cuda_device(
      {&grad_y_in, &region_begin, &bitmap, &block_begin, &code_begin, &scales, &codes});
  const c10::cuda::CUDAGuard guard(device);
  check_on(grad_y_in, device, "spatial_linear_backward_input", "grad_y");
  const PackedView v =
      device_view(StoreArrays{region_begin, bitmap, block_begin, code_begin, scales, codes},
                  code_format, in_features, grad_y_in.size(1), device);
  if (grad_y_in.size(0) == 0) return at::zeros({0, in_features}, grad_y_in.options());
  // grad_x = grad_y @ W through a dense workspace (cuBLAS); NaN and inf propagate as in a
  // dense product.
  return at::mm(grad_y_in, dense_weight(v, grad_y_in.scalar_type(), device));
}

at::Tensor active_mask(const at::Tensor& region_begin, const at::Tensor& bitmap,
                       const at::Tensor& block_begin, const at::Tensor& code_begin,
                       const at::Tensor& scales, const at::Tensor& codes, int64_t in_features,
                       int64_t out_features) {
  const c10::Device device =
      cuda_device({&region_begin, &bitmap, &block_begin, &code_begin, &scales, &codes});
  const c10::cuda::CUDAGuard guard(device);
  // The mask does not depend on the code width, and never reads the codes.
  const PackedView v =
      device_view(StoreArrays{region_begin, bitmap, block_begin, code_begin, scales, codes},
                  PackedView::kCodesUnread, in_features, out_features, device);
  at::Tensor mask = at::empty({out_features, in_features},
                              at::TensorOptions().dtype(at::kBool).device(device));
  active_mask_kernel<<<grid_of(v), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      v, mask.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor dequantize(const at::Tensor& region_begin, const at::Tensor& bitmap,
                      const at::Tensor& block_begin, const at::Tensor& code_begin,
                      const at::Tensor& scales, const at::Tensor& codes, int64_t format,
                      int64_t in_features, int64_t out_features) {
  const int code_format = checked_format(format);
  const c10::Device device =
      cuda_device({&region_begin, &bitmap, &block_begin, &code_begin, &scales, &codes});
  const c10::cuda::CUDAGuard guard(device);
  const PackedView v =
      device_view(StoreArrays{region_begin, bitmap, block_begin, code_begin, scales, codes},
                  code_format, in_features, out_features, device);
  return dense_weight(v, at::kFloat, device);
}

}  // namespace spatium::cuda
