// Uniform noise for sampling, the same bits as core.rng.counter_uniform's torch form, drawn
// across torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

// core.rng.counter_uniform's draw, element by element the same bits: the splitmix64 finaliser
// of key + (i + 1) * gamma (less its last xorshift, which leaves the top bits as they are), top
// 23 bits as an odd multiple of 2^-24
__attribute__((always_inline)) static inline void uniforms(uint64_t k, int64_t i0, int64_t i1,
                                                           float* p) {
  for (int64_t i = i0; i < i1; ++i) {
    uint64_t z = k + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    p[i] = (float)((z >> 41) * 2 + 1) * 0x1p-24f;
  }
}
static void uniforms_avx2(uint64_t k, int64_t i0, int64_t i1, float* p) {
  uniforms(k, i0, i1, p);
}
__attribute__((target("avx512f,avx512dq"))) static void uniforms_avx512(
    uint64_t k, int64_t i0, int64_t i1, float* p) {  // vectorised 64-bit products (vpmullq)
  uniforms(k, i0, i1, p);
}

torch::Tensor counter_uniform(int64_t key, int64_t n) {
  auto u = torch::empty({n}, torch::kFloat32);
  float* p = u.data_ptr<float>();
  const auto f = use512 && __builtin_cpu_supports("avx512dq") ? uniforms_avx512 : uniforms_avx2;
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) { f((uint64_t)key, i0, i1, p); });
  return u;
}
