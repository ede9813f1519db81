// Linears with few rows in x, y = x @ W.T + b, for decode on the CPU in fp32 or bf16.
//
// MKL's sgemm re-packs W on every call when x has a handful of rows, so decode streams each
// weight about twice and reaches ~9 GB/s here; pre-packing fixes that but is a second copy of
// the weights. This kernel reads the training weight W (N, K) as it lies, once: each vector of W
// is used for every row of x in a group of 4 or 8, and each vector of x for 1-3 rows of W, K in
// tiles of at most 1024 floats so that a group's tile of x stays in L1 (groups of 4, memory-
// bound, read W row after row, all of K, in one stream), using AVX2 FMA (AVX-512 where the
// CPU has it); the N rows are shared out across torch's intra-op threads (balance.h). A bf16
// W is widened to fp32 as it is loaded (bf16 is fp32's upper half: a zero-extend and a shift),
// x is widened once, the sums run in fp32 and y is rounded once, as oneDNN's bf16 linear does:
// the same arithmetic for half the bytes of W, on any CPU with AVX2.
//
// From ~8 rows on, decode is compute-bound, and what a tile does besides multiply-adds counts:
// its sums are reduced by a shuffle tree (16 sums in one vector with AVX-512), and y is
// written 8 columns at a time from 8 x 8 blocks transposed in registers, with bias, ReLU and
// the bf16 rounding in vectors (how far that carries it: engines/kernels.py's MAX_ROWS*).
//
// The tiles and spans are in linear_tiles.cpp, included before this file; here, x's groups,
// W's chunks across threads, and y.
#include <torch/extension.h>

#include <vector>

#include "balance.h"
#include "simd.h"

// y's 8 values at p from 8 fp32 sums: stored, or rounded to bf16 to nearest even (NaN to
// 0x7FC0), bit for bit as at::BFloat16(float)
static inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store8(at::BFloat16* p, __m256 v) {
  f8 f;
  u8 u;
  __builtin_memcpy(&f, &v, sizeof(f));
  __builtin_memcpy(&u, &v, sizeof(u));
  u8 r = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  r = f != f ? u8{} + 0x7FC0u : r;
  const h8 h = __builtin_convertvector(r, h8);
  __builtin_memcpy(p, &h, sizeof(h));
}

// y[m, n] (m < rows, n in [c0, c1)) from acc[(n - c0) * R + m], plus bias, ReLU where relu.
// 8 rows of x: 8 x 8 blocks transposed in registers, so that each row of y gets 8 values at
// a time (bias added as a vector); a scalar loop for 4-row tiles and the last n's
template <typename TW>
static inline void finish(const float* acc, int R, int rows, int64_t c0, int64_t c1,
                          const TW* bp, bool relu, TW* y, int64_t N) {
  int64_t n = c0;
  if (R == 8) {
    const __m256 zero = _mm256_setzero_ps();
    for (; n + 8 <= c1; n += 8) {
      const float* a = acc + (n - c0) * 8;  // a[j * 8 + m]: row m of x with row n + j of W
      __m256 t[8], u[8], c[8];
      for (int i = 0; i < 8; i += 2) {
        const __m256 lo = _mm256_loadu_ps(a + i * 8), hi = _mm256_loadu_ps(a + i * 8 + 8);
        t[i] = _mm256_unpacklo_ps(lo, hi);
        t[i + 1] = _mm256_unpackhi_ps(lo, hi);
      }
      for (int i = 0; i < 8; ++i) {  // from t[0, 2], t[1, 3], t[4, 6], t[5, 7]: low, high
        const __m256 p = t[(i & 4) + (i & 2) / 2], q = t[(i & 4) + (i & 2) / 2 + 2];
        u[i] = i & 1 ? _mm256_shuffle_ps(p, q, 0xEE) : _mm256_shuffle_ps(p, q, 0x44);
      }
      for (int i = 0; i < 4; ++i) {  // c[m]: row m of x's sums with W's rows n .. n + 7
        c[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        c[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
      }
      const f8 bv = bp ? loadw<f8>(bp + n) : f8{};
      __m256 bias;
      __builtin_memcpy(&bias, &bv, sizeof(bias));
      for (int m = 0; m < rows; ++m) {
        __m256 v = _mm256_add_ps(c[m], bias);
        if (relu) v = _mm256_max_ps(zero, v);  // NaN stays NaN, as in std::max(s, 0.f)
        store8(y + m * N + n, v);
      }
    }
  }
  for (; n < c1; ++n)
    for (int m = 0; m < rows; ++m) {
      float s = acc[(n - c0) * R + m];
      if (bp) s += float(bp[n]);
      y[m * N + n] = TW(relu ? std::max(s, 0.f) : s);  // bf16: rounded
    }
}

template <typename TX, typename TW>
using SpanFn = void (*)(const TX*, int64_t, const TW*, int64_t, int64_t, int64_t, int64_t,
                        float*, int64_t);

// the span for R rows of x: TX, x's element type as the span reads it (float, or bf16 for the
// dot-product instruction), TW, W's
template <int R, typename TX, typename TW>
static SpanFn<TX, TW> pick(bool wide) {
  if constexpr (std::is_same<TX, at::BFloat16>::value) return span_dp<R>;
  else return wide ? span_avx512<R, TW> : span_avx2<R, TW>;
}

// rows of W a unit of work holds (balanced_for's): CHUNK where x has more than one group
// (acc holds a chunk's sums for 8 rows of x), UNIT where it has one
constexpr int64_t CHUNK = 48, UNIT = 16;

// TW: float or at::BFloat16, W's and y's element type; TX: as in pick
template <typename TX, typename TW>
static torch::Tensor skinny(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b,
                            bool relu, bool wide) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (!std::is_same<TX, TW>::value) x = x.to(torch::kFloat);  // widened once (exact)
  // x in groups of GS rows: 8, or 4 with AVX2 once x's 8 rows would leave L1
  const int64_t GS = (wide || K < 1536) ? 8 : 4, groups = (M + GS - 1) / GS;
  const int64_t KL = K - K % (sizeof(TX) == 2 ? 32 : wide ? 16 : 8);
  const TX* xp = x.data_ptr<TX>();
  // a tile reads all R rows of its group: the last group's rows, zero rows after them, in a
  // buffer kept between calls (a new padded tensor each call cost more than a small linear),
  // at a cache line's boundary as torch's tensors are (a vector of x across two lines is two
  // loads, and the loads bound the 4-row tiles). Where x's rows lie a multiple of 4 KB apart
  // (K of 1024 or 4096 floats), every row's tile sits on the same sets of L1 (64 sets of 64
  // bytes, 8 deep); fp32 8-row tiles then read all of x from there, rows ld apart, ld's bytes
  // 512 past a multiple of 4 KB: row r's tile starts 8r sets on, x fills the sets evenly and
  // leaves each room for W.
  const bool spread = sizeof(TX) == 4 && GS == 8 && M > 4 && K * (int64_t)sizeof(TX) % 4096 == 0;
  const int64_t ld = spread ? K + 512 / (int64_t)sizeof(TX) : K;  // x's row stride
  const int64_t first = spread ? 0 : groups - 1;  // the first group the buffer holds
  thread_local std::vector<TX> buf;
  const TX* xlast = xp + (groups - 1) * GS * K;
  if (spread || M % GS) {
    const int64_t rows = (groups - first) * GS, line = 64 / sizeof(TX);
    buf.resize(rows * ld + line);
    const int64_t off = reinterpret_cast<uintptr_t>(buf.data()) / sizeof(TX) % line;
    TX* t = buf.data() + (line - off) % line;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = first * GS + r;
      if (m < M) std::copy(xp + m * K, xp + (m + 1) * K, t + r * ld);
      else std::fill(t + r * ld, t + r * ld + K, TX(0.f));
    }
    if (spread) xp = t;
    xlast = t + (rows - GS) * ld;
  }
  const TW* wp = w.data_ptr<TW>();
  const TW* bp = b.has_value() ? b->data_ptr<TW>() : nullptr;
  TW* yp = y.data_ptr<TW>();
  // W's rows in units that the threads share out (balance.h): past one group, CHUNK rows, which
  // the groups take turns over while they sit in L2 (W comes from memory once; group by group
  // over a thread's whole share read it once per group); in one group, UNIT rows, so that a
  // thread done early takes less from its partner at a time
  const int64_t per = groups > 1 ? CHUNK : UNIT, units = (N + per - 1) / per;
  balanced_for(units, (N + 255) / 256, [&](auto next) {
    float acc[CHUNK * 8];
    for (int64_t u; (u = next()) >= 0;) {
      const int64_t c0 = u * per, c1 = std::min(c0 + per, N);
      for (int64_t g = 0; g < groups; ++g) {
        const int rows = (int)std::min(GS, M - g * GS);
        // 4-row tiles when 4 rows or fewer: no wasted FMAs. (1- and 2-row tiles read W from
        // cache twice as fast but kept up with memory worse, where it read at ~60 GB/s.)
        const int R = rows <= 4 ? 4 : 8;
        const SpanFn<TX, TW> f = R == 4 ? pick<4, TX, TW>(wide) : pick<8, TX, TW>(wide);
        const TX* xg = g == groups - 1 ? xlast : xp + g * GS * ld;
        std::fill(acc, acc + (c1 - c0) * R, 0.f);
        // the last group reads this chunk from L2 and leaves memory idle: its L2 prefetch
        // brings in the next chunk's lines instead, ready for the first group (the next a
        // thread takes from its own share; past its share's end, or from the back of another,
        // it reaches rows in another core's cache or past W's end, where it does nothing)
        f(xg, ld, wp, K, KL, c0, c1, acc, groups > 1 && g == groups - 1 ? (c1 - c0) * K : 0);
        if (KL < K)  // K's last elements, short of a vector
          for (int64_t n = c0; n < c1; ++n)
            for (int m = 0; m < rows; ++m)
              for (int64_t k = KL; k < K; ++k)
                acc[(n - c0) * R + m] += float(wp[n * K + k]) * float(xg[m * ld + k]);
        finish(acc, R, rows, c0, c1, bp, relu, yp + g * GS * N, N);
      }
    }
  });
  return y;
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b,
                            bool relu) {
  // x (M, K) contiguous, w (N, K) contiguous, b (N,) or None, all fp32 or all bf16 -> (M, N),
  // ReLU applied where relu
  const bool wide = use512;  // read once: set_avx512 from another thread cannot split a call
  if (w.scalar_type() != torch::kBFloat16) return skinny<float, float>(x, w, b, relu, wide);
  if (wide && use_bf16dp) return skinny<at::BFloat16, at::BFloat16>(x, w, b, relu, wide);
  return skinny<float, at::BFloat16>(x, w, b, relu, wide);
}
