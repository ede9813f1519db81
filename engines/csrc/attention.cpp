// One decode step's attention on the CPU in fp32 or bf16: one query per head against the keys
// and values a cache holds. SDPA's CPU flash kernel read the cache at ~10-14 GB/s here in fp32,
// and took ~4x this kernel's time in bf16. A bf16 cache is widened to fp32 as it is loaded (a
// zero-extend and a shift: exact); the arithmetic is fp32 in both, and a bf16 output is rounded
// once at the end.
//
// q (B, H, 1, D) and k, v (B, KV, E, D), each with unit stride along D and rows of a head
// D apart (views of the cache as they lie); keep (B, E) bool. Returns (B, 1, H, D).
// One task per (row, KV head), shared out across threads by balanced_for (balance.h); its H/KV
// query heads take turns, so K and V come from memory once while a head's K and V fit in L2
// (the later heads re-read them there). Two passes: scores, then softmax weights times values.
// Both keep many independent FMA chains in flight: eight keys' dot products at once, and the
// output held in registers across the keys (one dot product, one reduction and one output
// update through memory per key took ~130 cycles: slower than the memory read).
#include <torch/extension.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "balance.h"
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

static inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// all-ones lanes where m[0, 8) is true
static inline __m256 keep8(const bool* m) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
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

// s[0, n) <- e^(s - max) over the kept keys (m: one bool a key, or nullptr for all), 0 at the
// others; returns their sum. A NaN score (or +inf, through inf - inf) makes every weight NaN,
// as in SDPA. Eight keys a vector: a scalar max and sum, each a chain through one register,
// took a third of the decode kernel's time.
static inline float softmax_row(float* s, int64_t n, const bool* m) {
  const int64_t n8 = n & ~int64_t(7);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  __m256 mv = _mm256_set1_ps(-INFINITY), nanv = _mm256_setzero_ps();
  for (int64_t t = 0; t < n8; t += 8) {
    const __m256 x = _mm256_loadu_ps(s + t), kept = m ? keep8(m + t) : all;
    mv = _mm256_max_ps(mv, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, kept));
    nanv = _mm256_or_ps(nanv, _mm256_and_ps(kept, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  }
  float mx = hmax(mv);
  bool nan = _mm256_movemask_ps(nanv) != 0;
  for (int64_t t = n8; t < n; ++t)
    if (!m || m[t]) {
      mx = std::max(mx, s[t]);
      nan |= std::isnan(s[t]);
    }
  if (nan) mx = NAN;
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sv = _mm256_setzero_ps();
  for (int64_t t = 0; t < n8; t += 8) {
    const __m256 p = _mm256_and_ps(m ? keep8(m + t) : all,
                                   exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + t), mxv)));
    _mm256_storeu_ps(s + t, p);
    sv = _mm256_add_ps(sv, p);
  }
  float sum = hsum(sv);
  for (int64_t t = n8; t < n; ++t) sum += s[t] = (!m || m[t]) ? std::exp(s[t] - mx) : 0.f;
  return sum;
}

// s[0, 8) = the scores of keys K[0, 8) (rows kt apart) against qs (D floats), the keys
// widened in order
template <typename T>
static inline void scores8(const float* qs, const T* K, int64_t kt, int64_t D, float* s) {
  const int64_t D8 = D & ~int64_t(7);
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D8; d += 8) {
    const __m256 qv = _mm256_loadu_ps(qs + d);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(K + j * kt + d), a[j]);
  }
  _mm256_storeu_ps(s, hsum8x8(a));
  if (D8 < D)
    for (int j = 0; j < 8; ++j)
      for (int64_t d = D8; d < D; ++d) s[j] += qs[d] * float(K[j * kt + d]);
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

// bf16 as fp32 in pairs: a 32-bit lane of bf16 data holds element 2i in its low half and
// 2i + 1 in its high half; masking the low half off gives 2i + 1, a shift gives 2i, exactly.
// One cheap op per 8 elements, where widening them in order takes a shuffle and a shift (the
// shuffles were what bounded bf16 decode attention). Dot products and weighted sums run on
// the odd and even elements as they come; q is split the same way, and the output
// interleaved back once.
static inline __m256 odd16(__m256i x) {
  return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
}
static inline __m256 even16(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
static inline __m256i load16(const at::BFloat16* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// s[0, 8) = the scores of keys K[0, 8) (rows kt apart, D a multiple of 16) against q, given as
// qo and qe (q's odd and even elements of each 16, D/2 each)
static inline void scores8_pairs(const float* qo, const float* qe, const at::BFloat16* K,
                                 int64_t kt, int64_t D, float* s) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    const __m256 o = _mm256_loadu_ps(qo + c / 2), e = _mm256_loadu_ps(qe + c / 2);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i x = load16(K + j * kt + c);
      a[j] = _mm256_fmadd_ps(o, odd16(x), a[j]);
      a[j] = _mm256_fmadd_ps(e, even16(x), a[j]);
    }
  }
  _mm256_storeu_ps(s, hsum8x8(a));
}

// o[0, 16 NC) += sum over kept keys t of p[t] * V[t, 0, 16 NC), in pairs (bf16 V): 2 NC
// accumulators in registers, interleaved back into order at the end
template <int NC>
static inline void weighted_sum_pairs(const float* p, const bool* m, const at::BFloat16* V,
                                      int64_t vt, int64_t E, int64_t pf, float* o) {
  __m256 ao[NC], ae[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) ao[c] = ae[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < E; ++t) {
    _mm_prefetch((const char*)(V + (t + pf) * vt), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int l = 0; l < NC * 16; l += 32)  // every line of the slice, into L2
      _mm_prefetch((const char*)(V + (t + 2 * pf) * vt + l), _MM_HINT_T1);
    if (!m[t]) continue;
    const __m256 w = _mm256_set1_ps(p[t]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m256i x = load16(V + t * vt + 16 * c);
      ao[c] = _mm256_fmadd_ps(w, odd16(x), ao[c]);
      ae[c] = _mm256_fmadd_ps(w, even16(x), ae[c]);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) {
    // (e0 o0 e1 o1 | e4 o4 e5 o5) and (e2 o2 e3 o3 | e6 o6 e7 o7): elements 0-3 | 8-11, 4-7 | 12-15
    const __m256 lo = _mm256_unpacklo_ps(ae[c], ao[c]), hi = _mm256_unpackhi_ps(ae[c], ao[c]);
    float* oc = o + 16 * c;
    _mm256_storeu_ps(oc, _mm256_add_ps(_mm256_loadu_ps(oc), _mm256_permute2f128_ps(lo, hi, 0x20)));
    _mm256_storeu_ps(oc + 8,
                     _mm256_add_ps(_mm256_loadu_ps(oc + 8), _mm256_permute2f128_ps(lo, hi, 0x31)));
  }
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
  // a task a (row, KV head); rows hold different numbers of real keys
  balanced_for(B * KV, B * KV, [&](auto next) {
    std::vector<float> qs(D), qo(D / 2 + 8), qe(D / 2 + 8), s(E8 + 8), o(D);
    constexpr bool bf16 = std::is_same<T, at::BFloat16>::value;
    const bool pairs = bf16 && D % 16 == 0;
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t b = task / KV, h = task % KV;
      // left padding: keys before the row's first kept one are neither read nor weighed
      int64_t lead = 0;
      while (lead < E && !mp[b * E + lead]) ++lead;
      if (lead == E) lead = 0;
      const int64_t n = E - lead, n8 = n & ~int64_t(7);
      const T* K = kp + b * kb + h * kh + lead * kt;
      const T* V = vp + b * vb + h * vh + lead * vt;
      const bool* m = mp + b * E + lead;
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = qp + b * qb + (h * G + g) * qh;
        for (int64_t d = 0; d < D; ++d) qs[d] = float(qg[d]) * (float)scale;
        // scores, eight keys at a time
        if (pairs)
          for (int64_t c = 0; c < D; c += 16)
            for (int64_t i = 0; i < 8; ++i) {
              qo[c / 2 + i] = qs[c + 2 * i + 1];
              qe[c / 2 + i] = qs[c + 2 * i];
            }
        for (int64_t t = 0; t < n8; t += 8) {
          bool done = false;
          if constexpr (bf16)
            if (pairs) {
              scores8_pairs(qo.data(), qe.data(), K + t * kt, kt, D, s.data() + t);
              done = true;
            }
          if (!done) scores8(qs.data(), K + t * kt, kt, D, s.data() + t);
          _mm_prefetch((const char*)(K + (t + pf) * kt), _MM_HINT_T0);
          for (int j = 0; j < 8; ++j)  // every line of 8 keys further ahead, into L2
            for (int64_t l = 0; l < D; l += 64 / (int64_t)sizeof(T))
              _mm_prefetch((const char*)(K + (t + 2 * pf + j) * kt + l), _MM_HINT_T1);
        }
        for (int64_t t = n8; t < n; ++t) s[t] = dot(qs.data(), K + t * kt, D);
        const float sum = softmax_row(s.data(), n, m);
        // values: 64 floats of D at a time in registers, then what is left 8 and 1 at a time
        std::fill(o.begin(), o.end(), 0.f);
        int64_t d = 0;
        if constexpr (bf16)
          if (pairs) {  // bf16, D a multiple of 16: 64 of D at a time, then 16
            for (; d + 64 <= D; d += 64)
              weighted_sum_pairs<4>(s.data(), m, V + d, vt, n, pf, o.data() + d);
            for (; d < D; d += 16)
              weighted_sum_pairs<1>(s.data(), m, V + d, vt, n, pf, o.data() + d);
          }
        for (; d + 64 <= D8; d += 64) weighted_sum<8>(s.data(), m, V + d, vt, n, pf, o.data() + d);
        for (; d < D8; d += 8) weighted_sum<1>(s.data(), m, V + d, vt, n, pf, o.data() + d);
        for (; d < D; ++d)
          for (int64_t t = 0; t < n; ++t) o[d] += s[t] * float(V[t * vt + d]);
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
