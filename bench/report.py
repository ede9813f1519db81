"""Tidy rows -> the summary table (one row per engine), printing and PNG plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .parity import parity_tolerance
from .results import atomic_write
from .stats import median_ci

# fractions of the machine's measured limits; one above OVER_LIMIT says the limit was
# under-measured (the run achieved more than it), and is printed flagged, never as a result
FRACTION_COLS = ("gen_flops_frac", "score_flops_frac", "train_flops_frac",
                 "decode_roofline_frac")
OVER_LIMIT = 1.05

SUMMARY_COLUMNS = ["engine", "status", "gen_s", "sync_s", "score_s", "train_s", "step_s",
                   "gen_tokens_per_s", "samples_per_s", "gen_speedup_vs_hf",
                   "step_speedup_vs_hf",
                   "gen_s_lo", "gen_s_hi", "sync_s_lo", "sync_s_hi", "score_s_lo", "score_s_hi",
                   "train_s_lo", "train_s_hi", "step_s_lo", "step_s_hi",
                   "gen_speedup_vs_hf_lo", "gen_speedup_vs_hf_hi", "step_speedup_vs_hf_lo",
                   "step_speedup_vs_hf_hi", "steps_measured", "over_limit",
                   "gen_flops_frac", "score_flops_frac", "train_flops_frac",
                   "gen_gflops", "score_gflops", "train_gflops",
                   "decode_roofline_frac", "peak_mem_mb", "peak_reserved_mb", "peak_device_mb",
                   "gen_peak_mem_mb", "weight_copies", "weight_copies_measured", "kv_pool_mb",
                   "actor_weight_mb", "weights_held_mb", "parity_max_abs_diff",
                   "score_parity_max_abs_diff",
                   "parity_token_agreement", "parity_divergence_margin", "parity_tol",
                   "parity_logit_scale", "setup_s", "first_call_s", "probe_s", "reward",
                   "kl", "actor_loss", "critic_loss", "note"]

PHASE_COL = {"generate": "gen_s", "sync": "sync_s", "score": "score_s", "train": "train_s",
             "step": "step_s"}


def summarize(data: dict) -> pd.DataFrame:
    """The summary DataFrame of a results dict (medians over the measured steps). A phase not
    measured (NaN) or a sentinel (+inf parity) makes its ratios NaN or 0 without a warning."""
    import numpy as np
    with np.errstate(divide="ignore", invalid="ignore"):
        return _summarize(data)


def step_samples(data: dict, engine: str) -> pd.DataFrame:
    """Seconds per measured step of `engine`: one row per step, indexed by the round it ran in
    (its step number in results without rounds), a column per phase (generate summed over the
    step's generation batches; "step" the whole step), and "tokens", the answer tokens
    generated in the step, where the worker counted them."""
    o = data["options"]
    rows = pd.DataFrame(data["rows"], columns=["engine", "step", "phase", "metric", "value",
                                               "unit"])
    r = rows[(rows.engine == engine) & (rows.step >= o["warmup"])]
    # min_count: a phase whose every reading is NaN stays NaN (a lost time), not 0 seconds
    secs = r[r.metric == "seconds"].pivot_table(index="step", columns="phase", values="value",
                                                aggfunc=lambda v: v.sum(min_count=1))
    tokens = r[(r.phase == "generate") & (r.metric == "tokens")].groupby("step").value.sum()
    if len(tokens):
        secs["tokens"] = tokens
    rounds = r[(r.phase == "step") & (r.metric == "round")].set_index("step").value
    if len(secs) and secs.index.isin(rounds.index).all():
        secs.index = [int(rounds[s]) for s in secs.index]
    secs.index.name = "round"
    return secs


def _summarize(data: dict) -> pd.DataFrame:
    o, limits = data["options"], data.get("limits", {})
    rows = pd.DataFrame(data["rows"], columns=["engine", "step", "phase", "metric", "value",
                                               "unit"])
    out, samples = [], {}
    world = int((data.get("env") or {}).get("world_size") or 1)
    for name in data["options"]["engines_run"]:
        info = data["engines"].get(name, {})
        r = rows[rows.engine == name]
        setup = {(p, m): v for p, m, v in r[r.step < 0][["phase", "metric", "value"]].values}
        measured = r[r.step >= o["warmup"]]
        med = measured.groupby(["phase", "metric"]).value.median()
        samples[name] = steps = step_samples(data, name)
        d = {"engine": name, "status": info.get("status", "failed: no result"),
             "note": info.get("note", "")}
        for phase, col in PHASE_COL.items():
            d[col], d[f"{col}_lo"], d[f"{col}_hi"] = median_ci(
                steps[phase] if phase in steps else [])
        B = o["batch"] * o["generation_batches"]
        tokens = steps["tokens"].median() if "tokens" in steps else B * o["gen_len"]
        d["gen_tokens_per_s"] = tokens / d["gen_s"]
        d["samples_per_s"] = B / d["step_s"]
        d["steps_measured"] = len(steps)
        peak = limits.get("matmul_flops", 0) or float("nan")  # 0 or absent: not measured
        for phase, col in (("generate", "gen"), ("score", "score"), ("train", "train")):
            achieved = setup.get((phase, "flops"), float("nan")) / d[PHASE_COL[phase]]
            d[f"{col}_gflops"] = achieved / 1e9
            d[f"{col}_flops_frac"] = achieved / peak
        d["decode_roofline_frac"] = _roofline(setup, o, limits, world) / d["gen_s"]
        # the process's peak (rank 0's alone in a multi-rank run) or the steps' (the largest
        # rank's there; ru_maxrss only grows, so on one rank the steps' is never above it)
        d["peak_mem_mb"] = max(setup.get(("setup", "peak_rss_mb"), float("nan")),
                               measured[measured.metric == "peak_rss_mb"].value.max(),
                               key=lambda v: v if v == v else float("-inf"))
        gpu_peak = measured[measured.metric == "peak_mem_mb"].value
        if len(gpu_peak):
            d["peak_mem_mb"] = gpu_peak.max()
        d["peak_reserved_mb"] = measured[measured.metric == "peak_reserved_mb"].value.max()
        # GPU: the driver's count of this process's memory, allocations outside torch's included
        d["peak_device_mb"] = measured[measured.metric == "peak_device_mb"].value.max()
        # generation's own peak (GPU: allocated; CPU: RSS above the baseline, where the worker
        # could reset the process's peak at each phase), which training's hides in peak_mem_mb
        gen = measured[measured.phase == "generate"]
        gen_peak = gen[gen.metric == "peak_mem_mb"].value
        d["gen_peak_mem_mb"] = (gen_peak if len(gen_peak) else
                                gen[gen.metric == "peak_rss_mb"].value).max()
        d["weight_copies"] = setup.get(("setup", "weight_copies"), float("nan"))
        # counted from the tensors alive after the parity probe (bench/holdings.py)
        d["weight_copies_measured"] = setup.get(("setup", "weight_copies_measured"),
                                                float("nan"))
        d["actor_weight_mb"] = setup.get(("setup", "actor_weight_bytes"), float("nan")) / 2 ** 20
        d["weights_held_mb"] = d["actor_weight_mb"] * d["weight_copies"]
        d["kv_pool_mb"] = setup.get(("setup", "kv_pool_bytes"), 0.0) / 2 ** 20
        # the engine's own generation path against hf's log-probs; its scoring beside it
        d["parity_max_abs_diff"] = setup.get(("parity", "gen_max_abs_diff"), float("nan"))
        d["score_parity_max_abs_diff"] = setup.get(("parity", "max_abs_diff"), float("nan"))
        d["parity_token_agreement"] = setup.get(("parity", "token_agreement"), float("nan"))
        d["parity_divergence_margin"] = setup.get(("parity", "divergence_margin"),
                                                  float("nan"))
        d["parity_logit_scale"] = setup.get(("parity", "logit_scale"), float("nan"))
        d["parity_tol"] = parity_tolerance(o.get("dtype", "float32"), d["parity_logit_scale"],
                                           o.get("parity_tol", 0.0))
        d["setup_s"] = setup.get(("setup", "init_s"), float("nan"))
        d["first_call_s"] = setup.get(("setup", "first_call_s"), float("nan"))
        d["probe_s"] = setup.get(("parity", "probe_s"), float("nan"))
        for k in ("reward", "kl", "actor_loss", "critic_loss"):
            d[k] = med.get(("metrics", k), float("nan"))
        out.append(d)
    df = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    if "hf" in samples:
        for col, phase in (("gen_speedup_vs_hf", "generate"), ("step_speedup_vs_hf", "step")):
            got = [speedup(samples["hf"], samples[e], phase) for e in df.engine]
            df[col], df[f"{col}_lo"], df[f"{col}_hi"] = zip(*got) if got else ((), (), ())
    df["over_limit"] = [", ".join(c for c in FRACTION_COLS if d[c] > OVER_LIMIT)
                        for _, d in df.iterrows()]
    return df


def speedup(hf: pd.DataFrame, engine: pd.DataFrame, phase: str) -> tuple:
    """(median, low, high) of hf's time over the engine's for `phase`, paired by round: one
    ratio per round both measured. Runs without shared rounds (a resumed run's kept hf) give
    the ratio of the medians and no interval."""
    if phase not in hf or phase not in engine:
        return float("nan"), float("nan"), float("nan")
    both = pd.concat([hf[phase].rename("hf"), engine[phase].rename("e")], axis=1,
                     join="inner")
    if len(both) == 0:
        return hf[phase].median() / engine[phase].median(), float("nan"), float("nan")
    return median_ci(both.hf / both.e)


def _roofline(setup: dict, o: dict, limits: dict, world: int = 1) -> float:
    """flops.decode_roofline_s for the actor shape the worker recorded (nan if it did not): one
    rank's share of each generation batch against one device's limits, and the weights read
    again for every generation batch."""
    from .flops import Shape, decode_roofline_s
    try:
        s = Shape(*(int(setup[("setup", f"shape_{f}")]) for f in Shape._fields))
        dbytes = int(setup[("setup", "dtype_bytes")])
    except (KeyError, ValueError, OverflowError):  # not recorded, or not a whole number
        return float("nan")
    if not (limits.get("matmul_flops", 0) > 0 and limits.get("mem_bw", 0) > 0):
        return float("nan")  # not measured
    rows = max(1, o["batch"] // max(1, world))
    return o["generation_batches"] * decode_roofline_s(s, rows, o["prompt_len"], o["gen_len"],
                                                       dbytes, limits["matmul_flops"],
                                                       limits["mem_bw"])


def setup_line(data: dict) -> str | None:
    """'measured on: ...': the machine, its threads, software and measured limits, the context
    every number in the table needs (ratios to hf move with the CPU). None if nothing is known."""
    env, lim = data.get("env") or {}, data.get("limits") or {}
    # the run's device, not whether the machine has a GPU: a CPU run on a CUDA machine is the CPU's
    device = str((data.get("options") or {}).get("device") or lim.get("device") or "cpu")
    parts = []
    if device.startswith("cuda") and env.get("gpu"):
        parts.append(str(env["gpu"]))
    elif env.get("cpu"):
        isa = env.get("cpu_isa")
        parts.append(f"{env['cpu']}" + (f" ({isa})" if isa else ""))
    if env.get("threads"):
        parts.append(f"{env['threads']} threads")
    if env.get("huge_pages") and not device.startswith("cuda"):
        parts.append(f"huge pages {env['huge_pages']}")
    parts += [f"{k} {env[k]}" for k in ("torch", "deepspeed", "vllm") if env.get(k)]
    if lim.get("matmul_flops") and lim.get("mem_bw"):
        parts.append(f"limits {_rate(lim['matmul_flops'], 'FLOP/s')} matmul, "
                     f"{_rate(lim['mem_bw'], 'B/s')} read")
    return f"measured on: {', '.join(parts)}" if parts else None


def _rate(v: float, unit: str) -> str:
    """185e9 -> '185 GFLOP/s', 4.2e12 -> '4.2 TB/s', 31.3e9 -> '31.3 GB/s'."""
    scale, prefix = (1e12, "T") if v >= 1e12 else (1e9, "G")
    x = v / scale
    return f"{x:.3g} {prefix}{unit}" if x < 100 else f"{x:,.0f} {prefix}{unit}"


INTERVAL_COLS = ("gen_s", "sync_s", "score_s", "train_s", "step_s", "gen_speedup_vs_hf",
                 "step_speedup_vs_hf")


def _num(v) -> str:
    return "NaN" if v != v else f"{v:.3g}"


def _with_interval(v, lo, hi) -> str:
    """'0.804 [0.79, 0.82]'; the median alone where there is no interval."""
    if lo is None or lo != lo or hi != hi:
        return _num(v)
    return f"{_num(v)} [{_num(lo)}, {_num(hi)}]"


def format_table(df: pd.DataFrame, data: dict | None = None) -> str:
    """The summary table, its notes, and (given the results) the setup it was measured on."""
    cols = ["engine", "status", "gen_s", "sync_s", "score_s", "train_s", "step_s",
            "gen_tokens_per_s", "gen_speedup_vs_hf", "step_speedup_vs_hf",
            "decode_roofline_frac", "peak_mem_mb", "gen_peak_mem_mb",
            "weight_copies_measured", "parity_max_abs_diff"]
    show = df[cols].copy()
    show["status"] = show.status.str.slice(0, 48)
    for c in INTERVAL_COLS:  # median [low, high]: the 95% interval where there is one
        if c in show:
            show[c] = [_with_interval(d[c], d.get(f"{c}_lo"), d.get(f"{c}_hi"))
                       for _, d in df.iterrows()]
    flagged = False
    for c in FRACTION_COLS:
        if c in show:
            over = df[c] > OVER_LIMIT
            flagged |= bool(over.any())
            show[c] = [f"{v:.3g} (!)" if o else _num(v) for v, o in zip(df[c], over)]
    with pd.option_context("display.width", 250, "display.max_columns", 30,
                           "display.float_format", lambda v: f"{v:.4g}"):
        table = show.to_string(index=False)
    notes = [f"note: {e}: {n}" for e, n in zip(df.engine, df.get("note", [])) if n == n and n]
    if INTERVAL_COLS[0] in show:
        n = df.steps_measured.max() if "steps_measured" in df else float("nan")
        notes.append("times and ratios to hf: median [95% interval] over the measured steps"
                     + ("; intervals need 6 steps or more" if not n >= 6 else "")
                     + (", ratios paired by round" if "hf" in set(df.engine) else ""))
    if flagged:
        lim = (data or {}).get("limits") or {}
        notes.append(f"(!) above {OVER_LIMIT:g}: the run did more than the measured limits allow "
                     f"({_rate(lim.get('matmul_flops', 0), 'FLOP/s')} matmul, "
                     f"{_rate(lim.get('mem_bw', 0), 'B/s')} read, from "
                     f"{lim.get('measurements', 1)} readings): the limit is under-measured "
                     f"and the fraction is not a result")
    tol, scale = df.parity_tol.max(), df.parity_logit_scale.max()
    if tol == tol:
        notes.append(f"parity tolerance: {tol:.3g} nats from hf's log-probs"
                     + (f" (hf's largest top logit {scale:.3g})" if scale == scale else ""))
    line = setup_line(data) if data is not None else None
    return "\n".join([table, *notes, *([line] if line else [])])


def plot_phases(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = None
    ok = df[df.status == "ok"]
    for col, label in (("gen_s", "generate"), ("sync_s", "sync"), ("score_s", "score"),
                       ("train_s", "train")):
        vals = ok[col].fillna(0.0).values
        ax.bar(ok.engine, vals, bottom=bottom, label=label)
        bottom = vals if bottom is None else bottom + vals
    ax.set_ylabel("seconds per PPO step (median)")
    ax.set_title("Time per phase")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_sweep(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for (engine, preset, gl), g in df[df.status == "ok"].groupby(["engine", "preset", "gen_len"]):
        g = g.sort_values("batch")
        ax.plot(g.batch, g.gen_tokens_per_s, marker="o", label=f"{engine} {preset} G={gl}")
        if "gen_peak_mem_mb" in g:  # results from before the column have none
            mem.plot(g.batch, g.gen_peak_mem_mb, marker="o", label=f"{engine} {preset} G={gl}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Generation throughput vs batch")
    ax.legend(fontsize=7)
    mem.set_xlabel("batch size")
    mem.set_ylabel("MB above the run's baseline")
    mem.set_title("Generation's peak memory vs batch")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
