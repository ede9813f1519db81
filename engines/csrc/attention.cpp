// One decode step's attention on the CPU in fp32 or bf16: one query per head against the keys
// and values a cache holds. SDPA's CPU flash kernel read the cache at ~10-14 GB/s here in fp32,
// and took ~4x this kernel's time in bf16. A bf16 cache is widened to fp32 as it is loaded (a
// zero-extend and a shift: exact); the arithmetic is fp32 in both, and a bf16 output is rounded
// once at the end.
//
// q (B, H, 1, D) and k, v (B, KV, E, D), each with unit stride along D and rows of a head
// D apart (views of the cache as they lie); keep (B, E) bool. Returns (B, 1, H, D).
// One task per (row, KV head); its H/KV query heads take turns, so K and V come from memory
// once while a head's K and V fit in L2 (the later heads re-read them there). Two passes:
// scores, then softmax weights times values. Both keep many independent FMA chains in flight:
// eight keys' dot products at once, and the output held in registers across the keys (one dot
// product, one reduction and one output update through memory per key took ~130 cycles:
// slower than the memory read).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "simd.h"

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// 8 elements of the cache as floats
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename T>
static inline float dot(const float* a, const T* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s += a[d] * float(b[d]);
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
template <int NV, typename T>
static inline void weighted_sum(const float* p, const bool* m, const T* V, int64_t vt,
                                int64_t E, int64_t pf, float* o) {
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < E; ++t) {
    _mm_prefetch((const char*)(V + (t + pf) * vt), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int l = 0; l < NV * 8; l += 64 / (int)sizeof(T))  // every line of the slice, into L2
      _mm_prefetch((const char*)(V + (t + 2 * pf) * vt + l), _MM_HINT_T1);
    if (!m[t]) continue;
    const __m256 pv = _mm256_set1_ps(p[t]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      acc[j] = _mm256_fmadd_ps(pv, load8(V + t * vt + 8 * j), acc[j]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j)
    _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(_mm256_loadu_ps(o + 8 * j), acc[j]));
}

// T: float or at::BFloat16, the element type of q, k, v and the output
template <typename T>
static torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                            torch::Tensor keep, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), E = k.size(2);
  const int64_t G = H / KV, E8 = E & ~int64_t(7), D8 = D & ~int64_t(7);
  auto out = torch::empty({B, 1, H, D}, q.options());
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const bool* mp = keep.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), kh = k.stride(1),
                kt = k.stride(2), vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  // rows ahead: ~4 KB (L2: twice that)
  const int64_t pf = std::max<int64_t>(8, 4096 / (D * (int64_t)sizeof(T)));
  at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qs(D), s(E8 + 8), o(D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KV, h = task % KV;
      const T* K = kp + b * kb + h * kh;
      const T* V = vp + b * vb + h * vh;
      const bool* m = mp + b * E;
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = qp + b * qb + (h * G + g) * qh;
        for (int64_t d = 0; d < D; ++d) qs[d] = float(qg[d]) * (float)scale;
        // scores, eight keys at a time
        for (int64_t t = 0; t < E8; t += 8) {
          __m256 a[8];
#pragma GCC unroll 8
          for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D8; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qs.data() + d);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j)
              a[j] = _mm256_fmadd_ps(qv, load8(K + (t + j) * kt + d), a[j]);
          }
          _mm_prefetch((const char*)(K + (t + pf) * kt), _MM_HINT_T0);
          for (int j = 0; j < 8; ++j)  // every line of 8 keys further ahead, into L2
            for (int64_t l = 0; l < D; l += 64 / (int64_t)sizeof(T))
              _mm_prefetch((const char*)(K + (t + 2 * pf + j) * kt + l), _MM_HINT_T1);
          _mm256_storeu_ps(s.data() + t, hsum8x8(a));
          if (D8 < D)
            for (int j = 0; j < 8; ++j)
              for (int64_t d = D8; d < D; ++d) s[t + j] += qs[d] * float(K[(t + j) * kt + d]);
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
          for (int64_t t = 0; t < E; ++t) o[d] += s[t] * float(V[t * vt + d]);
        T* dst = op + b * H * D + (h * G + g) * D;
        const float r = 1.f / sum;
        for (int64_t dd = 0; dd < D; ++dd) dst[dd] = T(o[dd] * r);
      }
    }
  });
  return out;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor keep, double scale) {
  if (q.scalar_type() == torch::kBFloat16) return attend<at::BFloat16>(q, k, v, keep, scale);
  return attend<float>(q, k, v, keep, scale);
}
