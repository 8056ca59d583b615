// What the CPU kernels and the inference pack share: the checked view of a store's arrays and
// the finite-input test that picks a path.
#pragma once

#include <ATen/ATen.h>

#include "core/packed_view.h"
#include "store_checks.h"

namespace spatium::cpu {

// Checks that the six arrays describe one consistent memory for this code width (every walk
// then stays inside them) and returns the kernels' view. O(bitmap words): microseconds. Bits
// PackedView::kCodesUnread only for a caller that never reads the codes (an active mask).
PackedView checked_view(const StoreArrays& s, int format, int64_t in_features, int64_t out_features);

// The view of a store whose codes the op reads: `format` must be a code format (an integer width or
// quant::kNf4).
PackedView view_of(const StoreArrays& s, int64_t format, int64_t in_features, int64_t out_features);

// Whether every value of a contiguous float32 tensor is finite.
bool all_finite(const at::Tensor& t);

}  // namespace spatium::cpu
