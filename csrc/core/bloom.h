// Split-block bloom filter: each key maps to one 256-bit block (one cache line half, one AVX2
// register) and sets one bit in each of the block's eight 32-bit words. A lookup touches one
// block, so it costs one cache miss at most. Torch-free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "huge_page_allocator.h"

namespace spatium::bloom {

enum class Kernel { Auto, Portable, Avx2 };

class SplitBlockBloom {
 public:
  static constexpr size_t kBlockBytes = 32;
  static constexpr size_t kImageOverhead = 24;  // magic, version, block count, checksum

  // A filter of `num_blocks` >= 1 blocks. Kernel::Auto picks AVX2 where the CPU has it; all
  // kernels set and test the same bits. Throws std::invalid_argument for 0 blocks or an
  // unavailable kernel.
  explicit SplitBlockBloom(size_t num_blocks, Kernel kernel = Kernel::Auto);

  // The smallest filter whose expected false-positive rate with `expected_keys` keys is at most
  // `target_fpr` (0 < target_fpr < 1; otherwise std::invalid_argument).
  static SplitBlockBloom for_capacity(size_t expected_keys, double target_fpr,
                                      Kernel kernel = Kernel::Auto);

  // Expected false-positive rate of a filter of `num_blocks` blocks holding `keys` keys (the
  // exact expectation for uniformly hashed keys: Poisson block loads).
  static double expected_fpr(size_t keys, size_t num_blocks);

  void insert(uint64_t key);
  bool might_contain(uint64_t key) const;  // never false for an inserted key

  // Batch versions; they prefetch blocks ahead, which pays when the filter is out of cache.
  void insert_batch(const uint64_t* keys, size_t n);
  // Writes 1 (might contain) or 0 (surely absent) per key into out[n]; returns the number of 1s.
  size_t might_contain_batch(const uint64_t* keys, size_t n, uint8_t* out) const;

  void clear();  // removes every key, keeps the size

  size_t num_blocks() const { return blocks_.size(); }
  size_t size_bytes() const { return blocks_.size() * kBlockBytes; }
  // The filter with its metadata: what serialize() produces.
  size_t image_bytes() const { return size_bytes() + kImageOverhead; }
  Kernel kernel() const { return kernel_; }

  // A self-describing byte image: magic, version, block count, blocks, checksum.
  std::vector<uint8_t> serialize() const;
  // Rebuilds a filter from serialize()'s image. A truncated, resized or damaged buffer throws
  // std::invalid_argument naming the problem; it never reads out of bounds.
  static SplitBlockBloom deserialize(const uint8_t* data, size_t size,
                                     Kernel kernel = Kernel::Auto);

  friend bool operator==(const SplitBlockBloom& a, const SplitBlockBloom& b);

 private:
  struct alignas(kBlockBytes) Block {
    uint32_t word[8];
  };

  std::vector<Block, HugePageAllocator<Block>> blocks_;
  Kernel kernel_;
};

}  // namespace spatium::bloom
