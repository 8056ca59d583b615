// Registers the kernels of csrc/kernels.h with the dispatcher: the impls of the ops whose
// schemas spatium_torch/ops.py defines. Nothing else in csrc registers an op.
#include <torch/library.h>

#include "kernels.h"

namespace spatium {

TORCH_LIBRARY_IMPL(spatium, CPU, m) {
  m.impl("morton_encode", &cpu::morton_encode);
  m.impl("morton_decode", &cpu::morton_decode);
  m.impl("spatial_linear", &cpu::spatial_linear);
  m.impl("spatial_linear_backward_input", &cpu::spatial_linear_backward_input);
  m.impl("active_mask", &cpu::active_mask);
  m.impl("dequantize", &cpu::dequantize);
  m.impl("requantize_", &cpu::requantize);
  m.impl("activation", &cpu::activation);
  m.impl("activation_backward", &cpu::activation_backward);
  m.impl("activation_map", &cpu::activation_map);
  m.impl("activation_map_backward", &cpu::activation_map_backward);
  m.impl("learnable_map_backward", &cpu::learnable_map_backward);
  m.impl("map_argmax", &cpu::map_argmax);
  m.impl("factored_map_backward", &cpu::factored_map_backward);
  m.impl("factored_map_argmax", &cpu::factored_map_argmax);
  m.impl("simhash_cells", &cpu::simhash_cells);
  m.impl("count_hits_", &cpu::count_hits);
  m.impl("track_activity_", &cpu::track_activity);
}

// An op without tensor arguments dispatches to no backend: registered for all of them.
TORCH_LIBRARY_IMPL(spatium, CompositeExplicitAutograd, m) {
  m.impl("_threads_used_by_parallel_for", &cpu::threads_used_by_parallel_for);
}

#ifdef SPATIUM_WITH_CUDA
TORCH_LIBRARY_IMPL(spatium, CUDA, m) {
  m.impl("morton_encode", &cuda::morton_encode);
  m.impl("morton_decode", &cuda::morton_decode);
  m.impl("spatial_linear", &cuda::spatial_linear);
  m.impl("spatial_linear_backward_input", &cuda::spatial_linear_backward_input);
  m.impl("active_mask", &cuda::active_mask);
  m.impl("dequantize", &cuda::dequantize);
}
#endif

}  // namespace spatium
