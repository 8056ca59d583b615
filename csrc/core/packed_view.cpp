#include "packed_view.h"

#include <algorithm>
#include <array>
#include <vector>

namespace spatium {
namespace {

// The small-batch kernels, one instantiation per code width and full-region size S, compiled
// per ISA below so that decoding, products and sums inline into one loop nest. Full regions
// (S inputs) take a fixed-size path: constant trip counts unroll, and products accumulate in a
// [batch][S] vector summed once per neuron instead of once per block. Other sizes (a partial
// last region, irregular layouts) take the generic path.
// Batch 1 over full regions: decode, scale and multiply fused, the S partial sums held in a
// local array the compiler keeps in vector registers.
template <int Format, int S>
[[gnu::always_inline]] inline void linear_row_fused(const PackedView& v, int64_t n0, int64_t n1,
                                                    const float* x, float* y, float* w) {
  constexpr int bits = quant::width(Format);
  constexpr uint32_t mask = (1u << bits) - 1u;
  constexpr int per_byte = 8 / bits;
  constexpr int bytes = S / per_byte;
  PackedView::Cursor cursor = v.cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    float acc[S] = {};
    float rest = 0.0f;
    v.visit_blocks(n, cursor, [&](int64_t r, int64_t blk, int64_t off) {
      const float scale = half_to_float(v.scales[blk]);
      const float* xr = x + v.region_begin[r];
      const uint8_t* c = v.codes + off;
      if (Format == 1 && bytes % 8 == 0 && v.region_size(r) == S) {
        // 1-bit planes are too short for the loop below to vectorize: decode the block first
        // (in 8-byte runs, quant::decode_runs).
        quant::decode_planes<Format>(c, S, scale, w);
#pragma omp simd
        for (int i = 0; i < S; ++i) acc[i] += w[i] * xr[i];
        return;
      }
      if (v.region_size(r) == S) {
        for (int p = 0; p < per_byte; ++p) {
#pragma omp simd
          for (int i = 0; i < bytes; ++i) {
            const float level = quant::level<Format>((c[i] >> (p * bits)) & mask);
            acc[p * bytes + i] += scale * level * xr[p * bytes + i];
          }
        }
        return;
      }
      const int64_t size = v.region_size(r);
      quant::decode_planes<Format>(c, size, scale, w);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < size; ++i) sum += w[i] * xr[i];
      rest += sum;
    });
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < S; ++i) sum += acc[i];
    y[n] = sum + rest;
  }
}

template <int Format, int S>
[[gnu::always_inline]] inline void linear_rows_impl(const PackedView& v, int64_t n0, int64_t n1,
                                                    const float* x, int64_t batch, int64_t ldx,
                                                    float* y, int64_t ldy, float* scratch) {
  float* w = scratch;                        // [max(S, in)] one decoded block
  float* acc = scratch + v.in_features + S;  // [batch][S]
  if (S > 0 && batch == 1) {
    linear_row_fused<Format, S>(v, n0, n1, x, y, w);
    return;
  }
  PackedView::Cursor cursor = v.cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i = 0; i < batch * S; ++i) acc[i] = 0.0f;
    for (int64_t b = 0; b < batch; ++b) y[b * ldy + n] = 0.0f;
    v.visit_blocks(n, cursor, [&](int64_t r, int64_t blk, int64_t off) {
      const int64_t size = v.region_size(r);
      const float scale = half_to_float(v.scales[blk]);
      if (S > 0 && size == S) {
        quant::decode_planes<Format>(v.codes + off, S, scale, w);
        for (int64_t b = 0; b < batch; ++b) {
          const float* xr = x + b * ldx + v.region_begin[r];
          float* a = acc + b * S;
#pragma omp simd
          for (int i = 0; i < S; ++i) a[i] += w[i] * xr[i];
        }
        return;
      }
      quant::decode_planes<Format>(v.codes + off, size, scale, w);
      for (int64_t b = 0; b < batch; ++b) {
        const float* xr = x + b * ldx + v.region_begin[r];
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < size; ++i) sum += w[i] * xr[i];
        y[b * ldy + n] += sum;
      }
    });
    for (int64_t b = 0; b < batch; ++b) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < S; ++i) sum += acc[b * S + i];
      y[b * ldy + n] += sum;
    }
  }
}

template <int Format, int S>
[[gnu::always_inline]] inline void linear_t_rows_impl(const PackedView& v, int64_t n0, int64_t n1,
                                                      const float* gy, int64_t batch, int64_t ldy,
                                                      float* gx, int64_t ldx, float* scratch) {
  PackedView::Cursor cursor = v.cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    v.visit_blocks(n, cursor, [&](int64_t r, int64_t blk, int64_t off) {
      const int64_t size = v.region_size(r);
      const float scale = half_to_float(v.scales[blk]);
      const bool full = S > 0 && size == S;
      quant::decode_planes<Format>(v.codes + off, full ? S : size, scale, scratch);
      for (int64_t b = 0; b < batch; ++b) {
        const float alpha = gy[b * ldy + n];
        float* gr = gx + b * ldx + v.region_begin[r];
        if (full) {
#pragma omp simd
          for (int i = 0; i < S; ++i) gr[i] += alpha * scratch[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < size; ++i) gr[i] += alpha * scratch[i];
        }
      }
    });
  }
}

// Picks the fixed-size path for the region sizes worth specializing.
template <int Format, template <int, int> class Kernel, class... Args>
[[gnu::always_inline]] inline void by_region_size(int region_bits, Args... args) {
  switch (region_bits) {
    case 4: Kernel<Format, 16>::run(args...); return;
    case 5: Kernel<Format, 32>::run(args...); return;
    case 6: Kernel<Format, 64>::run(args...); return;
    case 7: Kernel<Format, 128>::run(args...); return;
    case 8: Kernel<Format, 256>::run(args...); return;
    default: Kernel<Format, 0>::run(args...); return;
  }
}

template <int Format, int S>
struct LinearRows {
  template <class... Args>
  [[gnu::always_inline]] static inline void run(Args... args) {
    linear_rows_impl<Format, S>(args...);
  }
};
template <int Format, int S>
struct LinearTRows {
  template <class... Args>
  [[gnu::always_inline]] static inline void run(Args... args) {
    linear_t_rows_impl<Format, S>(args...);
  }
};

// Picks the instantiation for the code format.
template <template <int, int> class Kernel, class... Args>
[[gnu::always_inline]] inline void by_format(const PackedView& v, Args... args) {
  const int rb = v.full_region_bits;
  switch (v.format) {
    case 1: by_region_size<1, Kernel>(rb, v, args...); return;
    case 2: by_region_size<2, Kernel>(rb, v, args...); return;
    case 4: by_region_size<4, Kernel>(rb, v, args...); return;
    case quant::kNf4: by_region_size<quant::kNf4, Kernel>(rb, v, args...); return;
    case quant::kOdd2: by_region_size<quant::kOdd2, Kernel>(rb, v, args...); return;
    default: by_region_size<8, Kernel>(rb, v, args...); return;
  }
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void linear_rows_any(
    const PackedView& v, int64_t n0, int64_t n1, const float* x, int64_t batch, int64_t ldx,
    float* y, int64_t ldy, float* scratch) {
  by_format<LinearRows>(v, n0, n1, x, batch, ldx, y, ldy, scratch);
}

[[gnu::target_clones("avx512f", "avx2", "default"), gnu::flatten]] void linear_t_rows_any(
    const PackedView& v, int64_t n0, int64_t n1, const float* gy, int64_t batch, int64_t ldy,
    float* gx, int64_t ldx, float* scratch) {
  by_format<LinearTRows>(v, n0, n1, gy, batch, ldy, gx, ldx, scratch);
}

}  // namespace

void PackedView::dequantize_rows(int64_t n0, int64_t n1, float* out, int64_t ld) const {
  PackedView::Cursor cursor = cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * ld;
    std::fill(row, row + in_features, 0.0f);
    visit_blocks(n, cursor, [&](int64_t r, int64_t b, int64_t off) {
      quant::dequantize_block(codes + off, region_size(r), format, scales[b], row + region_begin[r]);
    });
  }
}

void PackedView::dequantize_regions(int64_t r0, int64_t r1, float* out, int64_t ld) const {
  const int64_t first = region_begin[r0];
  const int64_t cols = region_begin[r1] - first;
  PackedView::Cursor cursor = cursor_at(0);
  for (int64_t n = 0; n < out_features; ++n) {
    float* row = out + n * ld;
    std::fill(row, row + cols, 0.0f);
    visit_blocks(n, cursor, [&](int64_t r, int64_t b, int64_t off) {
      if (r >= r0 && r < r1) {
        quant::dequantize_block(codes + off, region_size(r), format, scales[b],
                                row + region_begin[r] - first);
      }
    });
  }
}

void PackedView::active_mask_rows(int64_t n0, int64_t n1, uint8_t* out, int64_t ld) const {
  PackedView::Cursor cursor = cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    uint8_t* row = out + (n - n0) * ld;
    std::fill(row, row + in_features, uint8_t{0});
    visit_blocks(n, cursor, [&](int64_t r, int64_t, int64_t) {
      std::fill(row + region_begin[r], row + region_begin[r + 1], uint8_t{1});
    });
  }
}

void PackedView::linear_rows(int64_t n0, int64_t n1, const float* x, int64_t batch, int64_t ldx,
                             float* y, int64_t ldy, float* scratch) const {
  linear_rows_any(*this, n0, n1, x, batch, ldx, y, ldy, scratch);
}

void PackedView::linear_t_rows(int64_t n0, int64_t n1, const float* gy, int64_t batch,
                               int64_t ldy, float* gx, int64_t ldx, float* scratch) const {
  linear_t_rows_any(*this, n0, n1, gy, batch, ldy, gx, ldx, scratch);
}

void PackedView::quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld,
                               uint16_t* scales_out, uint8_t* codes_out) const {
  // Blocks go to the quantizer in batches, across rows.
  constexpr int64_t kBatch = 64;
  std::array<quant::BlockJob, kBatch> jobs;
  int64_t queued = 0;
  const auto flush = [&] {
    quant::quantize_blocks(jobs.data(), queued, format);
    queued = 0;
  };
  PackedView::Cursor cursor = cursor_at(n0);
  for (int64_t n = n0; n < n1; ++n) {
    visit_blocks(n, cursor, [&](int64_t r, int64_t b, int64_t off) {
      jobs[queued++] = {latent + n * ld + region_begin[r], region_size(r), codes_out + off,
                        scales_out + b};
      if (queued == kBatch) flush();
    });
  }
  flush();
}

namespace {

// Set bits of the bitmap in [begin, end).
int64_t count_bits(const uint64_t* bitmap, int64_t begin, int64_t end) {
  int64_t count = 0;
  while (begin < end) {
    const int64_t take = std::min<int64_t>(64 - (begin & 63), end - begin);
    uint64_t word = bitmap[begin >> 6] >> (begin & 63);
    if (take < 64) word &= (uint64_t{1} << take) - 1;
    count += __builtin_popcountll(word);
    begin += take;
  }
  return count;
}

}  // namespace

std::string PackedView::layout_error(const ArrayLengths& lengths) const {
  if (out_features < 1 || num_regions < 1 || lengths.region_begin != num_regions + 1) {
    return "empty memory";
  }
  const std::string shape = " do not fit " + std::to_string(out_features) + " neurons x " +
                            std::to_string(num_regions) + " regions (not from one SpatialMemory?)";
  const int64_t entries = directory_entries(out_features);
  if (lengths.bitmap != bitmap_words(out_features, num_regions) ||
      lengths.block_begin != entries || lengths.code_begin != entries) {
    return "memory arrays" + shape;
  }
  if (region_begin[0] != 0) return "memory regions do not start at input 0 (damaged?)";
  for (int64_t r = 0; r < num_regions; ++r) {
    if (region_begin[r + 1] <= region_begin[r]) return "memory regions do not increase (damaged?)";
  }
  if (region_begin[num_regions] != in_features) {
    return "memory covers " + std::to_string(region_begin[num_regions]) + " inputs, the input has " +
           std::to_string(in_features);
  }
  const int64_t used_bits = out_features * num_regions;
  if (count_bits(bitmap, used_bits, lengths.bitmap * 64) != 0) {
    return "memory bitmap marks blocks past the last of " + std::to_string(out_features) +
           " neurons (not from one SpatialMemory?)";
  }
  // Code bytes per block: those of a full region, except in the few irregular regions (usually
  // none, or a partial last one), which are counted one by one.
  int64_t full_bytes = 0;
  for (int64_t r = 0; r < num_regions; ++r) full_bytes = std::max(full_bytes, region_bytes(r));
  std::vector<int64_t> irregular;
  for (int64_t r = 0; r < num_regions; ++r) {
    if (region_bytes(r) != full_bytes) irregular.push_back(r);
  }
  if (block_begin[0] != 0 || code_begin[0] != 0) {
    return "memory offsets do not start at 0 (damaged?)";
  }
  for (int64_t e = 0; e + 1 < entries; ++e) {
    const int64_t n0 = e * kDirectoryStride;
    const int64_t n1 = std::min(n0 + kDirectoryStride, out_features);
    const int64_t blocks = count_bits(bitmap, n0 * num_regions, n1 * num_regions);
    int64_t bytes = blocks * full_bytes;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t r : irregular) {
        if (is_active(n, r)) bytes += region_bytes(r) - full_bytes;
      }
    }
    // block_begin[e] and code_begin[e] are already known to be sums of such counts: no overflow.
    if (block_begin[e + 1] != block_begin[e] + blocks) {
      return "memory block offsets disagree with the bitmap at neuron " + std::to_string(n0) +
             " (damaged?)";
    }
    if (format != kCodesUnread && code_begin[e + 1] != code_begin[e] + bytes) {
      return "memory code offsets disagree with " + std::to_string(quant::width(format)) +
             "-bit codes of the bitmap's blocks at neuron " + std::to_string(n0) +
             " (damaged, or bits other than the store's?)";
    }
  }
  if (lengths.scales != total_blocks() ||
      (format != kCodesUnread && lengths.codes != total_code_bytes())) {
    return "memory arrays disagree in size: " + std::to_string(lengths.scales) + " scales and " +
           std::to_string(lengths.codes) + " code bytes for " + std::to_string(total_blocks()) +
           " blocks of " + std::to_string(total_code_bytes()) + " bytes (not from one SpatialMemory?)";
  }
  return {};
}

}  // namespace spatium
