// What the kernels share: the instruction set in use (AVX2 + FMA, the files' own target, or
// AVX-512 where the CPU has it, picked at run time) and a horizontal sum of 8 vectors.
#pragma once

#include <immintrin.h>

// lanes j of the result: the sum of a[j]'s eight lanes
static inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline bool use512 = __builtin_cpu_supports("avx512f");

// tests run both paths on a CPU that has AVX-512; returns whether AVX-512 is now in use
inline bool set_avx512(bool on) {
  use512 = on && __builtin_cpu_supports("avx512f");
  return use512;
}

// the bf16 linears' dot-product instruction (vdpbf16ps), where the CPU has it; tests switch it
// off to run the widening path on such a CPU; returns whether it is now in use
inline bool use_bf16dp = __builtin_cpu_supports("avx512bf16");
inline bool set_bf16dp(bool on) {
  use_bf16dp = on && __builtin_cpu_supports("avx512bf16");
  return use_bf16dp;
}

inline bool avx512_on() { return use512; }
inline bool bf16dp_on() { return use512 && use_bf16dp; }

inline bool cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
