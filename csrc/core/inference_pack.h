// A layer's quantized weights re-laid for integer dot products, for inference on CPUs with
// AVX-512 VNNI (vpdpbusd: 64 unsigned-byte x signed-byte products into 16 int32 sums), or
// with AVX2 (see Isa).
//
// Neurons go in groups of 16 slots, one int32 lane each. A group keeps one panel per region that
// any of its neurons holds (the union of their blocks; a neuron without the block gets scale 0).
// Slot s holds neuron s, or for sparse layouts where that pays, the neuron neuron_order()[s]:
// neurons gathered so that each group's union of regions stays small. The kernels write each
// slot's output to its neuron's place: per aligned block of 16 neurons a group holds some of,
// one permute and one masked store a row, so callers see neuron order.
// A panel holds the 16 neurons' fp16 scales and their stored codes in 64-byte chunks: byte
// 4m + j of a chunk is neuron m's, and its bit plane p (bits p*b .. p*b+b-1) holds the code of
// input 4p + j of the chunk. So one load feeds every plane's vpdpbusd for all 16 neurons, each
// against 4 broadcast activation bytes. A chunk spans 4 * (8 / b) inputs (8 at 4 bits); a
// region's inputs are padded to whole chunks (padding codes are 0). Each plane of a chunk is
// also one row of an AMX B tile (4 inputs x 16 neurons), which the AMX-INT8 kernel for larger
// batches unpacks the codes into.
//
// Activations are quantized to int8 per row and region (scale max|x| / 127, round to nearest),
// so a block's sum is scale_w * scale_x * (mult * sum(stored * q) - offset * sum(q)) with the
// stored values' offset (mult 2 for the odd codes of 1 bit and kOdd2). The int32 sums are exact: the only
// error is the activations' rounding (relative output error about 5e-3 on Gaussian inputs).
// nf4 codes are packed as 8-bit values, round(127 x level) + 127, which adds each level's
// rounding (at most 1 / 254 of the scale).
//
// Torch-free; the caller runs groups in parallel.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "packed_view.h"

namespace spatium {

class InferencePack {
 public:
  static constexpr int64_t kGroup = 16;       // neurons per group: the int32 lanes of a zmm
  static constexpr int64_t kChunkBytes = 64;  // one zmm of codes

  // Inputs one chunk spans at `bits` bits a code.
  static constexpr int64_t chunk_inputs(int bits) { return 4 * (8 / bits); }

  // The instruction sets the kernels come in. AVX-512 VNNI: vpdpbusd on a whole chunk, and
  // AMX-INT8 for batches where the CPU and OS allow it. AVX2 (with FMA and F16C): each half of
  // a chunk through vpmaddubsw (unsigned codes x signed activations, pairs summed in int16:
  // at most 2 x 15 x 127, so 8-bit codes go in as two nibbles) and vpmaddwd into int32 sums.
  // Both give the same int32 sums, hence the same outputs up to float rounding.
  enum class Isa { kNone, kAvx2, kAvx512Vnni };
  // The best this CPU runs; the environment variable SPATIUM_INFERENCE_ISA=avx2 (read once)
  // restricts it to AVX2, which is how the tests check that path on an AVX-512 machine.
  static Isa best_isa();
  static const char* isa_name(Isa isa);
  // Whether this CPU runs the kernels: best_isa() is not kNone.
  static bool cpu_supported();

  // Re-lays the memory `v` views (a copy: the view's arrays may go away after). Throws
  // std::invalid_argument for a memory whose int32 sums could overflow (a region of more than
  // 66,311 inputs at 8 bits, 1.1 million at 4), or of more than 2^31 - 1 neurons.
  explicit InferencePack(const PackedView& v);

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  int64_t groups() const { return (out_features_ + kGroup - 1) / kGroup; }
  int bits() const { return bits_; }  // of the packed codes (8 for nf4)
  // Bytes the forward reads: codes, scales, the panel index and the neuron order.
  int64_t bytes() const;
  // The neuron each slot holds; empty when slot s holds neuron s.
  const std::vector<int32_t>& neuron_order() const { return order_; }

  // Activations of `batch` rows quantized for the kernels.
  struct Rows {
    int64_t batch = 0;
    int64_t stride = 0;       // bytes of q a row takes: its regions padded to whole chunks
    // Rows go in tiles of tile_rows (the last tile: the rows left, h). A tile starting at row
    // b0 takes q from b0 * stride on: 4-byte words of its h rows in turn, word w of row b0 + j
    // at 4 * (w * h + j), so one pointer reaches every row of the tile. tile_rows 1: plain
    // [batch][stride] rows, as the AVX2 and AMX kernels read them.
    int64_t tile_rows = 1;
    std::vector<int8_t> q;
    // Per row and region, in tiles too ([regions][h] from b0 * regions on): a block's float
    // sum is multiplier * (its int32 sum) - correction, before the block's scale: multiplier
    // = (max|x| / 127) x mult, correction = (max|x| / 127) x the stored values' offset x sum(q).
    std::vector<float> multiplier;
    std::vector<float> correction;
  };
  // Quantizes rows x[b * ldx + i] for linear_groups, with `isa`'s instructions (the same rows
  // either way). Returns false, leaving `rows` unusable, when x holds a NaN or an infinity.
  // Throws std::invalid_argument for an isa this CPU lacks.
  [[nodiscard]] bool quantize(const float* x, int64_t batch, int64_t ldx, Rows& rows,
                              Isa isa = best_isa()) const;
  // y[b * ldy + n] = bias[n] + sum_i w[n][i] x[b][i] for the neurons n that groups [g0, g1)
  // hold (see neuron_order), every row: the sums of products with the quantized rows, started
  // from the bias (null: none). Each group writes and reads only its own neurons' entries, so
  // groups run in parallel. With kAvx512Vnni: AMX tiles for batches of 8 rows or more where
  // the CPU and OS allow AMX-INT8, VNNI otherwise. Throws std::invalid_argument for an isa
  // this CPU lacks, or rows quantized for another isa.
  void linear_groups(int64_t g0, int64_t g1, const Rows& rows, const float* bias, float* y,
                     int64_t ldy, Isa isa = best_isa()) const;

  // A group's part of one aligned block of 16 neurons in an output row: which of them it holds
  // and in which of its lanes.
  struct Placement {
    int32_t first = 0;      // the block's first neuron, a multiple of 16
    uint16_t mask = 0;      // bit j: the group holds neuron first + j
    uint8_t lane[16] = {};  // the group's lane holding neuron first + j (0 where it holds none)
  };

 private:
  int bits_ = 0;
  int format_ = 0;  // the store's code format
  int64_t in_features_ = 0;
  int64_t out_features_ = 0;
  std::vector<int32_t> order_;         // [neurons] the neuron of each slot, or empty
  std::vector<int64_t> placement_begin_;  // [groups + 1] first placement of each group
  std::vector<Placement> placements_;     // per group, its blocks in order
  std::vector<int64_t> region_begin_;  // [regions + 1] the memory's
  std::vector<int64_t> padded_begin_;  // [regions + 1] where each region starts in a Rows row
  std::vector<int64_t> group_begin_;   // [groups + 1] first panel of each group
  std::vector<int32_t> panel_region_;  // [panels]
  std::vector<uint16_t> scales_;       // [panels][16] fp16
  std::vector<int64_t> panel_chunks_;  // [panels + 1] first chunk of each panel
  std::vector<uint8_t> codes_;         // [chunks][64]
};

}  // namespace spatium
