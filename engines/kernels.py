"""CPU kernels for decode: linears with few rows in x (y = x @ W.T + b), and fp32 attention of
one query per head over the KV cache.

MKL's sgemm re-packs W on every call when x has a handful of rows, so decode streams each
weight about twice and reaches ~9 GB/s here; pre-packing fixes that but is a second copy of the
weights. This kernel reads the training weight W (N, K) as it lies, once: each vector of W is
used for every row of x in a group of 4 or 8, and each vector of x for 1-3 rows of W, K in tiles
of at most 1024 floats so that a group's tile of x stays in L1, using AVX2 FMA (AVX-512 where
the CPU has it, picked at run time); the N rows are split across torch's intra-op threads.
Built on first use with torch's C++ extension loader (cached in TORCH_EXTENSIONS_DIR); where it
cannot build or the CPU lacks AVX2/FMA, `available()` is False and callers use F.linear (the
slow twin, checked against it in tests/test_kernels.py).

Decode attention: SDPA's CPU flash kernel read the cache at ~10-14 GB/s here. `decode_attention`
gives each (row, KV head) to one task that reads its keys and then its values from memory once,
prefetched (the query heads that share them under GQA re-read them from L2), in two passes
(scores, then softmax weights times values).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from core.rng import as_int64
from core.rng import counter_uniform as _counter_uniform_torch

MAX_ROWS = 16

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Prefetch distances in floats: PREFETCH along a row of W into L1 (tuned on a Xeon), and
// PREFETCH_L2 into L2, in the order W is read (whole rows ahead at the same k when K runs in
// tiles). The second raised what one core of an AMD Zen 4 read from W from ~10 to
// ~14-15 GB/s: there, prefetching into L1 alone kept too few lines in flight. Both are kept, so
// a CPU where the first sufficed still gets it.
#ifndef PREFETCH
#define PREFETCH 1024
#endif
#ifndef PREFETCH_L2
#define PREFETCH_L2 4096
#endif

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// One body for both instruction sets, in GCC's vector types: f8 (8 floats, AVX2) and f16
// (16 floats, AVX-512). `tile` and `span` are always inlined, so they are compiled for their
// caller's target: span_avx2 for the file's (-mavx2 -mfma), span_avx512 for AVX-512, which
// runs only where the CPU has it.
typedef float f8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));

template <typename V>
__attribute__((always_inline)) static inline V loadv(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

// lanes j of the result: the sum of a[j]'s eight lanes
static inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// the 8 floats whose sum is v's: v itself, or the sum of v's two halves
__attribute__((always_inline)) static inline f8 fold(f8 v) { return v; }
__attribute__((always_inline)) static inline f8 fold(f16 v) {
  f8 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(f8));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(f8), sizeof(f8));
  return lo + hi;
}

// x leaves L1 (48 KB here) past 8 rows of ~1500 floats; the K dimension goes in equal tiles of
// at most KTILE floats, so that a group's tile of x stays in L1 while W streams past it
constexpr int64_t KTILE = 1024;

// Partial dot products over k in [k0, k1) of NW rows of W from n with R rows of x, added to
// acc[j * R + r]. R x NW accumulators in registers: each W vector is loaded once and used R
// times, each x vector loaded once into a register and used NW times (left to itself, GCC
// folded the x load into every FMA: NW loads of it). The accumulators are summed 8 at a time
// with a transpose-and-add tree (hsum8x8), not one by one through memory. pf2: how far ahead of
// each W load, in floats, the L2 prefetch reaches.
template <typename V, int R, int NW>
__attribute__((always_inline)) static inline void tile(
    const float* x, const float* w, int64_t K, int64_t k0, int64_t k1, int64_t n, float* acc,
    int64_t pf2) {
  constexpr int L = sizeof(V) / sizeof(float), T = NW * R, T8 = (T + 7) / 8 * 8;
  V a[NW][R];
#pragma GCC unroll 8
  for (int j = 0; j < NW; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[j][r] = V{};
  for (int64_t k = k0; k < k1; k += L) {
    V v[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      _mm_prefetch((const char*)(w + (n + j) * K + k + PREFETCH), _MM_HINT_T0);  // from DRAM
      _mm_prefetch((const char*)(w + (n + j) * K + k + pf2), _MM_HINT_T1);
      v[j] = loadv<V>(w + (n + j) * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      V xv = loadv<V>(x + r * K + k);
      asm("" : "+v"(xv));  // keeps xv in a register
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) a[j][r] += v[j] * xv;  // contracted to an FMA
    }
  }
  f8 s[T8];
#pragma GCC unroll 8
  for (int t = 0; t < T8; ++t) s[t] = t < T ? fold(a[t / R][t % R]) : f8{};
#pragma GCC unroll 4
  for (int t = 0; t < T; t += 8) {
    float h[8];
    _mm256_storeu_ps(h, hsum8x8(reinterpret_cast<const __m256*>(s + t)));
    for (int u = 0; u < 8 && t + u < T; ++u) acc[t + u] += h[u];
  }
}

// acc[(n - c0) * R + r] += the dot products of rows [c0, c1) of W with R rows of x over
// k < KL (a multiple of the vector width), tile by tile of K, NW rows of W at a time
template <typename V, int R>
__attribute__((always_inline)) static inline void span(
    const float* x, const float* w, int64_t K, int64_t KL, int64_t c0, int64_t c1, int nw,
    float* acc) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t tiles = std::max<int64_t>(1, (KL + KTILE - 1) / KTILE);
  const int64_t kt = (KL / L + tiles - 1) / tiles * L;  // whole vectors
  for (int64_t k0 = 0; k0 < KL; k0 += kt) {
    const int64_t k1 = std::min(k0 + kt, KL);
    const int64_t pf2 = (PREFETCH_L2 + (k1 - k0) - 1) / (k1 - k0) * K;  // whole rows ahead
    int64_t n = c0;
    if (nw == 3)
      for (; n + 3 <= c1; n += 3) tile<V, R, 3>(x, w, K, k0, k1, n, acc + (n - c0) * R, pf2);
    if (nw >= 2)
      for (; n + 2 <= c1; n += 2) tile<V, R, 2>(x, w, K, k0, k1, n, acc + (n - c0) * R, pf2);
    for (; n < c1; ++n) tile<V, R, 1>(x, w, K, k0, k1, n, acc + (n - c0) * R, pf2);
  }
}

// AVX2 (16 registers): 8 rows of x one row of W at a time; 4 rows of x two rows of W at a
// time, or three where skinny_linear groups x in 4s (K >= 1536: 8 rows ran at 11 GB/s there)
template <int R>
static void span_avx2(const float* x, const float* w, int64_t K, int64_t KL, int64_t c0,
                      int64_t c1, float* acc) {
  span<f8, R>(x, w, K, KL, c0, c1, R == 8 ? 1 : K >= 1536 ? 3 : 2, acc);
}

// AVX-512 (32 registers): two rows of W at a time (with x loaded into a register, three
// measured no faster here)
template <int R>
__attribute__((target("avx512f"))) static void span_avx512(
    const float* x, const float* w, int64_t K, int64_t KL, int64_t c0, int64_t c1, float* acc) {
  span<f16, R>(x, w, K, KL, c0, c1, 2, acc);
}

using SpanFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);

static bool use512 = __builtin_cpu_supports("avx512f");

// tests run both paths on a CPU that has AVX-512; returns whether AVX-512 is now in use
bool set_avx512(bool on) {
  use512 = on && __builtin_cpu_supports("avx512f");
  return use512;
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b) {
  // x (M, K) contiguous float32, w (N, K) contiguous float32, b (N,) or None -> (M, N)
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  // x in groups of GS rows: 8, or 4 with AVX2 once x's 8 rows would leave L1
  const bool wide = use512;  // read once: set_avx512 from another thread cannot split a call
  const int64_t GS = (wide || K < 1536) ? 8 : 4, groups = (M + GS - 1) / GS;
  const int64_t KL = K - K % (wide ? 16 : 8);
  torch::Tensor xpad = x;
  if (M % GS) {  // zero rows pad M up to a multiple of GS
    xpad = torch::zeros({groups * GS, K}, x.options());
    xpad.narrow(0, 0, M).copy_(x);
  }
  const float* xp = xpad.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // past one group, the groups take turns over each 48 rows of W while they sit in L2: W comes
  // from memory once (group by group over a thread's whole share read it once per group)
  constexpr int64_t CHUNK = 48;
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    float acc[CHUNK * 8];
    for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
      const int64_t c1 = std::min(c0 + CHUNK, n1);
      for (int64_t g = 0; g < groups; ++g) {
        const int rows = (int)std::min(GS, M - g * GS);
        const int R = rows <= 4 ? 4 : 8;  // 4-row tiles when 4 rows or fewer: no wasted FMAs
        const SpanFn f = wide ? (R == 4 ? span_avx512<4> : span_avx512<8>)
                              : (R == 4 ? span_avx2<4> : span_avx2<8>);
        const float* xg = xp + g * GS * K;
        std::fill(acc, acc + (c1 - c0) * R, 0.f);
        f(xg, wp, K, KL, c0, c1, acc);
        for (int64_t n = c0; n < c1; ++n)
          for (int m = 0; m < rows; ++m) {
            float s = acc[(n - c0) * R + m];
            for (int64_t k = KL; k < K; ++k) s += wp[n * K + k] * xg[m * K + k];
            yp[(g * GS + m) * N + n] = bp ? s + bp[n] : s;
          }
      }
    }
  });
  return y;
}

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

bool cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// One decode step's attention: one query per head against the keys and values a cache holds.
// q (B, H, 1, D) and k, v (B, KV, E, D), each with unit stride along D and rows of a head
// D apart (views of the cache as they lie); keep (B, E) bool. Returns (B, 1, H, D).
// One task per (row, KV head); its H/KV query heads take turns, so K and V come from memory
// once while a head's K and V fit in L2 (the later heads re-read them there). Two passes:
// scores, then softmax weights times values. Both keep many independent FMA chains in flight:
// eight keys' dot products at once, and the output held in registers across the keys (one dot
// product, one reduction and one output update through memory per key took ~130 cycles:
// slower than the memory read).

static inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// e^x for x <= 0 (x - max of the scores), relative error ~2e-7: x = n ln2 + r with |r| <= ln2/2,
// e^r by its Taylor polynomial to degree 7 (the next term is below 2e-7 there), 2^n from the
// exponent bits; below -87, 0; NaN stays NaN
static inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 zero_out = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // a NaN stays NaN (max_ps returns its second operand then)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, ln2 split in two so that n * hi is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.f / 5040);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 720));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 120));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 24));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 6));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(zero_out, y);
}

// o[0, NV*8) += sum over kept keys t of p[t] * V[t, 0, NV*8): NV vectors held in registers
template <int NV>
static inline void weighted_sum(const float* p, const bool* m, const float* V, int64_t vt,
                                int64_t E, int64_t pf, float* o) {
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < E; ++t) {
    _mm_prefetch((const char*)(V + (t + pf) * vt), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int l = 0; l < NV * 8; l += 16)  // every line of this key's slice, into L2
      _mm_prefetch((const char*)(V + (t + 2 * pf) * vt + l), _MM_HINT_T1);
    if (!m[t]) continue;
    const __m256 pv = _mm256_set1_ps(p[t]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(V + t * vt + 8 * j), acc[j]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j)
    _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_loadu_ps(o + 8 * j), acc[j]));
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor keep, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), E = k.size(2);
  const int64_t G = H / KV, E8 = E & ~int64_t(7), D8 = D & ~int64_t(7);
  auto out = torch::empty({B, 1, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = keep.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), kh = k.stride(1),
                kt = k.stride(2), vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  const int64_t pf = std::max<int64_t>(8, 4096 / (D * 4));  // rows ahead: ~4 KB (L2: twice that)
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qs(D), s(E8 + 8), o(D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KV, h = task % KV;
      const float* K = kp + b * kb + h * kh;
      const float* V = vp + b * vb + h * vh;
      const bool* m = mp + b * E;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qp + b * qb + (h * G + g) * qh;
        for (int64_t d = 0; d < D; ++d) qs[d] = qg[d] * (float)scale;
        // scores, eight keys at a time
        for (int64_t t = 0; t < E8; t += 8) {
          __m256 a[8];
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D8; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qs.data() + d);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j)
              a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + (t + j) * kt + d), a[j]);
          }
          _mm_prefetch((const char*)(K + (t + pf) * kt), _MM_HINT_T0);
          for (int j = 0; j < 8; ++j)  // every line of 8 keys further ahead, into L2
            for (int64_t l = 0; l < D; l += 16)
              _mm_prefetch((const char*)(K + (t + 2 * pf + j) * kt + l), _MM_HINT_T1);
          _mm256_storeu_ps(s.data() + t, hsum8x8(a));
          if (D8 < D)
            for (int j = 0; j < 8; ++j)
              for (int64_t d = D8; d < D; ++d) s[t + j] += qs[d] * K[(t + j) * kt + d];
        }
        for (int64_t t = E8; t < E; ++t) s[t] = dot(qs.data(), K + t * kt, D);
        // a NaN score (or +inf, through inf - inf) makes every weight NaN, as in SDPA
        float mx = -INFINITY;
        bool nan = false;
        for (int64_t t = 0; t < E; ++t)
          if (m[t]) {
            mx = std::max(mx, s[t]);
            nan |= std::isnan(s[t]);
          }
        if (nan) mx = NAN;
        // weights e^(s - max), 0 where masked, and their sum
        const __m256 mxv = _mm256_set1_ps(mx);
        for (int64_t t = 0; t < E8; t += 8) {
          const __m256 p = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s.data() + t), mxv));
          _mm256_storeu_ps(s.data() + t, p);
        }
        for (int64_t t = E8; t < E; ++t) s[t] = std::exp(s[t] - mx);
        float sum = 0.f;
        for (int64_t t = 0; t < E; ++t) {
          if (!m[t]) s[t] = 0.f;
          sum += s[t];
        }
        // values: 64 floats of D at a time in registers, then what is left 8 and 1 at a time
        std::fill(o.begin(), o.end(), 0.f);
        int64_t d = 0;
        for (; d + 64 <= D8; d += 64) weighted_sum<8>(s.data(), m, V + d, vt, E, pf, o.data() + d);
        for (; d < D8; d += 8) weighted_sum<1>(s.data(), m, V + d, vt, E, pf, o.data() + d);
        for (; d < D; ++d)
          for (int64_t t = 0; t < E; ++t) o[d] += s[t] * V[t * vt + d];
        float* dst = op + b * H * D + (h * G + g) * D;
        const float r = 1.f / sum;
        for (int64_t dd = 0; dd < D; ++dd) dst[dd] = o[dd] * r;
      }
    }
  });
  return out;
}
"""

_mod = None
_why: Optional[str] = None


def _load():
    global _mod, _why
    if _mod is not None or _why is not None:
        return _mod
    if os.environ.get("RLHF_BENCH_NO_KERNELS"):
        _why = "disabled by RLHF_BENCH_NO_KERNELS"
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        _mod = load_inline(name="rlhf_bench_skinny_v18", cpp_sources=_SRC,
                           functions=["skinny_linear", "cpu_ok", "set_avx512", "decode_attention",
                                      "counter_uniform"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-Wno-psabi"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        if not _mod.cpu_ok():
            _mod, _why = None, "this CPU lacks AVX2/FMA"
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: use the twin
        _mod, _why = None, f"could not build ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        print(f"rlhf-bench: skinny-linear kernel unavailable, using F.linear: {_why}",
              file=sys.stderr)
    return _mod


def set_avx512(on: bool) -> bool:
    """Use the AVX-512 blocks where the CPU has them (the default), or force the AVX2 ones;
    returns whether AVX-512 is in use."""
    mod = _load()
    return bool(mod is not None and mod.set_avx512(on))


def available() -> bool:
    return _load() is not None


def why_unavailable() -> Optional[str]:
    _load()
    return _why


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """x (M, K), w (N, K), b (N,) or None -> (M, N) = x @ w.T + b; the kernel for
    M <= MAX_ROWS fp32 CPU tensors, F.linear otherwise."""
    mod = _load()
    if (mod is None or x.dim() != 2 or w.dim() != 2 or x.shape[0] > MAX_ROWS
            or x.shape[1] != w.shape[1] or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu"
            or not w.is_contiguous()
            or (b is not None and (b.dtype != torch.float32 or not b.is_contiguous()
                                   or b.shape != (w.shape[0],) or b.device.type != "cpu"))):
        return F.linear(x, w, b)  # which also raises on shapes that do not match
    return mod.skinny_linear(x.contiguous(), w, b)


def counter_uniform(key: int, n: int) -> torch.Tensor:
    """core.rng.counter_uniform(key, n), computed in C++ across torch's threads (0.2 ms for
    8 x 50272 here, the torch form 3.2 ms); the same bits (tests/test_kernels.py checks them),
    from the torch form where the kernel is unavailable."""
    mod = _load()
    if mod is None:
        return _counter_uniform_torch(key, n)
    return mod.counter_uniform(as_int64(key), n)  # the key's 64 bits, as the torch form takes


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> Optional[torch.Tensor]:
    """One decode step's attention on the CPU in fp32: q (B, H, 1, D); k, v (B, KV, E, D) with
    unit stride along D (cache views); keep (B, E) bool, True on keys to attend to (at least one
    a row). Returns (B, H, 1, D) (a view of a (B, 1, H, D) tensor), or None where the kernel does
    not apply (the caller uses SDPA)."""
    mod = _load()
    if mod is None or q.dim() != 4 or k.dim() != 4:
        return None
    B, H, S, D = q.shape
    KV, E = k.shape[1], k.shape[2]
    if (S != 1 or min(B, H, D, KV, E) < 1 or H % KV or k.shape != (B, KV, E, D)
            or v.shape != k.shape or keep.shape != (B, E) or keep.dtype != torch.bool
            or any(t.dtype != torch.float32 for t in (q, k, v))
            or any(t.device.type != "cpu" for t in (q, k, v, keep))
            or any(t.stride(3) != 1 for t in (q, k, v))):
        return None
    return mod.decode_attention(q, k, v, keep.contiguous(), scale).transpose(1, 2)
