// Run-time CPU feature detection, done once per process.
#pragma once

namespace spatium::cpu {

struct Features {
  bool avx2 = false;
  bool fma_f16c = false;   // FMA3 and F16C, which the AVX2 integer inference kernels also use
  bool avx512 = false;     // AVX-512 F + BW + VL + DQ: what the 512-bit kernels use
  bool avx512_vnni = false;  // and VNNI (vpdpbusd): the integer inference kernels
  bool bmi2 = false;
  bool fast_pdep = false;  // BMI2 present and pdep/pext not microcoded (not AMD Zen 1/2)
};

// The features of the CPU this process runs on.
const Features& features();

}  // namespace spatium::cpu
