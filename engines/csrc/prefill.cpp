// A prefill chunk's causal attention on the CPU in fp32 or bf16, over each row's real tokens
// only. SDPA under a boolean mask computes every (query, key) pair of the padded (S, end)
// block, padding and the masked upper triangle included; with left-padded prompts of random
// lengths that is ~3x the work of the causal pairs. Here row b's queries at cache slots
// t >= first[b] each attend slots first[b]..t, and nothing else is computed.
//
// q (B, H, S, D): the chunk's queries, the first at cache slot `start`; k, v (B, KV, start + S,
// D): cache views holding the chunk's keys and values; each with unit stride along D. first
// (B,) int64: row b's real tokens are slots first[b] onwards (left padding before them).
// Returns (B, S, H, D), zeros on padded queries. Arithmetic in fp32 (a bf16 input is widened
// as it is loaded), the output rounded once. Uses load8, exp_nonpos and softmax_row from
// attention.cpp, defined before it in the one translation unit (kernels.py's SOURCES).
//
// One task per (KV head, row): its keys are widened once into a transposed fp32 block (D, L),
// L the row's real keys up to the chunk's end (8 x 8 transposes; a later chunk does it
// again), then its H/KV heads' queries go through four at a time: scores for 16 keys a step
// held in registers (queries broadcast, keys along the lanes), a two-pass softmax on each
// query's row, then the values as the cache holds them, 16 of D a pass for the four queries.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

// r[i] <- lane i of each of r[0..8): an 8 x 8 transpose in registers
static inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// o[i * od + (0, 8 NV)) = inv[i] * sum over keys j < n of p[i * pl + j] * V[j, 0, 8 NV), for
// the tile's four queries i: the 8 NV accumulators a query held in registers
template <int NV, typename T>
static inline void weigh(const float* p, int64_t pl, const T* V, int64_t vt, int64_t n,
                         const float* inv, float* o, int64_t od) {
  __m256 a[4][NV];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) a[i][u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m256 v[NV];
#pragma GCC unroll 2
    for (int u = 0; u < NV; ++u) v[u] = load8(V + j * vt + 8 * u);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 w = _mm256_broadcast_ss(p + i * pl + j);
#pragma GCC unroll 2
      for (int u = 0; u < NV; ++u) a[i][u] = _mm256_fmadd_ps(w, v[u], a[i][u]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int u = 0; u < NV; ++u)
      _mm256_storeu_ps(o + i * od + 8 * u, _mm256_mul_ps(a[i][u], _mm256_set1_ps(inv[i])));
}

template <typename T>
static torch::Tensor prefill_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor first, int64_t start, double scale) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), KV = k.size(1);
  const int64_t end = start + S, G = H / KV;
  auto out = torch::empty({B, S, H, D}, q.options());
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t* fp = first.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t qb = q.stride(0), qh = q.stride(1), qs = q.stride(2), kb = k.stride(0),
                kh = k.stride(1), kt = k.stride(2), vb = v.stride(0), vh = v.stride(1),
                vt = v.stride(2);
  const float sc = (float)scale;
  // kv-head-major task order: the two threads' halves hold rows of every length alike
  at::parallel_for(0, KV * B, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> Kt, Q(4 * D), s, o(4 * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t h = task / B, b = task % B;
      const int64_t f = std::min(std::max<int64_t>(fp[b], 0), end);
      const int64_t q0 = std::max(start, f);  // the first real query's slot
      // padded queries: zeros
      for (int64_t t = start; t < q0; ++t)
        for (int64_t g = 0; g < G; ++g)
          std::fill_n(op + ((b * S + t - start) * H + h * G + g) * D, D, T(0.f));
      if (q0 >= end) continue;
      const int64_t L = end - f, L16 = (L + 15) & ~int64_t(15);
      Kt.resize(D * L16);
      s.resize(4 * L16);
      const T* K = kp + b * kb + h * kh + f * kt;
      const T* V = vp + b * vb + h * vh + f * vt;
      for (int64_t j = 0; j < L16; j += 8)
        for (int64_t d = 0; d < D; d += 8) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i)
            r[i] = j + i < L ? load8(K + (j + i) * kt + d) : _mm256_setzero_ps();
          transpose8(r);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(Kt.data() + (d + i) * L16 + j, r[i]);
        }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        for (int64_t t = q0; t < end; t += 4) {
          const int64_t nq = std::min<int64_t>(4, end - t);
          for (int64_t i = 0; i < 4; ++i) {
            const T* src = qp + b * qb + head * qh + (t - start + std::min(i, nq - 1)) * qs;
            for (int64_t d = 0; d < D; ++d) Q[i * D + d] = float(src[d]) * sc;
          }
          // the next tile's queries, rows a cache's width apart, on their way meanwhile
          for (int64_t i = t + 4; i < std::min(t + 8, end); ++i)
            for (int64_t l = 0; l < D * (int64_t)sizeof(T); l += 64)
              _mm_prefetch((const char*)(qp + b * qb + head * qh + (i - start) * qs) + l,
                           _MM_HINT_T0);
          // scores of the tile's queries against keys [0, n) of the row (slots f..)
          const int64_t n = t + nq - f, n16 = (n + 15) & ~int64_t(15);
          for (int64_t j = 0; j < n16; j += 16) {
            __m256 a[4][2];
            for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; ++d) {
              const __m256 k0 = _mm256_loadu_ps(Kt.data() + d * L16 + j);
              const __m256 k1 = _mm256_loadu_ps(Kt.data() + d * L16 + j + 8);
#pragma GCC unroll 4
              for (int i = 0; i < 4; ++i) {
                const __m256 qv = _mm256_broadcast_ss(Q.data() + i * D + d);
                a[i][0] = _mm256_fmadd_ps(qv, k0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(qv, k1, a[i][1]);
              }
            }
            for (int i = 0; i < 4; ++i) {
              _mm256_storeu_ps(s.data() + i * L16 + j, a[i][0]);
              _mm256_storeu_ps(s.data() + i * L16 + j + 8, a[i][1]);
            }
          }
          // softmax of query i over its keys [0, t + i - f]; weights 0 after them
          float inv[4] = {0.f, 0.f, 0.f, 0.f};
          for (int64_t i = nq; i < 4; ++i) std::fill_n(s.data() + i * L16, n16, 0.f);
          for (int64_t i = 0; i < nq; ++i) {
            float* r = s.data() + i * L16;
            const int64_t ni = t + i - f + 1;
            const float sum = softmax_row(r, ni, nullptr);
            std::fill(r + ni, r + n16, 0.f);
            inv[i] = 1.f / sum;
          }
          // values: the four queries against keys [0, n), 16 of D a pass, then 8
          int64_t d = 0;
          for (; d + 16 <= D; d += 16) weigh<2>(s.data(), L16, V + d, vt, n, inv, o.data() + d, D);
          for (; d < D; d += 8) weigh<1>(s.data(), L16, V + d, vt, n, inv, o.data() + d, D);
          for (int64_t i = 0; i < nq; ++i) {
            T* dst = op + ((b * S + t + i - start) * H + head) * D;
            for (int64_t dd = 0; dd < D; ++dd) dst[dd] = T(o[i * D + dd]);
          }
        }
      }
    }
  });
  return out;
}

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                torch::Tensor first, int64_t start, double scale) {
  if (q.scalar_type() == torch::kBFloat16)
    return prefill_attend<at::BFloat16>(q, k, v, first, start, scale);
  return prefill_attend<float>(q, k, v, first, start, scale);
}
