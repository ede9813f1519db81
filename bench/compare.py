"""Judge a new run against a saved one.

Speeds are compared as ratios to `hf` in the same run (engine time / hf time), which carry
across machines of one kind better than raw seconds, but not across CPUs or software: on a
Zen 4 `hf`'s MKL linears are slow where a Xeon's are not, and the ratios move with it, so a
difference in the machine or software is noted. `--absolute` compares raw seconds instead
(same machine only). Memory is the engine's peak over hf's. An engine that was ok and now
fails (parity included) regresses.
"""
from __future__ import annotations

import math

import pandas as pd

from .machine import SETUP_KEYS
from .options import WORK_OPTIONS, differing
from .report import summarize

TIME_COLS = ("gen_s", "score_s", "train_s", "step_s")


def _summary(data: dict) -> pd.DataFrame:
    return summarize(data).set_index("engine")


def compare(base: dict, new: dict, max_slowdown: float, max_mem_growth: float,
            absolute: bool = False) -> tuple[pd.DataFrame, list[str]]:
    b, n = _summary(base), _summary(new)
    use_ratio = not absolute and "hf" in b.index and "hf" in n.index
    lines, problems = [], []
    for engine in b.index:
        if engine not in n.index:
            if str(b.loc[engine].status) == "ok":  # one that never ran cannot regress
                problems.append(f"{engine}: in the base run but not in the new one")
            continue
        bs, ns = b.loc[engine], n.loc[engine]
        if str(bs.status) == "ok" and str(ns.status) != "ok":
            problems.append(f"{engine}: was ok, now {ns.status}")
        for col in TIME_COLS:
            bv, nv = bs[col], ns[col]
            if str(ns.status) == "ok" and math.isfinite(bv) and bv > 0 and not (
                    math.isfinite(nv) and nv > 0):
                # an "ok" run without a usable time (rows lost, NaN or inf written) must not
                # pass the gate as if nothing had slowed down
                lines.append(dict(engine=engine, metric=col, base=bv, new=nv, change=math.nan,
                                  verdict="MISSING"))
                problems.append(f"{engine}: {col} {bv:.4g} -> {nv} (no usable measurement in "
                                f"the new run)")
                continue
            if use_ratio:
                bv, nv = bv / b.loc["hf", col], nv / n.loc["hf", col]
            if not (math.isfinite(bv) and math.isfinite(nv)) or bv <= 0:
                continue
            change = nv / bv - 1.0
            judged = not (use_ratio and engine == "hf")
            bad = judged and change > max_slowdown
            lines.append(dict(engine=engine, metric=col + ("/hf" if use_ratio else ""),
                              base=bv, new=nv, change=change,
                              verdict="REGRESSED" if bad else ("ok" if judged else "reference")))
            if bad:
                problems.append(f"{engine}: {col}{'/hf' if use_ratio else ''} {bv:.4g} -> "
                                f"{nv:.4g} (+{change:.0%}, limit +{max_slowdown:.0%})")
        bm, nm = bs.peak_mem_mb, ns.peak_mem_mb
        if use_ratio and engine != "hf":
            bm, nm = bm / b.loc["hf", "peak_mem_mb"], nm / n.loc["hf", "peak_mem_mb"]
        if math.isfinite(bm) and math.isfinite(nm) and bm > 0 and not (use_ratio and
                                                                      engine == "hf"):
            change = nm / bm - 1.0
            bad = change > max_mem_growth
            lines.append(dict(engine=engine, metric="peak_mem" + ("/hf" if use_ratio else ""),
                              base=bm, new=nm, change=change,
                              verdict="REGRESSED" if bad else "ok"))
            if bad:
                problems.append(f"{engine}: peak memory {bm:.4g} -> {nm:.4g} (+{change:.0%}, "
                                f"limit +{max_mem_growth:.0%})")
    return pd.DataFrame(lines), problems


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
