"""Efficiencies a harness run measured (`--efficiency RUN_DIR`): the achieved fractions of the
rooflines that `rlhf-bench run` writes to summary.csv, with results.json naming the machine."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .presets import DEFAULT_EFFICIENCY, Efficiency

# summary.csv column (bench/report.py) -> Efficiency field it measures
EFFICIENCY_COLUMNS = {"decode_roofline_frac": "decode", "score_flops_frac": "score",
                      "train_flops_frac": "train"}


def load_efficiency(run_dir: str, engine: str) -> tuple[Efficiency, str]:
    """Efficiencies for `engine` from a harness results dir, and where they came from: measured
    fractions where the run has them, documented defaults for the rest."""
    import pandas as pd
    root = Path(run_dir)
    try:
        meta = json.loads((root / "results.json").read_text())
        table = pd.read_csv(root / "summary.csv")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"--efficiency {run_dir}: cannot read summary.csv and results.json "
                         f"({type(err).__name__})") from None
    if not isinstance(meta, dict) or "engine" not in table.columns:
        raise ValueError(f"--efficiency {run_dir}: results.json must be an object and summary.csv "
                         "needs an 'engine' column")
    rows = table[table["engine"].astype(str) == engine]
    if "status" in rows.columns:
        rows = rows[rows["status"].astype(str).str.startswith("ok")]
    eff, found = DEFAULT_EFFICIENCY[engine], []
    for col, fieldname in EFFICIENCY_COLUMNS.items():
        if rows.empty or col not in rows.columns:
            continue
        value = pd.to_numeric(rows[col], errors="coerce").median()
        if math.isnan(value):
            continue
        if not 0 < value <= 1.05:   # a measured fraction above 1 by more than noise is wrong
            raise ValueError(f"--efficiency {run_dir}: {col}={value:g} for {engine} "
                             "is not a fraction in (0, 1]")
        eff = dataclasses.replace(eff, **{fieldname: min(value, 1.0)})
        found.append(fieldname)
    if "decode" in found:   # a measured decode fraction already contains launch and loop costs
        eff = dataclasses.replace(eff, launch_s=0.0, token_sync_s=0.0)
    env = meta.get("env") if isinstance(meta.get("env"), dict) else {}
    device = env.get("gpu") or env.get("cpu") or "unknown device"
    if not isinstance(device, str):
        device = "unknown device"
    if not found:   # said where it is printed: the user asked for measured efficiencies
        why = "no ok row" if rows.empty else "no efficiency columns in its ok row"
        return eff, f"defaults for {engine} ({root.name} has {why})"
    return eff, f"{root.name} ({device}): {', '.join(found)}"
