"""bench/micro/hybrid_vs_vllm.py on opt-mini (the smallest preset vLLM's CPU attention takes):
its table has the columns it promises, each median and the ratio come from the rounds it wrote
(the ratio paired per round, not a ratio of medians), and bad options are one-line errors.
No timing is asserted."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import engines
from bench.micro import hybrid_vs_vllm as sweep
from bench.stats import median_ci


def test_bad_options_are_one_line_errors():
    for args in (["--batches", "0"], ["--presets", "no-such-model"], ["--rounds", "0"]):
        r = subprocess.run([sys.executable, "-m", "bench.micro.hybrid_vs_vllm", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.skipif(engines.missing("vllm", "cpu") is not None, reason="vllm not installed")
def test_table_from_its_rounds(tmp_path):
    assert sweep.main(["--presets", "opt-mini", "--batches", "2", "--rounds", "6",
                       "--prompt-len", "6", "--gen-len", "4", "--vllm-eager", "--quick-limits",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "sweep.csv")
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert list(table.columns) == sweep.COLUMNS and len(table) == 1
    assert (tmp_path / "sweep.png").stat().st_size > 0
    row = table.iloc[0]
    by = rounds.pivot(index="round", columns="engine", values="seconds")
    assert len(by) == 6 and by.notna().all().all()
    for e in sweep.ENGINES:
        assert row[f"{e}_s"] == pytest.approx(by[e].median())
        assert row[f"{e}_lo"] <= row[f"{e}_s"] <= row[f"{e}_hi"]
    paired = median_ci(by.vllm / by.hybrid)
    assert (row.ratio, row.ratio_lo, row.ratio_hi) == pytest.approx(paired)
    assert row.roofline_s > 0 and row.hybrid_roofline_frac == pytest.approx(
        row.roofline_s / row.hybrid_s)


def test_time_rounds_runs_each_hook_before_its_engine_s_timed_calls_only():
    events = []
    fns = {"hybrid": lambda: events.append("hybrid"), "vllm": lambda: events.append("vllm")}
    rows = sweep.time_rounds(fns, 3, before={"vllm": lambda: events.append("reset")})
    assert len(rows) == 3 and all(set(r) == {"hybrid", "vllm"} for r in rows)
    # warm-up unhooked, then the pair alternating, the reset just ahead of every timed vllm call
    assert events == ["hybrid", "vllm", "hybrid", "reset", "vllm", "reset", "vllm", "hybrid",
                      "hybrid", "reset", "vllm"]


def test_decode_linears_runs_each_case_and_refuses_bad_rows():
    """bench/micro/decode_linears.py: one line per row count naming every case (no timing
    asserted); bad options are one-line errors."""
    from engines import kernels as K
    for args in (["--rows", "0"], ["--rows", "x"], ["--repeats", "0"]):
        r = subprocess.run([sys.executable, "-m", "bench.micro.decode_linears", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    if not K.available():
        pytest.skip(f"the kernels are unavailable here: {K.why_unavailable()}")
    r = subprocess.run([sys.executable, "-m", "bench.micro.decode_linears", "--rows", "1,3",
                        "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["rows 1", "rows 3"]
    for case in ("fp32 kernel", "fp32 oneDNN", "bf16 kernel, widening", "bf16 oneDNN",
                 "torch.sum of 512 MB read"):
        assert all(f"{case} " in ln for ln in lines), (case, lines)
    assert all(("vdpbf16ps" in ln) == K.set_bf16dp(True) for ln in lines)
