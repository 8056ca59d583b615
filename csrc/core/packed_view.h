// A view of a packed block-sparse memory: the arrays a SpatialMemory owns, or the
// same arrays held by torch tensors. The kernels run on views, so the torch ops and the store
// share one implementation. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "quantize.h"

// The few members a CUDA kernel also calls (the bitmap walk and per-region sizes) are marked
// SPATIUM_HOST_DEVICE: __host__ __device__ under nvcc, nothing elsewhere.
#ifdef __CUDACC__
#define SPATIUM_HOST_DEVICE __host__ __device__
#else
#define SPATIUM_HOST_DEVICE
#endif

namespace spatium {

// Index of the lowest set bit of a non-zero word.
SPATIUM_HOST_DEVICE inline int lowest_set_bit(uint64_t word) {
#ifdef __CUDA_ARCH__
  return __ffsll(static_cast<long long>(word)) - 1;
#else
  return __builtin_ctzll(word);
#endif
}

// Neurons per directory entry: the directory keeps the block index and byte offset of every
// 8th neuron, and a walk over at most 7 neurons' bitmap bits finds any other. That costs about
// 2 bytes a neuron instead of 16.
inline constexpr int64_t kDirectoryStride = 8;

inline constexpr int64_t directory_entries(int64_t out_features) {
  return (out_features + kDirectoryStride - 1) / kDirectoryStride + 1;
}
inline constexpr int64_t bitmap_words(int64_t out_features, int64_t regions) {
  return (out_features * regions + 63) / 64;
}

// How many elements each of a memory's arrays holds, as received.
struct ArrayLengths {
  int64_t region_begin = 0;
  int64_t bitmap = 0;
  int64_t block_begin = 0;
  int64_t code_begin = 0;
  int64_t scales = 0;
  int64_t codes = 0;
};

struct PackedView {
  // The `format` of a view that walks blocks but never reads their codes (an active mask).
  static constexpr int kCodesUnread = 0;

  // Where a neuron's blocks start: index into scales, byte offset into codes.
  struct Cursor {
    int64_t block = 0;
    int64_t offset = 0;
  };

  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t num_regions = 0;
  int format = 0;  // code format (quantize.h): an integer width, or quant::kNf4
  int full_region_bits = -1;  // a full region holds 2^full_region_bits inputs (-1: unknown)
  const int64_t* region_begin = nullptr;  // [regions + 1] first input of each region
  const uint64_t* bitmap = nullptr;       // [bitmap_words] bit n * regions + r: block (n, r)
  const int64_t* block_begin = nullptr;   // [directory_entries] blocks before neuron 8k; total
  const int64_t* code_begin = nullptr;    // [directory_entries] code bytes before neuron 8k; total
  const uint16_t* scales = nullptr;       // [blocks] fp16 bits
  const uint8_t* codes = nullptr;         // [bytes]

  // Why arrays of these lengths cannot be this view's memory, or "" when they can: regions
  // increase from 0 to in_features, the bitmap marks nothing past the last neuron, and every
  // directory entry holds exactly the blocks and code bytes (for this view's format) that its
  // neurons' bitmap bits call for. Then every walk stays inside the arrays. Reads nothing
  // before its length is checked; O(bitmap words + neurons x irregular regions). With format
  // kCodesUnread, the codes are left unchecked (and must not be read).
  std::string layout_error(const ArrayLengths& lengths) const;

  SPATIUM_HOST_DEVICE int64_t region_size(int64_t r) const {
    return region_begin[r + 1] - region_begin[r];
  }
  SPATIUM_HOST_DEVICE int64_t region_bytes(int64_t r) const {
    return quant::code_bytes(quant::width(format), region_size(r));
  }
  SPATIUM_HOST_DEVICE bool is_active(int64_t neuron, int64_t r) const {
    const int64_t bit = neuron * num_regions + r;
    return (bitmap[bit >> 6] >> (bit & 63)) & 1u;
  }
  int64_t total_blocks() const { return block_begin[directory_entries(out_features) - 1]; }
  int64_t total_code_bytes() const { return code_begin[directory_entries(out_features) - 1]; }

  // Calls visit(region) for each active region of a neuron, in order.
  template <class Visit>
  [[gnu::always_inline]] SPATIUM_HOST_DEVICE inline void for_each_region(int64_t neuron,
                                                                         Visit&& visit) const {
    const int64_t first = neuron * num_regions, end = first + num_regions;
    for (int64_t bit = first; bit < end;) {
      const int64_t take = std::min<int64_t>(64 - (bit & 63), end - bit);
      uint64_t word = bitmap[bit >> 6] >> (bit & 63);
      if (take < 64) word &= (uint64_t{1} << take) - 1;
      for (; word != 0; word &= word - 1) visit(bit - first + lowest_set_bit(word));
      bit += take;
    }
  }

  // The cursor of a neuron: from its directory entry, a walk over at most 7 neurons.
  Cursor cursor_at(int64_t neuron) const {
    const int64_t entry = neuron / kDirectoryStride;
    Cursor c{block_begin[entry], code_begin[entry]};
    for (int64_t m = entry * kDirectoryStride; m < neuron; ++m) {
      for_each_region(m, [&](int64_t r) {
        ++c.block;
        c.offset += region_bytes(r);
      });
    }
    return c;
  }

  // Calls visit(region, block index, byte offset) for each active block of a neuron, in region
  // order, starting from and advancing `cursor` (which must be that neuron's cursor).
  template <class Visit>
  [[gnu::always_inline]] inline void visit_blocks(int64_t neuron, Cursor& cursor,
                                                  Visit&& visit) const {
    for_each_region(neuron, [&](int64_t r) {
      visit(r, cursor.block, cursor.offset);
      ++cursor.block;
      cursor.offset += region_bytes(r);
    });
  }

  // The same for one neuron on its own.
  template <class Visit>
  [[gnu::always_inline]] inline void for_each_block(int64_t neuron, Visit&& visit) const {
    Cursor cursor = cursor_at(neuron);
    visit_blocks(neuron, cursor, visit);
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
