#include "bloom.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#include "hash.h"

namespace spatium::bloom {
namespace {

// One odd multiplier per word: bit (lo * salt[i]) >> 27 of word i. Drawn once from splitmix64.
constexpr uint32_t kSalt[8] = {0xFF50322Bu, 0x74E8902Fu, 0x3689B7E9u, 0xC7BC311Du,
                               0x6636701Du, 0x4B22E459u, 0x0461E94Fu, 0x182B3CDFu};

constexpr uint64_t kMaxBlocks = uint64_t{1} << 32;  // reduce() maps 32 hash bits

constexpr uint32_t kMagic = 0x46425453u;  // "STBF" little-endian
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 16;  // magic, version, block count
constexpr size_t kFooterBytes = 8;   // checksum
static_assert(kHeaderBytes + kFooterBytes == SplitBlockBloom::kImageOverhead);

inline uint32_t bit_in_word(uint32_t lo, int i) { return (lo * kSalt[i]) >> 27; }

[[gnu::target("avx2")]] inline __m256i block_mask_avx2(uint32_t lo) {
  const __m256i salts = _mm256_setr_epi32(
      static_cast<int>(kSalt[0]), static_cast<int>(kSalt[1]), static_cast<int>(kSalt[2]),
      static_cast<int>(kSalt[3]), static_cast<int>(kSalt[4]), static_cast<int>(kSalt[5]),
      static_cast<int>(kSalt[6]), static_cast<int>(kSalt[7]));
  const __m256i bits =
      _mm256_srli_epi32(_mm256_mullo_epi32(_mm256_set1_epi32(static_cast<int>(lo)), salts), 27);
  return _mm256_sllv_epi32(_mm256_set1_epi32(1), bits);
}

void insert_portable(uint32_t* word, uint32_t lo) {
  for (int i = 0; i < 8; ++i) word[i] |= uint32_t{1} << bit_in_word(lo, i);
}

bool contains_portable(const uint32_t* word, uint32_t lo) {
  uint32_t missing = 0;
  for (int i = 0; i < 8; ++i) missing |= ~word[i] & (uint32_t{1} << bit_in_word(lo, i));
  return missing == 0;
}

[[gnu::target("avx2")]] void insert_avx2(uint32_t* word, uint32_t lo) {
  auto* p = reinterpret_cast<__m256i*>(word);
  _mm256_store_si256(p, _mm256_or_si256(_mm256_load_si256(p), block_mask_avx2(lo)));
}

[[gnu::target("avx2")]] bool contains_avx2(const uint32_t* word, uint32_t lo) {
  const __m256i block = _mm256_load_si256(reinterpret_cast<const __m256i*>(word));
  return _mm256_testc_si256(block, block_mask_avx2(lo));
}

// Batch loops: hash a chunk of keys and prefetch their blocks, then visit them, so that the
// cache misses of a chunk overlap. Compiled once per kernel so the probe inlines.
constexpr size_t kChunk = 16;

// Multiply-shift range reduction of the high 32 hash bits: no modulo, any block count.
inline size_t reduce(uint64_t hash, size_t num_blocks) {
  return static_cast<size_t>(((hash >> 32) * num_blocks) >> 32);
}

template <class Visit>
[[gnu::always_inline]] inline void for_each_block(const uint32_t* words, size_t num_blocks,
                                                  const uint64_t* keys, size_t n, Visit visit) {
  uint64_t hash[kChunk];
  for (size_t base = 0; base < n; base += kChunk) {
    const size_t m = std::min(kChunk, n - base);
    for (size_t j = 0; j < m; ++j) {
      hash[j] = mix64(keys[base + j]);
      __builtin_prefetch(words + 8 * reduce(hash[j], num_blocks));
    }
    for (size_t j = 0; j < m; ++j) {
      visit(base + j, 8 * reduce(hash[j], num_blocks), static_cast<uint32_t>(hash[j]));
    }
  }
}

void insert_batch_portable(uint32_t* words, size_t num_blocks, const uint64_t* keys, size_t n) {
  for_each_block(words, num_blocks, keys, n,
                 [&](size_t, size_t at, uint32_t lo) { insert_portable(words + at, lo); });
}

[[gnu::target("avx2")]] void insert_batch_avx2(uint32_t* words, size_t num_blocks,
                                               const uint64_t* keys, size_t n) {
  for_each_block(words, num_blocks, keys, n,
                 [&](size_t, size_t at, uint32_t lo) { insert_avx2(words + at, lo); });
}

size_t contains_batch_portable(const uint32_t* words, size_t num_blocks, const uint64_t* keys,
                               size_t n, uint8_t* out) {
  size_t hits = 0;
  for_each_block(words, num_blocks, keys, n, [&](size_t i, size_t at, uint32_t lo) {
    out[i] = contains_portable(words + at, lo);
    hits += out[i];
  });
  return hits;
}

[[gnu::target("avx2")]] size_t contains_batch_avx2(const uint32_t* words, size_t num_blocks,
                                                   const uint64_t* keys, size_t n, uint8_t* out) {
  size_t hits = 0;
  for_each_block(words, num_blocks, keys, n, [&](size_t i, size_t at, uint32_t lo) {
    out[i] = contains_avx2(words + at, lo);
    hits += out[i];
  });
  return hits;
}

uint64_t checksum(const uint8_t* data, size_t size) {
  return hash_bytes(0x6A09E667F3BCC908ull, data, size);
}

template <class T>
void put(std::vector<uint8_t>& out, size_t offset, T value) {
  std::memcpy(out.data() + offset, &value, sizeof(T));
}

template <class T>
T get(const uint8_t* data, size_t offset) {
  T value;
  std::memcpy(&value, data + offset, sizeof(T));
  return value;
}

Kernel resolve(Kernel kernel) {
  const bool avx2 = cpu::features().avx2;
  if (kernel == Kernel::Auto) return avx2 ? Kernel::Avx2 : Kernel::Portable;
  if (kernel == Kernel::Avx2 && !avx2) {
    throw std::invalid_argument("SplitBlockBloom: this CPU has no AVX2");
  }
  return kernel;
}

}  // namespace

SplitBlockBloom::SplitBlockBloom(size_t num_blocks, Kernel kernel) : kernel_(resolve(kernel)) {
  if (num_blocks == 0 || num_blocks > kMaxBlocks) {
    throw std::invalid_argument("SplitBlockBloom: block count must be in [1, 2^32], got " +
                                std::to_string(num_blocks));
  }
  blocks_.assign(num_blocks, Block{});
}

double SplitBlockBloom::expected_fpr(size_t keys, size_t num_blocks) {
  if (num_blocks == 0) return 1.0;
  // A block holding j keys answers a random absent key "yes" with probability
  // (1 - (31/32)^j)^8; block loads are Poisson with mean keys / blocks.
  // Loads more than 12 standard deviations (+32) from the mean carry no measurable mass.
  const double lambda = static_cast<double>(keys) / static_cast<double>(num_blocks);
  const double spread = 12.0 * std::sqrt(lambda) + 32.0;
  const auto first = static_cast<size_t>(std::max(0.0, lambda - spread));
  const auto last = static_cast<size_t>(lambda + spread);
  double fpr = 0.0;
  for (size_t j = first; j <= last; ++j) {
    const double jd = static_cast<double>(j);
    const double log_poisson = jd * std::log(lambda) - lambda - std::lgamma(jd + 1.0);
    const double p_yes = std::pow(1.0 - std::pow(31.0 / 32.0, jd), 8);
    fpr += (lambda > 0.0 ? std::exp(log_poisson) : (j == 0 ? 1.0 : 0.0)) * p_yes;
  }
  return fpr;
}

SplitBlockBloom SplitBlockBloom::for_capacity(size_t expected_keys, double target_fpr,
                                              Kernel kernel) {
  if (!(target_fpr > 0.0 && target_fpr < 1.0)) {
    throw std::invalid_argument("SplitBlockBloom: target false-positive rate must be in (0, 1)");
  }
  // expected_fpr falls as blocks grow: binary-search the smallest block count that meets it.
  uint64_t lo = 1, hi = 1;
  while (expected_fpr(expected_keys, hi) > target_fpr) {
    if (hi >= kMaxBlocks) {
      throw std::invalid_argument("SplitBlockBloom: target needs more than 2^32 blocks");
    }
    lo = hi + 1;
    hi = std::min<uint64_t>(hi * 2, kMaxBlocks);
  }
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (expected_fpr(expected_keys, mid) > target_fpr) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return SplitBlockBloom(static_cast<size_t>(hi), kernel);
}

void SplitBlockBloom::insert(uint64_t key) {
  const uint64_t h = mix64(key);
  uint32_t* word = blocks_[reduce(h, blocks_.size())].word;
  if (kernel_ == Kernel::Avx2) {
    insert_avx2(word, static_cast<uint32_t>(h));
  } else {
    insert_portable(word, static_cast<uint32_t>(h));
  }
}

bool SplitBlockBloom::might_contain(uint64_t key) const {
  const uint64_t h = mix64(key);
  const uint32_t* word = blocks_[reduce(h, blocks_.size())].word;
  return kernel_ == Kernel::Avx2 ? contains_avx2(word, static_cast<uint32_t>(h))
                                 : contains_portable(word, static_cast<uint32_t>(h));
}

void SplitBlockBloom::insert_batch(const uint64_t* keys, size_t n) {
  uint32_t* words = blocks_.data()->word;
  if (kernel_ == Kernel::Avx2) {
    insert_batch_avx2(words, blocks_.size(), keys, n);
  } else {
    insert_batch_portable(words, blocks_.size(), keys, n);
  }
}

size_t SplitBlockBloom::might_contain_batch(const uint64_t* keys, size_t n, uint8_t* out) const {
  const uint32_t* words = blocks_.data()->word;
  return kernel_ == Kernel::Avx2 ? contains_batch_avx2(words, blocks_.size(), keys, n, out)
                                 : contains_batch_portable(words, blocks_.size(), keys, n, out);
}

void SplitBlockBloom::clear() { std::fill(blocks_.begin(), blocks_.end(), Block{}); }

std::vector<uint8_t> SplitBlockBloom::serialize() const {
  const size_t body = size_bytes();
  std::vector<uint8_t> out(kHeaderBytes + body + kFooterBytes);
  put<uint32_t>(out, 0, kMagic);
  put<uint32_t>(out, 4, kVersion);
  put<uint64_t>(out, 8, blocks_.size());
  std::memcpy(out.data() + kHeaderBytes, blocks_.data(), body);
  put<uint64_t>(out, kHeaderBytes + body, checksum(out.data(), kHeaderBytes + body));
  return out;
}

SplitBlockBloom SplitBlockBloom::deserialize(const uint8_t* data, size_t size, Kernel kernel) {
  auto fail = [](const std::string& why) {
    return std::invalid_argument("SplitBlockBloom: cannot deserialize: " + why);
  };
  if (data == nullptr || size < kHeaderBytes + kBlockBytes + kFooterBytes) {
    throw fail("buffer of " + std::to_string(size) + " bytes is too short");
  }
  if (get<uint32_t>(data, 0) != kMagic) throw fail("bad magic (not a bloom filter image)");
  if (get<uint32_t>(data, 4) != kVersion) {
    throw fail("unsupported version " + std::to_string(get<uint32_t>(data, 4)));
  }
  const uint64_t num_blocks = get<uint64_t>(data, 8);
  const size_t body = size - kHeaderBytes - kFooterBytes;
  if (num_blocks == 0 || num_blocks > kMaxBlocks || body % kBlockBytes != 0 ||
      body / kBlockBytes != num_blocks) {
    throw fail("header says " + std::to_string(num_blocks) + " blocks but the buffer holds " +
               std::to_string(body) + " body bytes");
  }
  if (get<uint64_t>(data, kHeaderBytes + body) != checksum(data, kHeaderBytes + body)) {
    throw fail("checksum mismatch (damaged data)");
  }
  SplitBlockBloom filter(static_cast<size_t>(num_blocks), kernel);
  std::memcpy(filter.blocks_.data(), data + kHeaderBytes, body);
  return filter;
}

bool operator==(const SplitBlockBloom& a, const SplitBlockBloom& b) {
  return a.blocks_.size() == b.blocks_.size() &&
         std::memcmp(a.blocks_.data(), b.blocks_.data(), a.size_bytes()) == 0;
}

}  // namespace spatium::bloom
