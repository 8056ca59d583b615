// The kernel entry points, one set per device with the same signatures: csrc/cpu/*.cpp define
// spatium::cpu, csrc/cuda/*.cu define spatium::cuda (only what has a CUDA kernel yet). Each is
// the impl of the op of the same name in torch.ops.spatium, whose schema, fake and autograd live
// in spatium_torch/ops.py; csrc/register.cpp registers them with the dispatcher. An op with no
// kernel on a device runs its portable reference (spatium_torch/reference.py) there.
//
// The store's arrays come by name, as the layer's `store` buffers hold them (layout in
// core/spatial_memory.h): region_begin, bitmap, block_begin, code_begin int64; scales float16;
// codes uint8.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace spatium {

namespace cpu {

at::Tensor morton_encode(const at::Tensor& xyz);
at::Tensor morton_decode(const at::Tensor& codes);
// Test hook: the distinct threads at::parallel_for ran `work_items` tasks on.
int64_t threads_used_by_parallel_for(int64_t work_items);

// The spatial-memory ops.
at::Tensor spatial_linear(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& region_begin,
                          const at::Tensor& bitmap, const at::Tensor& block_begin,
                          const at::Tensor& code_begin, const at::Tensor& scales,
                          const at::Tensor& codes, int64_t format, int64_t out_features);
at::Tensor spatial_linear_backward_input(const at::Tensor& grad_y, const at::Tensor& region_begin,
                                         const at::Tensor& bitmap, const at::Tensor& block_begin,
                                         const at::Tensor& code_begin, const at::Tensor& scales,
                                         const at::Tensor& codes, int64_t format,
                                         int64_t in_features);
at::Tensor active_mask(const at::Tensor& region_begin, const at::Tensor& bitmap,
                       const at::Tensor& block_begin, const at::Tensor& code_begin,
                       const at::Tensor& scales, const at::Tensor& codes, int64_t in_features,
                       int64_t out_features);
at::Tensor dequantize(const at::Tensor& region_begin, const at::Tensor& bitmap,
                      const at::Tensor& block_begin, const at::Tensor& code_begin,
                      const at::Tensor& scales, const at::Tensor& codes, int64_t format,
                      int64_t in_features, int64_t out_features);
void requantize(const at::Tensor& latent, const at::Tensor& region_begin, const at::Tensor& bitmap,
                const at::Tensor& block_begin, const at::Tensor& code_begin, at::Tensor& scales,
                at::Tensor& codes, int64_t format);

// The activation-map ops.
at::Tensor activation(const at::Tensor& x, int64_t fn);
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& x, int64_t fn);
at::Tensor activation_map(const at::Tensor& pre, const at::Tensor& cells, const at::Tensor& table);
at::Tensor activation_map_backward(const at::Tensor& grad, const at::Tensor& pre,
                                   const at::Tensor& cells, const at::Tensor& table);
std::tuple<at::Tensor, at::Tensor> learnable_map_backward(const at::Tensor& grad,
                                                          const at::Tensor& pre,
                                                          const at::Tensor& cells,
                                                          const at::Tensor& table);
at::Tensor map_argmax(const at::Tensor& logits);
std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_map_backward(const at::Tensor& grad,
                                                                     const at::Tensor& pre,
                                                                     const at::Tensor& cells,
                                                                     const at::Tensor& table);
at::Tensor factored_map_argmax(const at::Tensor& neuron_logits, const at::Tensor& cell_logits,
                               const at::Tensor& initial, const at::Tensor& lead);
at::Tensor simhash_cells(const at::Tensor& x, const at::Tensor& projections);
void count_hits(at::Tensor& hits, const at::Tensor& cells);

// Growth statistics.
void track_activity(const at::Tensor& output, at::Tensor& activity, at::Tensor& output_mean,
                    double momentum);

}  // namespace cpu

namespace cuda {

at::Tensor morton_encode(const at::Tensor& xyz);
at::Tensor morton_decode(const at::Tensor& codes);

// The spatial-memory ops (requantize_ runs its reference impl on CUDA for now).
at::Tensor spatial_linear(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& region_begin,
                          const at::Tensor& bitmap, const at::Tensor& block_begin,
                          const at::Tensor& code_begin, const at::Tensor& scales,
                          const at::Tensor& codes, int64_t format, int64_t out_features);
at::Tensor spatial_linear_backward_input(const at::Tensor& grad_y, const at::Tensor& region_begin,
                                         const at::Tensor& bitmap, const at::Tensor& block_begin,
                                         const at::Tensor& code_begin, const at::Tensor& scales,
                                         const at::Tensor& codes, int64_t format,
                                         int64_t in_features);
at::Tensor active_mask(const at::Tensor& region_begin, const at::Tensor& bitmap,
                       const at::Tensor& block_begin, const at::Tensor& code_begin,
                       const at::Tensor& scales, const at::Tensor& codes, int64_t in_features,
                       int64_t out_features);
at::Tensor dequantize(const at::Tensor& region_begin, const at::Tensor& bitmap,
                      const at::Tensor& block_begin, const at::Tensor& code_begin,
                      const at::Tensor& scales, const at::Tensor& codes, int64_t format,
                      int64_t in_features, int64_t out_features);

}  // namespace cuda

}  // namespace spatium
