#include "spatial_memory.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "hash.h"
#include "morton.h"
#include "quantize.h"

namespace spatium {
namespace {

constexpr double kBloomFalsePositiveRate = 0.01;

std::invalid_argument error(const std::string& what) {
  return std::invalid_argument("SpatialMemory: " + what);
}

template <class T>
uint64_t checksum_of(uint64_t h, const std::vector<T>& values) {
  return hash_bytes(h, values.data(), values.size() * sizeof(T));
}

}  // namespace

SpatialMemory::SpatialMemory(int64_t out_features, std::vector<uint64_t> input_codes, int format,
                             int region_bits)
    : out_features_(out_features),
      format_(format),
      region_bits_(region_bits),
      in_features_(static_cast<int64_t>(input_codes.size())),
      input_codes_(std::move(input_codes)) {
  if (out_features < 1) {
    throw error("out_features must be >= 1, got " + std::to_string(out_features));
  }
  if (!quant::valid_format(format)) {
    throw error("bits must be one of 1, 2, 4, 8 (or the nf4 or 2-bit odd format), got " +
                std::to_string(format));
  }
  if (region_bits < 0 || region_bits > morton::kCodeBits) {
    throw error("region_bits must be in [0, 48], got " + std::to_string(region_bits));
  }
  if (input_codes_.empty()) throw error("a layer needs at least one input");
  for (size_t i = 0; i < input_codes_.size(); ++i) {
    if (input_codes_[i] >= morton::kCodeLimit) throw error("input code out of range [0, 2^48)");
    if (i > 0 && input_codes_[i] <= input_codes_[i - 1]) {
      throw error("input codes must be strictly ascending (distinct positions, Morton-sorted)");
    }
    const uint64_t key = input_codes_[i] >> region_bits_;
    if (region_keys_.empty() || region_keys_.back() != key) {
      region_keys_.push_back(key);
      region_begin_.push_back(static_cast<int64_t>(i));
    }
  }
  region_begin_.push_back(in_features());
  bool default_layout = true;
  for (size_t i = 0; i < input_codes_.size() && default_layout; ++i) {
    default_layout = input_codes_[i] == i;
  }
  if (default_layout) std::vector<uint64_t>().swap(input_codes_);
  blocks_ = make_blocks(
      std::vector<uint64_t>(static_cast<size_t>(bitmap_words(out_features_, num_regions())), 0));
  rebuild_bloom();
}

SpatialMemory SpatialMemory::from_parts(int64_t out_features, int64_t in_features,
                                        std::vector<uint64_t> stored_input_codes, int format,
                                        int region_bits, std::vector<uint64_t> bitmap,
                                        std::vector<uint16_t> scales, std::vector<uint8_t> codes) {
  if (stored_input_codes.empty()) {
    if (in_features < 1) throw error("a layer needs at least one input");
    stored_input_codes.resize(static_cast<size_t>(in_features));
    for (size_t i = 0; i < stored_input_codes.size(); ++i) stored_input_codes[i] = i;
  } else if (static_cast<int64_t>(stored_input_codes.size()) != in_features) {
    throw error("input codes hold " + std::to_string(stored_input_codes.size()) +
                " inputs, expected " + std::to_string(in_features));
  }
  SpatialMemory memory(out_features, std::move(stored_input_codes), format, region_bits);
  const int64_t words = bitmap_words(out_features, memory.num_regions());
  if (static_cast<int64_t>(bitmap.size()) != words) {
    throw error("bitmap has " + std::to_string(bitmap.size()) + " words, expected " +
                std::to_string(words));
  }
  const int64_t used_bits = out_features * memory.num_regions() - (words - 1) * 64;
  if (used_bits < 64 && (bitmap.back() >> used_bits) != 0) {
    throw error("bitmap marks blocks past the last neuron");
  }
  std::shared_ptr<Blocks> blocks = memory.make_blocks(std::move(bitmap));
  if (scales.size() != blocks->scales.size()) {
    throw error("scales hold " + std::to_string(scales.size()) + " blocks, the bitmap " +
                std::to_string(blocks->scales.size()));
  }
  if (codes.size() != blocks->codes.size()) {
    throw error("codes hold " + std::to_string(codes.size()) + " bytes, expected " +
                std::to_string(blocks->codes.size()));
  }
  blocks->scales = std::move(scales);
  blocks->codes = std::move(codes);
  memory.blocks_ = std::move(blocks);
  memory.rebuild_bloom();
  return memory;
}

PackedView SpatialMemory::view() const { return view_of(*blocks_); }

PackedView SpatialMemory::view_of(const Blocks& blocks) const {
  PackedView v;
  v.out_features = out_features_;
  v.in_features = in_features();
  v.num_regions = num_regions();
  v.format = format_;
  v.full_region_bits = region_bits_;
  v.region_begin = region_begin_.data();
  v.bitmap = blocks.bitmap.data();
  v.block_begin = blocks.block_begin.data();
  v.code_begin = blocks.code_begin.data();
  v.scales = blocks.scales.data();
  v.codes = blocks.codes.data();
  return v;
}

int64_t SpatialMemory::region_of_input(int64_t input) const {
  return std::upper_bound(region_begin_.begin(), region_begin_.end(), input) -
         region_begin_.begin() - 1;
}

void SpatialMemory::check_neuron(int64_t neuron) const {
  if (neuron < 0 || neuron >= out_features_) {
    throw std::out_of_range("SpatialMemory: neuron " + std::to_string(neuron) +
                            " out of range [0, " + std::to_string(out_features_) + ")");
  }
}

uint64_t SpatialMemory::bloom_key(int64_t neuron, uint64_t region_key) {
  return mix64(static_cast<uint64_t>(neuron)) ^ region_key;
}

std::shared_ptr<SpatialMemory::Blocks> SpatialMemory::make_blocks(
    std::vector<uint64_t> bitmap) const {
  auto blocks = std::make_shared<Blocks>();
  blocks->bitmap = std::move(bitmap);
  const int64_t entries = directory_entries(out_features_);
  blocks->block_begin.assign(static_cast<size_t>(entries), 0);
  blocks->code_begin.assign(static_cast<size_t>(entries), 0);
  const PackedView v = view_of(*blocks);  // only its bitmap is read below
  int64_t count = 0, bytes = 0;
  for (int64_t n = 0; n < out_features_; ++n) {
    if (n % kDirectoryStride == 0) {
      blocks->block_begin[n / kDirectoryStride] = count;
      blocks->code_begin[n / kDirectoryStride] = bytes;
    }
    v.for_each_region(n, [&](int64_t r) {
      ++count;
      bytes += quant::code_bytes(quant::width(format_), region_size(r));
    });
  }
  blocks->block_begin.back() = count;
  blocks->code_begin.back() = bytes;
  blocks->scales.assign(static_cast<size_t>(count), 0);
  blocks->codes.assign(static_cast<size_t>(bytes), 0);
  return blocks;
}

void SpatialMemory::rebuild_bloom() {
  bloom::SplitBlockBloom filter = bloom::SplitBlockBloom::for_capacity(
      static_cast<size_t>(std::max<int64_t>(active_blocks(), 1)), kBloomFalsePositiveRate);
  const PackedView v = view();
  for (int64_t n = 0; n < out_features_; ++n) {
    v.for_each_block(n, [&](int64_t r, int64_t, int64_t) {
      filter.insert(bloom_key(n, region_keys_[r]));
    });
  }
  bloom_ = std::move(filter);
}

void SpatialMemory::set_active(const uint8_t* mask) {
  const int64_t regions = num_regions();
  std::vector<uint64_t> bitmap(static_cast<size_t>(bitmap_words(out_features_, regions)), 0);
  for (int64_t bit = 0; bit < out_features_ * regions; ++bit) {
    if (mask[bit]) bitmap[bit >> 6] |= uint64_t{1} << (bit & 63);
  }
  std::shared_ptr<Blocks> next = make_blocks(std::move(bitmap));
  const PackedView after = view_of(*next);
  const PackedView before = view();
  const std::vector<float> zeros(static_cast<size_t>(in_features()), 0.0f);
  for (int64_t n = 0; n < out_features_; ++n) {
    // The old blocks of this neuron, walked alongside the new ones (both in region order).
    std::vector<int64_t> old_region, old_block, old_offset;
    before.for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      old_region.push_back(r);
      old_block.push_back(b);
      old_offset.push_back(off);
    });
    size_t k = 0;
    after.for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      while (k < old_region.size() && old_region[k] < r) ++k;
      if (k < old_region.size() && old_region[k] == r) {
        next->scales[b] = blocks_->scales[old_block[k]];
        std::copy_n(blocks_->codes.data() + old_offset[k], after.region_bytes(r),
                    next->codes.data() + off);
      } else {
        next->scales[b] =
            quant::quantize_block(zeros.data(), region_size(r), format_, next->codes.data() + off);
      }
    });
  }
  blocks_ = std::move(next);
  rebuild_bloom();
}

SpatialMemory SpatialMemory::select_neurons(const std::vector<int64_t>& rows) const {
  if (rows.empty()) throw error("select_neurons needs at least one neuron");
  for (int64_t row : rows) check_neuron(row);
  std::vector<uint64_t> codes = input_codes_;
  if (codes.empty()) {  // the default layout: input j at code j
    codes.resize(static_cast<size_t>(in_features_));
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = i;
  }
  SpatialMemory next(static_cast<int64_t>(rows.size()), std::move(codes), format_, region_bits_);
  const int64_t regions = num_regions();
  std::vector<uint64_t> bitmap(static_cast<size_t>(bitmap_words(next.out_features_, regions)), 0);
  const PackedView before = view();
  for (size_t i = 0; i < rows.size(); ++i) {
    before.for_each_region(rows[i], [&](int64_t r) {
      const int64_t bit = static_cast<int64_t>(i) * regions + r;
      bitmap[bit >> 6] |= uint64_t{1} << (bit & 63);
    });
  }
  std::shared_ptr<Blocks> blocks = next.make_blocks(std::move(bitmap));
  const PackedView after = next.view_of(*blocks);
  for (size_t i = 0; i < rows.size(); ++i) {
    // Same regions in the same order on both sides: copy block by block.
    std::vector<std::pair<int64_t, int64_t>> source;  // (block, offset) of the old neuron
    before.for_each_block(rows[i], [&](int64_t, int64_t b, int64_t off) { source.emplace_back(b, off); });
    size_t k = 0;
    after.for_each_block(static_cast<int64_t>(i), [&](int64_t r, int64_t b, int64_t off) {
      blocks->scales[b] = blocks_->scales[source[k].first];
      std::copy_n(blocks_->codes.data() + source[k].second, after.region_bytes(r),
                  blocks->codes.data() + off);
      ++k;
    });
  }
  next.blocks_ = std::move(blocks);
  next.rebuild_bloom();
  return next;
}

void SpatialMemory::quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld) {
  view().quantize_rows(n0, n1, latent, ld, blocks_->scales.data(), blocks_->codes.data());
}

int64_t SpatialMemory::input_index(uint64_t code) const {
  if (input_codes_.empty()) return code < static_cast<uint64_t>(in_features_) ? static_cast<int64_t>(code) : -1;
  const auto it = std::lower_bound(input_codes_.begin(), input_codes_.end(), code);
  return it != input_codes_.end() && *it == code ? it - input_codes_.begin() : -1;
}

bool SpatialMemory::contains(int64_t neuron, uint64_t code) const {
  check_neuron(neuron);
  if (!bloom_.might_contain(bloom_key(neuron, code >> region_bits_))) return false;
  const int64_t input = input_index(code);
  return input >= 0 && is_active(neuron, region_of_input(input));
}

float SpatialMemory::read(int64_t neuron, uint64_t code) const {
  check_neuron(neuron);
  const int64_t input = input_index(code);
  if (input < 0) throw error("position (Morton code " + std::to_string(code) + ") is no input");
  const int64_t region = region_of_input(input);
  float value = 0.0f;
  const PackedView v = view();
  v.for_each_block(neuron, [&](int64_t r, int64_t b, int64_t off) {
    if (r != region) return;
    const uint32_t stored = quant::get_stored(v.codes + off, quant::width(format_), region_size(r),
                                              input - region_begin_[r]);
    value = half_to_float(v.scales[b]) * quant::level_of(format_, stored);
  });
  return value;
}

void SpatialMemory::write(int64_t neuron, uint64_t code, float value) {
  check_neuron(neuron);
  const int64_t input = input_index(code);
  if (input < 0) throw error("position (Morton code " + std::to_string(code) + ") is no input");
  const int64_t region = region_of_input(input);
  if (!is_active(neuron, region)) {
    const int64_t regions = num_regions();
    std::vector<uint8_t> mask(static_cast<size_t>(out_features_ * regions));
    for (int64_t n = 0; n < out_features_; ++n) {
      for (int64_t r = 0; r < regions; ++r) mask[n * regions + r] = is_active(n, r);
    }
    mask[neuron * regions + region] = 1;
    set_active(mask.data());
  }
  view().for_each_block(neuron, [&](int64_t r, int64_t b, int64_t off) {
    if (r != region) return;
    std::vector<float> block(static_cast<size_t>(region_size(r)));
    uint8_t* codes = blocks_->codes.data() + off;
    quant::dequantize_block(codes, region_size(r), format_, blocks_->scales[b], block.data());
    block[input - region_begin_[r]] = value;
    blocks_->scales[b] = quant::quantize_block(block.data(), region_size(r), format_, codes);
  });
}

MemoryStats SpatialMemory::neuron_stats(int64_t neuron) const {
  check_neuron(neuron);
  MemoryStats s;
  s.total_capacity = in_features();
  const PackedView v = view();
  int64_t code_bytes = 0;
  v.for_each_block(neuron, [&](int64_t r, int64_t, int64_t off) {
    s.used_capacity += region_size(r);
    s.nonzero += quant::count_nonzero(v.codes + off, region_size(r), format_);
    ++s.active_regions;
    code_bytes += v.region_bytes(r);
  });
  // The neuron's own share: its codes and one fp16 scale a block.
  s.bytes = code_bytes + 2 * s.active_regions;
  return s;
}

MemoryStats SpatialMemory::stats() const {
  MemoryStats total;
  for (int64_t n = 0; n < out_features_; ++n) {
    const MemoryStats s = neuron_stats(n);
    total.total_capacity += s.total_capacity;
    total.used_capacity += s.used_capacity;
    total.nonzero += s.nonzero;
    total.active_regions += s.active_regions;
    total.bytes += s.bytes;
  }
  // Layer-wide: the bitmap, the directory, the input codes (none for the default layout), the
  // region table, the bloom filter.
  total.bytes += 8 * static_cast<int64_t>(blocks_->bitmap.size()) +
                 8 * static_cast<int64_t>(blocks_->block_begin.size() + blocks_->code_begin.size()) +
                 8 * static_cast<int64_t>(input_codes_.size()) +
                 8 * static_cast<int64_t>(region_keys_.size()) +
                 8 * static_cast<int64_t>(region_begin_.size()) +
                 static_cast<int64_t>(bloom_.image_bytes());
  return total;
}

uint64_t SpatialMemory::checksum() const {
  uint64_t h = mix64(static_cast<uint64_t>(out_features_) * 1000 + format_ * 100 + region_bits_);
  h = mix64(h + static_cast<uint64_t>(in_features_));
  h = checksum_of(h, input_codes_);
  h = checksum_of(h, blocks_->bitmap);
  h = checksum_of(h, blocks_->scales);
  return checksum_of(h, blocks_->codes);
}

}  // namespace spatium
