"""A grid of runs over batch sizes, answer lengths and presets, gathered in one table."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from .harness import check_model, check_out_folder, fair_share, run_benchmark
from .options import ConfigError
from .report import plot_sweep, summarize
from .results import atomic_write_csv, int_list, load_results


def _ints(text: str, default: int) -> list[int]:
    """A sweep axis: each value once, in order, at least 1; the run's own value when none."""
    vals = int_list(text, "sweep values") if text else [default]
    if any(v < 1 for v in vals):
        raise ConfigError(f"sweep values must be at least 1, got {text!r}")
    return list(dict.fromkeys(vals))


def sweep(o, batches: str, gen_lens: str, presets: str) -> int:
    out = Path(o.out or "results/sweep")
    if o.resume and o.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    check_out_folder(out, "sweep")
    if (out / "sweep.csv").exists() and not (o.overwrite or o.resume):
        raise ConfigError(f"--out {out} already holds a sweep; pass --overwrite to replace it, "
                          f"--resume to finish it, or choose another --out")
    # a value given twice is one point (it would run twice into the same folder)
    names = list(dict.fromkeys(x.strip() for x in presets.split(",") if x.strip())) if presets \
        else [o.preset]
    if not names:
        raise ConfigError(f"--presets: expected comma-separated presets, got {presets!r}")
    sizes, lens = _ints(batches, o.batch), _ints(gen_lens, o.gen_len)
    grid = [(p, b, g) for p in names for b in sizes for g in lens]
    for p in names:  # before any point runs: the largest batch and length are the hardest
        check_model(dataclasses.replace(o, preset=p, batch=max(sizes), gen_len=max(lens)))
    started = [out / f"{p}_b{b}_g{g}" for p, b, g in grid
               if (out / f"{p}_b{b}_g{g}" / "results.json").exists()]
    if o.resume and not started:
        raise ConfigError(f"--resume: {out} holds no point of this sweep to resume")
    frames, worst = [], 0
    t0 = time.perf_counter()
    for n, (preset, b, g) in enumerate(grid):
        sub = out / f"{preset}_b{b}_g{g}"
        # --time-budget is the whole sweep's: each point an equal share of what is left
        budget = (fair_share(o.time_budget, time.perf_counter() - t0, len(grid) - n)
                  if o.time_budget else 0.0)
        if o.time_budget and budget < 1:
            print(f"== sweep: --time-budget {o.time_budget:g} s spent; "
                  f"{len(grid) - n} point(s) not run")
            worst = max(worst, 1)
            break
        # --resume: a point already started keeps its finished engines; the rest run afresh
        again = o.resume and sub in started
        oo = dataclasses.replace(o, preset=preset, batch=b, gen_len=g, out=str(sub),
                                 overwrite=not again, resume=again, time_budget=budget)
        print(f"== sweep: preset {preset}, batch {b}, gen_len {g}")
        worst = max(worst, run_benchmark(oo))
        df = summarize(load_results(sub))
        df.insert(1, "preset", preset)
        df.insert(2, "batch", b)
        df.insert(3, "gen_len", g)
        frames.append(df)
        atomic_write_csv(out / "sweep.csv", pd.concat(frames, ignore_index=True))
    if not frames:
        return worst
    table = pd.concat(frames, ignore_index=True)
    plot_sweep(table, out / "sweep.png")
    print(table[["engine", "preset", "batch", "gen_len", "status", "gen_tokens_per_s",
                 "step_s"]].to_string(index=False))
    print(f"\nsweep: {out}/sweep.csv, sweep.png")
    return worst
