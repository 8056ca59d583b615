// Argument checks shared by the CPU and CUDA impls of the spatial-memory ops, so that every
// device refuses the same arguments with the same messages.
#pragma once

#include <ATen/ATen.h>

#include "core/packed_view.h"

namespace spatium {

// The store's six arrays as the ops receive them (layout in core/spatial_memory.h).
struct StoreArrays {
  const at::Tensor& region_begin;
  const at::Tensor& bitmap;
  const at::Tensor& block_begin;
  const at::Tensor& code_begin;
  const at::Tensor& scales;
  const at::Tensor& codes;
};

// Where the host can read a store's index arrays: the tensors themselves on the CPU, a host
// copy of them for a store on a GPU.
struct IndexArrays {
  const int64_t* region_begin = nullptr;
  const int64_t* bitmap = nullptr;
  const int64_t* block_begin = nullptr;
  const int64_t* code_begin = nullptr;
};

// `format` as an op that reads the codes takes it: a code width 1, 2, 4 or 8, or quant::kNf4
// (ValueError otherwise).
int checked_format(int64_t format);

// out_features >= 1, then each array's dtype, and that it is a contiguous 1-D tensor on
// `device`.
void check_store(const StoreArrays& s, int64_t out_features, const c10::Device& device);

// A product's rows: 2-D [batch, features], float32 or float64.
void check_rows(const at::Tensor& t, const char* op, const char* name);

// Checks that the arrays, read through `host`, describe one consistent memory for this code
// width (PackedView::layout_error with the arrays' real lengths: every walk then stays inside
// them) and returns the view onto `host` with full_region_bits set; scales and codes are left
// to the caller. Bits PackedView::kCodesUnread only for a caller that never reads the codes.
PackedView validated_view(const StoreArrays& s, const IndexArrays& host, int format,
                          int64_t in_features, int64_t out_features);

}  // namespace spatium
