"""The machine's own limits, measured at the start of a run: matmul FLOP/s and memory read
bandwidth (on GPU: the device's, with synchronised timing)."""
from __future__ import annotations

import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_of(fn, device: str, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device: str = "cpu", dtype: torch.dtype = torch.float32, quick: bool = False) -> dict:
    """{'matmul_flops': FLOP/s, 'mem_bw': bytes/s, ...}; `quick` uses smaller problems."""
    if device.startswith("cuda"):
        n, mb, reps = (4096, 512, 5) if quick else (8192, 2048, 10)
    else:
        n, mb, reps = (1024, 128, 3) if quick else (2048, 512, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _best_of(lambda: torch.mm(a, b), device, reps)
    x = torch.ones(mb * 2 ** 20 // 4, device=device, dtype=torch.float32)
    t_rd = _best_of(lambda: x.sum(), device, reps)
    read_bytes = x.numel() * 4
    del a, b, x
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the harness measures, then holds on while the engines run
    return dict(matmul_flops=2 * n ** 3 / t_mm, mem_bw=read_bytes / t_rd,
                matmul_n=n, read_mb=mb, threads=torch.get_num_threads(), device=device,
                dtype=str(dtype).replace("torch.", ""))
