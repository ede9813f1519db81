"""rlhf-bench: run, sweep, report, compare, project."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would print a warning to stdout

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the one-line error every other bad input gets (no usage block);
    `--help` still shows the usage."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _run_args(p: argparse.ArgumentParser) -> None:
    from .options import add_flags
    p.add_argument("--config", help="TOML file whose keys are these options with _ for - "
                   "(compile = false for --no-compile); flags override it")
    add_flags(p)


SWEEP_AXES = ("batches", "gen_lens", "presets")


def options_from(args, axes: dict | None = None):
    """The run's options: the --config TOML's keys, overridden by the flags given. A sweep
    passes `axes`, which takes the TOML's sweep keys (batches, gen_lens, presets) as strings."""
    from .options import OPTIONS, ConfigError, from_dict, load_toml, validate
    d = load_toml(args.config) if getattr(args, "config", None) else {}
    if axes is not None:
        for k in SWEEP_AXES:
            v = d.pop(k, d.pop(k.replace("_", "-"), ""))  # gen_lens or gen-lens, as other keys
            if isinstance(v, list):  # batches = [1, 4, 16] as well as "1,4,16"
                v = ",".join(map(str, v))
            if not isinstance(v, str):
                raise ConfigError(f"config key {k!r}: expected a comma-separated string or a "
                                  f"list, got {v!r}")
            axes[k] = getattr(args, k) or v  # a flag overrides the file
    d.update({o.name: getattr(args, o.name) for o in OPTIONS
              if getattr(args, o.name) is not None})  # a flag not given reads None
    if d.get("out") == "":
        raise ConfigError("--out is empty: give a folder (default results/latest for run, "
                          "results/sweep for sweep)")
    return validate(from_dict(d))


def cmd_run(args) -> int:
    from .harness import run_benchmark
    return run_benchmark(options_from(args))


def cmd_sweep(args) -> int:
    from .sweep import sweep
    axes: dict = {}
    o = options_from(args, axes)
    return sweep(o, **axes)


def cmd_report(args) -> int:
    from pathlib import Path
    from .report import format_table, plot_phases, plot_sweep, summarize
    from .results import ResultsError, atomic_write_csv, load_run
    d = Path(args.dir)
    if (d / "sweep.csv").exists() and not (d / "results.json").exists():
        import pandas as pd
        try:
            df = pd.read_csv(d / "sweep.csv")
        except (ValueError, UnicodeDecodeError, OSError) as e:  # pandas' parser errors too
            raise ResultsError(f"{d / 'sweep.csv'}: not a readable sweep table "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        need = {"engine", "preset", "batch", "gen_len", "status", "gen_tokens_per_s"}
        if need - set(df.columns):
            raise ResultsError(f"{d / 'sweep.csv'}: not a sweep table (no "
                               f"{', '.join(sorted(need - set(df.columns)))})")
        numeric = ("batch", "gen_len", "gen_tokens_per_s")
        if df.empty or not all(pd.api.types.is_numeric_dtype(df[c]) for c in numeric):
            raise ResultsError(f"{d / 'sweep.csv'}: not a sweep table (no rows, or "
                               f"{', '.join(numeric)} not all numbers)")
        plot_sweep(df, d / "sweep.png")
        print(df.to_string(index=False))
        print(f"\nplot: {d / 'sweep.png'}")
        return 0
    data = load_run(d)
    with _malformed(d):
        df = summarize(data)
    print(format_table(df, data))
    if d.is_dir():
        atomic_write_csv(d / "summary.csv", df)
        plot_phases(df, d / "phases.png")
        print(f"\nplot: {d / 'phases.png'}")
    return 0


@contextlib.contextmanager
def _malformed(where):
    """A results file that passed load_results' checks but still breaks the summary: one line
    naming it, not a traceback."""
    from .results import ResultsError
    try:
        yield
    except (KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError, ValueError,
            OverflowError) as e:
        raise ResultsError(f"{where}: malformed results ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120] if str(e) else ''})")


def cmd_compare(args) -> int:
    from .compare import (compare, parse_percent, setup_differences, setup_mismatch,
                          workload_differences)
    from .results import ResultsError, load_run
    base, new = load_run(args.base), load_run(args.new)  # a killed run's finished steps kept
    slowdown, growth = parse_percent(args.max_slowdown), parse_percent(args.max_mem_growth)
    with _malformed(f"{args.base} or {args.new}"):  # judged first: a bad file prints no note
        table, problems, unsure = compare(base, new, slowdown, growth, absolute=args.absolute)
        differ = workload_differences(base, new)
        setup, mismatch = setup_differences(base, new), setup_mismatch(base, new)
    if differ and not args.allow_different_work:
        raise ResultsError(f"the runs measured different work: {', '.join(differ)} "
                           f"(--allow-different-work judges them anyway)")
    if differ:
        print(f"note: the runs measured different work: {', '.join(differ)}; judged as "
              f"asked", file=sys.stderr)
    without = [p for p, d in ((args.base, base), (args.new, new))
               if "hf" not in d["options"].get("engines_run", [])]
    hf_aside = ("" if not mismatch or without or args.absolute else
                "; hf's own times and memory are not judged")
    if setup:
        print(f"note: the runs' setups differ: {', '.join(setup)}; speed ratios to hf move "
              f"with these too, so a change may be theirs, not the code's{hf_aside}",
              file=sys.stderr)
    elif hf_aside:
        print(f"note: the runs' setups are not known to match: {', '.join(mismatch)}"
              f"{hf_aside}", file=sys.stderr)
    if without and not args.absolute:
        print(f"note: no hf in {', '.join(map(str, without))}: comparing raw seconds, as "
              f"--absolute does (meaningful on the same machine only)", file=sys.stderr)
    if unsure:
        print(f"note: inconclusive (the change's interval straddles the limit, or too few "
              f"steps give none): {', '.join(unsure)}; more --steps narrow it"
              + ("" if args.strict else ", --strict fails on it"), file=sys.stderr)
    import pandas as pd
    with pd.option_context("display.width", 200, "display.float_format",
                           lambda v: f"{v:.4g}"):
        print(table.to_string(index=False) if len(table) else "(nothing to compare)")
    print(f"change: new/base with its 95% interval (low, high); a regression where the "
          f"interval lies above {1 + slowdown:.4g} (time) or the change above "
          f"{1 + growth:.4g} (memory)")
    if problems or (unsure and args.strict):
        print("\nREGRESSIONS:" if problems else "\nINCONCLUSIVE (--strict):")
        for p in problems or unsure:
            print("  " + p)
        return 1
    print("\nno regression" + (f" ({len(unsure)} inconclusive)" if unsure else ""))
    return 0


def cmd_project(args) -> int:
    from .projection.cli import run_projection
    return run_projection(args)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlhf-bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compare engines on identical PPO steps")
    _run_args(r)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("sweep", help="run over batch sizes, answer lengths and presets")
    _run_args(s)
    s.add_argument("--batches", default="", help="comma-separated batch sizes")
    s.add_argument("--gen-lens", default="", help="comma-separated answer lengths")
    s.add_argument("--presets", default="", help="comma-separated presets")
    s.set_defaults(func=cmd_sweep)
    rp = sub.add_parser("report", help="re-print a run's summary and write its plots")
    rp.add_argument("dir")
    rp.set_defaults(func=cmd_report)
    c = sub.add_parser(
        "compare", help="judge NEW against BASE; exit 1 on a regression",
        description="Judge NEW against BASE, per engine and phase (and peak memory), by the "
        "95% interval of the change in the median over the measured rounds: REGRESSED when "
        "the interval lies above the limit, inconclusive when it straddles it, ok otherwise. "
        "Times are per-round ratios to hf unless --absolute; hf's own are judged in seconds "
        "when both runs share machine and software. Exit 1 on a regression, 2 when the runs "
        "measured different work.")
    c.add_argument("base")
    c.add_argument("new")
    c.add_argument("--max-slowdown", default="10%",
                   help="largest allowed growth of a phase's median time (vs hf's in the same "
                        "round, unless --absolute); a regression when the whole interval lies "
                        "above it: 10%% or 0.1 (default 10%%)")
    c.add_argument("--max-mem-growth", default="10%",
                   help="largest allowed growth of peak memory (the process's and "
                        "generation's), as --max-slowdown (default 10%%)")
    for flag, text in (
            ("--absolute", "judge every engine's raw seconds instead of ratios to hf (same "
                           "machine only)"),
            ("--strict", "exit 1 on an inconclusive line too (an interval that straddles the "
                         "limit: too few steps or too much noise to decide)"),
            ("--allow-different-work", "judge runs whose work differs (batch, lengths, "
                                       "preset, dtype...) instead of refusing them")):
        c.add_argument(flag, action="store_true", help=text)
    c.set_defaults(func=cmd_compare)
    pj = sub.add_parser("project", help="predict PPO step time on GPU clusters")
    try:
        from .projection.cli import add_arguments
        add_arguments(pj)
    except ImportError:
        pass
    pj.set_defaults(func=cmd_project)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from .options import ConfigError
    from .results import ResultsError
    try:
        code = args.func(args)
    except (ConfigError, ResultsError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"rlhf-bench {args.cmd}: error: {msg}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("rlhf-bench: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
