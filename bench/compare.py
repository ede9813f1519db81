"""Judge a new run against a saved one by the interval of each change.

Samples: every measured round gives one time per engine and phase (report.step_samples). In
ratio mode (the default, when both runs have hf) a sample is the engine's time over hf's in the
same round, sync over hf's step (hf copies nothing), which carries across machines of one kind
better than raw seconds, but not across CPUs or software: on a Zen 4 hf's MKL linears are slow
where a Xeon's are not, and the ratios move with it, so such a difference is noted.
`--absolute`, or a run without hf, judges raw seconds (same machine only).

Change: new median / base median with its 95% bootstrap interval (stats.change_ci). With
t = 1 + threshold a line is REGRESSED when the whole interval lies above t, inconclusive when
it straddles t (or too few samples give no interval and the point is above t), ok otherwise.
A sync under 1% of the engine's step in both runs is a timer reading of nothing (an engine that
copies no weights) and is "negligible" whatever its ratio.

hf itself: ratios cancel whatever every engine shares (hf's scoring and training are everyone's),
so when both runs come from the same machine and software (every setup key but the commit
recorded and equal) hf's phases and memory are judged in raw terms as well.

Memory: peak_mem_mb (the process's peak: training's on CPU) and gen_peak_mem_mb (generation's
own), one value per run: over hf's in ratio mode, raw for hf as above; REGRESSED when it grows
past --max-mem-growth.

An engine that was ok and now fails regresses, and so does a line whose new run is ok but has
no usable value where the base had one (MISSING).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .machine import SETUP_KEYS
from .options import WORK_OPTIONS, differing
from .report import PHASE_COL, step_samples, summarize
from .stats import change_ci, median_ci

MEMORY_COLS = ("peak_mem_mb", "gen_peak_mem_mb")
NEGLIGIBLE = 0.01  # a sync below this share of the step in both runs is not judged
# keys that must be recorded for two runs to count as one setup; gpu, deepspeed and vllm are
# absent where there is none, and then compare equal
KNOWN_KEYS = ("python", "torch", "transformers", "cpu", "cpu_isa", "threads", "world_size")
COLUMNS = ["engine", "metric", "base", "new", "change", "low", "high", "verdict"]


def _median(x) -> float:
    return median_ci(x)[0]


def verdict(point: float, low: float, high: float, limit: float) -> str:
    """REGRESSED, inconclusive or ok for a change (new/base) and its interval (NaN with too
    few samples) against the largest allowed growth `limit` (0.1 for 10%)."""
    t = 1.0 + limit
    if low > t:
        return "REGRESSED"
    if low <= t < high or (math.isnan(low) and point > t):
        return "inconclusive"
    return "ok"


def _time_line(engine: str, metric: str, b, n, limit: float, new_ok: bool,
               negligible: bool = False) -> dict | None:
    """One time line from the two runs' samples; None when the base measured nothing."""
    bm, nm = _median(b), _median(n)
    if not bm > 0:
        return None
    line = dict(engine=engine, metric=metric, base=bm, new=nm, change=math.nan, low=math.nan,
                high=math.nan)
    if math.isnan(nm):  # an "ok" run without a usable time (rows lost, NaN or inf written)
        return dict(line, verdict="MISSING") if new_ok else None
    point, low, high = change_ci(b, n)
    return dict(line, change=point, low=low, high=high,
                verdict="negligible" if negligible else verdict(point, low, high, limit))


def _mem_line(engine: str, metric: str, b: float, n: float, limit: float,
              new_ok: bool) -> dict | None:
    if not (math.isfinite(b) and b > 0):
        return None
    line = dict(engine=engine, metric=metric, base=b, new=n, low=math.nan, high=math.nan)
    if not math.isfinite(n):
        return dict(line, change=math.nan, verdict="MISSING") if new_ok else None
    return dict(line, change=n / b, verdict="REGRESSED" if n / b > 1.0 + limit else "ok")


def _ratios(s: pd.DataFrame, hf: pd.DataFrame) -> dict[str, pd.Series]:
    """Per-round engine/hf of every phase (sync over hf's step), paired on the round."""
    out = {}
    for phase in PHASE_COL:
        den = "step" if phase == "sync" else phase
        if phase in s.columns and den in hf.columns:
            out[phase] = (s[phase] / hf[den]).replace([np.inf, -np.inf], np.nan)
    return out


def _negligible_sync(s: pd.DataFrame) -> bool:
    return "sync" in s and "step" in s and _median(s["sync"]) < NEGLIGIBLE * _median(s["step"])


def compare(base: dict, new: dict, max_slowdown: float, max_mem_growth: float,
            absolute: bool = False) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(table, regressions, inconclusive lines): the table has a line per engine and metric
    (COLUMNS), each regression is a sentence, each inconclusive line 'engine metric'."""
    b, n = (summarize(d).set_index("engine") for d in (base, new))
    ratio = not absolute and "hf" in b.index and "hf" in n.index
    judge_hf = not ratio or not setup_mismatch(base, new)  # hf's own seconds and memory
    bs = {e: step_samples(base, e) for e in b.index}
    ns = {e: step_samples(new, e) for e in n.index}
    lines, problems = [], []
    for engine in b.index:
        if engine not in n.index:
            if str(b.loc[engine].status) == "ok":  # one that never ran cannot regress
                problems.append(f"{engine}: in the base run but not in the new one")
            continue
        new_ok = str(n.loc[engine].status) == "ok"
        if str(b.loc[engine].status) == "ok" and not new_ok:
            problems.append(f"{engine}: was ok, now {n.loc[engine].status}")
        by_ratio = ratio and engine != "hf"
        judged = engine != "hf" or judge_hf  # a MISSING line counts all the same
        negligible = _negligible_sync(bs[engine]) and _negligible_sync(ns[engine])
        br = _ratios(bs[engine], bs["hf"]) if by_ratio else {}
        nr = _ratios(ns[engine], ns["hf"]) if by_ratio else {}
        for phase, col in PHASE_COL.items():
            if phase not in bs[engine]:
                continue
            raw = _time_line(engine, col, bs[engine][phase], ns[engine].get(phase, []),
                             max_slowdown, new_ok, negligible and phase == "sync")
            if by_ratio:
                name = col + ("/hf_step" if phase == "sync" else "/hf")
                line = _time_line(engine, name, br.get(phase, []), nr.get(phase, []),
                                  max_slowdown, new_ok, negligible and phase == "sync")
                if raw is not None and raw["verdict"] == "MISSING":
                    line = raw  # its own time lost, not hf's
            else:
                line = raw
            if line is not None and (judged or line["verdict"] == "MISSING"):
                lines.append(line)
        for col in MEMORY_COLS:
            bm, nm = b.loc[engine, col], n.loc[engine, col]
            if by_ratio:
                line = _mem_line(engine, f"{col}/hf", bm / b.loc["hf", col],
                                 nm / n.loc["hf", col], max_mem_growth, new_ok)
            else:
                line = _mem_line(engine, col, bm, nm, max_mem_growth, new_ok)
            if line is not None and (judged or line["verdict"] == "MISSING"):
                lines.append(line)
    for ln in lines:
        if ln["verdict"] in ("REGRESSED", "MISSING"):
            problems.append(_sentence(ln, max_mem_growth if "mem" in ln["metric"]
                                      else max_slowdown))
    unsure = [f"{ln['engine']} {ln['metric']}" for ln in lines if ln["verdict"] == "inconclusive"]
    return pd.DataFrame(lines, columns=COLUMNS), problems, unsure


def _sentence(ln: dict, limit: float) -> str:
    head = f"{ln['engine']}: {ln['metric']} {ln['base']:.4g} -> "
    if ln["verdict"] == "MISSING":
        return head + f"{ln['new']} (no usable measurement in the new run)"
    interval = (f", 95% interval {ln['low'] - 1:+.0%} to {ln['high'] - 1:+.0%}"
                if ln["low"] == ln["low"] else "")
    return head + f"{ln['new']:.4g} ({ln['change'] - 1:+.0%}{interval}; limit +{limit:.0%})"


def workload_differences(base: dict, new: dict) -> list[str]:
    """'name (base -> new)' for each option of the work the two runs differ in (one missing
    from either, as in results older than the option, is not compared)."""
    bo, no = base.get("options", {}), new.get("options", {})
    return [f"{k} ({bo[k]} -> {no[k]})" for k in differing(bo, no, WORK_OPTIONS)]


def setup_differences(base: dict, new: dict) -> list[str]:
    """'name (base -> new)' for each part of the machine or software (not the commit) the two
    runs were measured on that differs; one missing from either is not compared."""
    be, ne = base.get("env") or {}, new.get("env") or {}
    return [f"{k} ({be[k]} -> {ne[k]})"
            for k in differing(be, ne, [k for k in SETUP_KEYS if k != "git_commit"])]


def setup_mismatch(base: dict, new: dict) -> list[str]:
    """Why two runs do not count as one machine and software: 'name (base -> new)' for each
    setup key but the commit that differs (absent from one run included), 'name (not
    recorded)' for each of KNOWN_KEYS either run lacks; empty when they do count as one."""
    be, ne = base.get("env") or {}, new.get("env") or {}
    missing = [k for k in KNOWN_KEYS if be.get(k) is None or ne.get(k) is None]
    return [f"{k} (not recorded)" for k in missing] + [
        f"{k} ({be.get(k)} -> {ne.get(k)})" for k in SETUP_KEYS
        if k != "git_commit" and k not in missing and be.get(k) != ne.get(k)]


def parse_percent(text: str) -> float:
    """'10%' or a fraction below 1 ('0.1'). A bare 10 would read as 1000%, a gate that never
    fires for someone who meant 10%: it is refused."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"not a percentage: {text!r} (write e.g. 10% or 0.1; at least 0)")
    if not t.endswith("%") and v >= 1:
        raise ValueError(f"{text!r} is ambiguous: write a percentage ({t}%) or a fraction "
                         f"below 1 (0.1 for 10%)")
    return v
