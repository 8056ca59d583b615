#include "spatial_memory.h"

#include <algorithm>
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

int popcount(uint64_t word) { return __builtin_popcountll(word); }

}  // namespace

SpatialMemory::SpatialMemory(int64_t out_features, std::vector<uint64_t> input_codes, int bits,
                             int region_bits)
    : out_features_(out_features),
      bits_(bits),
      region_bits_(region_bits),
      input_codes_(std::move(input_codes)) {
  if (out_features < 1) throw error("out_features must be >= 1, got " + std::to_string(out_features));
  if (!quant::valid_bits(bits)) {
    throw error("bits must be one of 1, 2, 4, 8, got " + std::to_string(bits));
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
  }
  for (size_t i = 0; i < input_codes_.size(); ++i) {
    const uint64_t key = input_codes_[i] >> region_bits_;
    if (region_keys_.empty() || region_keys_.back() != key) {
      region_keys_.push_back(key);
      region_begin_.push_back(static_cast<int64_t>(i));
    }
  }
  region_begin_.push_back(in_features());
  words_ = (num_regions() + 63) / 64;
  bitmap_.assign(static_cast<size_t>(out_features_ * words_), 0);
  rebuild_index();
}

SpatialMemory SpatialMemory::from_parts(int64_t out_features, std::vector<uint64_t> input_codes,
                                        int bits, int region_bits, std::vector<uint64_t> bitmap,
                                        std::vector<uint16_t> scales, std::vector<uint8_t> codes) {
  SpatialMemory memory(out_features, std::move(input_codes), bits, region_bits);
  if (static_cast<int64_t>(bitmap.size()) != out_features * memory.words_) {
    throw error("bitmap has " + std::to_string(bitmap.size()) + " words, expected " +
                std::to_string(out_features * memory.words_));
  }
  const int64_t tail = memory.num_regions() % 64;
  if (tail != 0) {
    for (int64_t n = 0; n < out_features; ++n) {
      if (bitmap[(n + 1) * memory.words_ - 1] >> tail) throw error("bitmap marks regions past the last");
    }
  }
  memory.bitmap_ = std::move(bitmap);
  memory.rebuild_index();
  if (static_cast<int64_t>(scales.size()) != memory.active_blocks()) {
    throw error("scales hold " + std::to_string(scales.size()) + " blocks, the bitmap " +
                std::to_string(memory.active_blocks()));
  }
  if (static_cast<int64_t>(codes.size()) != memory.code_begin_.back()) {
    throw error("codes hold " + std::to_string(codes.size()) + " bytes, expected " +
                std::to_string(memory.code_begin_.back()));
  }
  for (int64_t n = 0; n < out_features; ++n) {
    memory.for_each_block(n, [&](int64_t r, int64_t, int64_t offset) {
      for (int64_t j = 0; j < memory.region_size(r); ++j) {
        if (!quant::valid_stored(bits, quant::get_stored(codes.data() + offset, bits, j))) {
          throw error("codes hold a value outside the " + std::to_string(bits) + "-bit code set");
        }
      }
    });
  }
  memory.scales_ = std::move(scales);
  memory.codes_ = std::move(codes);
  return memory;
}

int64_t SpatialMemory::region_of_input(int64_t input) const {
  return std::upper_bound(region_begin_.begin(), region_begin_.end(), input) -
         region_begin_.begin() - 1;
}

int64_t SpatialMemory::region_bytes(int64_t r) const {
  return quant::code_bytes(bits_, region_size(r));
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

template <class Visit>
void SpatialMemory::for_each_block(int64_t neuron, Visit&& visit) const {
  int64_t block = block_begin_[neuron];
  int64_t offset = code_begin_[neuron];
  const uint64_t* row = bitmap_.data() + neuron * words_;
  for (int64_t w = 0; w < words_; ++w) {
    for (uint64_t bits = row[w]; bits != 0; bits &= bits - 1) {
      const int64_t r = w * 64 + __builtin_ctzll(bits);
      visit(r, block, offset);
      ++block;
      offset += region_bytes(r);
    }
  }
}

void SpatialMemory::rebuild_index() {
  block_begin_.assign(static_cast<size_t>(out_features_ + 1), 0);
  code_begin_.assign(static_cast<size_t>(out_features_ + 1), 0);
  for (int64_t n = 0; n < out_features_; ++n) {
    int64_t blocks = 0, bytes = 0;
    const uint64_t* row = bitmap_.data() + n * words_;
    for (int64_t w = 0; w < words_; ++w) {
      blocks += popcount(row[w]);
      for (uint64_t bits = row[w]; bits != 0; bits &= bits - 1) {
        bytes += region_bytes(w * 64 + __builtin_ctzll(bits));
      }
    }
    block_begin_[n + 1] = block_begin_[n] + blocks;
    code_begin_[n + 1] = code_begin_[n] + bytes;
  }
  bloom_ = bloom::SplitBlockBloom::for_capacity(
      static_cast<size_t>(std::max<int64_t>(active_blocks(), 1)), kBloomFalsePositiveRate);
  for (int64_t n = 0; n < out_features_; ++n) {
    for_each_block(n, [&](int64_t r, int64_t, int64_t) { bloom_.insert(bloom_key(n, region_keys_[r])); });
  }
}

void SpatialMemory::set_active(const uint8_t* mask) {
  SpatialMemory next = *this;  // built aside: a failure leaves this memory unchanged
  std::fill(next.bitmap_.begin(), next.bitmap_.end(), 0);
  const int64_t regions = num_regions();
  for (int64_t n = 0; n < out_features_; ++n) {
    for (int64_t r = 0; r < regions; ++r) {
      if (mask[n * regions + r]) next.bitmap_[n * words_ + (r >> 6)] |= uint64_t{1} << (r & 63);
    }
  }
  next.rebuild_index();
  next.scales_.assign(static_cast<size_t>(next.active_blocks()), 0);
  next.codes_.assign(static_cast<size_t>(next.code_begin_.back()), 0);
  const std::vector<float> zeros(static_cast<size_t>(in_features()), 0.0f);
  for (int64_t n = 0; n < out_features_; ++n) {
    // Old blocks of this neuron, in region order, walked alongside the new ones.
    std::vector<std::pair<int64_t, int64_t>> old_blocks;  // (block index, byte offset) by region
    std::vector<int64_t> old_regions;
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      old_regions.push_back(r);
      old_blocks.emplace_back(b, off);
    });
    size_t k = 0;
    next.for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      while (k < old_regions.size() && old_regions[k] < r) ++k;
      if (k < old_regions.size() && old_regions[k] == r) {
        next.scales_[b] = scales_[old_blocks[k].first];
        std::copy_n(codes_.data() + old_blocks[k].second, region_bytes(r), next.codes_.data() + off);
      } else {
        next.scales_[b] = quant::quantize_block(zeros.data(), region_size(r), bits_,
                                                next.codes_.data() + off);
      }
    });
  }
  *this = std::move(next);
}

void SpatialMemory::quantize_rows(int64_t n0, int64_t n1, const float* latent, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) {
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      scales_[b] = quant::quantize_block(latent + n * ld + region_begin_[r], region_size(r), bits_,
                                         codes_.data() + off);
    });
  }
}

void SpatialMemory::dequantize_rows(int64_t n0, int64_t n1, float* out, int64_t ld) const {
  for (int64_t n = n0; n < n1; ++n) {
    float* row = out + (n - n0) * ld;
    std::fill(row, row + in_features(), 0.0f);
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      quant::dequantize_block(codes_.data() + off, region_size(r), bits_, scales_[b],
                              row + region_begin_[r]);
    });
  }
}

void SpatialMemory::dequantize_regions(int64_t r0, int64_t r1, float* out, int64_t ld) const {
  const int64_t first = region_begin_[r0];
  const int64_t cols = region_begin_[r1] - first;
  for (int64_t n = 0; n < out_features_; ++n) {
    float* row = out + n * ld;
    std::fill(row, row + cols, 0.0f);
    for_each_block(n, [&](int64_t r, int64_t b, int64_t off) {
      if (r >= r0 && r < r1) {
        quant::dequantize_block(codes_.data() + off, region_size(r), bits_, scales_[b],
                                row + region_begin_[r] - first);
      }
    });
  }
}

int64_t SpatialMemory::input_index(uint64_t code) const {
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
  for_each_block(neuron, [&](int64_t r, int64_t b, int64_t off) {
    if (r == region) {
      value = half_to_float(scales_[b]) *
              static_cast<float>(quant::from_stored(
                  bits_, quant::get_stored(codes_.data() + off, bits_, input - region_begin_[r])));
    }
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
  for_each_block(neuron, [&](int64_t r, int64_t b, int64_t off) {
    if (r != region) return;
    std::vector<float> block(static_cast<size_t>(region_size(r)));
    quant::dequantize_block(codes_.data() + off, region_size(r), bits_, scales_[b], block.data());
    block[input - region_begin_[r]] = value;
    scales_[b] = quant::quantize_block(block.data(), region_size(r), bits_, codes_.data() + off);
  });
}

MemoryStats SpatialMemory::neuron_stats(int64_t neuron) const {
  check_neuron(neuron);
  MemoryStats s;
  s.total_capacity = in_features();
  for_each_block(neuron, [&](int64_t r, int64_t, int64_t off) {
    s.used_capacity += region_size(r);
    s.nonzero += quant::count_nonzero(codes_.data() + off, region_size(r), bits_);
    ++s.active_regions;
  });
  // Codes, one fp16 scale a block, the neuron's bitmap row and its two directory offsets.
  s.bytes = (code_begin_[neuron + 1] - code_begin_[neuron]) + 2 * s.active_regions +
            8 * words_ + 2 * 8;
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
  // Layer-wide: input codes, region keys and starts, the directory sentinels, the bloom filter.
  total.bytes += 8 * in_features() + 8 * num_regions() + 8 * (num_regions() + 1) + 2 * 8 +
                 static_cast<int64_t>(bloom_.size_bytes());
  return total;
}

}  // namespace spatium
