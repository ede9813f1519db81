"""CPU kernels for decode, in fp32 or bf16 (computing in fp32): linears with decode's rows in x
(y = x @ W.T + b), one decode step's attention over the KV cache, and the sampling noise of
core.rng.counter_uniform; and dense_linear, the linears of more rows (prefill, large decode
batches) through oneDNN.

The C++ lies in engines/csrc/ (one file per kernel, the linear's tiles in one of their own; why
each is fast, in its own comments).
Built on first use with torch's C++ extension loader as one translation unit, cached in
TORCH_EXTENSIONS_DIR under a name that digests the sources, so an edit rebuilds. Compiled for
AVX2 + FMA; the AVX-512 bodies run where the CPU has them, picked at run time. Where it cannot
build or the CPU lacks AVX2/FMA, `available()` is False and callers take the slow twins
(F.linear, SDPA, the torch form of the noise), against which tests/test_kernels.py checks it.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from core.rng import as_int64
from core.rng import counter_uniform as _counter_uniform_torch

# rows of x up to which the linear kernel runs, while it is the faster of it and oneDNN's
# blocked GEMM (dense_linear), the latter re-blocking W on each call: memory-bound decode at few
# rows, and, with AVX-512 (32 registers: 8 rows of x by 2 of W in a tile), compute-bound decode
# up to 64 rows in fp32 and 96 in bf16 through AVX-512 BF16's dot-product instruction
# (docs/performance.md). bf16 widened to fp32, and AVX2, stop at 16.
MAX_ROWS = 16
MAX_ROWS_AVX512 = 64
MAX_ROWS_BF16DP = 96
DENSE_ROWS = 16   # dense_linear's row multiple
# what the linear and attention kernels take (x, W, b, or q, k, v all of one of them)
DTYPES = (torch.float32, torch.bfloat16)

CSRC = Path(__file__).with_name("csrc")
# in this order: linear.cpp, prefill.cpp and stack.cpp use functions of the files before them
SOURCES = ("linear_tiles.cpp", "linear.cpp", "attention.cpp", "prefill.cpp", "noise.cpp",
           "stack.cpp")
FUNCTIONS = ["skinny_linear", "cpu_ok", "set_avx512", "avx512_on", "set_bf16dp", "bf16dp_on",
             "decode_attention", "prefill_attention", "counter_uniform", "decode_stack"]
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-Wno-psabi"]

_mod = None
_why: Optional[str] = None


def _build_name() -> str:
    """rlhf_bench_kernels_ and a digest of the sources, the flags and their folder (the build
    includes the sources from there: two checkouts under one name would rebuild each other's)."""
    h = hashlib.sha256(f"{CSRC}\n{CFLAGS}".encode())
    for f in sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"rlhf_bench_kernels_{h.hexdigest()[:16]}"


def _load():
    global _mod, _why
    if _mod is not None or _why is not None:
        return _mod
    if os.environ.get("RLHF_BENCH_NO_KERNELS"):
        _why = "disabled by RLHF_BENCH_NO_KERNELS"
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        # main.cpp includes each source (warnings name the file and line there) and binds
        _mod = load_inline(name=_build_name(), cpp_sources=[f'#include "{s}"' for s in SOURCES],
                           functions=FUNCTIONS, extra_include_paths=[str(CSRC)],
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
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


def set_bf16dp(on: bool) -> bool:
    """Let bf16 linears use AVX-512 BF16's dot-product instruction where the CPU has it (the
    default, with AVX-512 in use), or widen bf16 to fp32 as the other CPUs do; returns whether
    the instruction is in use."""
    mod = _load()
    return bool(mod is not None and mod.set_bf16dp(on))


def max_rows(dtype: torch.dtype) -> int:
    """Rows of x up to which skinny_linear runs the kernel in this dtype (0: never)."""
    if dtype not in DTYPES or _load() is None:
        return 0
    if dtype == torch.bfloat16:
        return MAX_ROWS_BF16DP if _mod.bf16dp_on() else MAX_ROWS
    return MAX_ROWS_AVX512 if _mod.avx512_on() else MAX_ROWS


def available() -> bool:
    return _load() is not None


def why_unavailable() -> Optional[str]:
    _load()
    return _why


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
                  relu: bool = False) -> torch.Tensor:
    """x (M, K), w (N, K), b (N,) or None -> (M, N) = x @ w.T + b, then ReLU if relu; the
    kernel for M <= max_rows(dtype) CPU tensors all fp32 or all bf16, F.linear otherwise."""
    mod = _load()
    if (mod is None or x.dim() != 2 or w.dim() != 2 or x.shape[0] > max_rows(x.dtype)
            or x.shape[1] != w.shape[1] or x.dtype not in DTYPES
            or w.dtype != x.dtype or x.device.type != "cpu" or w.device.type != "cpu"
            or not w.is_contiguous()
            or (b is not None and (b.dtype != x.dtype or not b.is_contiguous()
                                   or b.shape != (w.shape[0],) or b.device.type != "cpu"))):
        y = F.linear(x, w, b)  # which also raises on shapes that do not match
        return F.relu(y) if relu else y
    return mod.skinny_linear(x.contiguous(), w, b, relu)


_DNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def dnn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether dense_linear takes oneDNN's path for x (.., K) and w (N, K): fp32 or bf16 on
    the CPU, a torch built with oneDNN."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.bfloat16) and _DNN)


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
                 relu: bool = False) -> torch.Tensor:
    """x (.., K) @ w.T + b (then ReLU if relu) through oneDNN's matmul, given the weight as it
    lies: oneDNN re-blocks it into a scratch buffer per call (no copy kept), which a call of
    many rows (prefill, decode above max_rows) repays; F.linear (MKL) where dnn_ok is False.
    No autograd: for no_grad generation only."""
    if not dnn_ok(x, w) or (b is not None and b.dtype != w.dtype):
        y = F.linear(x, w, b)
        return F.relu(y) if relu else y
    # x's rows padded with zero rows to a multiple of DENSE_ROWS: oneDNN's kernels for a
    # ragged last block of rows ran 10-30% slower a call (prefill's real tokens, 782 at batch 8)
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    if M % DENSE_ROWS:
        x2 = F.pad(x2, (0, 0, 0, DENSE_ROWS - M % DENSE_ROWS))
    y = torch.ops.mkldnn._linear_pointwise(x2, w.contiguous(), b, "relu" if relu else "none",
                                           [], "")
    return y[:M].reshape(*x.shape[:-1], w.shape[0])


def decode_stack(x: torch.Tensor, params: list, k_cache: tuple, v_cache: tuple, start: int,
                 keep: torch.Tensor, pre_norm: bool, heads: int, eps1: float,
                 eps2: float) -> torch.Tensor:
    """Every layer of an OPT-shaped decoder for one decode step in one call (engines/csrc/
    stack.cpp): x (B, E) -> (B, E), the new keys and values written at cache slot `start`.
    params: 16 tensors a layer (engines/stack.py's params); the caller checks that the
    kernels are available and apply (engines/stack.py's applies)."""
    return _mod.decode_stack(x, params, list(k_cache), list(v_cache), start, keep, pre_norm,
                             heads, eps1, eps2)


def counter_uniform(key: int, n: int) -> torch.Tensor:
    """core.rng.counter_uniform(key, n), computed in C++ across torch's threads (0.2 ms for
    8 x 50272 here, the torch form 3.2 ms); the same bits (tests/test_kernels.py checks them),
    from the torch form where the kernel is unavailable."""
    mod = _load()
    if mod is None:
        return _counter_uniform_torch(key, n)
    return mod.counter_uniform(as_int64(key), n)  # the key's 64 bits, as the torch form takes


def _qkv_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What both attention kernels need of q, k and v: one of DTYPES for all three, on the CPU,
    unit stride along the head dimension (their last of 4)."""
    return (q.dtype in DTYPES and all(t.dtype == q.dtype and t.device.type == "cpu"
                                      and t.stride(3) == 1 for t in (q, k, v)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> Optional[torch.Tensor]:
    """One decode step's attention on the CPU in fp32 or bf16: q (B, H, 1, D); k, v (B, KV, E, D)
    with unit stride along D (cache views); keep (B, E) bool, True on keys to attend to (at least
    one a row). Returns (B, H, 1, D) (a view of a (B, 1, H, D) tensor), or None where the kernel
    does not apply (the caller uses SDPA)."""
    mod = _load()
    if mod is None or q.dim() != 4 or k.dim() != 4:
        return None
    B, H, S, D = q.shape
    KV, E = k.shape[1], k.shape[2]
    if (S != 1 or min(B, H, D, KV, E) < 1 or H % KV or k.shape != (B, KV, E, D)
            or v.shape != k.shape or keep.shape != (B, E) or keep.dtype != torch.bool
            or keep.device.type != "cpu" or not _qkv_ok(q, k, v)):
        return None
    return mod.decode_attention(q, k, v, keep.contiguous(), scale).transpose(1, 2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor,
                      start: int, scale: float) -> Optional[torch.Tensor]:
    """A prefill chunk's causal attention on the CPU in fp32 or bf16, over real tokens only:
    q (B, H, S, D), the first query at cache slot `start`; k, v (B, KV, start + S, D) with unit
    stride along D (cache views); first (B,) int64, row b's real tokens being slots first[b]
    onwards. Returns (B, H, S, D) (a view of a (B, S, H, D) tensor), zeros on padded queries,
    or None where the kernel does not apply (the caller uses SDPA)."""
    mod = _load()
    if mod is None or q.dim() != 4 or k.dim() != 4:
        return None
    B, H, S, D = q.shape
    KV = k.shape[1]
    if (min(B, H, S, D, KV) < 1 or D % 8 or H % KV or k.shape != (B, KV, start + S, D)
            or v.shape != k.shape or first.shape != (B,) or first.dtype != torch.int64
            or first.device.type != "cpu" or not _qkv_ok(q, k, v)):
        return None
    return mod.prefill_attention(q, k, v, first.contiguous(), start, scale).transpose(1, 2)
