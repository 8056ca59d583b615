#include "quantize.h"

#include <algorithm>

namespace spatium::quant {
namespace {

// code values of every byte, for b in {1, 2, 4}: table[byte][k] is the code of the k-th field.
template <int Bits>
struct ByteTable {
  static constexpr int kPerByte = 8 / Bits;
  std::array<std::array<float, kPerByte>, 256> code{};
  constexpr ByteTable() {
    for (uint32_t byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < kPerByte; ++k) {
        const uint32_t stored = (byte >> (k * Bits)) & ((1u << Bits) - 1u);
        code[byte][k] = static_cast<float>(valid_stored(Bits, stored) ? from_stored(Bits, stored) : 0);
      }
    }
  }
};

template <int Bits>
void dequantize_packed(const uint8_t* codes, int64_t count, float scale, float* out) {
  static constexpr ByteTable<Bits> table;
  constexpr int per_byte = ByteTable<Bits>::kPerByte;
  const int64_t full = count / per_byte;
  for (int64_t i = 0; i < full; ++i) {
    const auto& fields = table.code[codes[i]];
    for (int k = 0; k < per_byte; ++k) out[i * per_byte + k] = scale * fields[k];
  }
  for (int64_t j = full * per_byte; j < count; ++j) {
    out[j] = scale * table.code[codes[full]][j - full * per_byte];
  }
}

}  // namespace

uint16_t quantize_block(const float* w, int64_t count, int bits, uint8_t* codes) {
  std::fill(codes, codes + code_bytes(bits, count), uint8_t{0});
  float absmax = 0.0f;
  double abs_sum = 0.0;
  bool finite = true;
  for (int64_t j = 0; j < count; ++j) {
    finite = finite && std::isfinite(w[j]);
    absmax = std::max(absmax, std::fabs(w[j]));
    abs_sum += std::fabs(w[j]);
  }
  if (!finite) {
    for (int64_t j = 0; j < count; ++j) set_stored(codes, bits, j, to_stored(bits, 0));
    return kHalfNaN;
  }
  if (bits == 1) {
    for (int64_t j = 0; j < count; ++j) set_stored(codes, bits, j, w[j] >= 0.0f ? 1u : 0u);
    return count > 0 ? float_to_half(static_cast<float>(abs_sum / static_cast<double>(count))) : 0;
  }
  const int qmax = max_code(bits);
  const uint16_t scale_half = float_to_half_up(absmax / static_cast<float>(qmax));
  const float scale = half_to_float(scale_half);
  for (int64_t j = 0; j < count; ++j) {
    const int code =
        scale > 0.0f ? static_cast<int>(std::clamp(std::nearbyint(w[j] / scale),
                                                   static_cast<float>(-qmax), static_cast<float>(qmax)))
                     : 0;
    set_stored(codes, bits, j, to_stored(bits, code));
  }
  return scale_half;
}

void dequantize_block(const uint8_t* codes, int64_t count, int bits, uint16_t scale_half,
                      float* out) {
  const float scale = half_to_float(scale_half);
  switch (bits) {
    case 1: dequantize_packed<1>(codes, count, scale, out); return;
    case 2: dequantize_packed<2>(codes, count, scale, out); return;
    case 4: dequantize_packed<4>(codes, count, scale, out); return;
    default:
      for (int64_t j = 0; j < count; ++j) {
        out[j] = scale * static_cast<float>(static_cast<int>(codes[j]) - offset(8));
      }
  }
}

int64_t count_nonzero(const uint8_t* codes, int64_t count, int bits) {
  int64_t nonzero = 0;
  for (int64_t j = 0; j < count; ++j) nonzero += from_stored(bits, get_stored(codes, bits, j)) != 0;
  return nonzero;
}

}  // namespace spatium::quant
