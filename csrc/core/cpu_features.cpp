#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace spatium::cpu {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// AMD (and Hygon) before family 19h (Zen 3) run pdep/pext in microcode: tens of cycles each.
bool pdep_is_microcoded() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amd_like = (ebx == 0x68747541u /* "Auth" */) || (ebx == 0x6f677948u /* "Hygo" */);
  if (!amd_like) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  unsigned family = (eax >> 8) & 0xfu;
  if (family == 0xfu) family += (eax >> 20) & 0xffu;
  return family < 0x19u;
}

Features detect() {
  __builtin_cpu_init();
  Features f;
  f.avx2 = __builtin_cpu_supports("avx2");
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool leaf1 = __get_cpuid(1, &eax, &ebx, &ecx, &edx);
  f.fma_f16c = leaf1 && ((ecx >> 12) & 1u) && ((ecx >> 29) & 1u);  // CPUID.1:ECX FMA, F16C
  f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512_vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
  f.bmi2 = __builtin_cpu_supports("bmi2");
  f.fast_pdep = f.bmi2 && !pdep_is_microcoded();
  return f;
}
#else
Features detect() { return {}; }
#endif

}  // namespace

const Features& features() {
  static const Features detected = detect();
  return detected;
}

}  // namespace spatium::cpu
