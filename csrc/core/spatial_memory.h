// The spatial memory of one layer: quantized, block-sparse weights of `out_features` neurons over
// `in_features` inputs whose positions are Morton codes, sorted ascending. Torch-free.
//
// Regions: region key = input code >> region_bits; the inputs of a region are one contiguous run
// of the sorted inputs. A block is one neuron x one region; a neuron's memory is its set of
// active blocks. Layout:
//   bitmap      [ceil(out * regions / 64)]  bit n * regions + r: block (n, r) is active
//   block_begin [out / 8 + 1]  active blocks before neurons 0, 8, 16, ...; the total last
//   code_begin  [out / 8 + 1]  code bytes before the same neurons; the total last
//   scales      [blocks]       fp16 bits, blocks in (neuron, region) order
//   codes       [bytes]        the arena: each block's packed codes, byte-aligned, same order
// block_begin and code_begin (the directory) are derived from the bitmap; with the bitmap they
// locate any block after a walk over at most 7 neurons' bits (see PackedView).
// A split-block bloom filter over (neuron, region key) answers "might n hold this region?".
// The per-block arrays live in one shared Blocks object: a layout change builds a new one, so
// a holder of the old one (a tensor view saved for backward) never sees freed memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "bloom.h"
#include "packed_view.h"

namespace spatium {

struct MemoryStats {
  int64_t total_capacity = 0;  // weights the neuron(s) may hold: fan-in
  int64_t used_capacity = 0;   // weights stored: inputs covered by active blocks
  int64_t nonzero = 0;         // non-zero codes
  int64_t active_regions = 0;  // active blocks
  int64_t bytes = 0;           // real footprint
};

class SpatialMemory {
 public:
  // The arrays that change with the layout (see the top of this file).
  struct Blocks {
    std::vector<uint64_t> bitmap;
    std::vector<int64_t> block_begin;
    std::vector<int64_t> code_begin;
    std::vector<uint16_t> scales;
    std::vector<uint8_t> codes;
  };

  // input_codes: the Morton codes of the inputs, strictly ascending, each < 2^48. format: a
  // code width in {1, 2, 4, 8} or quant::kNf4; region_bits in [0, 48]. Starts with no active block. Throws
  // std::invalid_argument naming the problem.
  SpatialMemory(int64_t out_features, std::vector<uint64_t> input_codes, int format,
                int region_bits);
  // Move-only: a copy would share its Blocks.
  SpatialMemory(SpatialMemory&&) = default;
  SpatialMemory& operator=(SpatialMemory&&) = default;
  SpatialMemory(const SpatialMemory&) = delete;
  SpatialMemory& operator=(const SpatialMemory&) = delete;

  // Rebuilds a memory from its parts (the serialized state), validating every one: sizes that
  // disagree or a bitmap with bits past the last region throw std::invalid_argument (every
  // stored value is a code).
  // stored_input_codes as stored_input_codes() gives them (empty for the default layout).
  static SpatialMemory from_parts(int64_t out_features, int64_t in_features,
                                  std::vector<uint64_t> stored_input_codes, int format,
                                  int region_bits, std::vector<uint64_t> bitmap,
                                  std::vector<uint16_t> scales, std::vector<uint8_t> codes);

  int64_t out_features() const { return out_features_; }
  int64_t in_features() const { return in_features_; }
  int format() const { return format_; }
  int region_bits() const { return region_bits_; }
  int64_t num_regions() const { return static_cast<int64_t>(region_keys_.size()); }
  uint64_t region_key(int64_t r) const { return region_keys_[r]; }
  int64_t region_begin(int64_t r) const { return region_begin_[r]; }  // first input of region r
  int64_t region_size(int64_t r) const { return region_begin_[r + 1] - region_begin_[r]; }
  int64_t region_of_input(int64_t input) const;
  // The inputs' codes as stored: empty for the default layout (input j at code j), which then
  // costs no memory.
  const std::vector<uint64_t>& stored_input_codes() const { return input_codes_; }
  const std::vector<uint64_t>& region_keys() const { return region_keys_; }

  // Layout.
  bool is_active(int64_t neuron, int64_t region) const { return view().is_active(neuron, region); }
  int64_t active_blocks() const { return static_cast<int64_t>(blocks_->scales.size()); }
  // Makes the active blocks those of mask [out][regions] (non-zero = active). Blocks active
  // before and after keep their codes and scale; newly active blocks start at zero.
  void set_active(const uint8_t* mask);

  // A memory whose neuron i is this memory's neuron rows[i], blocks and codes copied: rows may
  // repeat a neuron (a split) or leave one out (a prune). Throws std::out_of_range for a row
  // outside [0, out_features) and std::invalid_argument for no rows.
  SpatialMemory select_neurons(const std::vector<int64_t>& rows) const;

  // Values.
  // Re-quantizes the active blocks of neurons [n0, n1) from latent weights [out][in] (row
  // stride ld, inputs in sorted order; `latent` points at row 0). Disjoint ranges may run in
  // parallel.
  void quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld);
  // The kernels' view of the current arrays (dequantize_rows, dequantize_regions, ...). Valid
  // until the next layout change.
  PackedView view() const;

  // Point API by input position (a Morton code). contains: whether the neuron holds the block of
  // that position (false for positions that are no input). read: the stored weight (0 outside
  // active blocks). write: stores value, activating the block if needed; the block is
  // re-quantized with its other weights, so read returns value as quantized. read/write throw
  // std::invalid_argument for a position that is no input and std::out_of_range for a neuron.
  bool contains(int64_t neuron, uint64_t code) const;
  float read(int64_t neuron, uint64_t code) const;
  void write(int64_t neuron, uint64_t code, float value);
  int64_t input_index(uint64_t code) const;  // -1 when the position is no input

  // Stats and footprint.
  MemoryStats neuron_stats(int64_t neuron) const;
  MemoryStats stats() const;  // summed over neurons, plus the layer-wide tables in bytes
  int64_t bytes() const { return stats().bytes; }

  // The raw parts, for serialization; blocks() shares ownership of the current arrays.
  const std::vector<int64_t>& region_begins() const { return region_begin_; }
  const std::vector<uint64_t>& bitmap() const { return blocks_->bitmap; }
  const std::vector<int64_t>& block_begin() const { return blocks_->block_begin; }
  const std::vector<int64_t>& code_begin() const { return blocks_->code_begin; }
  const std::vector<uint16_t>& scales() const { return blocks_->scales; }
  const std::vector<uint8_t>& codes() const { return blocks_->codes; }
  const std::shared_ptr<Blocks>& blocks() const { return blocks_; }
  const bloom::SplitBlockBloom& bloom() const { return bloom_; }
  // A checksum of the configuration and every array, for detecting damaged saved states.
  uint64_t checksum() const;

 private:
  void check_neuron(int64_t neuron) const;
  static uint64_t bloom_key(int64_t neuron, uint64_t region_key);
  // The kernels' view of a given set of arrays (the current ones, or ones being built).
  PackedView view_of(const Blocks& blocks) const;
  // New Blocks for `bitmap`: offsets derived, scales and codes sized (zero-filled).
  std::shared_ptr<Blocks> make_blocks(std::vector<uint64_t> bitmap) const;
  // Rebuilds the bloom filter from the current bitmap.
  void rebuild_bloom();

  int64_t out_features_;
  int format_;
  int region_bits_;
  int64_t in_features_;
  std::vector<uint64_t> input_codes_;  // empty: the default layout
  std::vector<uint64_t> region_keys_;
  std::vector<int64_t> region_begin_;  // [regions + 1]

  std::shared_ptr<Blocks> blocks_;
  bloom::SplitBlockBloom bloom_{1};
};

}  // namespace spatium
