"""Results on disk: tidy rows, atomic writes, strict reading.

A run directory holds results.json (everything), rows.csv (the tidy rows) and summary.csv (one
row per engine). Every write goes to a temporary file renamed into place, so a crash never
leaves a half-written file where a good one stood. Nothing here unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from core.files import atomic_write

VERSION = 1
ROW_KEYS = ("engine", "step", "phase", "metric", "value", "unit")


class ResultsError(ValueError):
    """A results file is missing, malformed, truncated or from another version."""


def row(engine: str, step: int, phase: str, metric: str, value: float, unit: str = "") -> dict:
    return dict(engine=engine, step=int(step), phase=phase, metric=metric, value=float(value),
                unit=unit)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_write_csv(path, df) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def append_jsonl(path, obj) -> None:
    """One JSON object per line, flushed and synced: a killed writer loses at most that line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    """Every complete line of a JSONL file; a torn last line (killed writer) is dropped."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return out


def load_results(path) -> dict:
    """results.json of a run directory (or the file itself), validated."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise ResultsError(f"{p}: no results file (is this a run directory?)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{p}: not valid JSON ({e.__class__.__name__}: truncated or corrupt)")
    if not isinstance(data, dict) or "version" not in data:
        raise ResultsError(f"{p}: not an rlhf-bench results file (no version)")
    if not _is(data["version"], int) or data["version"] != VERSION:
        raise ResultsError(f"{p}: results version {data['version']!r}, this rlhf-bench reads "
                           f"version {VERSION}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not all(_good_row(r) for r in rows):
        raise ResultsError(f"{p}: malformed rows (each needs {', '.join(ROW_KEYS)}: "
                           f"engine, phase, metric and unit strings, an integer step, a number)")
    engines = data.get("engines")
    if not isinstance(engines, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("status", ""), str)
            for e in engines.values()):
        raise ResultsError(f"{p}: malformed engines section (each engine needs a status string)")
    o = data.get("options")
    if not isinstance(o, dict) or not isinstance(o.get("engines_run"), list) or not all(
            isinstance(e, str) for e in o["engines_run"]):
        raise ResultsError(f"{p}: malformed options (engines_run must be a list of names)")
    bad = [k for k in ("batch", "generation_batches", "prompt_len", "gen_len", "warmup")
           if not _is(o.get(k), int) or o[k] < 0]
    if bad:
        raise ResultsError(f"{p}: malformed options ({', '.join(bad)} must be whole numbers)")
    limits = data.get("limits", {})
    if not isinstance(limits, dict) or not all(_is(v, (int, float)) for k, v in limits.items()
                                               if k in ("matmul_flops", "mem_bw")):
        raise ResultsError(f"{p}: malformed limits section")
    return data


def _is(v, kind) -> bool:
    """isinstance without bool passing for a number (JSON true is no step or value)."""
    return isinstance(v, kind) and not isinstance(v, bool)


def _good_row(r) -> bool:
    return (isinstance(r, dict) and not set(ROW_KEYS) - set(r) and _is(r["step"], int)
            and _is(r["value"], (int, float)) and all(isinstance(r[k], str) for k in
                                                      ("engine", "phase", "metric", "unit")))


def recover(data: dict, run_dir) -> dict:
    """A run whose harness was killed leaves engines marked "running": take their rows from the
    workers' own JSON-lines files, which hold every step finished before the kill."""
    run_dir = Path(run_dir)
    for name, info in data["engines"].items():
        if info.get("status") != "running":
            continue
        lines = read_jsonl(run_dir / "engines" / f"{name}.jsonl")
        rows = [r for r in lines if "event" not in r]
        ends = [e["status"] for e in lines if e.get("event") == "status"
                and isinstance(e.get("status"), str)]
        rows = [r for r in rows if _good_row(r)]
        data["rows"] = [r for r in data["rows"] if r["engine"] != name] + rows
        info["status"] = ends[-1] if ends else "failed: harness stopped while it ran"
    return data
