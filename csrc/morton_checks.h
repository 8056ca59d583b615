// Argument checks and error messages shared by the CPU and CUDA impls of the Morton ops.
#pragma once

#include <ATen/ATen.h>

namespace spatium {

// Validates morton_encode's input (shape [N, 3], integer dtype) and returns it as a contiguous
// int32 or int64 tensor on the same device.
at::Tensor encode_input(const at::Tensor& xyz);
// Validates morton_decode's input (shape [N], integer dtype) and returns it as contiguous int64.
at::Tensor decode_input(const at::Tensor& codes);

// Throw a ValueError naming the offending row and its values (read back from any device).
[[noreturn]] void throw_bad_position(const at::Tensor& xyz, int64_t row);
[[noreturn]] void throw_bad_code(const at::Tensor& codes, int64_t index);

}  // namespace spatium
