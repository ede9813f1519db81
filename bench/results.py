"""Results on disk: tidy rows, atomic writes, strict reading.

A run directory holds results.json (everything), rows.csv (the tidy rows) and summary.csv (one
row per engine). Every write goes to a temporary file renamed into place, so a crash never
leaves a half-written file where a good one stood. Nothing here unpickles.
"""
from __future__ import annotations

import json
import math
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


def int_list(text: str, what: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16], empty items skipped; anything else a one-line ValueError naming
    `what` (an option's list as typed: sweep's --batches, project's --gpus)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []   # not integers: the same error as none at all
    if not values:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}")
    return values


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
    """Every complete line of a JSONL file up to the first torn or unreadable one (a killed
    writer tears the last); lines that are not JSON objects are skipped."""
    out = []
    try:
        with open(path, "rb") as f:  # bytes: a bad line must not cost the good ones before it
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    obj = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    break
                if isinstance(obj, dict):
                    out.append(obj)
    except (FileNotFoundError, IsADirectoryError):
        pass
    return out


def load_results(path) -> dict:
    """results.json of a run directory (or the file itself), validated."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        if (p.parent / "sweep.csv").exists():
            raise ResultsError(f"{p.parent} is a sweep: its points are run folders of their own "
                               f"(e.g. {p.parent}/<preset>_b<batch>_g<gen_len>)")
        raise ResultsError(f"{p}: no results file (is this a run directory?)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{p}: not valid JSON ({e.__class__.__name__}: truncated or corrupt)")
    except RecursionError:
        raise ResultsError(f"{p}: not an rlhf-bench results file (nested too deeply to read)")
    except IsADirectoryError:
        raise ResultsError(f"{p}: a folder, not a results file")
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
            isinstance(e, str) for e in o["engines_run"]) or not o["engines_run"]:
        raise ResultsError(f"{p}: malformed options (engines_run must be a non-empty list of "
                           f"names)")
    least = dict(batch=1, generation_batches=1, prompt_len=1, gen_len=1, warmup=0)
    bad = [k for k, low in least.items() if not _is(o.get(k), int) or o[k] < low]
    if bad:
        raise ResultsError(f"{p}: malformed options ({', '.join(bad)} must be whole numbers, "
                           f"at least 1 (warmup: 0))")
    limits = data.get("limits", {})
    if not isinstance(limits, dict) or not all(
            _number(v) and 0 <= v < math.inf for k, v in limits.items()
            if k in ("matmul_flops", "mem_bw")):
        raise ResultsError(f"{p}: malformed limits section (matmul_flops and mem_bw must be "
                           f"finite numbers, 0 or more)")
    if not isinstance(data.get("env") or {}, dict):  # read by compare's note and --resume
        raise ResultsError(f"{p}: malformed env section (must map names, such as cpu, to values)")
    return data


def _is(v, kind) -> bool:
    """isinstance without bool passing for a number (JSON true is no step or value)."""
    return isinstance(v, kind) and not isinstance(v, bool)


def _number(v) -> bool:
    """A JSON number a float can hold (json reads 1e400 written as digits into an int)."""
    return _is(v, float) or (_is(v, int) and abs(v) < 2 ** 1023)


def _good_row(r) -> bool:
    return (isinstance(r, dict) and not set(ROW_KEYS) - set(r) and _is(r["step"], int)
            and _number(r["value"]) and all(isinstance(r[k], str) for k in
                                            ("engine", "phase", "metric", "unit")))


def load_run(path) -> dict:
    """A run as `report` and `compare` read it: load_results of a run folder or its
    results.json, with a killed harness's finished steps recovered from the folder."""
    p = Path(path)
    return recover(load_results(p), p if p.is_dir() else p.parent)


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
        rows = [r for r in rows if _good_row(r) and r["engine"] == name]
        data["rows"] = [r for r in data["rows"] if r["engine"] != name] + rows
        info["status"] = ends[-1] if ends else "failed: harness stopped while it ran"
    return data
