#include "store_checks.h"

#include <algorithm>
#include <string>

#include "core/quantize.h"

namespace spatium {
namespace {

std::string place_of(const c10::Device& device) {
  return device.is_cpu() ? std::string("CPU tensor") : "tensor on " + device.str();
}

void check_part(const at::Tensor& t, at::ScalarType dtype, const char* name,
                const c10::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "spatium: memory ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  const bool on_device = device.is_cpu() ? t.device().is_cpu() : t.device() == device;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && on_device, "spatium: memory ", name,
                    " must be a contiguous 1-D ", place_of(device), ", got ", t.dim(), "-D on ",
                    t.device());
}

}  // namespace

int checked_format(int64_t format) {
  TORCH_CHECK_VALUE(0 < format && format <= quant::kNf4 &&
                        quant::valid_format(static_cast<int>(format)),
                    "spatium: the code format must be a width 1, 2, 4 or 8, ", quant::kOdd2,
                    " (2-bit odd codes) or ", quant::kNf4, " (nf4), got ", format);
  return static_cast<int>(format);
}

void check_store(const StoreArrays& s, int64_t out_features, const c10::Device& device) {
  TORCH_CHECK_VALUE(out_features >= 1, "spatium: out_features must be >= 1, got ", out_features);
  check_part(s.region_begin, at::kLong, "region_begin", device);
  check_part(s.bitmap, at::kLong, "bitmap", device);
  check_part(s.block_begin, at::kLong, "block_begin", device);
  check_part(s.code_begin, at::kLong, "code_begin", device);
  check_part(s.scales, at::kHalf, "scales", device);
  check_part(s.codes, at::kByte, "codes", device);
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [batch, features], got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", t.scalar_type());
}

PackedView validated_view(const StoreArrays& s, const IndexArrays& host, int format,
                          int64_t in_features, int64_t out_features) {
  PackedView v;
  v.format = format;
  v.num_regions = s.region_begin.numel() - 1;
  v.out_features = out_features;
  v.in_features = in_features;
  v.region_begin = host.region_begin;
  v.bitmap = reinterpret_cast<const uint64_t*>(host.bitmap);
  v.block_begin = host.block_begin;
  v.code_begin = host.code_begin;
  const std::string error = v.layout_error(ArrayLengths{
      s.region_begin.numel(), s.bitmap.numel(), s.block_begin.numel(), s.code_begin.numel(),
      s.scales.numel(), s.codes.numel()});
  TORCH_CHECK_VALUE(error.empty(), "spatium: ", error);
  // A full region's size, as the CPU kernels' fixed-size path wants it: the largest region, if
  // a power of two (otherwise every block takes the generic path).
  int64_t largest = 0;
  for (int64_t r = 0; r < v.num_regions; ++r) largest = std::max(largest, v.region_size(r));
  v.full_region_bits = (largest & (largest - 1)) == 0 ? __builtin_ctzll(largest) : -1;
  return v;
}

}  // namespace spatium
