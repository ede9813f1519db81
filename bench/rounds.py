"""Engines measured in interleaved rounds, one worker process each.

Every engine of a group is started in turn (set up, compiled and parity-probed while the others
wait); then round k runs one step of each engine, one after another, before any engine's step
k+1. Only one worker computes at a time; the rest wait, idle, for their next "go". Drift of
the machine (another tenant, clocks, thermals) then falls on all engines alike, and each
round's engine/hf times make a paired ratio.

Groups come from memory: all engines at once where their estimated peaks fit the machine's
free memory together; otherwise hf stays resident and the others come in groups beside it (so
every ratio to hf is still paired within its rounds); `--sequential` runs each engine's steps
alone, one engine after another.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .machine import with_huge_pages
from .results import atomic_write_json, read_jsonl

POLL_S = 0.05
FIT = 0.85  # of the memory free at the start: the rest is the harness, caches, the kernel


class Worker:
    """One engine's worker process, stepped by the harness: set up and probed when started,
    then one step per `go(round)`; its rows reach the run's data as they are written."""

    def __init__(self, run, name: str, reference: bool, probe_only: bool, limit: float | None):
        self.run, self.name, self.limit = run, name, limit
        out = run.out / "engines"
        out.mkdir(parents=True, exist_ok=True)
        self.rows_path = out / f"{name}.jsonl"
        self.rows_path.unlink(missing_ok=True)
        self.log_path = out / f"{name}.log"
        # its place in the run's engine list (hf's probe alone after them) picks the port of
        # its ranks' process group: the same on every rank, and never another engine's
        names = run.data["options"]["engines_run"]
        spec = dict(options=run.o.to_dict(), engine=name, rows_path=str(self.rows_path),
                    parity_path=str(out / "parity_ref.safetensors"), reference=reference,
                    probe_only=probe_only,
                    engine_index=names.index(name) if name in names else len(names))
        spec_path = out / f"{name}.spec.json"
        atomic_write_json(spec_path, spec)
        self.log = open(self.log_path, "w")
        env = with_huge_pages(dict(os.environ, PYTHONUNBUFFERED="1",
                                   DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu")))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, text=True,
                                     start_new_session=True)
        run.data["engines"][name] = dict(status="running", pid=self.proc.pid)
        self.rows, self.seen = [], 0
        self.status, self.note, self.code = None, "", None
        self.ready, self.sent, self.done, self.stopped = False, 0, 0, False
        self.active = 0.0  # seconds it has computed (set-up, probe, steps): what `limit` caps

    # ------------------------------------------------------------------ reading its rows

    def _read(self) -> None:
        lines = read_jsonl(self.rows_path)
        if len(lines) == self.seen:
            return
        new, self.seen = lines[self.seen:], len(lines)
        for ev in new:
            kind = ev.get("event")
            if kind is None:
                self.rows.append(ev)
            elif kind == "status" and not (self.status or "").startswith("failed: timed out"):
                self.status = ev["status"]  # the latest wins, unless the harness timed it out
            elif kind == "note":
                self.note = ev["note"]
            elif kind == "ready":
                self.ready = True
            elif kind == "stepped":
                self.done += 1
            elif kind == "progress":
                self.run.progress.show(f"{self.name}: step {ev['step'] + 1} {ev['phase']}")
        self.run.rows[self.name] = self.rows
        self.run.save()

    def compute(self, until) -> bool:
        """Let the worker run until `until()` holds (True) or it exits (False), stopping it on
        SIGINT or when its own computing time passes its limit."""
        if self.code is not None:
            return False
        t0 = time.perf_counter()
        while True:
            try:
                code = self.proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            spent = self.active + time.perf_counter() - t0
            if code is None and self.run.interrupted:  # stop it, keep its rows
                os.killpg(self.proc.pid, signal.SIGTERM)
                code = self.proc.wait()
                self.stopped = True
            if code is None and self.limit is not None and spent > self.limit:
                os.killpg(self.proc.pid, signal.SIGKILL)
                code = self.proc.wait()
                self.status = f"failed: timed out after {self.limit:.0f} s"
            self._read()
            if code is not None:
                self.active, self.code = spent, code
                return False
            if until():
                self.active = spent
                return True

    # ------------------------------------------------------------------ driving it

    def start(self) -> bool:
        """Set-up and the parity probe; True when it waits for its first step."""
        return self.compute(lambda: self.ready)

    def step(self, round_: int) -> bool:
        """One step, in round `round_`; True when it is done and the worker waits again."""
        if self.code is not None:
            return False
        try:
            self.proc.stdin.write(f"go {round_}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it exited meanwhile: compute() reads why
            pass
        self.sent += 1
        return self.compute(lambda: self.done >= self.sent)

    def finish(self) -> str:
        """End its input, let it release and exit; its final status in the run's data."""
        if self.code is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.compute(lambda: False)
        self.log.close()
        code, status = self.code, self.status
        if self.stopped or (self.run.interrupted and code in (0, None)):
            status = "failed: interrupted (SIGINT)"
        elif status is None or (code not in (0, 3) and not status.startswith("failed")):
            tail = self.log_path.read_text(errors="replace")
            last = [ln for ln in tail.strip().splitlines() if ln.strip()][-1:] or [""]
            why = f"exit {code}" + (f" (killed by signal {-code})" if code and code < 0 else "")
            if code == -signal.SIGKILL:  # not the harness's own: a timeout says so above
                why += (" - most often the kernel's out-of-memory killer: try a smaller --batch, "
                        "--dtype bfloat16, --lora-dim or --phases generate")
            status = f"failed: {why}: {last[0][:200]}"
        self.run.data["engines"][self.name] = dict(status=status, exit_code=code,
                                                   **({"note": self.note} if self.note else {}))
        self.run.save()
        return status


def groups(names: list[str], need: dict, free: float, sequential: bool) -> tuple[list, str]:
    """The engines' groups, each run in rounds, and how they were formed (for the results and a
    note). `need`: an estimated peak (bytes) per engine; `free`: the machine's free memory."""
    if sequential or len(names) < 2:
        return [[n] for n in names], "sequential"
    room = FIT * free
    if sum(need[n] for n in names) <= room:
        return [list(names)], "interleaved"
    anchor = ["hf"] if "hf" in names else []
    rest = [n for n in names if n not in anchor]
    out, cur, used = [], [], sum(need[n] for n in anchor)
    for n in rest:
        if cur and used + need[n] > room:
            out.append(anchor + cur)
            cur, used = [], sum(need[a] for a in anchor)
        cur.append(n)
        used += need[n]
    out.append(anchor + cur)
    how = "interleaved with hf in groups" if anchor else "interleaved in groups"
    return out, how


def run_rounds(run, plan: list, rounds: int, limit, on_round) -> None:
    """Each group of `plan` in `rounds` rounds; an engine stays resident from its first group
    to its last. `limit(name, started)` gives an engine's computing-time limit as it starts
    (None: none; below 1 s: it is not started); `on_round()` runs between rounds, all idle."""
    last = {n: i for i, g in enumerate(plan) for n in g}
    live: dict[str, Worker] = {}
    started: dict[str, Worker] = {}
    k, total = 0, rounds * len(plan)
    for gi, group in enumerate(plan):
        for name in group:
            if name in started:
                continue
            if run.interrupted:
                run.data["engines"][name] = dict(status="failed: not run (interrupted)")
                continue
            lim = limit(name, started)
            if lim is not None and lim < 1:
                run.data["engines"][name] = dict(
                    status=f"failed: not run (--time-budget {run.o.time_budget:g} s spent)")
                run.progress.show(f"{name}: {run.data['engines'][name]['status']}",
                                  milestone=True)
                continue
            w = started[name] = Worker(run, name, reference=(name == "hf"), probe_only=False,
                                       limit=lim)
            run.progress.show(f"{name}: setting up", milestone=True)
            if w.start():
                live[name] = w
            else:
                run.progress.show(f"{name}: {w.finish()}", milestone=True)
        members = [live[n] for n in group if n in live]
        for _ in range(rounds):
            if run.interrupted or not members:
                break
            run.progress.show(f"round {k + 1} of {total}: {', '.join(w.name for w in members)}",
                              milestone=True)
            for w in members:
                if not w.step(k):  # it exited: its status now, its rows kept
                    live.pop(w.name).finish()
                    run.progress.show(f"{w.name}: {run.data['engines'][w.name]['status']}",
                                      milestone=True)
            members = [w for w in members if w.code is None]
            on_round()
            k += 1
        for name in group:
            if name in live and (last[name] == gi or run.interrupted):
                status = live.pop(name).finish()
                run.progress.show(f"{name}: {status}", milestone=True)
    for w in live.values():
        w.finish()
