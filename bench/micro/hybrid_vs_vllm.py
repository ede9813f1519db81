"""Generation of `hybrid` against `vllm` over batch sizes: the same random weights, prompts and
greedy fixed-length answers, both engines set up once per (preset, batch), then rounds in which
each generates once, the first of the pair alternating from round to round.

Per batch: each engine's median seconds with its 95% interval (bench/stats.median_ci), the
paired ratio vllm / hybrid (one ratio per round; > 1: `hybrid` faster) with its interval, and
`hybrid`'s decode roofline fraction (bench/flops.decode_roofline_s against the limits read
before and after every batch, kept as the harness keeps them: bench/machine.best_limits).
Writes sweep.csv (the table), rounds.csv (every timed generate) and sweep.png into --out.

Run: python -m bench.micro.hybrid_vs_vllm [--presets opt-125m,opt-350m]
     [--batches 1,4,8,16,32,64] [--rounds 6] [--dtype float32|bfloat16] [--vllm-eager]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.report import _with_interval

ENGINES = ("hybrid", "vllm")
COLUMNS = ["preset", "dtype", "batch", "prompt_len", "gen_len", "rounds",
           "hybrid_s", "hybrid_lo", "hybrid_hi", "vllm_s", "vllm_lo", "vllm_hi",
           "ratio", "ratio_lo", "ratio_hi", "roofline_s", "hybrid_roofline_frac",
           "matmul_gflops", "mem_gbs"]


def _ints(text: str) -> list[int]:
    from bench.results import int_list
    try:
        out = int_list(text, "batches")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers of at least 1, got {text!r}")
    return out


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.micro.hybrid_vs_vllm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="opt-125m,opt-350m")
    p.add_argument("--batches", type=_ints, default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (6 or more give "
                   "intervals)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--quick-limits", action="store_true", help="smaller limit probes (tests)")
    p.add_argument("--out", default="results/hybrid_vs_vllm")
    a = p.parse_args(argv)
    a.presets = [s for s in a.presets.split(",") if s]
    from core.models import PRESETS
    bad = [s for s in a.presets if s not in PRESETS]
    if bad or not a.presets:
        p.error(f"unknown preset {', '.join(bad) or '(none)'}; valid: {', '.join(PRESETS)}")
    if a.rounds < 1 or a.prompt_len < 1 or a.gen_len < 1 or a.threads < 1:
        p.error("--rounds, --prompt-len, --gen-len and --threads must be at least 1")
    return a


def native_bf16() -> bool:
    from bench.machine import _cpu_isa
    return any(f in (_cpu_isa() or "").split() for f in ("avx512_bf16", "amx_tile"))


def time_rounds(fns: dict, rounds: int, before: dict | None = None) -> list[dict]:
    """One warm-up call of each, then `rounds` rounds of one call each, the order of the pair
    alternating: [{name: seconds}, ...], a dict per round. before[name](), where given, runs
    ahead of each of that name's calls, untimed."""
    before = before or {}
    for fn in fns.values():
        fn()
    out, names = [], list(fns)
    for r in range(rounds):
        row = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            if name in before:
                before[name]()
            t = time.perf_counter()
            fns[name]()
            row[name] = time.perf_counter() - t
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    """Medians with intervals for each engine, and the paired ratio vllm / hybrid."""
    from bench.stats import median_ci
    d = {}
    for e in ENGINES:
        d[f"{e}_s"], d[f"{e}_lo"], d[f"{e}_hi"] = median_ci([r[e] for r in rows])
    d["ratio"], d["ratio_lo"], d["ratio_hi"] = median_ci([r["vllm"] / r["hybrid"] for r in rows])
    return d


def run_batch(preset, bundle, batch, a) -> list[dict]:
    """Set both engines up for this batch, time their rounds, shut vLLM down."""
    import engines
    from core.data import synthetic_prompts
    from core.types import GenerationConfig, RunConfig
    gen = GenerationConfig(gen_len=a.gen_len, greedy=True)
    cfg = RunConfig(preset=preset, batch=batch, prompt_len=a.prompt_len, gen=gen, dtype=a.dtype,
                    train=False)
    prompts = synthetic_prompts(batch, a.prompt_len, bundle.config.vocab_size, bundle.pad_id,
                                seed=0)
    hybrid = engines.get("hybrid")
    vllm = engines.get("vllm", compile=not a.vllm_eager)
    states = {"hybrid": hybrid.init(bundle, cfg, seed=0), "vllm": vllm.init(bundle, cfg, seed=0)}
    try:
        fns = {n: (lambda e=e, n=n: e.generate(states[n], prompts, gen, seed=0))
               for n, e in (("hybrid", hybrid), ("vllm", vllm))}
        # the prompts are the same every round: vLLM would serve a repeated prompt's whole
        # blocks from its prefix cache, which a PPO step's new prompts never find there
        return time_rounds(fns, a.rounds, before={"vllm": vllm.llm.reset_prefix_cache})
    finally:
        vllm.release()
        hybrid.release()


def sweep(a) -> tuple[list[dict], list[dict]]:
    """(table rows, per-round rows) over a's presets and batches."""
    from bench.flops import decode_roofline_s, shape_of
    from bench.machine import best_limits, measure_limits
    from core.models import build_bundle
    from core.types import torch_dtype
    dtype = torch_dtype(a.dtype)
    limits = best_limits({}, measure_limits(dtype=dtype, quick=a.quick_limits))
    table, samples = [], []
    for preset in a.presets:
        bundle = build_bundle(preset, seed=0, dtype=dtype, actor_only=True)
        shape = shape_of(bundle.actor, bundle.config)
        for batch in a.batches:
            rows = run_batch(preset, bundle, batch, a)
            limits = best_limits(limits, measure_limits(dtype=dtype, quick=a.quick_limits))
            for r, row in enumerate(rows):
                samples += [dict(preset=preset, dtype=a.dtype, batch=batch, round=r, engine=e,
                                 seconds=row[e]) for e in ENGINES]
            table.append(dict(preset=preset, dtype=a.dtype, batch=batch,
                              prompt_len=a.prompt_len, gen_len=a.gen_len, rounds=len(rows),
                              **summarize(rows), shape=shape))
            print(_line(table[-1]), flush=True)
        del bundle
    for row in table:  # against the best limits of the whole run
        row["roofline_s"] = decode_roofline_s(row.pop("shape"), row["batch"], a.prompt_len,
                                              a.gen_len, dtype.itemsize, limits["matmul_flops"],
                                              limits["mem_bw"])
        row["hybrid_roofline_frac"] = row["roofline_s"] / row["hybrid_s"]
        row["matmul_gflops"], row["mem_gbs"] = limits["matmul_flops"] / 1e9, limits["mem_bw"] / 1e9
    return table, samples


def _line(r: dict) -> str:
    return (f"{r['preset']} {r['dtype']} batch {r['batch']}: hybrid "
            f"{_with_interval(r['hybrid_s'], r['hybrid_lo'], r['hybrid_hi'])} s, vllm "
            f"{_with_interval(r['vllm_s'], r['vllm_lo'], r['vllm_hi'])} s, vllm/hybrid "
            f"{_with_interval(r['ratio'], r['ratio_lo'], r['ratio_hi'])}")


def markdown(df) -> str:
    lines = ["| preset | batch | hybrid s | vllm s | vllm / hybrid | hybrid decode roofline |",
             "|---|---|---|---|---|---|"]
    for r in df.to_dict("records"):
        lines.append(f"| {r['preset']} | {r['batch']} | "
                     f"{_with_interval(r['hybrid_s'], r['hybrid_lo'], r['hybrid_hi'])} | "
                     f"{_with_interval(r['vllm_s'], r['vllm_lo'], r['vllm_hi'])} | "
                     f"{_with_interval(r['ratio'], r['ratio_lo'], r['ratio_hi'])} | "
                     f"{r['hybrid_roofline_frac']:.2f} |")
    return "\n".join(lines)


def plot(df, path: Path) -> None:
    """Per preset: both engines' medians over batch (intervals as bars), and the ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    presets = list(dict.fromkeys(df.preset))
    fig, axes = plt.subplots(2, len(presets), figsize=(5 * len(presets), 7), squeeze=False)
    for i, preset in enumerate(presets):
        d = df[df.preset == preset].sort_values("batch")
        top, bottom = axes[0][i], axes[1][i]
        for e in ENGINES:
            top.errorbar(d.batch, d[f"{e}_s"], yerr=[d[f"{e}_s"] - d[f"{e}_lo"],
                         d[f"{e}_hi"] - d[f"{e}_s"]], marker="o", capsize=3, label=e)
        top.set(title=f"{preset}, {d.dtype.iloc[0]}", xscale="log", ylabel="generate, s")
        top.legend()
        bottom.errorbar(d.batch, d.ratio, yerr=[d.ratio - d.ratio_lo, d.ratio_hi - d.ratio],
                        marker="o", capsize=3, color="k")
        bottom.axhline(1.0, color="gray", lw=0.8)
        bottom.set(xscale="log", xlabel="batch", ylabel="vllm / hybrid time")
        for ax in (top, bottom):
            ax.set_xticks(list(d.batch), [str(b) for b in d.batch])
            ax.set_xticks([], minor=True)  # no labelled minor ticks between the batches
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse(argv)
    import engines
    why = engines.missing("vllm", "cpu")
    if why:
        print(f"hybrid_vs_vllm: vllm {why}", file=sys.stderr)
        return 2
    if a.dtype == "bfloat16" and not native_bf16():
        print("hybrid_vs_vllm: this CPU has no native bf16 (AVX-512 bf16 or AMX)",
              file=sys.stderr)
        return 2
    import pandas as pd
    torch.set_num_threads(a.threads)
    table, samples = sweep(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(table, columns=COLUMNS)
    df.to_csv(out / "sweep.csv", index=False)
    pd.DataFrame(samples).to_csv(out / "rounds.csv", index=False)
    plot(df, out / "sweep.png")
    print(markdown(df))
    print(f"limits: {df.matmul_gflops.iloc[0]:.0f} GFLOP/s matmul, {df.mem_gbs.iloc[0]:.1f} GB/s "
          f"read, {a.threads} threads; wrote {out}/sweep.csv, rounds.csv, sweep.png")
    return 0


if __name__ == "__main__":
    from bench.machine import respawn_with_huge_pages
    respawn_with_huge_pages("bench.micro.hybrid_vs_vllm")  # the workers' memory, as in `run`
    sys.exit(main())
