#include "packed_view.h"

#include <algorithm>

namespace spatium {

void PackedView::dequantize_rows(int64_t n0, int64_t n1, float* out, int64_t ld) const {
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * ld;
    std::fill(row, row + in_features, 0.0f);
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      quant::dequantize_block(codes + off, region_size(r), bits, scales[b], row + region_begin[r]);
    });
  }
}

void PackedView::dequantize_regions(int64_t r0, int64_t r1, float* out, int64_t ld) const {
  const int64_t first = region_begin[r0];
  const int64_t cols = region_begin[r1] - first;
  for (int64_t n = 0; n < out_features; ++n) {
    float* row = out + n * ld;
    std::fill(row, row + cols, 0.0f);
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      if (r >= r0 && r < r1) {
        quant::dequantize_block(codes + off, region_size(r), bits, scales[b],
                                row + region_begin[r] - first);
      }
    });
  }
}

void PackedView::active_mask_rows(int64_t n0, int64_t n1, uint8_t* out, int64_t ld) const {
  for (int64_t n = n0; n < n1; ++n) {
    uint8_t* row = out + (n - n0) * ld;
    std::fill(row, row + in_features, uint8_t{0});
    for_each_block(n, [&](int64_t r, int64_t, int64_t) {
      std::fill(row + region_begin[r], row + region_begin[r + 1], uint8_t{1});
    });
  }
}

void PackedView::quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld,
                               uint16_t* scales_out, uint8_t* codes_out) const {
  for (int64_t n = n0; n < n1; ++n) {
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      scales_out[b] = quant::quantize_block(latent + n * ld + region_begin[r], region_size(r), bits,
                                            codes_out + off);
    });
  }
}

}  // namespace spatium
