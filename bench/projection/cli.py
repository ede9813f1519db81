"""`rlhf-bench project` (and `python -m bench.projection`): the options, the configurations they
ask for, the table printed, the CSV and PNG written."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..results import atomic_write, int_list
from .calibration import calibration_table
from .measured import load_efficiency
from .model import STEP_PARTS, Config, auto_tp, check_config, predict
from .presets import ENGINES, GPUS, MODELS, SWEEP_GPUS, SWEEP_MODELS
from .search import fits, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rlhf-bench project`. --model, --gpus and --engine take comma-separated lists."""
    a = parser.add_argument
    a("--model", default=None,
      help=f"actor(s): {', '.join(MODELS)} (default opt-1.3b; --sweep: 1.3b..175b)")
    a("--gpus", default=None, help="GPU count(s) (default 1; --sweep: 1,2,4,...,64)")
    a("--gpu", default="a100-80g", help=f"one of {', '.join(GPUS)}")
    a("--engine", default="ds-hybrid", help=f"engine(s): {', '.join(ENGINES)}")
    a("--critic", default=None, help="critic and reward model (default: opt-350m for OPT actors, "
      "as DeepSpeed-Chat; the actor's own shape for the others)")
    # the knobs: left out, 3 / 1 / 0 / no offload / the largest batch, or where that does not
    # fit, the fastest setting that does (search.py); a knob given is never changed
    a("--zero-stage", type=int, default=None,
      help="ZeRO stage of actor and critic training (0-3; default 3)")
    a("--inference-tp", default=None,
      help="tensor-parallel degree of generation, or 'auto' (default 1)")
    a("--lora-dim", type=int, default=None, help="LoRA rank; > 0 trains only the adapters "
      "(default 0: full training)")
    a("--offload", action="store_true", help="ZeRO-Offload: Adam states in host memory, CPU Adam")
    a("--no-grad-ckpt", action="store_true", help="no activation checkpointing")
    a("--tokens", type=float, default=135e6, help="token budget, prompt + answer tokens")
    a("--prompt-len", type=int, default=256)
    a("--gen-len", type=int, default=256)
    a("--batch", type=int, default=None, help="global batch, prompts (default: largest that fits)")
    a("--efficiency", default=None, metavar="RUN_DIR",
      help="a harness run's results dir (summary.csv, results.json) to read achieved "
      "efficiencies from")
    a("--sweep", action="store_true", help="OPT 1.3B..175B x 1..64 GPUs")
    a("--calibration", action="store_true", help="DeepSpeed-Chat's published table beside ours")
    a("--out", default=None, help="write the rows as CSV")
    a("--plot", default=None, help="write a PNG of hours vs GPUs and the phase shares")


def given_knobs(args) -> frozenset[str]:
    """The knobs (search.KNOBS) the command line sets; `--inference-tp auto` leaves TP open."""
    tp = args.inference_tp
    given = {"zero_stage": args.zero_stage is not None, "lora_dim": args.lora_dim is not None,
             "inference_tp": tp is not None and str(tp).strip().lower() != "auto",
             "offload": getattr(args, "offload", False), "batch": args.batch is not None}
    return frozenset(k for k, v in given.items() if v)


def configs_from_args(args) -> list[Config]:
    """The configurations a command line asks for (a cartesian product of the lists), each with
    the knobs it leaves open at their defaults."""
    models = args.model.split(",") if args.model else (
        list(SWEEP_MODELS) if args.sweep else ["opt-1.3b"])
    gpu_counts = int_list(args.gpus, "--gpus") if args.gpus else (
        list(SWEEP_GPUS) if args.sweep else [1])
    tp_text = "1" if args.inference_tp is None else str(args.inference_tp)
    tp_auto = tp_text.strip().lower() == "auto"
    tp = 1 if tp_auto else int_list(tp_text, "--inference-tp")[0]
    efficiencies = {}
    out = []
    for engine in args.engine.split(","):
        if engine in ENGINES and args.efficiency:
            efficiencies[engine] = load_efficiency(args.efficiency, engine)
        eff, source = efficiencies.get(engine, (None, "defaults"))
        for model in models:
            for n in gpu_counts:
                if args.sweep and not tp_auto and n % tp:
                    continue                   # a sweep skips GPU counts the TP degree cannot split
                cfg = Config(model=model, gpus=n, gpu=args.gpu, engine=engine,
                             zero_stage=3 if args.zero_stage is None else args.zero_stage,
                             inference_tp=tp, lora_dim=args.lora_dim or 0,
                             tokens=args.tokens, prompt_len=args.prompt_len, gen_len=args.gen_len,
                             batch=args.batch, grad_ckpt=not getattr(args, "no_grad_ckpt", False),
                             offload=getattr(args, "offload", False),
                             critic=getattr(args, "critic", None), eff=eff, eff_source=source)
                check_config(cfg)
                if tp_auto:
                    cfg = dataclasses.replace(cfg, inference_tp=auto_tp(cfg))
                out.append(cfg)
    return out


def plot_projection(df, path: str) -> None:
    """Left: projected hours vs GPUs per model and engine. Right: each phase's share of the step
    at the largest GPU count in the table. Rows that do not fit are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = df[df["batch"] > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for (model, engine), g in ok.groupby(["model", "engine"], sort=False):
        left.plot(g["gpus"], g["total_hours"], marker="o", label=f"{model} {engine}")
    left.set_xscale("log", base=2)
    left.set_xticks(sorted(df["gpus"].unique()), [str(n) for n in sorted(df["gpus"].unique())])
    left.set(yscale="log", xlabel="GPUs", ylabel="hours for the token budget",
             title=f"RLHF PPO (step 3) on {', '.join(df['gpu'].unique())}")
    if not ok.empty:
        left.legend(fontsize=7)
        last = ok[ok["gpus"] == ok["gpus"].max()]
        share = last[[f"{p}_s" for p in STEP_PARTS]].div(last["step_s"], axis=0)
        share.index = last["model"] + " " + last["engine"]
        share.columns = list(STEP_PARTS)
        share.plot.barh(stacked=True, ax=right)
        right.set(xlabel="share of step time", title=f"phases at {ok['gpus'].max()} GPUs")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


SHOWN = {"model": "model", "gpus": "gpus", "gpu": "gpu", "engine": "engine", "batch": "batch",
         "zero_stage": "zero", "inference_tp": "tp", "lora": "lora", "offload": "offload",
         "fits": "fits", "mem_gib": "GiB/gpu", "generate_s": "gen_s", "sync_s": "sync_s",
         "score_s": "score_s", "train_s": "train_s", "comm_s": "comm_s", "step_s": "step_s",
         "total_hours": "hours", "dominant_phase": "dominant", "efficiency": "efficiency"}


def format_projection(df) -> str:
    """The rows with their assumptions (batch, ZeRO stage, TP, LoRA, offload, efficiencies); a
    setting the search chose because the given ones did not fit is marked `*`."""
    import pandas as pd
    df = df.assign(lora=[f"{d}+base" if d and not only else str(d)
                         for d, only in zip(df["lora_dim"], df["lora_only"])])
    if "chosen" in df.columns:
        chosen = df["chosen"].fillna("").str.split(",")
        for knob, col in (("batch", "batch"), ("zero_stage", "zero_stage"),
                          ("inference_tp", "inference_tp"), ("lora_dim", "lora"),
                          ("offload", "offload")):
            df[col] = [f"{v}*" if knob in c else str(v) for v, c in zip(df[col], chosen)]
    cols = {k: v for k, v in SHOWN.items() if k in df.columns}
    extra = [c for c in ("published_hours", "ratio", "set", "settings") if c in df.columns]
    with pd.option_context("display.width", 300, "display.max_columns", 40,
                           "display.max_colwidth", 80):
        return df[list(cols) + extra].rename(columns=cols).round(2).to_string(index=False)


def run_projection(args) -> int:
    """`rlhf-bench project`: print the projected table, write --out CSV and --plot PNG."""
    import pandas as pd
    for flag in ("out", "plot"):
        path = getattr(args, flag, None)
        if path and Path(path).is_dir():
            raise ValueError(f"--{flag} {path} is a folder; give a file name")
    notes = []
    if getattr(args, "calibration", False):
        df = calibration_table()
    else:
        given = given_knobs(args)
        choices = [resolve(cfg, given) for cfg in configs_from_args(args)]
        if not any(fits(c.cfg) for c in choices):   # no answer to the question asked
            raise ValueError(choices[0].note)
        df = pd.DataFrame([{**predict(c.cfg), "chosen": ",".join(c.chosen), "note": c.note}
                           for c in choices])
        notes = [c.note for c in choices if c.note]
    print(format_projection(df))
    if notes:
        print("* chosen because the settings as given do not fit, or fit a starved batch:"
              if df["chosen"].any()
              else "settings that do not fit:")
        for note in dict.fromkeys(notes):
            print(f"  {note}")
    for name in df["gpu"].unique():
        g = GPUS[name]
        print(f"{name}: {g.bf16_flops / 1e12:.0f} TFLOP/s {g.dtype}, {g.hbm_bw / 1e12:.3g} TB/s "
              f"memory, {g.memory / 2 ** 30:.0f} GiB, {g.link} {g.nvlink_bw / 1e9:.0f} GB/s, "
              f"IB {g.ib_bw / 1e9:.3g} GB/s per GPU per direction")
    pairs = dict.fromkeys(f"{m} -> {c}" for m, c in zip(df["model"], df["critic"]))
    print(f"critic and reward model: {', '.join(pairs)}")
    prompts = args.tokens / (args.prompt_len + args.gen_len)
    print(f"efficiencies: {'; '.join(df['eff_source'].unique())}; tokens {args.tokens:.4g} = "
          f"{prompts:,.0f} prompts x ({args.prompt_len} + {args.gen_len})")
    if args.out:
        atomic_write(args.out, lambda tmp: df.to_csv(tmp, index=False))
    if args.plot:
        plot_projection(df, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m bench.projection`); rlhf-bench calls run_projection."""
    class OneLine(argparse.ArgumentParser):   # usage mistakes: one line, as rlhf-bench's own
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
    parser = OneLine(prog="rlhf-bench project", description="Scale projection: predict RLHF PPO "
                     "step time on GPU clusters from first principles.")
    add_arguments(parser)
    try:
        return run_projection(parser.parse_args(argv))
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
