"""A CPU kernel for decode-shaped linears: y = x @ W.T (+ b) with few rows in x.

MKL's sgemm re-packs W on every call when x has a handful of rows, so decode streams each
weight about twice and reaches ~9 GB/s here; pre-packing fixes that but is a second copy of the
weights. This kernel reads the training weight W (N, K) as it lies, once: every row of W is
dotted with all rows of x (kept in L1) using AVX2 FMA, and the N rows are split across torch's
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

// rows of W [n0, n1) against 8 rows of x (x padded with zero rows when M < 8): eight named
// accumulators so they live in registers, and two rows of W per pass to halve the x loads
static void block8(const float* x, const float* w, const float* bias, float* y, int64_t K,
                   int64_t N, int rows, int64_t n0, int64_t n1) {
  const int64_t K8 = K & ~int64_t(7);
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K, *x4 = x + 4 * K,
              *x5 = x + 5 * K, *x6 = x + 6 * K, *x7 = x + 7 * K;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0;
    for (int64_t k = 0; k < K8; k += 8) {
      _mm_prefetch((const char*)(wr + k + PREFETCH), _MM_HINT_T0);  // rows ahead, from DRAM
      const __m256 v = _mm256_loadu_ps(wr + k);
      a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x0 + k), a0);
      a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x1 + k), a1);
      a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x2 + k), a2);
      a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x3 + k), a3);
      a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x4 + k), a4);
      a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x5 + k), a5);
      a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x6 + k), a6);
      a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x7 + k), a7);
    }
    float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(a4), hsum(a5), hsum(a6),
                  hsum(a7)};
    for (int m = 0; m < rows; ++m) {
      for (int64_t k = K8; k < K; ++k) s[m] += wr[k] * x[m * K + k];
      y[m * N + n] = bias ? s[m] + bias[n] : s[m];
    }
  }
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
      block8(xp + g * 8 * K, wp, bp, yp + g * 8 * N, K, N, rows, n0, n1);
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
        _mod = load_inline(name="rlhf_bench_skinny_v6", cpp_sources=_SRC,
                           functions=["skinny_linear", "cpu_ok"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        if not _mod.cpu_ok():
            _mod, _why = None, "this CPU lacks AVX2/FMA"
    except Exception as e:  # noqa: BLE001 - no compiler, headers, ...: use the twin
        _mod, _why = None, f"could not build ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        print(f"rlhf-bench: skinny-linear kernel unavailable, using F.linear: {_why}",
              file=sys.stderr)
    return _mod


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
