// The spatial memory of one layer: quantized, block-sparse weights of `out_features` neurons over
// `in_features` inputs whose positions are Morton codes, sorted ascending (DESIGN §2). Torch-free.
//
// Regions: region key = input code >> region_bits; the inputs of a region are one contiguous run
// of the sorted inputs. A block is one neuron x one region; a neuron's memory is its set of
// active blocks. Layout:
//   bitmap      [out][words]  bit r of neuron n: block (n, r) is active
//   block_begin [out + 1]     prefix count of active blocks: index of neuron n's first scale
//   code_begin  [out + 1]     prefix byte offset of neuron n's codes in the arena
//   scales      [blocks]      fp16 bits, blocks in (neuron, region) order
//   codes       [bytes]       the arena: each block's packed codes, byte-aligned, same order
// block_begin and code_begin are derived from the bitmap (they are what makes lookups O(1)).
// A split-block bloom filter over (neuron, region key) answers "might n hold this region?".
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bloom.h"

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
  // input_codes: the Morton codes of the inputs, strictly ascending, each < 2^48. bits in
  // {1, 2, 4, 8}; region_bits in [0, 48]. Starts with no active block. Throws
  // std::invalid_argument naming the problem.
  SpatialMemory(int64_t out_features, std::vector<uint64_t> input_codes, int bits, int region_bits);

  // Rebuilds a memory from its parts (the serialized state), validating every one: sizes that
  // disagree, codes outside the code set or a bitmap with bits past the last region throw
  // std::invalid_argument.
  static SpatialMemory from_parts(int64_t out_features, std::vector<uint64_t> input_codes,
                                  int bits, int region_bits, std::vector<uint64_t> bitmap,
                                  std::vector<uint16_t> scales, std::vector<uint8_t> codes);

  int64_t out_features() const { return out_features_; }
  int64_t in_features() const { return static_cast<int64_t>(input_codes_.size()); }
  int bits() const { return bits_; }
  int region_bits() const { return region_bits_; }
  int64_t num_regions() const { return static_cast<int64_t>(region_keys_.size()); }
  int64_t bitmap_words() const { return words_; }
  uint64_t region_key(int64_t r) const { return region_keys_[r]; }
  int64_t region_begin(int64_t r) const { return region_begin_[r]; }  // first input of region r
  int64_t region_size(int64_t r) const { return region_begin_[r + 1] - region_begin_[r]; }
  int64_t region_of_input(int64_t input) const;
  const std::vector<uint64_t>& input_codes() const { return input_codes_; }

  // Layout.
  bool is_active(int64_t neuron, int64_t region) const {
    return (bitmap_[neuron * words_ + (region >> 6)] >> (region & 63)) & 1u;
  }
  int64_t active_blocks() const { return block_begin_.back(); }
  // Makes the active blocks those of mask [out][regions] (non-zero = active). Blocks active
  // before and after keep their codes and scale; newly active blocks start at zero.
  void set_active(const uint8_t* mask);

  // Values.
  // Re-quantizes the active blocks of neurons [n0, n1) from latent weights [out][in] (row
  // stride ld, inputs in sorted order; `latent` points at row 0). Disjoint ranges may run in
  // parallel.
  void quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld);
  // Dequantized rows [n0, n1) into out (row stride ld), zeros outside active blocks.
  void dequantize_rows(int64_t n0, int64_t n1, float* out, int64_t ld) const;
  // Dequantized columns of regions [r0, r1) for all neurons: out[n][c] for c in
  // [0, region_begin(r1) - region_begin(r0)), row stride ld.
  void dequantize_regions(int64_t r0, int64_t r1, float* out, int64_t ld) const;

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

  // The raw parts, for serialization and for kernels.
  const std::vector<uint64_t>& bitmap() const { return bitmap_; }
  const std::vector<int64_t>& block_begin() const { return block_begin_; }
  const std::vector<int64_t>& code_begin() const { return code_begin_; }
  const std::vector<uint16_t>& scales() const { return scales_; }
  const std::vector<uint8_t>& codes() const { return codes_; }
  const bloom::SplitBlockBloom& bloom() const { return bloom_; }

 private:
  int64_t region_bytes(int64_t r) const;
  void check_neuron(int64_t neuron) const;
  static uint64_t bloom_key(int64_t neuron, uint64_t region_key);
  // Recomputes block_begin_/code_begin_ from the bitmap and rebuilds the bloom filter.
  void rebuild_index();
  // Calls visit(region, block index, byte offset) for each active block of a neuron, in order.
  template <class Visit>
  void for_each_block(int64_t neuron, Visit&& visit) const;

  int64_t out_features_;
  int bits_;
  int region_bits_;
  std::vector<uint64_t> input_codes_;
  std::vector<uint64_t> region_keys_;
  std::vector<int64_t> region_begin_;  // [regions + 1]
  int64_t words_;                      // bitmap words per neuron

  std::vector<uint64_t> bitmap_;
  std::vector<int64_t> block_begin_;
  std::vector<int64_t> code_begin_;
  std::vector<uint16_t> scales_;
  std::vector<uint8_t> codes_;
  bloom::SplitBlockBloom bloom_{1};
};

}  // namespace spatium
