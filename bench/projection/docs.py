"""Regenerate the generated parts of docs/projection.md: `python -m bench.projection.docs`.

A generated part sits between `<!-- generated: KIND ARGS -->` and `<!-- end -->` and is rebuilt
from `rlhf-bench project ARGS`; the prose around the parts is kept as written. KIND:
  stamp      the day, commit and machine of this regeneration, and its command
  output     the command and all it prints
  summary    the command, then hours (dominant phase) per model and GPU count, one column per
             engine; `*` where the search chose settings
  hours      a sentence: the command's hours on each GPU count, in engine order
  published  the command, then DeepSpeed-Chat's published hours beside what it prints given only
             model, GPUs and GPU kind
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shlex
import subprocess
import tempfile
import textwrap
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "projection.md"
COMMAND = "python -m bench.projection.docs"
PRICED = ("bench/projection", "bench/flops.py", ":!bench/projection/docs.py")   # the numbers' code
PART = re.compile(r"(<!-- generated: (\w+) ?([^\n]*?) -->\n)(?s:.*?)(<!-- end -->)")


def project(args: str):
    """(what `rlhf-bench project ARGS` prints, its rows as a DataFrame)."""
    import pandas as pd

    from .cli import add_arguments, run_projection
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.csv"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            run_projection(parser.parse_args([*shlex.split(args), "--out", str(out)]))
        df = pd.read_csv(out, dtype={"chosen": str})
    return printed.getvalue(), df.assign(chosen=df["chosen"].fillna(""))


def wrapped(args: str) -> str:
    lines = textwrap.wrap(f"rlhf-bench project {args}", 92, break_on_hyphens=False)
    return " \\\n    ".join(lines)


def cell(row) -> str:
    if not row.fits:
        return "does not fit"
    return f"{row.total_hours:.3g} h ({row.dominant_phase})" + ("*" if row.chosen else "")


def output(args: str) -> str:
    return f"```\n$ rlhf-bench project {args}\n{project(args)[0]}```\n"


def summary(args: str) -> str:
    df = project(args)[1]
    engines = list(dict.fromkeys(df["engine"]))
    lines = [f"| model | GPUs | {' | '.join(engines)} |", "|---|---|" + "---|" * len(engines)]
    for (model, gpus), g in df.groupby(["model", "gpus"], sort=False):
        cells = [cell(g[g.engine == e].iloc[0]) for e in engines]
        lines.append(f"| {model} | {gpus} | " + " | ".join(cells) + " |")
    return f"```\n{wrapped(args)}\n```\n\n" + "\n".join(lines) + "\n"


def hours(args: str) -> str:
    df = project(args)[1]
    said = []
    for (gpus, gpu), g in df.groupby(["gpus", "gpu"], sort=False):
        h = [f"{x:.2f}" for x in g.total_hours]
        said.append(f"{', '.join(h[:-1])} and {h[-1]} h on {gpus} {gpu.upper()}s "
                    f"({', '.join(g.dominant_phase)})")
    return f"`rlhf-bench project {args}` gives {' and '.join(said)}.\n"


def published(_: str = "") -> str:
    from .calibration import calibration_table
    from .search import KNOBS
    df = calibration_table()
    df = df[df["set"] == "as asked"]
    lines = ["```\nrlhf-bench project --model MODEL --gpus GPUS --gpu GPU\n```\n",
             "| GPUs | GPU | model | published | projected | ratio | batch | settings "
             "(* chosen by the search) |", "|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        star = {k: "*" if k in r.chosen.split(",") else "" for k in KNOBS}
        settings = [f"ZeRO-{r.zero_stage}{star['zero_stage']}"]
        settings += [f"offload{star['offload']}"] if r.offload else []
        settings += [f"TP {r.inference_tp}{star['inference_tp']}"] if r.inference_tp > 1 else []
        settings += [f"LoRA {r.lora_dim}{star['lora_dim']}"] if r.lora_dim else []
        lines.append(f"| {r.gpus} | {r.gpu} | {r.model} | {r.published_hours:.3g} h | "
                     f"{r.total_hours:.3g} h | {r.ratio:.2f} | {r.batch}{star['batch']} | "
                     f"{', '.join(settings)} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", *PRICED)
    return head + (" and the changes to the model committed with this page" if dirty.strip()
                   else "")


def stamp(_: str = "") -> str:
    text = (f"Generated {date.today().isoformat()} from commit {commit()}, on {machine()}, by "
            f"`{COMMAND}` (the numbers are arithmetic: the same on any machine).")
    return textwrap.fill(text, 100) + "\n"


RENDER = {"stamp": stamp, "output": output, "summary": summary, "hours": hours,
          "published": published}


def regenerate(text: str, kinds=tuple(RENDER)) -> str:
    """`text` with each generated part of a kind in `kinds` rebuilt from its command."""
    def part(m: re.Match) -> str:
        head, kind, args, end = m.groups()
        if kind not in RENDER:
            raise ValueError(f"docs/projection.md: unknown generated part {kind!r}")
        return head + RENDER[kind](args) + end if kind in kinds else m.group(0)
    return PART.sub(part, text)


def main() -> int:
    from ..results import atomic_write_text
    text = DOC.read_text(encoding="utf-8")
    atomic_write_text(DOC, regenerate(text))
    print(f"{DOC.relative_to(ROOT)}: {len(PART.findall(text))} parts regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
