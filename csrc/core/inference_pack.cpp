#include "inference_pack.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace spatium {
namespace {

// A block's value is scale * (kMult * stored - kOffset): 1-bit codes are +-1 = 2 * stored - 1.
constexpr int stored_offset(int bits) { return bits == 1 ? 1 : quant::offset(bits); }

// The pack's arrays, as the kernels read them.
struct Panels {
  const int64_t* padded_begin;
  const int64_t* group_begin;
  const int32_t* panel_region;
  const uint16_t* scales;
  const int64_t* panel_chunks;
  const uint8_t* codes;
  int64_t out_features;
  int64_t padded_inputs;
  int64_t regions;
};

// Rows the register tile holds: R int32 sums and R float accumulators, 16 lanes each.
constexpr int kTileRows = 8;

#if defined(__x86_64__)
// GCC 12 flags its own intrinsics' self-initialised _mm512_undefined_ps() placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SPATIUM_VNNI [[gnu::target("avx512f,avx512bw,avx512vnni,f16c,fma")]]

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

// sums[b] += plane Plane of the chunk . (the 4 activation bytes of row b at q[b] + at + 4 Plane).
template <int Bits, int R, int Plane>
SPATIUM_VNNI inline void dot_plane(__m512i bytes, const int8_t* const* q, int64_t at,
                                   __m512i* sums) {
  const __m512i codes = plane_of<Bits, Plane>(bytes);
  for (int b = 0; b < R; ++b) {
    int32_t four;
    std::memcpy(&four, q[b] + at + 4 * Plane, sizeof four);
    sums[b] = _mm512_dpbusd_epi32(sums[b], codes, _mm512_set1_epi32(four));
  }
}

template <int Bits, int R, int... Planes>
SPATIUM_VNNI inline void dot_chunk(__m512i bytes, const int8_t* const* q, int64_t at,
                                   __m512i* sums, std::integer_sequence<int, Planes...>) {
  (dot_plane<Bits, R, Planes>(bytes, q, at, sums), ...);
}

// Group g's 16 neurons for rows [b0, b0 + R): y[b][n] = the sum over the group's panels.
template <int Bits, int R>
SPATIUM_VNNI void group_rows(const Panels& p, int64_t g, const InferencePack::Rows& rows,
                             int64_t b0, float* y, int64_t ldy) {
  constexpr int64_t chunk = InferencePack::chunk_inputs(Bits);
  constexpr float mult = Bits == 1 ? 2.0f : 1.0f;
  const int8_t* q[R];
  for (int b = 0; b < R; ++b) q[b] = rows.q.data() + (b0 + b) * p.padded_inputs;
  __m512 acc[R];
  for (int b = 0; b < R; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t panel = p.group_begin[g]; panel < p.group_begin[g + 1]; ++panel) {
    const int64_t r = p.panel_region[panel];
    const uint8_t* w = p.codes + p.panel_chunks[panel] * InferencePack::kChunkBytes;
    const int64_t chunks = p.panel_chunks[panel + 1] - p.panel_chunks[panel];
    __m512i sums[R];
    for (int b = 0; b < R; ++b) sums[b] = _mm512_setzero_si512();
    int64_t at = p.padded_begin[r];
    for (int64_t c = 0; c < chunks; ++c, w += InferencePack::kChunkBytes, at += chunk) {
      dot_chunk<Bits, R>(_mm512_loadu_si512(w), q, at, sums,
                         std::make_integer_sequence<int, 8 / Bits>{});
    }
    const __m512 scale = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + panel * 16)));
    for (int b = 0; b < R; ++b) {
      const int64_t cell = (b0 + b) * p.regions + r;
      const __m512 sum = _mm512_fmsub_ps(_mm512_cvtepi32_ps(sums[b]), _mm512_set1_ps(mult),
                                         _mm512_set1_ps(rows.offset[cell]));
      acc[b] = _mm512_fmadd_ps(sum, _mm512_mul_ps(scale, _mm512_set1_ps(rows.scale[cell])), acc[b]);
    }
  }
  const int64_t n0 = g * InferencePack::kGroup;
  const int64_t lanes = std::min<int64_t>(InferencePack::kGroup, p.out_features - n0);
  const auto mask = static_cast<__mmask16>((1u << lanes) - 1u);
  for (int b = 0; b < R; ++b) _mm512_mask_storeu_ps(y + (b0 + b) * ldy + n0, mask, acc[b]);
}

template <int Bits>
void groups_all_rows(const Panels& p, int64_t g0, int64_t g1, const InferencePack::Rows& rows,
                     float* y, int64_t ldy) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t b = 0;
    for (; b + kTileRows <= rows.batch; b += kTileRows) {
      group_rows<Bits, kTileRows>(p, g, rows, b, y, ldy);
    }
    switch (rows.batch - b) {
      case 1: group_rows<Bits, 1>(p, g, rows, b, y, ldy); break;
      case 2: group_rows<Bits, 2>(p, g, rows, b, y, ldy); break;
      case 3: group_rows<Bits, 3>(p, g, rows, b, y, ldy); break;
      case 4: group_rows<Bits, 4>(p, g, rows, b, y, ldy); break;
      case 5: group_rows<Bits, 5>(p, g, rows, b, y, ldy); break;
      case 6: group_rows<Bits, 6>(p, g, rows, b, y, ldy); break;
      case 7: group_rows<Bits, 7>(p, g, rows, b, y, ldy); break;
      default: break;
    }
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

bool InferencePack::cpu_supported() { return cpu::features().avx512_vnni; }

InferencePack::InferencePack(const PackedView& v)
    : bits_(v.bits), in_features_(v.in_features), out_features_(v.out_features) {
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
  // Each int32 lane sums stored value x |q| <= (2^bits - 1) x 127 over a region.
  if (largest * ((int64_t{1} << bits_) - 1) * 127 > INT32_MAX) {
    throw std::invalid_argument("InferencePack: a region of " + std::to_string(largest) +
                                " inputs could overflow the int32 sums at " +
                                std::to_string(bits_) + " bits");
  }
  std::vector<int64_t> panel_of(static_cast<size_t>(regions), -1);
  std::vector<char> held(static_cast<size_t>(regions));
  group_begin_.assign(1, 0);
  panel_chunks_.assign(1, 0);
  PackedView::Cursor cursor = v.cursor_at(0);
  for (int64_t n0 = 0; n0 < out_features_; n0 += kGroup) {
    const int64_t n1 = std::min(n0 + kGroup, out_features_);
    std::fill(held.begin(), held.end(), 0);
    for (int64_t n = n0; n < n1; ++n) v.for_each_region(n, [&](int64_t r) { held[r] = 1; });
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
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t lane = n - n0;
      v.visit_blocks(n, cursor, [&](int64_t r, int64_t block, int64_t offset) {
        const int64_t panel = panel_of[r];
        scales_[panel * kGroup + lane] = v.scales[block];
        uint8_t* chunks = codes_.data() + panel_chunks_[panel] * kChunkBytes + 4 * lane;
        const int64_t size = v.region_size(r);
        for (int64_t i = 0; i < size; ++i) {
          const uint32_t stored = quant::get_stored(v.codes + offset, bits_, size, i);
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
                              (panel_chunks_.size() + group_begin_.size() + padded_begin_.size() +
                               region_begin_.size()) *
                                  sizeof(int64_t));
}

void InferencePack::quantize(const float* x, int64_t batch, int64_t ldx, Rows& rows) const {
  const int64_t regions = static_cast<int64_t>(region_begin_.size()) - 1;
  const int64_t padded = padded_begin_.back();
  const float offset = static_cast<float>(stored_offset(bits_));
  rows.batch = batch;
  rows.q.assign(static_cast<size_t>(batch * padded), 0);
  rows.scale.resize(static_cast<size_t>(batch * regions));
  rows.offset.resize(static_cast<size_t>(batch * regions));
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * ldx;
    for (int64_t r = 0; r < regions; ++r) {
      const int64_t begin = region_begin_[r], size = region_begin_[r + 1] - begin;
      float largest = 0.0f;
      for (int64_t i = 0; i < size; ++i) largest = std::max(largest, std::fabs(xb[begin + i]));
      const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
      int8_t* q = rows.q.data() + b * padded + padded_begin_[r];
      int32_t sum = 0;
      for (int64_t i = 0; i < size; ++i) {
        q[i] = static_cast<int8_t>(std::nearbyint(xb[begin + i] * inverse));
        sum += q[i];
      }
      rows.scale[b * regions + r] = largest / 127.0f;
      rows.offset[b * regions + r] = offset * static_cast<float>(sum);
    }
  }
}

void InferencePack::linear_groups(int64_t g0, int64_t g1, const Rows& rows, float* y,
                                  int64_t ldy) const {
#if defined(__x86_64__)
  const Panels p{padded_begin_.data(), group_begin_.data(), panel_region_.data(), scales_.data(),
                 panel_chunks_.data(),  codes_.data(),       out_features_,        padded_begin_.back(),
                 static_cast<int64_t>(region_begin_.size()) - 1};
  switch (bits_) {
    case 1: groups_all_rows<1>(p, g0, g1, rows, y, ldy); return;
    case 2: groups_all_rows<2>(p, g0, g1, rows, y, ldy); return;
    case 4: groups_all_rows<4>(p, g0, g1, rows, y, ldy); return;
    default: groups_all_rows<8>(p, g0, g1, rows, y, ldy); return;
  }
#else
  (void)g0, (void)g1, (void)rows, (void)y, (void)ldy;
  throw std::logic_error("InferencePack: the kernels need x86-64 with AVX-512 VNNI");
#endif
}

}  // namespace spatium
