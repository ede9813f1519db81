"""Runs each engine in its own subprocess on identical work and gathers the results.

The harness owns the run directory: it measures the machine's limits, starts one worker per
engine (the parity reference, hf, first), follows the rows each worker writes, and rewrites
results.json / rows.csv atomically as rows arrive; summary.csv and phases.png come at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import engines

from . import distributed, machine, parity
from .options import RESUME_OPTIONS, BenchOptions, ConfigError, differing
from .report import format_table, plot_phases, summarize
from .results import VERSION, atomic_write_csv, atomic_write_json, read_jsonl


def check_model(o: BenchOptions) -> None:
    """Model-dependent checks, before any engine starts."""
    from core.models import ModelError, build_config, hidden_out_size, max_positions
    try:
        cfg = build_config(o.preset)
    except ModelError as e:
        raise ConfigError(str(e))
    limit = max_positions(cfg)
    if o.prompt_len + o.gen_len > limit:
        raise ConfigError(f"--prompt-len {o.prompt_len} + --gen-len {o.gen_len} = "
                          f"{o.prompt_len + o.gen_len} is longer than the model's "
                          f"{limit} positions")
    machine.check_memory(o, cfg)
    width = min(cfg.hidden_size, hidden_out_size(cfg))
    if o.lora_dim > width:
        raise ConfigError(f"--lora-dim {o.lora_dim} is larger than the layer width {width}")
    if o.prompts_file:
        if not os.path.exists(o.prompts_file):
            raise ConfigError(f"--prompts-file {o.prompts_file!r} does not exist")
        from core.data import prompt_texts
        try:
            prompt_texts(o.prompts_file)
        except ValueError as e:
            raise ConfigError(f"--prompts-file: {e}")
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(o.tokenizer, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad tokenizer path
            if not os.path.exists(o.tokenizer):  # (a name in the local cache loads above)
                raise ConfigError(f"--tokenizer {o.tokenizer!r} does not exist")
            raise ConfigError(f"--tokenizer {o.tokenizer!r} holds no tokenizer "
                              f"({type(e).__name__})")
        if len(tok) > cfg.vocab_size:
            raise ConfigError(f"tokenizer has {len(tok)} tokens but the model's vocabulary is "
                              f"{cfg.vocab_size}: they do not belong together")


class Progress:
    """Progress on stderr: on a terminal one status line redrawn in place at every phase;
    otherwise (a log file, CI) one line per step started."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def show(self, text: str, milestone: bool = False) -> None:
        stamp = f"[{time.perf_counter() - self.t0:6.1f}s]"
        if self.tty:
            sys.stderr.write(f"\r\033[K{text}  {stamp}")
        elif milestone:
            sys.stderr.write(f"{text}  {stamp}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def resumable(out: Path, o: BenchOptions) -> dict:
    from .results import load_results
    if not (out / "results.json").exists():
        raise ConfigError(f"--resume: {out} holds no run to resume")
    prev = load_results(out)
    saved = prev.get("options", {})
    diff = differing(saved, o.to_dict(), RESUME_OPTIONS)
    if diff:
        raise ConfigError(f"--resume: options differ from the saved run ({', '.join(diff)}); "
                          f"use the same options or another --out")
    return prev


def check_same_setup(saved: dict, now: dict) -> None:
    """--resume: refuse to add rows measured by other code or on another machine to a run
    (a key missing on either side, as in older results, is not compared)."""
    def show(k, v):  # commits shortened; CPU and GPU names differ late in the string
        return str(v)[:12] if k == "git_commit" else str(v)
    diff = [f"{k} {show(k, saved[k])} -> {show(k, now[k])}"
            for k in differing(saved, now, machine.SETUP_KEYS)]
    if diff:
        raise ConfigError(f"--resume: the saved run was measured with other code or another "
                          f"machine ({', '.join(diff)}); its rows and new ones would not "
                          f"compare: use --overwrite or another --out")


class Run:
    def __init__(self, o: BenchOptions, out: Path):
        self.o, self.out = o, out
        self.finished: set = set()
        self.data = dict(version=VERSION, options=o.to_dict(), env={}, limits={}, engines={},
                         rows=[])
        self.interrupted = False

    def save(self) -> None:
        import pandas as pd
        atomic_write_json(self.out / "results.json", self.data)
        atomic_write_csv(self.out / "rows.csv", pd.DataFrame(
            self.data["rows"], columns=["engine", "step", "phase", "metric", "value", "unit"]))

    def run_engine(self, name: str, reference: bool, probe_only: bool, progress: Progress,
                   timeout: float | None = None) -> str:
        rows_path = self.out / "engines" / f"{name}.jsonl"
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.unlink(missing_ok=True)
        # its place in the run's engine list (hf's probe alone after them) picks the port of
        # its ranks' process group: the same on every rank, and never the last engine's
        names = self.data["options"]["engines_run"]
        spec = dict(options=self.o.to_dict(), engine=name, rows_path=str(rows_path),
                    parity_path=str(self.out / "engines" / "parity_ref.safetensors"),
                    reference=reference, probe_only=probe_only,
                    engine_index=names.index(name) if name in names else len(names))
        spec_path = self.out / "engines" / f"{name}.spec.json"
        atomic_write_json(spec_path, spec)
        log = open(self.out / "engines" / f"{name}.log", "w")
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
                   PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.data["engines"][name] = dict(status="running", pid=proc.pid)
        seen, status, note = 0, None, ""
        started = time.perf_counter()
        base = [r for r in self.data["rows"] if r["engine"] != name]
        while True:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if code is None and self.interrupted:  # SIGINT: stop the worker, keep its rows
                os.killpg(proc.pid, signal.SIGTERM)
                code = proc.wait()
            late = timeout is not None and time.perf_counter() - started > timeout
            if code is None and late:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
                status = f"failed: timed out after {timeout:.0f} s"
            lines = read_jsonl(rows_path)
            if len(lines) != seen:
                new, seen = lines[seen:], len(lines)
                mine = [r for r in lines if "event" not in r]
                for ev in new:  # the latest status wins, unless the harness timed it out
                    kind = ev.get("event")
                    if kind == "status" and not (status or "").startswith("failed: timed out"):
                        status = ev["status"]
                    elif kind == "note":
                        note = ev["note"]
                    elif kind == "progress" and ev["phase"] == "step":  # warm-up steps included
                        progress.show(f"{name}: step {ev['step'] + 1} of {ev['total']}",
                                      milestone=True)
                    elif kind == "progress":
                        progress.show(f"{name}: step {ev['step'] + 1} {ev['phase']}")
                self.data["rows"] = base + mine
                self.save()
            if code is not None:
                break
        log.close()
        if self.interrupted:
            status = "failed: interrupted (SIGINT)"
        elif status is None or (code not in (0, 3) and not status.startswith("failed")):
            tail = (self.out / "engines" / f"{name}.log").read_text(errors="replace")
            last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
            why = f"exit {code}" + (f" (killed by signal {-code})" if code and code < 0 else "")
            if code == -signal.SIGKILL:  # not the harness's own: a timeout says so above
                why += (" - most often the kernel's out-of-memory killer: try a smaller --batch, "
                        "--dtype bfloat16, --lora-dim or --phases generate")
            status = f"failed: {why}: {last[0][:200]}"
        self.data["engines"][name] = dict(status=status, exit_code=code,
                                          **({"note": note} if note else {}))
        self.save()
        if not probe_only:
            progress.show(f"{name}: {status}", milestone=True)
        return status


def check_out_folder(out: Path, kind: str) -> None:
    """--out must be a folder, or a path where one can be made, and not hold the other kind of
    results than `kind` ("run" or "sweep")."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a link to nothing")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise ConfigError(f"--out {out}: a part of the path is a file, not a folder")
    # a folder with results.json holds a run; one with sweep.csv alone, a sweep
    held = "run" if (out / "results.json").exists() else \
        "sweep" if (out / "sweep.csv").exists() else kind
    if held != kind:
        raise ConfigError(f"--out {out} holds a {held}, not a {kind}: choose another --out")


def run_benchmark(o: BenchOptions) -> int:
    """A whole benchmark run; returns the exit status (0 ok, 1 a failed engine or parity)."""
    out = distributed.run_dir(Path(o.out or "results/latest"))  # rank r > 0: --out/rank<r>
    previous = None
    if o.resume and o.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    check_out_folder(out, "run")
    if o.resume:
        previous = resumable(out, o)
    elif (out / "results.json").exists() and not o.overwrite:
        raise ConfigError(f"--out {out} already holds a run; pass --overwrite to replace it, "
                          f"--resume to finish it, or choose another --out")
    check_model(o)
    distributed.check(o)
    names = []
    for e in o.engines:
        names += engines.available(o.device) if e == "available" else [e]
    names = list(dict.fromkeys(names))
    if "hf" in names:
        names.remove("hf")
        names.insert(0, "hf")
    if out.exists() and o.overwrite:
        for stale in ("engines", "summary.csv", "rows.csv", "phases.png"):
            p = out / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    r = Run(o, out)
    r.data["options"]["engines_run"] = names
    if previous is not None:  # keep what finished; the rest runs again from its first step
        finished = {n for n, e in previous["engines"].items()
                    if e.get("status") == "ok" or e.get("status", "").startswith("unavailable")}
        r.data["engines"] = {n: e for n, e in previous["engines"].items() if n in finished}
        r.data["rows"] = [x for x in previous["rows"] if x["engine"] in finished]
        r.finished = finished
    import torch
    if o.threads:  # before environment(), which records the thread count
        torch.set_num_threads(o.threads)
    r.data["env"] = dict(machine.environment(), **distributed.launch_info())
    from core.types import torch_dtype
    if previous is not None:
        check_same_setup(previous.get("env") or {}, r.data["env"])
    if previous is not None and previous.get("limits"):
        # the kept engines' fractions of the machine's limits were taken against these
        r.data["limits"] = previous["limits"]
    else:
        r.data["limits"] = machine.measure_limits(o.device, dtype=torch_dtype(o.dtype),
                                                  quick=o.preset.startswith("tiny"))
    r.save()
    progress = Progress()

    def on_sigint(signum, frame):  # finish cleanly: stop the running worker, save, summarise
        r.interrupted = True
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return _run_engines(r, o, out, names, progress)
    finally:
        signal.signal(signal.SIGINT, previous)


def fair_share(budget: float, spent: float, left: int) -> float:
    """An equal share of what is left of `budget` seconds among `left` takers (--time-budget:
    the engines of a run, the points of a sweep)."""
    return max(0.0, budget - spent) / max(1, left)


def engine_limit(o: BenchOptions, spent: float, left: int) -> float | None:
    """Seconds the next engine may take: --engine-timeout, and under --time-budget its fair
    share among the `left` engines still to run; None: no limit."""
    limits = [o.engine_timeout] if o.engine_timeout else []
    if o.time_budget:
        limits.append(fair_share(o.time_budget, spent, left))
    return min(limits) if limits else None


def _run_engines(r: "Run", o: BenchOptions, out: Path, names: list, progress: Progress) -> int:
    have_ref = (out / "engines" / "parity_ref.safetensors").exists() and "hf" in r.finished
    todo = [n for n in names if n not in r.finished]
    probe = "hf" not in names and not have_ref  # the parity reference comes from hf, probe only
    t0 = time.perf_counter()

    def limit():
        return engine_limit(o, time.perf_counter() - t0, len(todo) + probe)
    if probe:
        r.run_engine("hf", reference=True, probe_only=True, progress=progress, timeout=limit())
        probe = False
        r.data["engines"].pop("hf", None)
        r.data["rows"] = [x for x in r.data["rows"] if x["engine"] != "hf"]
    for name in names:
        if name in r.finished:
            print(f"resume: {name} already finished ({r.data['engines'][name]['status']})",
                  file=sys.stderr)
            continue
        timeout = limit()
        todo.remove(name)
        if r.interrupted:
            r.data["engines"][name] = dict(status="failed: not run (interrupted)")
        elif timeout is not None and timeout < 1:
            r.data["engines"][name] = dict(status=f"failed: not run (--time-budget "
                                                  f"{o.time_budget:g} s spent)")
            progress.show(f"{name}: {r.data['engines'][name]['status']}", milestone=True)
        else:
            r.run_engine(name, reference=(name == "hf"), probe_only=False, progress=progress,
                         timeout=timeout)
    progress.done()
    df = summarize(r.data)
    failed, r.data["parity_tolerance"] = parity.verdict(df, o.dtype, o.parity_tol)
    for engine, why in failed.items():
        df.loc[df.engine == engine, "status"] = why
        r.data["engines"][engine]["status"] = why
    r.save()
    atomic_write_csv(out / "summary.csv", df)
    try:
        plot_phases(df, out / "phases.png")
    except Exception as e:  # noqa: BLE001 - a plot must never cost the results
        print(f"note: could not plot ({e})", file=sys.stderr)
    if distributed.is_main():
        print(format_table(df, r.data))
        print(f"\nresults: {out}/results.json, rows.csv, summary.csv, phases.png")
    if r.interrupted:
        print(f"interrupted: measured rows are saved in {out}; run the same command with "
              f"--resume to finish the engines that did not", file=sys.stderr)
        return 130
    if any(s.startswith("failed") for s in df.status):
        return 1
    missing = [e for e, s in zip(df.engine, df.status) if s.startswith("unavailable")
               and e in o.engines]  # asked for by name (not through `available`)
    if missing:
        print(f"rlhf-bench run: error: engine(s) unavailable on this machine: "
              f"{', '.join(missing)} (see the status column); the others ran", file=sys.stderr)
        return 2
    return 0
