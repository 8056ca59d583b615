#include "morton.h"

#include <immintrin.h>

#include <cstring>

#include "cpu_features.h"

namespace spatium::morton {
namespace {

constexpr uint64_t kMaskX = 0x0000249249249249ull;  // bits 0, 3, 6, ..., 45

template <class T>
size_t first_bad_position(const T* xyz, size_t n) {
  for (size_t i = 0; i < 3 * n; ++i) {
    if (static_cast<uint64_t>(xyz[i]) > kMaxCoord) return i / 3;
  }
  return n;
}

size_t first_bad_code(const int64_t* codes, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (static_cast<uint64_t>(codes[i]) >= kCodeLimit) return i;
  }
  return n;
}

// Two ways to move bits. Both spread the low 16 bits of a coordinate to every third code bit
// (shifted by the axis) and gather them back; higher bits are ignored.
struct MagicBits {
  [[gnu::always_inline]] static inline uint64_t spread(uint64_t v, int axis) {
    return spread3(v) << axis;
  }
  [[gnu::always_inline]] static inline uint64_t gather(uint64_t code, int axis) {
    return compact3(code >> axis);
  }
};
// Needs BMI2. Not always_inline: GCC would try to inline it into the default-target loop body
// first and fail; run_bmi2's flatten inlines it once that body sits inside bmi2 code.
struct Pdep {
  [[gnu::target("bmi2")]] static inline uint64_t spread(uint64_t v, int axis) {
    return _pdep_u64(v, kMaskX << axis);
  }
  [[gnu::target("bmi2")]] static inline uint64_t gather(uint64_t code, int axis) {
    return _pext_u64(code, kMaskX << axis);
  }
};

// The batch loops are branch-free so that the compiler vectorizes the magic-bits variants. Range
// checks are folded into one OR and resolved by a scalar re-scan only when something was out of
// range. Negative values become huge unsigned ones, so one unsigned comparison checks both ends.
template <class Bits>
struct Encode {
  template <class T>
  [[gnu::always_inline]] static inline size_t run(const T* xyz, int64_t* codes, size_t n) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t x = static_cast<uint64_t>(xyz[3 * i]);
      const uint64_t y = static_cast<uint64_t>(xyz[3 * i + 1]);
      const uint64_t z = static_cast<uint64_t>(xyz[3 * i + 2]);
      bad |= (x | y | z) >> 16;
      codes[i] = static_cast<int64_t>(Bits::spread(x, 0) | Bits::spread(y, 1) | Bits::spread(z, 2));
    }
    return bad ? first_bad_position(xyz, n) : n;
  }
};

template <class Bits>
struct Decode {
  template <class T>
  [[gnu::always_inline]] static inline size_t run(const int64_t* codes, T* xyz, size_t n) {
    uint64_t bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const uint64_t c = static_cast<uint64_t>(codes[i]);
      bad |= c >> kCodeBits;
      xyz[3 * i] = static_cast<T>(Bits::gather(c, 0));
      xyz[3 * i + 1] = static_cast<T>(Bits::gather(c, 1));
      xyz[3 * i + 2] = static_cast<T>(Bits::gather(c, 2));
    }
    return bad ? first_bad_code(codes, n) : n;
  }
};

// One instantiation per target: the always_inline loop is compiled with that target's ISA.
template <class Loop, class... Args>
size_t run_portable(Args... args) {
  return Loop::run(args...);
}
template <class Loop, class... Args>
[[gnu::target("avx2")]] size_t run_avx2(Args... args) {
  return Loop::run(args...);
}
template <class Loop, class... Args>
[[gnu::target("avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")]] size_t run_avx512(
    Args... args) {
  return Loop::run(args...);
}
template <class Loop, class... Args>
[[gnu::target("bmi2"), gnu::flatten]] size_t run_bmi2(Args... args) {
  return Loop::run(args...);
}

template <template <class> class Loop, class... Args>
size_t dispatch(Impl impl, Args... args) {
  switch (impl) {
    case Impl::Bmi2: return run_bmi2<Loop<Pdep>>(args...);
    case Impl::Avx2: return run_avx2<Loop<MagicBits>>(args...);
    case Impl::Avx512: return run_avx512<Loop<MagicBits>>(args...);
    case Impl::Portable: break;
  }
  return run_portable<Loop<MagicBits>>(args...);
}

}  // namespace

[[gnu::target("bmi2")]] uint64_t encode_bmi2(uint16_t x, uint16_t y, uint16_t z) {
  return Pdep::spread(x, 0) | Pdep::spread(y, 1) | Pdep::spread(z, 2);
}

[[gnu::target("bmi2")]] Position decode_bmi2(uint64_t code) {
  // Packed in a register first: filling the struct field by field makes GCC store 16-bit halves
  // and reload them as one 32-bit word, a store-forwarding stall that cost 4x here.
  const uint64_t packed =
      Pdep::gather(code, 0) | (Pdep::gather(code, 1) << 16) | (Pdep::gather(code, 2) << 32);
  Position p;
  std::memcpy(&p, &packed, sizeof(p));
  return p;
}

// Read once at load time: the per-call check is then a plain load, not a static-init guard.
const bool kUsePdep = cpu::features().fast_pdep;

uint64_t encode_point(uint16_t x, uint16_t y, uint16_t z) {
  return kUsePdep ? encode_bmi2(x, y, z) : encode(x, y, z);
}

Position decode_point(uint64_t code) { return kUsePdep ? decode_bmi2(code) : decode(code); }

const char* name(Impl impl) {
  switch (impl) {
    case Impl::Portable: return "portable";
    case Impl::Bmi2: return "bmi2";
    case Impl::Avx2: return "avx2";
    case Impl::Avx512: return "avx512";
  }
  return "unknown";
}

bool available(Impl impl) {
  const cpu::Features& f = cpu::features();
  switch (impl) {
    case Impl::Portable: return true;
    case Impl::Bmi2: return f.bmi2;
    case Impl::Avx2: return f.avx2;
    case Impl::Avx512: return f.avx512;
  }
  return false;
}

Impl best_batch_impl() {
  // Measured (benchmarks/RESULTS.md): the vectorized magic bits beat one pdep per coordinate,
  // and pdep beats scalar magic bits only where it is not microcoded.
  const cpu::Features& f = cpu::features();
  if (f.avx512) return Impl::Avx512;
  if (f.avx2) return Impl::Avx2;
  if (f.fast_pdep) return Impl::Bmi2;
  return Impl::Portable;
}

template <class T>
size_t encode_batch(const T* xyz, int64_t* codes, size_t n, Impl impl) {
  return dispatch<Encode>(impl, xyz, codes, n);
}

template <class T>
size_t decode_batch(const int64_t* codes, T* xyz, size_t n, Impl impl) {
  return dispatch<Decode>(impl, codes, xyz, n);
}

template size_t encode_batch<int32_t>(const int32_t*, int64_t*, size_t, Impl);
template size_t encode_batch<int64_t>(const int64_t*, int64_t*, size_t, Impl);
template size_t decode_batch<int32_t>(const int64_t*, int32_t*, size_t, Impl);
template size_t decode_batch<int64_t>(const int64_t*, int64_t*, size_t, Impl);

}  // namespace spatium::morton
