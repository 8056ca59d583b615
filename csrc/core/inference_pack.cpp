#include "inference_pack.h"

#include <algorithm>
#include <array>
#include <bitset>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "cpu_features.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace spatium {
namespace {

// nf4 codes go in as 8-bit stored values round(127 * level) + 127 (mult 1 / 127, offset 1):
// each level within 1 / 254 of the scale, the integer kernels unchanged.
constexpr float kNf4Steps = 127.0f;
uint32_t nf4_stored(uint32_t index) {
  return static_cast<uint32_t>(std::lround(kNf4Steps * quant::kNf4Levels[index]) + 127);
}

// The pack's arrays, as the kernels read them.
struct Panels {
  const int64_t* padded_begin;
  const int64_t* group_begin;
  const int32_t* panel_region;
  const uint16_t* scales;
  const int64_t* panel_chunks;
  const uint8_t* codes;
  const int32_t* order;  // the neuron of each slot; null: slot s holds neuron s
  const int64_t* placement_begin;
  const InferencePack::Placement* placements;
  const float* bias;     // per neuron; null: none
  int64_t out_features;
  int64_t regions;
  int64_t lanes(int64_t g) const {  // slots of group g that hold a neuron
    return std::min<int64_t>(InferencePack::kGroup, out_features - g * InferencePack::kGroup);
  }
};

// The bias of group g's 16 slots (0 past the last neuron, or without a bias).
inline void group_bias(const Panels& p, int64_t g, float* out) {
  const int64_t n0 = g * InferencePack::kGroup;
  std::fill(out, out + InferencePack::kGroup, 0.0f);
  if (p.bias == nullptr) return;
  for (int64_t k = 0; k < p.lanes(g); ++k) out[k] = p.bias[p.order ? p.order[n0 + k] : n0 + k];
}

// Writes group g's 16 slot values to their neurons' places in an output row.
inline void store_group(const Panels& p, int64_t g, const float* values, float* row) {
  for (int64_t k = p.placement_begin[g]; k < p.placement_begin[g + 1]; ++k) {
    const InferencePack::Placement& place = p.placements[k];
    for (unsigned mask = place.mask; mask != 0; mask &= mask - 1) {  // its neurons, in turn
      const int j = __builtin_ctz(mask);
      row[place.first + j] = values[place.lane[j]];
    }
  }
}

// Rows the register tile holds: R int32 sums and R float accumulators, 16 lanes each.
constexpr int kTileRows = 8;
// An AMX tile: 16 rows of 64 bytes. Batches of at least kAmxMinBatch rows take the AMX kernel.
constexpr int64_t kAmxRows = 16;
constexpr int64_t kAmxMinBatch = 8;
constexpr int64_t kTileBytes = kAmxRows * InferencePack::kChunkBytes;

// Whether this CPU and OS run AMX-INT8: the CPUID bits, the OS saving tile state (XCR0 bits 17
// and 18), and Linux's per-process permission to use tile data (asked once).
bool amx_usable() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool usable = [] {
    if (!cpu::features().avx512_vnni) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1u, int8 = (edx >> 25) & 1u;
    if (!tile || !int8) return false;
    unsigned xcr0_low = 0, xcr0_high = 0;
    __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if (((xcr0_low >> 17) & 3u) != 3u) return false;
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

#if defined(__x86_64__)
// GCC 12 flags its own intrinsics' self-initialised _mm512_undefined_ps() placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SPATIUM_VNNI [[gnu::target("avx512f,avx512bw,avx512vnni,f16c,fma")]]
#define SPATIUM_AMX [[gnu::target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni,f16c,fma")]]

// The largest |x| of a region's `size` inputs. Lanes holding an infinity or a NaN (not <= the
// largest float, or unordered: max_ps may drop a NaN) are set in not_finite.
SPATIUM_VNNI inline float largest_magnitude(const float* xr, int64_t size, __mmask16& not_finite) {
  const __m512 finite_limit = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 largest = _mm512_setzero_ps();
  for (int64_t i = 0; i < size; i += 16) {
    const auto lanes = static_cast<__mmask16>(size - i >= 16 ? 0xffff : (1u << (size - i)) - 1);
    const __m512 magnitude = _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, xr + i));
    not_finite |= _mm512_cmp_ps_mask(magnitude, finite_limit, _CMP_NLE_UQ);
    largest = _mm512_max_ps(largest, magnitude);
  }
  return _mm512_reduce_max_ps(largest);
}

// Inputs [i0, size) of one row's region quantized, sum + their values returned: word k of the
// region (inputs 4k .. 4k + 3) goes to q + k * word_step, up to word `words` (0 past the inputs).
SPATIUM_VNNI inline __m512i quantize_words(const float* xr, int64_t i0, int64_t size,
                                           int64_t words, __m512 inverse, int8_t* q,
                                           int64_t word_step, __m512i sum) {
  for (int64_t i = i0; i < size; i += 16) {
    const auto lanes = static_cast<__mmask16>(size - i >= 16 ? 0xffff : (1u << (size - i)) - 1);
    const __m512i rounded =
        _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, xr + i), inverse));
    sum = _mm512_add_epi32(sum, rounded);
    // 4 words, 0 past the region's inputs; those past its padding belong to the next region.
    alignas(16) int32_t four_words[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(four_words), _mm512_cvtsepi32_epi8(rounded));
    for (int64_t k = 0; k < std::min<int64_t>(4, words - i / 4); ++k) {
      std::memcpy(q + (i / 4 + k) * word_step, four_words + k, 4);
    }
  }
  return sum;
}

// Qword index vectors of vpermt2q: qwords t of the result from a (bit 3 clear) or b (set).
SPATIUM_VNNI inline __m512i qword_index(std::array<int64_t, 8> t) {
  return _mm512_set_epi64(t[7], t[6], t[5], t[4], t[3], t[2], t[1], t[0]);
}

// Dword indices of vpermt2d interleaving two rows' packed words (see quantize_tile_chunk):
// dword t of the result is word first + t / 2 of row a (t even) or row b (t odd). Two packs
// leave word w of a row in dword 4 (w % 4) + w / 4; bit 4 of an index picks b.
constexpr std::array<int32_t, 16> pair_index(int first) {
  std::array<int32_t, 16> index{};
  for (int t = 0; t < 16; ++t) {
    const int w = first + t / 2;
    index[static_cast<size_t>(t)] = 4 * (w % 4) + w / 4 + 16 * (t % 2);
  }
  return index;
}
constexpr std::array<int32_t, 16> kLowWordPairs = pair_index(0);
constexpr std::array<int32_t, 16> kHighWordPairs = pair_index(8);

// 64 inputs (16 words) at xr[j] of each row j of a tile of 8 rows, quantized with inverse[j]
// into the tile's layout: the 512 bytes at `out`, word w of row j at 4 * (8 w + j). sums[j]
// gains row j's values. A row's 16 words come out of two saturating packs, which leave word
// 4m + l in dword 4l + m (exact: |round(x * 127 / max|x|)| <= 127); three rounds of two-source
// permutes then interleave the rows (24 in all, against 128 4-byte copies word by word).
SPATIUM_VNNI inline void quantize_tile_chunk(const float* const* xr, const float* inverse,
                                             int8_t* out, __m512i* sums) {
  __m512i words[kTileRows];
#pragma GCC unroll 8
  for (int j = 0; j < kTileRows; ++j) {
    const __m512 scale = _mm512_set1_ps(inverse[j]);
    __m512i v[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      v[c] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr[j] + 16 * c), scale));
      sums[j] = _mm512_add_epi32(sums[j], v[c]);
    }
    words[j] = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
  }
  // Round 1, rows in pairs: words 0-7 (low) or 8-15 (high) of rows j, j + 1 alternating.
  const __m512i low = _mm512_loadu_si512(kLowWordPairs.data());
  const __m512i high = _mm512_loadu_si512(kHighWordPairs.data());
  __m512i pairs[kTileRows];  // [pair][half]
#pragma GCC unroll 4
  for (int pair = 0; pair < 4; ++pair) {
    pairs[2 * pair] = _mm512_permutex2var_epi32(words[2 * pair], low, words[2 * pair + 1]);
    pairs[2 * pair + 1] = _mm512_permutex2var_epi32(words[2 * pair], high, words[2 * pair + 1]);
  }
  // Round 2, pairs in pairs: 4 words of 4 rows, 16 bytes a word.
  const __m512i first4 = qword_index({0, 8, 1, 9, 2, 10, 3, 11});
  const __m512i second4 = qword_index({4, 12, 5, 13, 6, 14, 7, 15});
  __m512i quads[kTileRows];  // [rows 0-3 or 4-7][words 4q .. 4q + 3]
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m512i a = pairs[4 * half + h], b = pairs[4 * half + 2 + h];
      quads[4 * half + 2 * h] = _mm512_permutex2var_epi64(a, first4, b);
      quads[4 * half + 2 * h + 1] = _mm512_permutex2var_epi64(a, second4, b);
    }
  }
  // Round 3: two words of all 8 rows, stored in word order.
  const __m512i even = qword_index({0, 1, 8, 9, 2, 3, 10, 11});
  const __m512i odd = qword_index({4, 5, 12, 13, 6, 7, 14, 15});
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    _mm512_storeu_si512(out + 128 * q, _mm512_permutex2var_epi64(quads[q], even, quads[4 + q]));
    _mm512_storeu_si512(out + 128 * q + 64,
                        _mm512_permutex2var_epi64(quads[q], odd, quads[4 + q]));
  }
}

// Rows quantized region by region: q = round(x * 127 / max|x|) (to nearest even), and the
// factors that turn a block's int32 sum into multiplier * sum - correction. False when x holds
// a NaN or an infinity (found in the pass that takes max|x|, so no pass of its own). Whole
// tiles of 8 rows take a region's whole 64-input chunks 8 rows at once.
SPATIUM_VNNI bool quantize_rows(const float* x, int64_t batch, int64_t ldx, const int64_t* begin,
                                const int64_t* padded_begin, int64_t regions, float mult,
                                float offset, InferencePack::Rows& rows) {
  __mmask16 not_finite = 0;
  for (int64_t b0 = 0; b0 < batch; b0 += rows.tile_rows) {
    const int64_t height = std::min(rows.tile_rows, batch - b0);
    const int64_t word_step = 4 * height;
    for (int64_t r = 0; r < regions; ++r) {
      const int64_t size = begin[r + 1] - begin[r];
      const int64_t words = (padded_begin[r + 1] - padded_begin[r]) / 4;
      // The region's word 0 of the tile's first row; row j's is 4 j bytes on.
      int8_t* q = rows.q.data() + b0 * rows.stride + padded_begin[r] * height;
      const float* xr[kTileRows];
      alignas(64) float top[kTileRows], inverse[kTileRows];
      __m512i sums[kTileRows];
      for (int64_t j = 0; j < height; ++j) {
        xr[j] = x + (b0 + j) * ldx + begin[r];
        top[j] = largest_magnitude(xr[j], size, not_finite);
        inverse[j] = top[j] > 0.0f ? 127.0f / top[j] : 0.0f;
        sums[j] = _mm512_setzero_si512();
      }
      if (not_finite != 0) return false;
      const int64_t whole = height == kTileRows ? size / 64 * 64 : 0;
      for (int64_t i = 0; i < whole; i += 64) {
        const float* at[kTileRows];
        for (int j = 0; j < kTileRows; ++j) at[j] = xr[j] + i;
        quantize_tile_chunk(at, inverse, q + i * kTileRows, sums);
      }
      for (int64_t j = 0; j < height; ++j) {
        const __m512i sum = quantize_words(xr[j], whole, size, words, _mm512_set1_ps(inverse[j]),
                                           q + 4 * j, word_step, sums[j]);
        const float scale = top[j] / 127.0f;
        const int64_t cell = b0 * regions + r * height + j;
        rows.multiplier[cell] = scale * mult;
        rows.correction[cell] = scale * offset * static_cast<float>(_mm512_reduce_add_epi32(sum));
      }
    }
  }
  return true;
}

// Bit plane `Plane` of 64 code bytes: the codes of inputs 4 * Plane + j, one byte each.
template <int Bits, int Plane>
SPATIUM_VNNI inline __m512i plane_of(__m512i bytes) {
  if constexpr (Bits == 8) {
    return bytes;
  } else {
    const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << Bits) - 1));
    // A 16-bit shift carries the next byte's low bits into each byte's top: masked off.
    return _mm512_and_si512(_mm512_srli_epi16(bytes, Plane * Bits), mask);
  }
}

// acc += scale_w * (multiplier * sum - correction), with a row's factors for the sums' region.
SPATIUM_VNNI inline __m512 scaled(__m512 acc, __m512i sums, __m512 scale, float multiplier,
                                  float correction) {
  const __m512 sum = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(multiplier),
                                     _mm512_set1_ps(correction));
  return _mm512_fmadd_ps(scale, sum, acc);
}

// store_group for rows [0, count) of y, row b's values in acc[b]: per block, one permute and
// one masked store a row. (A 16-lane scatter took 12% of a sparse layer's batch of 256; a pass
// placing whole rows after the kernels added 25% to them at 1024 x 1024, these stores 11%.)
SPATIUM_VNNI inline void store_group_rows(const Panels& p, int64_t g, const __m512* acc,
                                          int64_t count, float* y, int64_t ldy) {
  for (int64_t k = p.placement_begin[g]; k < p.placement_begin[g + 1]; ++k) {
    const InferencePack::Placement& place = p.placements[k];
    const __m512i lanes =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(place.lane)));
    float* out = y + place.first;
#pragma GCC unroll 16
    for (int64_t b = 0; b < count; ++b) {
      _mm512_mask_storeu_ps(out + b * ldy, place.mask, _mm512_permutexvar_ps(lanes, acc[b]));
    }
  }
}

SPATIUM_VNNI inline __m512 panel_scales(const Panels& p, int64_t panel) {
  return _mm512_cvtph_ps(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + panel * InferencePack::kGroup)));
}

// sums + codes . (the 4 activation bytes at `four`, in every lane): vpdpbusd with the
// activations as an embedded broadcast. From the intrinsics GCC 12 makes a broadcast load of its
// own for each, and in the chunk loop also copies every accumulator each iteration: a 4-bit
// chunk took 52 instructions, 23 this way (with the tiled rows).
SPATIUM_VNNI inline __m512i dot_broadcast(__m512i sums, __m512i codes, const int8_t* four) {
  __asm__("vpdpbusd %2%{1to16%}, %1, %0"
          : "+v"(sums)
          : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(four)));
  return sums;
}

// sums[b] += plane Plane of the chunk . (row b's 4 activation bytes for it). `words` is the
// chunk's first word of a tile of R rows: row b's word for plane p is p * R + b.
template <int Bits, int R, int Plane>
SPATIUM_VNNI inline void dot_plane(__m512i bytes, const int8_t* words, __m512i* sums) {
  const __m512i codes = plane_of<Bits, Plane>(bytes);
  for (int b = 0; b < R; ++b) sums[b] = dot_broadcast(sums[b], codes, words + 4 * (Plane * R + b));
}

template <int Bits, int R, int... Planes>
SPATIUM_VNNI inline void dot_chunk(__m512i bytes, const int8_t* words, __m512i* sums,
                                   std::integer_sequence<int, Planes...>) {
  (dot_plane<Bits, R, Planes>(bytes, words, sums), ...);
}

// Group g's 16 neurons for the tile of R rows at b0: y[b][n] = bias (the group's 16 slots')
// + the sum over the group's panels. With Ahead, each code chunk read also fetches the one
// `ahead` bytes on into the cache.
template <int Bits, int R, bool Ahead>
SPATIUM_VNNI void group_rows(const Panels& p, int64_t g, const float* bias,
                             const InferencePack::Rows& rows, int64_t b0, float* y, int64_t ldy,
                             int64_t ahead) {
  constexpr int64_t chunk = InferencePack::chunk_inputs(Bits);
  const int8_t* tile = rows.q.data() + b0 * rows.stride;
  const float* multiplier = rows.multiplier.data() + b0 * p.regions;
  const float* correction = rows.correction.data() + b0 * p.regions;
  __m512 acc[R];
#pragma GCC unroll 16
  for (int b = 0; b < R; ++b) acc[b] = _mm512_load_ps(bias);
  for (int64_t panel = p.group_begin[g]; panel < p.group_begin[g + 1]; ++panel) {
    const int64_t r = p.panel_region[panel];
    const uint8_t* w = p.codes + p.panel_chunks[panel] * InferencePack::kChunkBytes;
    const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
    __m512i sums[R];
    for (int b = 0; b < R; ++b) sums[b] = _mm512_setzero_si512();
    const int8_t* words = tile + p.padded_begin[r] * R;  // word padded_begin / 4 of R rows
    for (int64_t c = 0; c < chunks; ++c, w += InferencePack::kChunkBytes, words += chunk * R) {
      if constexpr (Ahead) _mm_prefetch(reinterpret_cast<const char*>(w + ahead), _MM_HINT_T0);
      dot_chunk<Bits, R>(_mm512_loadu_si512(w), words, sums,
                         std::make_integer_sequence<int, 8 / Bits>{});
    }
    const __m512 scale = panel_scales(p, panel);
#pragma GCC unroll 16
    for (int b = 0; b < R; ++b) {
      acc[b] = scaled(acc[b], sums[b], scale, multiplier[r * R + b], correction[r * R + b]);
    }
  }
  store_group_rows(p, g, acc, R, y + b0 * ldy, ldy);
}

// run(std::integral_constant<int, R>, b) for rows [b, b + R) of a batch: whole tiles of
// TileRows rows, then one tile of the rows left (R fixed at compile time for the registers).
template <int TileRows, int R = TileRows - 1, class Run>
inline void last_rows(int64_t left, int64_t b, Run& run) {
  if constexpr (R > 0) {
    if (left == R) {
      run(std::integral_constant<int, R>{}, b);
    } else {
      last_rows<TileRows, R - 1>(left, b, run);
    }
  }
}
template <int TileRows, class Run>
inline void by_row_tiles(int64_t batch, Run&& run) {
  int64_t b = 0;
  for (; b + TileRows <= batch; b += TileRows) run(std::integral_constant<int, TileRows>{}, b);
  last_rows<TileRows>(batch - b, b, run);
}

template <int Bits>
void vnni_groups(const Panels& p, int64_t g0, int64_t g1, const InferencePack::Rows& rows,
                 float* y, int64_t ldy) {
  for (int64_t g = g0; g < g1; ++g) {
    // With several tiles of rows, the last fetches the next group's codes as it reads this
    // group's, so the next group's first tile finds them in cache (batch 32, 4096 x 4096: 6%
    // faster). A single tile streams the codes once; fetching ahead made batch 1 slower.
    const int64_t group_bytes = (p.panel_chunks[p.group_begin[g + 1]] -
                                 p.panel_chunks[p.group_begin[g]]) *
                                InferencePack::kChunkBytes;
    // Once a group: its lanes' bias entries are a gather, and written lane by lane they stall
    // the vector load that reads them (a sparse batch of 256 rows took 5% longer).
    alignas(64) float bias[InferencePack::kGroup];
    group_bias(p, g, bias);
    by_row_tiles<kTileRows>(rows.batch, [&](auto tile, int64_t b) {
      constexpr int R = decltype(tile)::value;
      if (b + R >= rows.batch && rows.batch > kTileRows && g + 1 < g1) {
        group_rows<Bits, R, true>(p, g, bias, rows, b, y, ldy, group_bytes);
      } else {
        group_rows<Bits, R, false>(p, g, bias, rows, b, y, ldy, 0);
      }
    });
  }
}

// The tile configuration: tiles 0-5 (two sets of sums, activations, codes), 16 rows x 64
// bytes each.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The codes of group g as AMX B tiles: per panel, one tile per 64 inputs, row k holding inputs
// 4k .. 4k + 3 of the 16 neurons (a chunk plane), rows past the panel's inputs zero.
template <int Bits, int... Planes>
SPATIUM_AMX void unpack_group(const Panels& p, int64_t g, std::vector<uint8_t>& tiles,
                              std::integer_sequence<int, Planes...>) {
  constexpr int64_t chunks_per_tile = kAmxRows / (8 / Bits);
  int64_t count = 0;
  for (int64_t panel = p.group_begin[g]; panel < p.group_begin[g + 1]; ++panel) {
    const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
    count += (chunks + chunks_per_tile - 1) / chunks_per_tile;
  }
  tiles.resize(static_cast<size_t>(count * kTileBytes));
  uint8_t* out = tiles.data();
  for (int64_t panel = p.group_begin[g]; panel < p.group_begin[g + 1]; ++panel) {
    const uint8_t* w = p.codes + p.panel_chunks[panel] * InferencePack::kChunkBytes;
    const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
    const int64_t filled = chunks * (8 / Bits) * InferencePack::kChunkBytes;
    const int64_t whole = (chunks + chunks_per_tile - 1) / chunks_per_tile * kTileBytes;
    std::memset(out + filled, 0, static_cast<size_t>(whole - filled));  // the last tile's tail
    for (int64_t c = 0; c < chunks; ++c, w += InferencePack::kChunkBytes) {
      const __m512i bytes = _mm512_loadu_si512(w);
      uint8_t* rows = out + (c / chunks_per_tile) * kTileBytes +
                      (c % chunks_per_tile) * (8 / Bits) * InferencePack::kChunkBytes;
      (_mm512_storeu_si512(rows + Planes * InferencePack::kChunkBytes,
                           plane_of<Bits, Planes>(bytes)),
       ...);
    }
    out += whole;
  }
}

// One panel's int32 sums for 16 rows x 16 neurons into `sums`: TDPBSUD (signed activations,
// unsigned codes) over its tiles, in tiles SUM, A and B. Tiles are not renamed, so panels in
// turn use two sets of three and one panel's loads need not wait for the other's products.
// GCC's tile intrinsics are macros that paste the tile number into the instruction, hence a
// macro for each set.
#define SPATIUM_PANEL_SUMS(NAME, SUM, A, B)                                                    \
  SPATIUM_AMX inline void NAME(const int8_t* a_tile, int64_t lda, const uint8_t*& b_tile,     \
                               int64_t tiles, int32_t* sums) {                                 \
    _tile_zero(SUM);                                                                           \
    for (int64_t t = 0; t < tiles; ++t) {                                                      \
      /* Activation bytes past the panel's inputs meet zero code rows. */                      \
      _tile_loadd(A, a_tile + t * InferencePack::kChunkBytes, lda);                            \
      _tile_loadd(B, b_tile, InferencePack::kChunkBytes);                                      \
      _tile_dpbsud(SUM, A, B);                                                                 \
      b_tile += kTileBytes;                                                                    \
    }                                                                                          \
    _tile_stored(SUM, sums, InferencePack::kGroup * sizeof(int32_t));                          \
  }
SPATIUM_PANEL_SUMS(panel_sums_in_tiles_0, 0, 1, 2)
SPATIUM_PANEL_SUMS(panel_sums_in_tiles_3, 3, 4, 5)
#undef SPATIUM_PANEL_SUMS

// acc[b] += the scaled sums of one panel for rows [b0, b0 + 16).
SPATIUM_AMX inline void scale_panel(__m512* acc, const int32_t* sums, const Panels& p,
                                    int64_t panel, const InferencePack::Rows& rows, int64_t b0) {
  const int64_t r = p.panel_region[panel];
  const __m512 scale = panel_scales(p, panel);
#pragma GCC unroll 16
  for (int64_t b = 0; b < kAmxRows; ++b) {
    const int64_t cell = (b0 + b) * p.regions + r;  // rows of one per tile
    acc[b] = scaled(acc[b], _mm512_loadu_si512(sums + b * InferencePack::kGroup), scale,
                    rows.multiplier[cell], rows.correction[cell]);
  }
}

// Groups [g0, g1) for every row, 16 rows at a time. Each panel's sums come from the AMX unit
// through memory (TDPBSUD, then a tile store); the vector units scale the previous panel's
// meanwhile, so the two overlap.
template <int Bits>
SPATIUM_AMX void amx_groups(const Panels& p, int64_t g0, int64_t g1,
                            const InferencePack::Rows& rows, float* y, int64_t ldy) {
  constexpr int64_t chunks_per_tile = kAmxRows / (8 / Bits);
  constexpr int64_t slot = kAmxRows * InferencePack::kGroup;
  TileConfig config;
  for (int t = 0; t < 6; ++t) {
    config.bytes_per_row[t] = InferencePack::kChunkBytes;
    config.rows[t] = kAmxRows;
  }
  _tile_loadconfig(&config);
  std::vector<uint8_t> tiles;
  alignas(64) int32_t sums[2 * slot];
  for (int64_t g = g0; g < g1; ++g) {
    unpack_group<Bits>(p, g, tiles, std::make_integer_sequence<int, 8 / Bits>{});
    const int64_t first = p.group_begin[g], last = p.group_begin[g + 1];
    alignas(64) float bias[InferencePack::kGroup];
    group_bias(p, g, bias);
    for (int64_t b0 = 0; b0 < rows.batch; b0 += kAmxRows) {
      const int8_t* a_rows = rows.q.data() + b0 * rows.stride;
      const uint8_t* b_tile = tiles.data();
      __m512 acc[kAmxRows];
      for (auto& a : acc) a = _mm512_load_ps(bias);
      for (int64_t panel = first; panel < last; ++panel) {
        const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
        const int64_t count = (chunks + chunks_per_tile - 1) / chunks_per_tile;
        const int8_t* a_tile = a_rows + p.padded_begin[p.panel_region[panel]];
        const bool even = (panel - first) % 2 == 0;
        if (even) {
          panel_sums_in_tiles_0(a_tile, rows.stride, b_tile, count, sums);
        } else {
          panel_sums_in_tiles_3(a_tile, rows.stride, b_tile, count, sums + slot);
        }
        if (panel > first) scale_panel(acc, even ? sums + slot : sums, p, panel - 1, rows, b0);
      }
      if (last > first) {
        scale_panel(acc, (last - first) % 2 == 1 ? sums : sums + slot, p, last - 1, rows, b0);
      }
      store_group_rows(p, g, acc, std::min(kAmxRows, rows.batch - b0), y + b0 * ldy, ldy);
    }
  }
  _tile_release();
}

// --- AVX2 ---------------------------------------------------------------------------------------
#define SPATIUM_AVX2 [[gnu::target("avx2,fma,f16c")]]
// Rows the AVX2 register tile holds: per row two int32 sums and two float accumulators.
constexpr int kAvx2TileRows = 4;

SPATIUM_AVX2 inline float max_lane(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// quantize_rows with AVX2: the same products and rounding (to nearest even, the default mode),
// so the same rows, and the same answer for a NaN or an infinity.
SPATIUM_AVX2 bool quantize_rows_avx2(const float* x, int64_t batch, int64_t ldx,
                                     const int64_t* begin, const int64_t* padded_begin,
                                     int64_t regions, float mult, float offset,
                                     InferencePack::Rows& rows) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  constexpr float kFiniteLimit = std::numeric_limits<float>::max();
  const __m256 finite_limit = _mm256_set1_ps(kFiniteLimit);
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * ldx;
    for (int64_t r = 0; r < regions; ++r) {
      const float* xr = xb + begin[r];
      const int64_t size = begin[r + 1] - begin[r];
      __m256 largest = _mm256_setzero_ps();
      __m256 not_finite = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= size; i += 8) {
        const __m256 magnitude = _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + i));
        not_finite = _mm256_or_ps(not_finite, _mm256_cmp_ps(magnitude, finite_limit, _CMP_NLE_UQ));
        largest = _mm256_max_ps(largest, magnitude);
      }
      if (_mm256_movemask_ps(not_finite) != 0) return false;
      float top = max_lane(largest);
      for (; i < size; ++i) {
        if (!(std::fabs(xr[i]) <= kFiniteLimit)) return false;
        top = std::max(top, std::fabs(xr[i]));
      }
      const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
      int8_t* q = rows.q.data() + b * rows.stride + padded_begin[r];
      __m256i sum = _mm256_setzero_si256();
      // Two saturating packs (exact: |q| <= 127) leave bytes 0-3 in dword 0, 4-7 in dword 4.
      const __m256i dwords_0_4 = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
      for (i = 0; i + 8 <= size; i += 8) {
        const __m256i lanes =
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), _mm256_set1_ps(inverse)));
        sum = _mm256_add_epi32(sum, lanes);
        const __m256i words = _mm256_packs_epi32(lanes, lanes);
        const __m256i bytes =
            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words), dwords_0_4);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(bytes));
      }
      alignas(32) int32_t rounded[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(rounded), sum);
      int32_t total = 0;
      for (const int32_t lane : rounded) total += lane;
      for (; i < size; ++i) {
        const auto lane = static_cast<int32_t>(std::nearbyint(xr[i] * inverse));
        q[i] = static_cast<int8_t>(lane);
        total += lane;
      }
      const float scale = top / 127.0f;
      rows.multiplier[b * regions + r] = scale * mult;
      rows.correction[b * regions + r] = scale * offset * static_cast<float>(total);
    }
  }
  return true;
}

// sums + the products of 32 code bytes with 4 activation bytes repeated, summed per int32
// lane, each pair's sum weighted by `weight` (int16 lanes).
SPATIUM_AVX2 inline __m256i dot4(__m256i sums, __m256i codes, __m256i activations,
                                 __m256i weight) {
  return _mm256_add_epi32(sums,
                          _mm256_madd_epi16(_mm256_maddubs_epi16(codes, activations), weight));
}

// sums[b][h] += plane Plane of the chunk's half h . (4 activation bytes of row b at q[b] + at
// + 4 Plane). An 8-bit code is 16 x its high nibble + its low nibble: vpmaddubsw's int16
// pair sums hold 2 x 15 x 127, not 2 x 255 x 127.
template <int Bits, int R, int Plane>
SPATIUM_AVX2 inline void dot_plane_avx2(const __m256i* halves, const int8_t* const* q,
                                        int64_t at, __m256i (*sums)[2]) {
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << (Bits == 8 ? 4 : Bits)) - 1));
  __m256i codes[2], high[2];
  for (int h = 0; h < 2; ++h) {
    if constexpr (Bits == 8) {
      codes[h] = _mm256_and_si256(halves[h], nibble);
      high[h] = _mm256_and_si256(_mm256_srli_epi16(halves[h], 4), nibble);
    } else {
      // A 16-bit shift carries the next byte's low bits into each byte's top: masked off.
      codes[h] = _mm256_and_si256(_mm256_srli_epi16(halves[h], Plane * Bits), mask);
    }
  }
  for (int b = 0; b < R; ++b) {
    int32_t four;
    std::memcpy(&four, q[b] + at + 4 * Plane, sizeof four);
    const __m256i activations = _mm256_set1_epi32(four);
    for (int h = 0; h < 2; ++h) {
      sums[b][h] = dot4(sums[b][h], codes[h], activations, ones);
      if constexpr (Bits == 8) sums[b][h] = dot4(sums[b][h], high[h], activations, sixteen);
    }
  }
}

template <int Bits, int R, int... Planes>
SPATIUM_AVX2 inline void dot_chunk_avx2(const uint8_t* w, const int8_t* const* q, int64_t at,
                                        __m256i (*sums)[2], std::integer_sequence<int, Planes...>) {
  const __m256i halves[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32))};
  (dot_plane_avx2<Bits, R, Planes>(halves, q, at, sums), ...);
}

// group_rows with AVX2: lanes 0-7 and 8-15 of the group in two registers each.
template <int Bits, int R>
SPATIUM_AVX2 void group_rows_avx2(const Panels& p, int64_t g, const float* bias,
                                  const InferencePack::Rows& rows, int64_t b0, float* y,
                                  int64_t ldy) {
  constexpr int64_t chunk = InferencePack::chunk_inputs(Bits);
  const int8_t* q[R];
  for (int b = 0; b < R; ++b) q[b] = rows.q.data() + (b0 + b) * rows.stride;
  __m256 acc[R][2];
  for (auto& row : acc) {
    row[0] = _mm256_load_ps(bias);
    row[1] = _mm256_load_ps(bias + 8);
  }
  for (int64_t panel = p.group_begin[g]; panel < p.group_begin[g + 1]; ++panel) {
    const int64_t r = p.panel_region[panel];
    const uint8_t* w = p.codes + p.panel_chunks[panel] * InferencePack::kChunkBytes;
    const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
    __m256i sums[R][2];
    for (auto& row : sums) row[0] = row[1] = _mm256_setzero_si256();
    int64_t at = p.padded_begin[r];
    // 8-bit chunks have one plane, taken apart into nibbles.
    constexpr int planes = Bits == 8 ? 1 : 8 / Bits;
    for (int64_t c = 0; c < chunks; ++c, w += InferencePack::kChunkBytes, at += chunk) {
      dot_chunk_avx2<Bits, R>(w, q, at, sums, std::make_integer_sequence<int, planes>{});
    }
    const uint16_t* scales = p.scales + panel * InferencePack::kGroup;
    for (int h = 0; h < 2; ++h) {
      const __m256 scale =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8 * h)));
      for (int b = 0; b < R; ++b) {
        const int64_t cell = (b0 + b) * p.regions + r;
        const __m256 sum = _mm256_fmsub_ps(_mm256_cvtepi32_ps(sums[b][h]),
                                           _mm256_set1_ps(rows.multiplier[cell]),
                                           _mm256_set1_ps(rows.correction[cell]));
        acc[b][h] = _mm256_fmadd_ps(scale, sum, acc[b][h]);
      }
    }
  }
  for (int b = 0; b < R; ++b) {
    alignas(32) float out[InferencePack::kGroup];
    _mm256_store_ps(out, acc[b][0]);
    _mm256_store_ps(out + 8, acc[b][1]);
    store_group(p, g, out, y + (b0 + b) * ldy);
  }
}

template <int Bits>
void avx2_groups(const Panels& p, int64_t g0, int64_t g1, const InferencePack::Rows& rows,
                 float* y, int64_t ldy) {
  for (int64_t g = g0; g < g1; ++g) {
    alignas(32) float bias[InferencePack::kGroup];
    group_bias(p, g, bias);
    by_row_tiles<kAvx2TileRows>(rows.batch, [&](auto tile, int64_t b) {
      group_rows_avx2<Bits, decltype(tile)::value>(p, g, bias, rows, b, y, ldy);
    });
  }
}

#pragma GCC diagnostic pop
#endif

}  // namespace

InferencePack::Isa InferencePack::best_isa() {
  static const Isa isa = [] {
    const cpu::Features& f = cpu::features();
    const bool avx2 = f.avx2 && f.fma_f16c;
    const char* forced = std::getenv("SPATIUM_INFERENCE_ISA");
    if (forced != nullptr && std::string(forced) == "avx2") return avx2 ? Isa::kAvx2 : Isa::kNone;
    if (f.avx512_vnni) return Isa::kAvx512Vnni;
    return avx2 ? Isa::kAvx2 : Isa::kNone;
  }();
  return isa;
}

const char* InferencePack::isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

bool InferencePack::cpu_supported() { return best_isa() != Isa::kNone; }

namespace {
// Whether linear_groups runs a batch on AMX tiles (with kAvx512Vnni).
bool takes_amx(InferencePack::Isa isa, int64_t batch) {
  return isa == InferencePack::Isa::kAvx512Vnni && batch >= kAmxMinBatch && amx_usable();
}

// The rows a tile of Rows holds for the kernel that runs `batch` rows with `isa`: the VNNI
// kernel's register tile, one where the kernel reads plain rows.
int64_t tile_rows_for(InferencePack::Isa isa, int64_t batch) {
  return isa == InferencePack::Isa::kAvx512Vnni && !takes_amx(isa, batch) ? kTileRows : 1;
}

// Refuses an instruction set this CPU lacks (a caller's explicit choice).
void check_isa(InferencePack::Isa isa) {
  const cpu::Features& f = cpu::features();
  const bool runs = isa == InferencePack::Isa::kAvx512Vnni ? f.avx512_vnni
                    : isa == InferencePack::Isa::kAvx2     ? f.avx2 && f.fma_f16c
                                                           : false;
  if (!runs) {
    throw std::invalid_argument(std::string("InferencePack: this CPU does not run the ") +
                                InferencePack::isa_name(isa) + " kernels");
  }
}

// Regions held by each neuron, as bitsets of `words` 64-bit words a neuron.
struct RegionSets {
  int64_t words = 0;
  std::vector<uint64_t> bits;
  const uint64_t* of(int64_t neuron) const { return bits.data() + neuron * words; }
};

RegionSets region_sets(const PackedView& v) {
  RegionSets sets;
  sets.words = (v.num_regions + 63) / 64;
  sets.bits.assign(static_cast<size_t>(v.out_features * sets.words), 0);
  for (int64_t n = 0; n < v.out_features; ++n) {
    uint64_t* row = sets.bits.data() + n * sets.words;
    v.for_each_region(n, [&](int64_t r) { row[r / 64] |= uint64_t{1} << (r % 64); });
  }
  return sets;
}

int popcount(uint64_t word) { return static_cast<int>(std::bitset<64>(word).count()); }

// Panels the pack needs with neurons in `order`: per group of 16, the regions any holds.
int64_t panels_in_order(const RegionSets& sets, const std::vector<int64_t>& order) {
  int64_t panels = 0;
  std::vector<uint64_t> held(static_cast<size_t>(sets.words));
  for (size_t g0 = 0; g0 < order.size(); g0 += InferencePack::kGroup) {
    std::fill(held.begin(), held.end(), 0);
    const size_t g1 = std::min(order.size(), g0 + InferencePack::kGroup);
    for (size_t s = g0; s < g1; ++s) {
      for (int64_t w = 0; w < sets.words; ++w) held[w] |= sets.of(order[s])[w];
    }
    for (const uint64_t word : held) panels += popcount(word);
  }
  return panels;
}

// The neurons in the order the pack lays them out, 16 to a group: each group starts at the
// first neuron not yet placed and takes, one at a time, the neuron that adds the fewest regions
// to the group's union among the next kCandidates unplaced ones; of equals, one in a block of
// 16 neurons the group already writes to (each block costs the kernels a store a row), then
// the first. A group computes a panel for every region any of its neurons holds, so with
// sparse layouts whose neighbours share few regions (random connectivity) the index order
// wastes most of the work. Empty when that order needs no more panels than the greedy one
// (dense layouts, most local ones): the pack then keeps neuron n in slot n.
std::vector<int64_t> grouped_order(const PackedView& v) {
  constexpr int64_t kCandidates = 256;
  const int64_t neurons = v.out_features;
  const RegionSets sets = region_sets(v);
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(neurons));
  constexpr int64_t kBlock = InferencePack::kGroup;
  std::vector<char> placed(static_cast<size_t>(neurons), 0);
  std::vector<char> written((neurons + kBlock - 1) / kBlock, 0);  // blocks the group writes to
  std::vector<uint64_t> held(static_cast<size_t>(sets.words));
  int64_t first = 0;  // every neuron before it is placed
  while (static_cast<int64_t>(order.size()) < neurons) {
    while (placed[first]) ++first;
    const size_t group_start = order.size();
    const auto take = [&](int64_t n) {
      placed[n] = 1;
      written[n / kBlock] = 1;
      order.push_back(n);
      for (int64_t w = 0; w < sets.words; ++w) held[w] |= sets.of(n)[w];
    };
    std::fill(held.begin(), held.end(), 0);
    take(first);
    for (int64_t lane = 1; lane < InferencePack::kGroup; ++lane) {
      int64_t best = -1, lowest = 0, seen = 0;
      for (int64_t n = first + 1; n < neurons && seen < kCandidates; ++n) {
        if (placed[n]) continue;
        ++seen;
        int64_t added = 0;
        for (int64_t w = 0; w < sets.words; ++w) added += popcount(sets.of(n)[w] & ~held[w]);
        const int64_t cost = 2 * added + (written[n / kBlock] ? 0 : 1);
        if (best < 0 || cost < lowest) {
          best = n;
          lowest = cost;
          if (cost == 0) break;
        }
      }
      if (best < 0) break;  // every neuron is placed
      take(best);
    }
    for (size_t s = group_start; s < order.size(); ++s) written[order[s] / kBlock] = 0;
  }
  std::vector<int64_t> identity(static_cast<size_t>(neurons));
  for (int64_t n = 0; n < neurons; ++n) identity[n] = n;
  if (panels_in_order(sets, order) < panels_in_order(sets, identity)) return order;
  return {};
}

// Appends to `out` the placements of a group whose lanes [0, lanes) hold neurons
// neuron_of(lane): one per block of 16 neurons they fall in, in the blocks' order.
template <class NeuronOf>
void add_placements(int64_t lanes, const NeuronOf& neuron_of,
                    std::vector<InferencePack::Placement>& out) {
  constexpr int64_t kBlock = InferencePack::kGroup;
  const auto first = static_cast<std::ptrdiff_t>(out.size());
  for (int64_t lane = 0; lane < lanes; ++lane) {
    const int64_t n = neuron_of(lane), block = n / kBlock * kBlock;
    auto place = std::find_if(out.begin() + first, out.end(),
                              [&](const InferencePack::Placement& p) { return p.first == block; });
    if (place == out.end()) {
      place = out.insert(out.end(), InferencePack::Placement{static_cast<int32_t>(block), 0, {}});
    }
    place->mask = static_cast<uint16_t>(place->mask | (1u << (n - block)));
    place->lane[n - block] = static_cast<uint8_t>(lane);
  }
  std::sort(out.begin() + first, out.end(),
            [](const InferencePack::Placement& a, const InferencePack::Placement& b) {
              return a.first < b.first;
            });
}

}  // namespace

InferencePack::InferencePack(const PackedView& v)
    : bits_(v.format == quant::kNf4 ? 8 : quant::width(v.format)),
      format_(v.format),
      in_features_(v.in_features),
      out_features_(v.out_features) {
  const int code_bits = quant::width(v.format);
  const int64_t regions = v.num_regions;
  const int64_t chunk = chunk_inputs(bits_);
  region_begin_.assign(v.region_begin, v.region_begin + regions + 1);
  padded_begin_.assign(1, 0);
  int64_t largest = 0;
  for (int64_t r = 0; r < regions; ++r) {
    const int64_t size = v.region_size(r);
    largest = std::max(largest, size);
    padded_begin_.push_back(padded_begin_.back() + (size + chunk - 1) / chunk * chunk);
  }
  if (out_features_ > INT32_MAX) {
    throw std::invalid_argument("InferencePack: " + std::to_string(out_features_) +
                                " neurons; the kernels index at most 2^31 - 1");
  }
  // Each int32 lane sums stored value x |q| <= (2^bits - 1) x 127 over a region.
  if (largest * ((int64_t{1} << bits_) - 1) * 127 > INT32_MAX) {
    throw std::invalid_argument("InferencePack: a region of " + std::to_string(largest) +
                                " inputs could overflow the int32 sums at " +
                                std::to_string(bits_) + " bits");
  }
  const std::vector<int64_t> order = grouped_order(v);
  order_.assign(order.begin(), order.end());  // fits: out_features <= INT32_MAX, checked above
  const auto neuron_in = [this](int64_t slot) { return order_.empty() ? slot : order_[slot]; };
  std::vector<int64_t> panel_of(static_cast<size_t>(regions), -1);
  std::vector<char> held(static_cast<size_t>(regions));
  group_begin_.assign(1, 0);
  panel_chunks_.assign(1, 0);
  placement_begin_.assign(1, 0);
  for (int64_t s0 = 0; s0 < out_features_; s0 += kGroup) {
    const int64_t s1 = std::min(s0 + kGroup, out_features_);
    add_placements(s1 - s0, [&](int64_t lane) { return neuron_in(s0 + lane); }, placements_);
    placement_begin_.push_back(static_cast<int64_t>(placements_.size()));
    std::fill(held.begin(), held.end(), 0);
    for (int64_t s = s0; s < s1; ++s) {
      v.for_each_region(neuron_in(s), [&](int64_t r) { held[r] = 1; });
    }
    for (int64_t r = 0; r < regions; ++r) {
      if (!held[r]) continue;
      panel_of[r] = static_cast<int64_t>(panel_region_.size());
      panel_region_.push_back(static_cast<int32_t>(r));
      const int64_t chunks = (padded_begin_[r + 1] - padded_begin_[r]) / chunk;
      panel_chunks_.push_back(panel_chunks_.back() + chunks);
    }
    group_begin_.push_back(static_cast<int64_t>(panel_region_.size()));
    scales_.resize(panel_region_.size() * kGroup, 0);
    codes_.resize(static_cast<size_t>(panel_chunks_.back() * kChunkBytes), 0);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t lane = s - s0;
      v.for_each_block(neuron_in(s), [&](int64_t r, int64_t block, int64_t offset) {
        const int64_t panel = panel_of[r];
        scales_[panel * kGroup + lane] = v.scales[block];
        uint8_t* chunks = codes_.data() + panel_chunks_[panel] * kChunkBytes + 4 * lane;
        const int64_t size = v.region_size(r);
        for (int64_t i = 0; i < size; ++i) {
          const uint32_t code = quant::get_stored(v.codes + offset, code_bits, size, i);
          const uint32_t stored = format_ == quant::kNf4 ? nf4_stored(code) : code;
          const int64_t c = i / chunk, k = i % chunk;
          chunks[c * kChunkBytes + k % 4] |= static_cast<uint8_t>(stored << (k / 4 * bits_));
        }
      });
    }
  }
}

int64_t InferencePack::bytes() const {
  return static_cast<int64_t>(codes_.size() + scales_.size() * sizeof(uint16_t) +
                              panel_region_.size() * sizeof(int32_t) +
                              order_.size() * sizeof(int32_t) +
                              placements_.size() * sizeof(Placement) +
                              (panel_chunks_.size() + group_begin_.size() + padded_begin_.size() +
                               region_begin_.size() + placement_begin_.size()) *
                                  sizeof(int64_t));
}

bool InferencePack::quantize(const float* x, int64_t batch, int64_t ldx, Rows& rows,
                             Isa isa) const {
#if defined(__x86_64__)
  check_isa(isa);
  const int64_t regions = static_cast<int64_t>(region_begin_.size()) - 1;
  const int64_t padded = padded_begin_.back();
  // Whole AMX tiles of rows, and one tile row past the end: tile loads read 16 rows of 64
  // bytes from any panel's start (the bytes past its inputs meet zero codes).
  const int64_t held = (batch + kAmxRows - 1) / kAmxRows * kAmxRows;
  rows.batch = batch;
  rows.tile_rows = tile_rows_for(isa, batch);
  // A row stride of whole cache lines, one more than a multiple of 4 KiB would be: 16 rows 4 KiB
  // apart fall into one L1 set, more than its ways.
  rows.stride = (padded + kChunkBytes - 1) / kChunkBytes * kChunkBytes;
  if (rows.stride % 4096 == 0) rows.stride += kChunkBytes;
  rows.q.assign(static_cast<size_t>(held * rows.stride + kChunkBytes), 0);
  rows.multiplier.assign(static_cast<size_t>(held * regions), 0.0f);
  rows.correction.assign(static_cast<size_t>(held * regions), 0.0f);
  // A block's value is scale * (mult * stored - offset): odd codes (1 bit, kOdd2) are
  // 2 * stored - (2^bits - 1), nf4's 8-bit stand-ins stored / 127 - 1.
  float mult = 1.0f, offset = static_cast<float>(quant::offset(bits_));
  if (format_ == quant::kNf4) {
    mult = 1.0f / kNf4Steps;
    offset = 1.0f;
  } else if (format_ == 1 || format_ == quant::kOdd2) {
    mult = 2.0f;
    offset = static_cast<float>(-quant::odd_code(bits_, 0));
  }
  return (isa == Isa::kAvx2 ? quantize_rows_avx2 : quantize_rows)(
      x, batch, ldx, region_begin_.data(), padded_begin_.data(), regions, mult, offset, rows);
#else
  (void)x, (void)batch, (void)ldx, (void)rows, (void)isa;
  throw std::logic_error("InferencePack: the kernels need x86-64 with AVX2 or AVX-512 VNNI");
#endif
}

void InferencePack::linear_groups(int64_t g0, int64_t g1, const Rows& rows, const float* bias,
                                  float* y, int64_t ldy, Isa isa) const {
#if defined(__x86_64__)
  check_isa(isa);
  const Panels p{padded_begin_.data(),
                 group_begin_.data(),
                 panel_region_.data(),
                 scales_.data(),
                 panel_chunks_.data(),
                 codes_.data(),
                 order_.empty() ? nullptr : order_.data(),
                 placement_begin_.data(),
                 placements_.data(),
                 bias,
                 out_features_,
                 static_cast<int64_t>(region_begin_.size()) - 1};
  if (rows.tile_rows != tile_rows_for(isa, rows.batch)) {
    throw std::invalid_argument(std::string("InferencePack: rows quantized for another kernel "
                                            "than the ") +
                                isa_name(isa) + " one");
  }
  if (isa == Isa::kAvx2) {
    switch (bits_) {
      case 1: avx2_groups<1>(p, g0, g1, rows, y, ldy); return;
      case 2: avx2_groups<2>(p, g0, g1, rows, y, ldy); return;
      case 4: avx2_groups<4>(p, g0, g1, rows, y, ldy); return;
      default: avx2_groups<8>(p, g0, g1, rows, y, ldy); return;
    }
  }
  if (takes_amx(isa, rows.batch)) {
    switch (bits_) {
      case 1: amx_groups<1>(p, g0, g1, rows, y, ldy); return;
      case 2: amx_groups<2>(p, g0, g1, rows, y, ldy); return;
      case 4: amx_groups<4>(p, g0, g1, rows, y, ldy); return;
      default: amx_groups<8>(p, g0, g1, rows, y, ldy); return;
    }
  }
  switch (bits_) {
    case 1: vnni_groups<1>(p, g0, g1, rows, y, ldy); return;
    case 2: vnni_groups<2>(p, g0, g1, rows, y, ldy); return;
    case 4: vnni_groups<4>(p, g0, g1, rows, y, ldy); return;
    default: vnni_groups<8>(p, g0, g1, rows, y, ldy); return;
  }
#else
  (void)g0, (void)g1, (void)rows, (void)y, (void)ldy, (void)isa;
  throw std::logic_error("InferencePack: the kernels need x86-64 with AVX2 or AVX-512 VNNI");
#endif
}

}  // namespace spatium
