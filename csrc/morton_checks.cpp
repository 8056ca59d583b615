// Argument checks and error messages shared by the CPU and CUDA kernels of the Morton ops.
#include "morton_checks.h"

#include "core/morton.h"

namespace spatium {
namespace {

bool is_integer(const at::Tensor& t) {
  return at::isIntegralType(t.scalar_type(), /*includeBool=*/false);
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

}  // namespace spatium
