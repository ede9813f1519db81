"""Runs each engine in its own subprocess on identical work and gathers the results.

The harness owns the run directory: it checks the options, starts one worker per engine (the
parity reference, hf, first) and steps them in interleaved rounds (bench.rounds), measuring
the machine's limits between rounds; it follows the rows each worker writes and rewrites
results.json / rows.csv atomically as rows arrive; summary.csv and phases.png come at the end.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import engines

from . import distributed, machine, parity, rounds
from .options import RESUME_OPTIONS, BenchOptions, ConfigError, differing
from .report import format_table, plot_phases, summarize
from .results import VERSION, atomic_write_csv, atomic_write_json


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
    """A run's data as results.json keeps it, rewritten as rows arrive."""

    def __init__(self, o: BenchOptions, out: Path, progress: Progress):
        self.o, self.out, self.progress = o, out, progress
        self.finished: set = set()
        self.data = dict(version=VERSION, options=o.to_dict(), env={}, limits={}, engines={},
                         rows=[])
        self.kept: list = []  # rows of engines a resumed run keeps
        self.rows: dict = {}  # engine -> the rows its worker wrote
        self.interrupted = False

    def save(self) -> None:
        import pandas as pd
        self.data["rows"] = self.kept + [r for rows in self.rows.values() for r in rows]
        atomic_write_json(self.out / "results.json", self.data)
        atomic_write_csv(self.out / "rows.csv", pd.DataFrame(
            self.data["rows"], columns=["engine", "step", "phase", "metric", "value", "unit"]))


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
    progress = Progress()
    r = Run(o, out, progress)
    r.data["options"]["engines_run"] = names
    if previous is not None:  # keep what finished; the rest runs again from its first step
        finished = {n for n, e in previous["engines"].items()
                    if e.get("status") == "ok" or e.get("status", "").startswith("unavailable")}
        r.data["engines"] = {n: e for n, e in previous["engines"].items() if n in finished}
        r.kept = [x for x in previous["rows"] if x["engine"] in finished]
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
        r.measure = lambda between_rounds=True: False
    else:
        def measure(between_rounds=True):  # every worker idle: the best reading stands
            r.data["limits"] = machine.best_limits(r.data["limits"], machine.measure_limits(
                o.device, dtype=torch_dtype(o.dtype), quick=o.preset.startswith("tiny"),
                reps=2 if between_rounds else None))
            return True
        r.measure = measure
        measure(between_rounds=False)
    r.save()

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


def _plan(o: BenchOptions, names: list) -> tuple[list, str]:
    """The groups the engines run in (bench.rounds.groups) from their estimated peaks."""
    if o.sequential or len(names) < 2:
        return rounds.groups(names, {}, 0.0, sequential=True)
    from core.models import build_config
    cfg = build_config(o.preset)
    need = {}
    for n in names:
        entry = engines.REGISTRY[n]
        copies = 2 if entry.fixed.get("pack") else 1
        try:  # the class's declared copies; an engine whose module will not import here
            copies = max(copies, getattr(engines.engine_class(n), "weight_copies", 1))
        except Exception:  # noqa: BLE001 - (unavailable) reports that itself when it starts
            pass
        need[n] = machine.worker_peak_bytes(o, cfg, entry.needs, copies)
    return rounds.groups(names, need, machine.free_memory(o.device), sequential=False)


def _limits(o: BenchOptions, todo: list, before: dict):
    """An engine's computing-time limit as it starts: --engine-timeout, and under
    --time-budget a fair share of what the engines started before it (`before`: hf's lone
    probe) have not used or been promised (a running engine's own limit, a finished one's
    time)."""
    def limit(name, started: dict):
        started = dict(before, **started)
        promised = sum(w.active if w.code is not None or w.limit is None else w.limit
                       for w in started.values())
        return engine_limit(o, promised, len([n for n in todo if n not in started]))
    return limit


def _run_engines(r: "Run", o: BenchOptions, out: Path, names: list, progress: Progress) -> int:
    have_ref = (out / "engines" / "parity_ref.safetensors").exists() and "hf" in r.finished
    for name in names:
        if name in r.finished:
            print(f"resume: {name} already finished ({r.data['engines'][name]['status']})",
                  file=sys.stderr)
    todo = [n for n in names if n not in r.finished]
    before = {}
    if "hf" not in names and not have_ref:  # the parity reference comes from hf, probe only
        ref = before["hf"] = rounds.Worker(r, "hf", reference=True, probe_only=True,
                                           limit=engine_limit(o, 0.0, len(todo) + 1))
        ref.compute(lambda: False)
        ref.finish()
        r.data["engines"].pop("hf", None)
        r.rows.pop("hf", None)
    limit = _limits(o, todo + list(before), before)
    plan, how = _plan(o, todo)
    r.data["schedule"] = dict(mode=how, groups=plan)
    if how.startswith("interleaved with hf in groups"):
        progress.show(f"note: the engines do not fit in memory together: each group runs "
                      f"beside hf ({' | '.join(', '.join(g) for g in plan)})", milestone=True)
    rounds.run_rounds(r, plan, o.warmup + o.steps, limit, on_round=r.measure)
    progress.done()
    df = summarize(r.data)
    for _ in range(3):  # a fraction above 1: the limits were under-measured; measure again
        over = (df.over_limit != "").any()
        if not over or r.interrupted or not r.measure(between_rounds=False):
            break
        df = summarize(r.data)
    failed, r.data["parity_tolerance"] = parity.verdict(df, o.dtype, o.parity_tol)
    for engine, why in failed.items():
        df.loc[df.engine == engine, "status"] = why
        r.data["engines"][engine]["status"] = why
    r.data["summary"] = df.to_dict(orient="records")
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
