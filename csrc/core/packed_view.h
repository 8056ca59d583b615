// A view of a packed block-sparse memory (DESIGN §2): the arrays a SpatialMemory owns, or the
// same arrays held by torch tensors. The kernels run on views, so the torch ops and the store
// share one implementation. Torch-free.
#pragma once

#include <cstdint>

#include "quantize.h"

namespace spatium {

struct PackedView {
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t num_regions = 0;
  int64_t words = 0;  // bitmap words per neuron
  int bits = 0;
  int full_region_bits = -1;  // region_bits: a full region holds 2^region_bits inputs (-1: unknown)
  const int64_t* region_begin = nullptr;  // [regions + 1] first input of each region
  const uint64_t* bitmap = nullptr;       // [out * words]
  const int64_t* block_begin = nullptr;   // [out + 1] index of each neuron's first block
  const int64_t* code_begin = nullptr;    // [out + 1] byte offset of each neuron's codes
  const uint16_t* scales = nullptr;       // [blocks] fp16 bits
  const uint8_t* codes = nullptr;         // [bytes]

  int64_t region_size(int64_t r) const { return region_begin[r + 1] - region_begin[r]; }
  int64_t region_bytes(int64_t r) const { return quant::code_bytes(bits, region_size(r)); }
  bool is_active(int64_t neuron, int64_t r) const {
    return (bitmap[neuron * words + (r >> 6)] >> (r & 63)) & 1u;
  }

  // Calls visit(region, block index, byte offset) for each active block of a neuron, in region
  // order.
  template <class Visit>
  [[gnu::always_inline]] inline void for_each_block(int64_t neuron, Visit&& visit) const {
    int64_t block = block_begin[neuron];
    int64_t offset = code_begin[neuron];
    const uint64_t* row = bitmap + neuron * words;
    for (int64_t w = 0; w < words; ++w) {
      for (uint64_t set = row[w]; set != 0; set &= set - 1) {
        const int64_t r = w * 64 + __builtin_ctzll(set);
        visit(r, block, offset);
        ++block;
        offset += region_bytes(r);
      }
    }
  }

  // Dequantized rows [n0, n1) into out (row stride ld), zeros outside active blocks.
  void dequantize_rows(int64_t n0, int64_t n1, float* out, int64_t ld) const;
  // Dequantized columns of regions [r0, r1), all neurons: out[n][c], c counted from the first
  // input of r0, row stride ld.
  void dequantize_regions(int64_t r0, int64_t r1, float* out, int64_t ld) const;
  // 1 inside active blocks, 0 elsewhere, rows [n0, n1) (row stride ld).
  void active_mask_rows(int64_t n0, int64_t n1, uint8_t* out, int64_t ld) const;
  // Floats of scratch the small-batch kernels need.
  int64_t scratch_floats(int64_t batch) const { return in_features + (batch + 1) * 256; }
  // Small-batch matmul straight from the codes, no dense panel: for neurons [n0, n1) and rows
  // b < batch, y[b * ldy + n] = bias-free x[b] . w_n (x rows of in_features, stride ldx). Each
  // block is decoded once into `scratch` (scratch_floats(batch)) and used for every row.
  void linear_rows(int64_t n0, int64_t n1, const float* x, int64_t batch, int64_t ldx, float* y,
                   int64_t ldy, float* scratch) const;
  // The transposed product, accumulated: gx[b * ldx + i] += sum over n in [n0, n1) of
  // gy[b * ldy + n] * w_n[i].
  void linear_t_rows(int64_t n0, int64_t n1, const float* gy, int64_t batch, int64_t ldy,
                     float* gx, int64_t ldx, float* scratch) const;
  // Re-quantizes the active blocks of neurons [n0, n1) from latent [out][in] (row stride ld,
  // `latent` at row 0) into scales and codes, which must be this view's arrays made writable.
  void quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld, uint16_t* scales_out,
                     uint8_t* codes_out) const;
};

}  // namespace spatium
