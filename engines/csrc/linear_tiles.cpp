// The inner loops of linear.cpp's kernel: tiles of R rows of x by NW rows of W over a tile of
// K, their partial sums reduced into acc, and the spans that run them over a range of W's rows,
// for AVX2, AVX-512 and AVX-512 BF16. Which tile runs where, and why: linear.cpp's header and
// the comments at each choice below. Included before linear.cpp in the one translation unit.
#include <torch/extension.h>

#include "simd.h"

// Prefetch distances: PREFETCH along a row of W into L1 for the 4-row tiles, in floats' worth of
// W's bytes (half as many bf16 elements; tuned on a Xeon; the 8-row tiles prefetch the next
// pair of rows instead, l1_ahead), and PREFETCH_L2 into L2, in W's elements (32 KB of fp32, 16 KB
// of bf16: each type's best on Zen 4), in the order W is read (whole rows ahead at the same k
// when K runs in tiles), which keeps more lines in flight.
#ifndef PREFETCH
#define PREFETCH 1024
#endif
#ifndef PREFETCH_L2
#define PREFETCH_L2 8192
#endif

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

// a vector of W's elements as floats: fp32 as it lies, bf16 zero-extended and shifted into
// the upper half (exact)
template <typename V>
__attribute__((always_inline)) static inline V loadw(const float* p) { return loadv<V>(p); }
// (in GCC's vector types, not intrinsics: compiled for the caller's target, as loadv; the
// attention kernel, AVX2 only, widens with intrinsics, which ran faster there)
typedef uint16_t h8 __attribute__((vector_size(16)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef uint32_t u16 __attribute__((vector_size(64)));
template <typename V> struct Widen;  // V's lanes as bf16 (H), and as 32-bit integers (U)
template <> struct Widen<f8> { typedef h8 H; typedef u8 U; };
template <> struct Widen<f16> { typedef h16 H; typedef u16 U; };

template <typename V>
__attribute__((always_inline)) static inline V loadw(const at::BFloat16* p) {
  typedef typename Widen<V>::H H;
  typedef typename Widen<V>::U U;
  H h;
  __builtin_memcpy(&h, p, sizeof(H));
  const U u = __builtin_convertvector(h, U) << 16;
  V v;
  __builtin_memcpy(&v, &u, sizeof(V));
  return v;
}

// the 8 floats whose sum is v's: v itself, or the sum of v's two halves
__attribute__((always_inline)) static inline f8 fold(f8 v) { return v; }
__attribute__((always_inline)) static inline f8 fold(f16 v) {
  f8 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(f8));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(f8), sizeof(f8));
  return lo + hi;
}

// acc[t] += the sum of a[t]'s lanes, t < T: 8 sums at a time with a transpose-and-add tree
// (hsum8x8), added to acc as a vector
template <typename V, int T>
__attribute__((always_inline)) static inline void add_sums(const V* a, float* acc) {
  constexpr int T8 = (T + 7) / 8 * 8;
  f8 s[T8];
#pragma GCC unroll 8
  for (int t = 0; t < T8; ++t) s[t] = t < T ? fold(a[t]) : f8{};
#pragma GCC unroll 4
  for (int t = 0; t < T; t += 8) {
    const __m256 h = hsum8x8(reinterpret_cast<const __m256*>(s + t));
    if (t + 8 <= T) {
      _mm256_storeu_ps(acc + t, _mm256_add_ps(_mm256_loadu_ps(acc + t), h));
    } else {
      float hs[8];
      _mm256_storeu_ps(hs, h);
      for (int u = 0; t + u < T; ++u) acc[t + u] += hs[u];
    }
  }
}

// 16 vectors of 16 lanes (AVX-512, a tile of 8 rows of x by 2 of W): their 16 sums in one
// vector, by a tree that halves the vectors at each level with a shuffle pair and an add:
// first each vector's lanes l and l + 8 (fold's sums), then even lanes plus odd ones (hsum8x8's
// pairs), so every sum is added in the same order as on the other paths and y does not depend
// on the tile a column or row lands in (batch size, thread count); sum t ends in lane t
__attribute__((always_inline)) static inline f16 pairs(f16 a, f16 b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                 31);
}

__attribute__((always_inline)) static inline void add_sums16(const f16* a, float* acc) {
  f16 b[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  const f16 c[4] = {pairs(b[0], b[1]), pairs(b[2], b[3]), pairs(b[4], b[5]), pairs(b[6], b[7])};
  f16 sums = pairs(pairs(c[0], c[1]), pairs(c[2], c[3])), old;
  __builtin_memcpy(&old, acc, sizeof(f16));
  sums += old;
  __builtin_memcpy(acc, &sums, sizeof(f16));
}

// acc[t] += the sum of a[t]'s lanes for T accumulators
template <typename V, int T>
__attribute__((always_inline)) static inline void reduce(const V* a, float* acc) {
  if constexpr (std::is_same<V, f16>::value && T == 16) add_sums16(a, acc);
  else add_sums<V, T>(a, acc);
}

// the bytes of x a tile can keep in L1 while W streams through it
constexpr int64_t X_L1 = 24 * 1024;

// the K dimension goes in equal tiles of at most KTILE elements, and of at most X_L1's worth of 8
// rows of x, so that a group's tile of x stays in L1 while W streams past it (8 rows of 1024
// floats are 32 KB, all of a 32 KB L1). The tiles depend on K and x's type alone, not on the
// rows: every row's sums are added in the same order.
constexpr int64_t KTILE = 1024;

// the length of K's tiles: equal, whole vectors of L elements; x's elements of `size` bytes
static inline int64_t k_tile(int64_t KL, int64_t L, int64_t size) {
  const int64_t most = std::min(KTILE, X_L1 / (8 * size));
  const int64_t tiles = std::max<int64_t>(1, (KL + most - 1) / most);
  return (KL / L + tiles - 1) / tiles * L;
}

// how far ahead, in W's elements of `size` bytes, the L1 prefetch reaches for tiles of R rows of
// x: along the row where by_rows reads W row after row (4 rows), the next pair of rows at the
// same k where by_tiles reads a tile of K across the rows (8; along the row it would land on the
// row being read, at K of 1024)
template <int R>
__attribute__((always_inline)) static inline int64_t l1_ahead(int64_t K, int64_t size) {
  return R <= 4 ? PREFETCH * (int64_t)sizeof(float) / size : 2 * K;
}

// how far ahead, in W's elements, the L2 prefetch reaches over tiles of `span` elements: whole
// rows of W (K apart), at least PREFETCH_L2 elements
static inline int64_t l2_ahead(int64_t span, int64_t K) {
  return (PREFETCH_L2 + span - 1) / span * K;
}

// Partial dot products over k in [k0, k1) of NW rows of W from n with R rows of x, added to
// acc[j * R + r]. R x NW accumulators in registers: each W vector is loaded once and used R
// times, each x vector loaded once into a register and used NW times (left to itself, GCC
// folded the x load into every FMA: NW loads of it). pf2: how far ahead of each W load, in
// W's elements, the L2 prefetch reaches.
template <typename V, int R, int NW, typename TW>
__attribute__((always_inline)) static inline void tile(
    const float* x, int64_t ldx, const TW* w, int64_t K, int64_t k0, int64_t k1, int64_t n,
    float* acc, int64_t pf2) {
  constexpr int L = sizeof(V) / sizeof(float), T = NW * R;
  const int64_t pf1 = l1_ahead<R>(K, sizeof(TW));
  V a[NW][R] = {};
  for (int64_t k = k0; k < k1; k += L) {
    V v[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      _mm_prefetch((const char*)(w + (n + j) * K + k + pf1), _MM_HINT_T0);  // into L1
      _mm_prefetch((const char*)(w + (n + j) * K + k + pf2), _MM_HINT_T1);
      v[j] = loadw<V>(w + (n + j) * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      V xv = loadv<V>(x + r * ldx + k);
      asm("" : "+v"(xv));  // keeps xv in a register
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) a[j][r] += v[j] * xv;  // contracted to an FMA
    }
  }
  reduce<V, T>(&a[0][0], acc);
}

// Up to 4 rows of x a tile is memory-bound, and W is read row after row, each row's tiles of K
// in turn: one stream, in the order W lies. (Tile by tile of K across the rows, the order the
// compute-bound tiles need to keep x's tile in L1, reads as many short streams as rows; where K
// runs in 3-4 tiles that kept up with memory worse.) Either order adds each tile's sums to acc
// in k's order, so y is the same bits. pf2: the L2 prefetch's distance along the stream.
template <int NW, typename Tile>
__attribute__((always_inline)) static inline void by_rows(int64_t KL, int64_t kt, int64_t c0,
                                                          int64_t c1, Tile tile) {
  const int64_t pf2 = PREFETCH_L2;
  int64_t n = c0;
  for (; n + NW <= c1; n += NW)
    for (int64_t k0 = 0; k0 < KL; k0 += kt)
      tile(std::integral_constant<int, NW>(), k0, std::min(k0 + kt, KL), n, pf2);
  for (; n < c1; ++n)
    for (int64_t k0 = 0; k0 < KL; k0 += kt)
      tile(std::integral_constant<int, 1>(), k0, std::min(k0 + kt, KL), n, pf2);
}

// The compute-bound tiles' order: tile by tile of K, and within one all of rows [c0, c1) of W,
// two at a time where `two`, so that the group's tile of x stays in L1. pf2: `next` where not
// 0, else whole rows ahead along this tile of K (l2_ahead).
template <typename Tile>
__attribute__((always_inline)) static inline void by_tiles(int64_t KL, int64_t kt, int64_t K,
                                                           int64_t c0, int64_t c1, bool two,
                                                           int64_t next, Tile tile) {
  for (int64_t k0 = 0; k0 < KL; k0 += kt) {
    const int64_t k1 = std::min(k0 + kt, KL);
    const int64_t pf2 = next ? next : l2_ahead(k1 - k0, K);
    int64_t n = c0;
    if (two)
      for (; n + 2 <= c1; n += 2) tile(std::integral_constant<int, 2>(), k0, k1, n, pf2);
    for (; n < c1; ++n) tile(std::integral_constant<int, 1>(), k0, k1, n, pf2);
  }
}

// acc[(n - c0) * R + r] += the dot products of rows [c0, c1) of W with R rows of x over
// k < KL (a multiple of the vector width): by_rows up to 4 rows of x, else tile by tile of K,
// NW rows of W at a time. next, where not 0: the 8-row tiles' L2 prefetch reaches that many of
// W's elements ahead (skinny's last group: the same line of the next chunk) instead of along
// this chunk.
template <typename V, int R, typename TW>
__attribute__((always_inline)) static inline void span(
    const float* x, int64_t ldx, const TW* w, int64_t K, int64_t KL, int64_t c0, int64_t c1,
    int nw, float* acc, int64_t next) {
  const int64_t kt = k_tile(KL, sizeof(V) / sizeof(float), sizeof(float));
  auto f = [&](auto nw_, int64_t k0, int64_t k1, int64_t n, int64_t pf2)
      __attribute__((always_inline)) {  // inlined: compiled for the span's target
    tile<V, R, decltype(nw_)::value, TW>(x, ldx, w, K, k0, k1, n, acc + (n - c0) * R, pf2);
  };
  if constexpr (R <= 4) {
    if (nw == 3) by_rows<3>(KL, kt, c0, c1, f);
    else if (nw == 2) by_rows<2>(KL, kt, c0, c1, f);
    else by_rows<1>(KL, kt, c0, c1, f);
  } else {
    by_tiles(KL, kt, K, c0, c1, nw >= 2, next, f);  // 8 rows of x
  }
}

// AVX2 (16 registers): 8 rows of x one row of W at a time; 4 rows of x two rows of W at a
// time, or three where skinny_linear groups x in 4s (K >= 1536: 8 rows ran at 11 GB/s there)
template <int R, typename TW>
static void span_avx2(const float* x, int64_t ldx, const TW* w, int64_t K, int64_t KL,
                      int64_t c0, int64_t c1, float* acc, int64_t next) {
  span<f8, R, TW>(x, ldx, w, K, KL, c0, c1, R == 8 ? 1 : K >= 1536 ? 3 : 2, acc, next);
}

// AVX-512 (32 registers): two rows of W at a time (with x loaded into a register, three
// measured no faster here)
template <int R, typename TW>
__attribute__((target("avx512f"))) static void span_avx512(
    const float* x, int64_t ldx, const TW* w, int64_t K, int64_t KL, int64_t c0, int64_t c1,
    float* acc, int64_t next) {
  span<f16, R, TW>(x, ldx, w, K, KL, c0, c1, 2, acc, next);
}

// bf16 x and W on a CPU with AVX-512 BF16: vdpbf16ps multiplies 32 pairs of bf16 exactly and adds
// them two by two into 16 fp32 lanes, twice an FMA's products an instruction and nothing to widen,
// where the widening path above turns compute-bound from ~8 rows. The same tiles as `tile` and
// `span` (two rows of W at a time, one up to 4 rows of x), compiled for that target: intrinsics
// inline only into functions of their own target.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
template <int R, int NW>
__attribute__((always_inline)) static inline void tile_dp(
    const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, int64_t k0, int64_t k1,
    int64_t n, float* acc, int64_t pf2) {
  const int64_t pf1 = l1_ahead<R>(K, sizeof(at::BFloat16));
  f16 a[NW][R] = {};
  for (int64_t k = k0; k < k1; k += 32) {
    __m512bh v[NW];
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      _mm_prefetch((const char*)(w + (n + j) * K + k + pf1), _MM_HINT_T0);
      _mm_prefetch((const char*)(w + (n + j) * K + k + pf2), _MM_HINT_T1);
      v[j] = (__m512bh)_mm512_loadu_si512(w + (n + j) * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
      asm("" : "+v"(xv));
#pragma GCC unroll 8
      for (int j = 0; j < NW; ++j) a[j][r] = (f16)_mm512_dpbf16_ps((__m512)a[j][r], v[j], xv);
    }
  }
  reduce<f16, NW * R>(&a[0][0], acc);
}

template <int R>
static void span_dp(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K,
                    int64_t KL, int64_t c0, int64_t c1, float* acc, int64_t next) {
  const int64_t kt = k_tile(KL, 32, sizeof(at::BFloat16));
  auto f = [&](auto nw_, int64_t k0, int64_t k1, int64_t n, int64_t pf2) {  // this target's
    tile_dp<R, decltype(nw_)::value>(x, ldx, w, K, k0, k1, n, acc + (n - c0) * R, pf2);
  };
  if constexpr (R <= 4) {
    // once x's rows outgrow the part of L1 the stream leaves them (K of 4096: 32 KB), two rows
    // of W side by side load each vector of x from L2 once for both
    if (R * K * (int64_t)sizeof(at::BFloat16) > X_L1) by_rows<2>(KL, kt, c0, c1, f);
    else by_rows<1>(KL, kt, c0, c1, f);
  } else {
    by_tiles(KL, kt, K, c0, c1, true, next, f);
  }
}
#pragma GCC pop_options
