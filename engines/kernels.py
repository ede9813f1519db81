"""A CPU kernel for decode-shaped linears: y = x @ W.T (+ b) with few rows in x.

MKL's sgemm re-packs W on every call when x has a handful of rows, so decode streams each
weight about twice and reaches ~9 GB/s here; pre-packing fixes that but is a second copy of the
weights. This kernel reads the training weight W (N, K) as it lies, once: every row of W is
dotted with all rows of x (kept in L1) using AVX2 FMA (AVX-512 where the CPU has it, picked at
run time), and the N rows are split across torch's
intra-op threads. Built on first use with torch's C++ extension loader (cached in
TORCH_EXTENSIONS_DIR); where it cannot build or the CPU lacks AVX2/FMA, `available()` is False
and callers use F.linear (the slow twin, checked against it in tests/test_kernels.py).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 16

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#ifndef PREFETCH
#define PREFETCH 1024
#endif

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// rows of W [n0, n1) against R rows of x (x padded with zero rows up to R): R accumulators
// in registers, each W vector loaded once and used R times. AVX2: 8 floats a vector.
template <int R>
static void block_avx2(const float* x, const float* w, const float* bias, float* y, int64_t K,
                       int64_t N, int rows, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 a[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      _mm_prefetch((const char*)(wr + k + PREFETCH), _MM_HINT_T0);  // rows ahead, from DRAM
      const __m256 v = _mm256_loadu_ps(wr + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * K + k), a[r]);
    }
    for (int m = 0; m < rows; ++m) {
      float s = hsum(a[m]);
      for (int64_t k = K8; k < K; ++k) s += wr[k] * x[m * K + k];
      y[m * N + n] = bias ? s + bias[n] : s;
    }
  }
}

// the same with AVX-512 (16 floats a vector), compiled for that target alone and chosen at run
// time: on a CPU without it this code is never entered
template <int R>
__attribute__((target("avx512f"))) static void block_avx512(
    const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N, int rows,
    int64_t n0, int64_t n1) {
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m512 a[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
      _mm_prefetch((const char*)(wr + k + PREFETCH), _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(wr + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + r * K + k), a[r]);
    }
    for (int m = 0; m < rows; ++m) {
      float s = _mm512_reduce_add_ps(a[m]);
      for (int64_t k = K16; k < K; ++k) s += wr[k] * x[m * K + k];
      y[m * N + n] = bias ? s + bias[n] : s;
    }
  }
}

using BlockFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int,
                         int64_t, int64_t);

static bool use512 = __builtin_cpu_supports("avx512f");

// tests run both paths on a CPU that has AVX-512; returns whether AVX-512 is now in use
bool set_avx512(bool on) {
  use512 = on && __builtin_cpu_supports("avx512f");
  return use512;
}

static BlockFn pick(int rows) {  // 4-row blocks when 4 rows or fewer remain: no wasted FMAs
  if (use512) return rows <= 4 ? block_avx512<4> : block_avx512<8>;
  return rows <= 4 ? block_avx2<4> : block_avx2<8>;
}

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b) {
  // x (M, K) contiguous float32, w (N, K) contiguous float32, b (N,) or None -> (M, N)
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const int64_t groups = (M + 7) / 8;
  torch::Tensor xp8 = x;
  if (M % 8) {  // zero rows pad M up to 8s
    xp8 = torch::zeros({groups * 8, K}, x.options());
    xp8.narrow(0, 0, M).copy_(x);
  }
  const float* xp = xp8.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t g = 0; g < groups; ++g) {
      const int rows = (int)std::min<int64_t>(8, M - g * 8);
      pick(rows)(xp + g * 8 * K, wp, bp, yp + g * 8 * N, K, N, rows, n0, n1);
    }
  });
  return y;
}

bool cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
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
        _mod = load_inline(name="rlhf_bench_skinny_v8", cpp_sources=_SRC,
                           functions=["skinny_linear", "cpu_ok", "set_avx512"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
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
    if (mod is None or x.shape[0] > MAX_ROWS or x.dtype != torch.float32
            or w.dtype != torch.float32 or x.device.type != "cpu" or not w.is_contiguous()
            or (b is not None and (b.dtype != torch.float32 or not b.is_contiguous()))):
        return F.linear(x, w, b)
    return mod.skinny_linear(x.contiguous(), w, b)
