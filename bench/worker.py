"""One engine in one process: build the models, probe parity, run and time PPO steps.

Run as `python -m bench.worker SPEC.json` by the harness, which paces it: after set-up and the
parity probe it says "ready" and runs one step per "go ROUND" line on stdin, until the end of
input. Rows and events go, one JSON line each, to the spec's rows file as they are measured;
the harness reads that file, so nothing measured before a crash is lost. Exit status: 0 done,
3 engine unavailable here, anything else a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import traceback

import psutil
import torch

import engines
from core.data import jsonl_prompts, synthetic_prompts
from core.engine import EngineUnavailable
from core.models import build_bundle, weight_bytes
from core.rng import fold_in
from core.step import ppo_step
from core.types import GenerationConfig, torch_dtype

from . import distributed, holdings, parity
from . import flops as F
from .options import from_dict
from .results import append_jsonl, row

EXIT_UNAVAILABLE = 3
EXIT_ORPHANED = 4
PARENT = os.getppid()


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


_PEAK_BEFORE_RESET = 0.0  # MB: the process's peak RSS as it stood at the last _new_peak()


def _peak_rss_mb() -> float:
    """The process's peak RSS so far (resetting VmHWM also resets ru_maxrss: kept here)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
               _PEAK_BEFORE_RESET)


def _hwm_mb() -> float | None:
    """Peak RSS since the last _new_peak() (Linux's VmHWM), or None where unreadable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _new_peak() -> bool:
    """Start a new peak-RSS window (Linux: '5' into /proc/self/clear_refs sets VmHWM to the
    current RSS), keeping the old peak for _peak_rss_mb. False where that is not possible."""
    global _PEAK_BEFORE_RESET
    before = _peak_rss_mb()
    if _hwm_mb() is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    _PEAK_BEFORE_RESET = before
    return True


class _DevicePeak:
    """This process's memory on the GPU as the driver counts it (NVML), sampled through a phase:
    allocations outside torch's allocator (DeepSpeed's inference workspace, vLLM's pools) are
    invisible to torch's counters. `mb` is None where NVML cannot be read."""

    def __init__(self, device: str):
        self.mb, self._stop, self._handle = None, None, None
        try:
            import pynvml
            pynvml.nvmlInit()
            index = torch.device(device).index or 0
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML here: torch's counters stand alone
            self._handle = None

    def _read(self) -> float | None:
        for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if p.pid == os.getpid() and p.usedGpuMemory is not None:
                return p.usedGpuMemory / 2 ** 20
        return None

    def __enter__(self):
        if self._handle is not None:
            import threading
            self._stop = threading.Event()

            def sample():
                while True:
                    with contextlib.suppress(Exception):
                        v = self._read()
                        if v is not None:
                            self.mb = max(self.mb or 0.0, v)
                    if self._stop.wait(0.02):
                        return
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()


class Recorder:
    """Writes rows, and times phases with a device sync before each clock read."""

    def __init__(self, path: str, engine: str, device: str, keep: set):
        self.path, self.engine, self.device, self.keep = path, engine, device, keep
        self.step = -1
        self.held = None  # multi-rank: a list keeping step rows for bench.distributed.end_step
        self.note = ""    # the engine's note last passed on
        self.base_rss = None  # MB: the baseline CPU peaks count from, once taken

    def emit(self, phase, metric, value, unit="", step=None):
        r = row(self.engine, self.step if step is None else step, phase, metric, value, unit)
        if self.held is not None and r["step"] >= 0:
            self.held.append(r)
        else:
            append_jsonl(self.path, r)

    def event(self, **kw):
        append_jsonl(self.path, dict(event=kw.pop("kind"), engine=self.engine, **kw))

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name):
        if os.getppid() != PARENT:  # the harness is gone: nobody will read what we measure
            os._exit(EXIT_ORPHANED)
        self.event(kind="progress", step=self.step, phase=name)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # the CPU's peak per phase, as the GPU's: RSS above the run's baseline
        cpu_peak = not cuda and self.base_rss is not None and _new_peak()
        device_peak = _DevicePeak(self.device) if cuda else contextlib.nullcontext()
        with device_peak:
            self._sync()
            t0 = time.perf_counter()
            yield
            self._sync()
            dt = time.perf_counter() - t0
        if name in self.keep:
            self.emit(name, "seconds", dt, "s")
            if cuda:
                self.emit(name, "peak_mem_mb", torch.cuda.max_memory_allocated() / 2 ** 20, "MB")
                # reserved also holds CUDA-graph pools, whose reuse allocated() does not see
                self.emit(name, "peak_reserved_mb", torch.cuda.max_memory_reserved() / 2 ** 20,
                          "MB")
                if device_peak.mb is not None:
                    self.emit(name, "peak_device_mb", device_peak.mb, "MB")
            elif cpu_peak and (hwm := _hwm_mb()) is not None:
                self.emit(name, "peak_rss_mb", hwm - self.base_rss, "MB")


def make_prompts(o, bundle, step: int, i: int):
    seed = fold_in(o.seed, 100, step, i)
    if o.prompts_file:
        p = jsonl_prompts(o.prompts_file, o.tokenizer, o.batch, o.prompt_len, seed=seed)
    else:
        p = synthetic_prompts(o.batch, o.prompt_len, bundle.config.vocab_size, bundle.pad_id,
                              seed=seed)
    return type(p)(*(t.to(o.device) for t in p))


def emit_model_counts(rec: Recorder, o, bundle, engine) -> None:
    a = F.shape_of(bundle.actor, bundle.config)
    B, P, G = o.batch * o.generation_batches, o.prompt_len, o.gen_len
    rec.emit("generate", "flops", F.generate_flops(a, B, P, G), "FLOP", step=-1)
    if bundle.critic is not None:  # else a generation-only run: it neither scores nor trains
        c = F.shape_of(bundle.critic, bundle.config)
        rec.emit("score", "flops", F.score_flops(a, c, B, P, G), "FLOP", step=-1)
        rec.emit("train", "flops", o.ppo_epochs * F.train_flops(a, c, B, P, G), "FLOP", step=-1)
    dbytes = torch.finfo(torch_dtype(o.dtype)).bits // 8
    rec.emit("setup", "actor_weight_bytes", weight_bytes(bundle.actor), "B", step=-1)
    rec.emit("setup", "weight_copies", engine.weight_copies, "", step=-1)
    # a KV pool an engine allocates up front for the run's batch and lengths (vllm's)
    rec.emit("setup", "kv_pool_bytes", getattr(engine, "kv_pool_bytes", 0), "B", step=-1)
    rec.emit("setup", "dtype_bytes", dbytes, "B", step=-1)
    for field, value in a._asdict().items():  # the actor's shape, for the decode roofline
        rec.emit("setup", f"shape_{field}", value, "", step=-1)


class _Counted:
    """The engine, its `generate` recording the answer tokens it produced (rows that stop at EOS
    count only what they generated) and how long its first call took (compiling, kernel
    builds, first allocations: kept out of the steps)."""

    def __init__(self, engine, rec: Recorder):
        self._engine, self._rec = engine, rec
        self.first_s = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, state, prompts, gen, *, seed):
        t0 = time.perf_counter()
        out = self._engine.generate(state, prompts, gen, seed=seed)
        if self.first_s is None:
            if self._rec.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.first_s = time.perf_counter() - t0
        self._rec.emit("generate", "tokens", float(out.answer_mask.sum()), "tokens")
        return out


def _note(rec: Recorder, engine) -> None:
    """Pass on the engine's note (set at init, or later: a fallback it took) when new."""
    note = getattr(engine, "note", "")
    if note and note != rec.note:
        rec.note = note
        rec.event(kind="note", note=note)


def _import_libraries(o, name: str, engine) -> None:
    """Load, before the memory baseline, the code the run loads anyway: building a model pulls
    in ~1100 modules lazily (transformers' model code, torch._dynamo, sympy, accelerate), about
    95 MB resident. Building the preset's architecture on the meta device does that and
    allocates no weights."""
    from transformers import AutoModelForCausalLM

    from core.models import build_config
    # only a warm-up: a bad preset, or an architecture that cannot be built on the meta
    # device, is build_bundle's to report
    with contextlib.suppress(Exception):
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(build_config(o.preset))
    if o.lora_dim:
        import peft  # noqa: F401
    if o.device == "cpu":
        # the CPU kernels (every engine's sampling noise, hybrid's decode): on a machine's
        # first run this builds them (~40 s), which would otherwise land in a timed phase, and
        # the loader's imports would count in that phase's peak
        from engines import kernels
        kernels.available()
    if "deepspeed" in engines.REGISTRY[name].needs or o.zero_stage >= 0:
        with contextlib.suppress(ImportError):  # an engine without DeepSpeed says so itself
            import deepspeed  # noqa: F401
    if hasattr(engine, "preload"):
        with contextlib.suppress(EngineUnavailable):  # its init says why, in the results
            engine.preload()


def _rounds():
    """The rounds this worker steps in, as the harness paces it: a line "go R" on stdin for each
    step, R the round; the end of input ends the run."""
    for line in sys.stdin:
        yield int(line.split()[1])


def run_engine_process(spec: dict) -> int:
    o = from_dict(spec["options"])
    name = spec["engine"]
    rec = Recorder(spec["rows_path"], name, o.device, set(o.phases))
    dist = distributed.setup(o, spec["engine_index"], rec)  # None unless on several ranks
    if o.threads:
        torch.set_num_threads(o.threads)
    engine = engines.get(name, **{k: getattr(o, k) for k in engines.REGISTRY[name].options})
    _import_libraries(o, name, engine)
    base_rss = rec.base_rss = _rss_mb()  # peaks count above this: the run's, not library code
    rec.emit("setup", "threads", torch.get_num_threads(), "", step=-1)
    try:
        cfg = o.run_config() if dist is None else dist.run_config(o)
        # a generation-only run builds the actor alone: reference, critic and reward would
        # each add the actor's size again to the peak and never be used
        bundle = build_bundle(o.preset, seed=o.seed, dtype=torch_dtype(o.dtype),
                              lora_dim=o.lora_dim, device=o.device,
                              actor_only=o.generation_only)
        t0 = time.perf_counter()
        state = engine.init(bundle, cfg, seed=o.seed)
        rec.emit("setup", "init_s", time.perf_counter() - t0, "s", step=-1)
        _note(rec, engine)
    except EngineUnavailable as e:
        rec.event(kind="status", status=f"unavailable: {e}")
        return EXIT_UNAVAILABLE
    emit_model_counts(rec, o, bundle, engine)
    counted = _Counted(engine, rec)
    t0 = time.perf_counter()
    parity.probe(lambda metric, value, unit: rec.emit("parity", metric, value, unit, step=-1),
                 counted, state, bundle, make_prompts(o, bundle, step=-1, i=0),
                 GenerationConfig(gen_len=o.gen_len, greedy=True, stop_at_eos=o.stop_at_eos),
                 seed=fold_in(o.seed, 999), ref_path=spec["parity_path"],
                 reference=spec["reference"])
    # the probe's first generate compiles and builds; the rest of the probe is its own work
    rec.emit("setup", "first_call_s", counted.first_s, "s", step=-1)
    rec.emit("parity", "probe_s", time.perf_counter() - t0 - counted.first_s, "s", step=-1)
    # after a generate, when any copy made on first use exists and its transient caches are gone
    rec.emit("setup", "weight_copies_measured", holdings.weight_copies(engine, bundle, state),
             "", step=-1)
    _note(rec, engine)
    if spec.get("probe_only"):
        rec.event(kind="status", status="ok")
        return 0
    rec.event(kind="ready")
    gen_only = o.generation_only
    for step, round_ in enumerate(_rounds()):
        rec.step = step
        began = time.time()
        batches = [make_prompts(o, bundle, step, i) for i in range(o.generation_batches)]
        seed = fold_in(o.seed, step)
        if dist is not None:  # this rank's rows of each batch, and its own sampling seed
            batches, seed = dist.shard(batches, seed)
        t0 = time.perf_counter()
        if gen_only:
            with rec.phase("sync"):
                engine.sync(state)
            for i, p in enumerate(batches):
                with rec.phase("generate"):
                    counted.generate(state, p, cfg.gen, seed=fold_in(seed, 1, i))
        else:
            state, m = ppo_step(counted, state, batches, cfg, seed=seed, phase=rec.phase)
            for k, v in m._asdict().items():
                rec.emit("metrics", k, float(v))
        rec.emit("step", "seconds", time.perf_counter() - t0, "s")
        rec.emit("step", "round", round_)
        rec.emit("sync", "bytes", getattr(engine, "sync_bytes", 0), "B")  # copied by sync
        rec.emit("step", "peak_rss_mb", _peak_rss_mb() - base_rss, "MB")
        _note(rec, engine)
        if dist is not None:
            dist.end_step(rec)
        rec.event(kind="stepped", step=step, round=round_, began=began, ended=time.time())
    engine.release()
    rec.emit("setup", "peak_rss_mb", _peak_rss_mb() - base_rss, "MB", step=-1)
    rec.event(kind="status", status="ok")
    return 0


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        code = run_engine_process(spec)
    except Exception as e:  # noqa: BLE001 - recorded as the engine's failure, then re-raised
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        append_jsonl(spec["rows_path"], dict(event="status", engine=spec["engine"],
                                             status=f"failed: {msg}"))
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
