"""The harness end to end: two engines on tiny-opt, files, summary schema, crash isolation,
FLOP counts and the roofline (compare: test_compare.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench import flops as F
from bench.report import SUMMARY_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["engine", "status", "gen_s", "sync_s", "score_s", "train_s", "step_s",
            "gen_tokens_per_s", "samples_per_s", "peak_mem_mb", "weight_copies",
            "parity_max_abs_diff", "decode_roofline_frac"]


def cli(*args, check=None, timeout=600):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=timeout)
    if check is not None:
        assert p.returncode == check, p.stdout + p.stderr
    return p


def _wait_for(out, timeout: float, done, every: float = 0.5):
    """Poll a running harness's results.json until done(data); returns data, or None when
    `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(every)
        try:
            data = json.loads((out / "results.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if done(data):
            return data
    return None


def _steps(data, engine: str) -> set:
    """Steps of `engine` with a step row in a results dict."""
    return {r["step"] for r in data["rows"] if r["engine"] == engine and r["phase"] == "step"}


RUN = ["--preset", "tiny-opt", "--batch", "2", "--prompt-len", "8", "--gen-len", "8",
       "--steps", "2", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def two_engine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    p = cli("run", "--engines", "hf,hybrid", *RUN, "--out", out, check=0)
    return out, p


def test_run_writes_json_csv_and_summary(two_engine_run):
    out, p = two_engine_run
    data = json.loads((out / "results.json").read_text())
    assert data["version"] == 1 and set(data["engines"]) == {"hf", "hybrid"}
    for key in ("matmul_flops", "mem_bw", "threads"):
        assert data["limits"][key] > 0
    for key in ("cpu", "torch", "transformers", "git_commit", "huge_pages"):
        assert key in data["env"]
    assert data["env"]["threads"] == data["limits"]["threads"] == 1  # --threads 1, as run
    rows = pd.read_csv(out / "rows.csv")
    assert list(rows.columns) == ["engine", "step", "phase", "metric", "value", "unit"]
    steps = rows[(rows.metric == "seconds") & (rows.phase == "step")]
    assert sorted(steps[steps.engine == "hybrid"].step) == [0, 1, 2]  # warm-up + 2 measured
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert set(REQUIRED) <= set(summary.columns)
    assert list(summary.engine) == ["hf", "hybrid"] and (summary.status == "ok").all()
    assert summary.notna()[REQUIRED].all().all()
    assert summary.set_index("engine").loc["hybrid", "parity_max_abs_diff"] < 1e-4
    # counted from the tensors each worker held after its probe: what the engines declare
    assert ((summary.weight_copies_measured - summary.weight_copies).abs() <= 0.25).all()
    assert (summary.parity_divergence_margin < 2e-3).all()  # measured for both, within ties
    # hf's largest top logit, read by both from the reference; fp32's spacing there is far
    # below the default, which therefore stands
    assert (summary.parity_logit_scale > 0).all() and summary.parity_logit_scale.nunique() == 1
    assert (summary.parity_tol == 1e-3).all() and data["parity_tolerance"]["max_abs_diff"] == 1e-3
    assert data["parity_tolerance"]["logit_scale"] == pytest.approx(summary.parity_logit_scale[0])
    assert "gen_tokens_per_s" in p.stdout and "hybrid" in p.stdout  # the printed table
    assert "parity tolerance: 0.001 nats from hf's log-probs (hf's largest top logit" in p.stdout
    assert (out / "phases.png").stat().st_size > 1000
    # stderr is a pipe here, as in CI logs: one progress line per round, and each engine's end
    for k in (1, 2, 3):
        assert f"round {k} of 3: hf, hybrid" in p.stderr, p.stderr
    for name in ("hf", "hybrid"):
        assert f"{name}: ok" in p.stderr
    # a multi-rank run's process group per engine takes its port from the run's engine list
    assert [json.loads((out / "engines" / f"{name}.spec.json").read_text())["engine_index"]
            for name in ("hf", "hybrid")] == [0, 1]


def test_engines_step_in_interleaved_rounds(two_engine_run):
    """Round k runs hf's step k, then hybrid's, before either's step k+1; only one computes at
    a time, and each measured step carries its round."""
    from bench.results import read_jsonl
    out, _ = two_engine_run
    done = {n: [e for e in read_jsonl(out / "engines" / f"{n}.jsonl")
                if e.get("event") == "stepped"] for n in ("hf", "hybrid")}
    assert [e["round"] for e in done["hf"]] == [e["round"] for e in done["hybrid"]] == [0, 1, 2]
    spans = sorted((e["began"], e["ended"], n) for n, evs in done.items() for e in evs)
    assert [n for *_, n in spans] == ["hf", "hybrid"] * 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    data = json.loads((out / "results.json").read_text())
    assert data["schedule"] == {"mode": "interleaved", "groups": [["hf", "hybrid"]]}
    rounds = [r["value"] for r in data["rows"] if r["metric"] == "round" and r["engine"] == "hf"]
    assert rounds == [0, 1, 2]


def test_workers_and_in_process_benchmarks_ask_for_huge_pages(monkeypatch):
    """Every engine's process gets the same allocator settings: added to the user's own glibc
    tunables, never twice, none with RLHF_BENCH_HUGE_PAGES=0; an in-process benchmark starts
    itself again with them, once."""
    from bench import machine
    monkeypatch.delenv("RLHF_BENCH_HUGE_PAGES", raising=False)
    env = machine.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                   "A": "1", "THP_MEM_ALLOC_ENABLE": "1"}
    assert machine.with_huge_pages(env) == env
    calls = []
    monkeypatch.setattr(machine.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(machine.sys, "argv", ["prog", "--batches", "8"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    machine.respawn_with_huge_pages("bench.micro.x")
    (exe, argv, child), = calls
    assert argv == [exe, "-m", "bench.micro.x", "--batches", "8"]
    assert "glibc.malloc.hugetlb=1" in child["GLIBC_TUNABLES"]
    monkeypatch.setenv("GLIBC_TUNABLES", child["GLIBC_TUNABLES"])
    machine.respawn_with_huge_pages("bench.micro.x")
    monkeypatch.setenv("RLHF_BENCH_HUGE_PAGES", "0")
    monkeypatch.delenv("GLIBC_TUNABLES")
    machine.respawn_with_huge_pages("bench.micro.x")
    assert len(calls) == 1
    assert machine.with_huge_pages({"A": "1"}) == {"A": "1"}
    assert machine.huge_pages() in ("always", "never", "not asked", "unknown")


def test_an_engines_ranks_meet_on_the_port_of_its_place_in_the_run(monkeypatch):
    """MASTER_PORT + 1 + the engine's place in the run's list: registering an engine moves no
    other engine's port, and successive engines never share a rendezvous."""
    import types

    import torch.distributed as dist

    from bench import distributed
    from bench.options import BenchOptions
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(k, v)
    seen = []
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **kw: seen.append(os.environ["MASTER_PORT"]))
    rec = types.SimpleNamespace(held=None)
    for index in (0, 3):
        monkeypatch.setenv("MASTER_PORT", "29600")
        assert distributed.setup(BenchOptions(threads=1), index, rec) is not None
    assert seen == ["29601", "29604"] and rec.held == []


def test_report_reprints_and_plots(two_engine_run):
    out, _ = two_engine_run
    (out / "phases.png").unlink()
    p = cli("report", out, check=0)
    assert "hybrid" in p.stdout and (out / "phases.png").exists()
    env = json.loads((out / "results.json").read_text())["env"]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("measured on: "))
    assert line.startswith(f"measured on: {env['cpu']}") and f"{env['threads']} threads" in line
    assert f"torch {env['torch']}" in line and "GB/s read" in line


def test_setup_line_names_the_gpu_or_the_cpu_and_skips_what_is_unknown():
    from bench.report import setup_line
    assert setup_line({}) is None and setup_line({"env": None, "limits": {}}) is None
    cpu = dict(cpu="AMD EPYC", cpu_isa="avx2 fma avx512f", threads=2, torch="2.13.0+cpu")
    assert setup_line({"env": cpu, "limits": dict(matmul_flops=1.855e11, mem_bw=3.31e10)}) == (
        "measured on: AMD EPYC (avx2 fma avx512f), 2 threads, torch 2.13.0+cpu, limits 186 "
        "GFLOP/s matmul, 33.1 GB/s read")
    gpu = dict(cpu, gpu="NVIDIA H200", deepspeed="0.19.8")
    assert setup_line({"env": gpu, "options": {"device": "cuda"}, "limits": dict(
        matmul_flops=7.9e14, mem_bw=4.3e12)}) == (
        "measured on: NVIDIA H200, 2 threads, torch 2.13.0+cpu, deepspeed 0.19.8, limits 790 "
        "TFLOP/s matmul, 4.3 TB/s read")
    # a CPU run on a machine that has a GPU is the CPU's run
    assert setup_line({"env": gpu, "options": {"device": "cpu"}}).startswith(
        "measured on: AMD EPYC (avx2 fma avx512f), 2 threads")
    # the pages the CPU's memory came in, which move its read rate
    assert setup_line({"env": dict(cpu, huge_pages="asked")}) == (
        "measured on: AMD EPYC (avx2 fma avx512f), 2 threads, huge pages asked, torch "
        "2.13.0+cpu")


def test_resume_refusals_name_whole_machine_strings_and_every_work_option(tmp_path):
    from bench.options import BenchOptions, ConfigError
    from bench.harness import check_same_setup, resumable
    with pytest.raises(ConfigError, match=r"cpu Intel\(R\) Xeon\(R\) Gold 6148 -> Intel\(R\) "
                                          r"Xeon\(R\) Gold 6248"):
        check_same_setup({"cpu": "Intel(R) Xeon(R) Gold 6148"}, {"cpu": "Intel(R) Xeon(R) Gold 6248"})
    with pytest.raises(ConfigError, match="cpu_isa avx2 fma -> avx2 fma avx512f"):
        check_same_setup({"cpu": "AMD EPYC", "cpu_isa": "avx2 fma"},
                         {"cpu": "AMD EPYC", "cpu_isa": "avx2 fma avx512f"})
    with pytest.raises(ConfigError, match="world_size 2 -> 1"):
        check_same_setup({"world_size": 2}, {"world_size": 1})
    check_same_setup({"cpu": "x", "gpu": None}, {"cpu": "x", "gpu": "H100"})  # unknown: not judged
    o = BenchOptions(zero_stage=2)
    (tmp_path / "results.json").write_text(json.dumps(dict(
        version=1, options=dict(o.to_dict(), offload=True, engines_run=["hf"]), engines={},
        rows=[])))
    with pytest.raises(ConfigError, match=r"options differ from the saved run \(offload\)"):
        resumable(tmp_path, o)


def test_killed_engine_is_failed_and_the_other_keeps_its_rows(tmp_path):
    out = tmp_path / "k"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    args = ["run", "--engines", "hf,hybrid", "--preset", "tiny-opt", "--batch", "2",
            "--prompt-len", "8", "--gen-len", "64", "--steps", "200", "--warmup", "0",
            "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    data = _wait_for(out, 300, lambda d: d["engines"].get("hf", {}).get("status") == "running"
                     and len(_steps(d, "hf")) >= 2)
    assert data is not None, "hf never reached step 2"
    os.kill(data["engines"]["hf"]["pid"], signal.SIGKILL)
    # the surviving engine goes on with its 200 steps; once it has measured one, stop the run
    # cleanly with SIGINT
    _wait_for(out, 240, lambda d: len(_steps(d, "hybrid")) >= 1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    data = json.loads((out / "results.json").read_text())
    assert data["engines"]["hf"]["status"].startswith("failed: exit -9 (killed by signal 9)")
    assert "out-of-memory killer" in data["engines"]["hf"]["status"]  # the usual sender
    assert len(_steps(data, "hf")) >= 2  # what hf measured before dying is kept
    hy_rows = [r for r in data["rows"] if r["engine"] == "hybrid"]
    assert any(r["phase"] == "step" for r in hy_rows)  # the other engine ran and was saved
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr  # says how to go on


def test_time_budget_shares_what_is_left():
    from bench.options import BenchOptions
    from bench.harness import engine_limit
    o = BenchOptions(time_budget=400)
    assert engine_limit(o, spent=0, left=4) == 100
    assert engine_limit(o, spent=40, left=3) == 120      # what the first left unused goes on
    assert engine_limit(o, spent=500, left=1) == 0       # spent: the caller does not start it
    assert engine_limit(BenchOptions(time_budget=400, engine_timeout=50), 0, 4) == 50
    assert engine_limit(BenchOptions(engine_timeout=50), 0, 4) == 50
    assert engine_limit(BenchOptions(), 0, 4) is None


def test_time_budget_stops_engines_and_keeps_their_rows(tmp_path):
    out = tmp_path / "b"
    p = cli("run", "--engines", "hf,hybrid", "--preset", "tiny-opt", "--batch", "2",
            "--prompt-len", "8", "--gen-len", "64", "--steps", "500", "--warmup", "0",
            "--threads", "1", "--time-budget", "24", "--out", out)
    assert p.returncode == 1, p.stdout + p.stderr
    data = json.loads((out / "results.json").read_text())
    hf, hy = data["engines"]["hf"]["status"], data["engines"]["hybrid"]["status"]
    assert hf == "failed: timed out after 12 s", hf         # half of 24 s
    assert hy.startswith("failed: timed out after "), hy    # the rest, less the polling lag
    assert int(hy.split()[-2]) <= 12
    assert _steps(data, "hf")                                # what it measured is kept


def test_sweep_time_budget_covers_the_whole_grid(tmp_path):
    p = cli("sweep", "--engines", "hf", "--preset", "tiny-opt", "--batches", "2,3,4",
            "--prompt-len", "8", "--gen-len", "8", "--steps", "200", "--warmup", "0",
            "--threads", "1", "--time-budget", "9", "--out", tmp_path / "s")
    assert p.returncode == 1, p.stdout + p.stderr
    first = json.loads((tmp_path / "s" / "tiny-opt_b2_g8" / "results.json").read_text())
    assert first["options"]["time_budget"] == pytest.approx(3, abs=0.1)  # 9 s over 3 points
    assert first["engines"]["hf"]["status"] == "failed: timed out after 3 s"
    # later points share what is left: never more than an equal share of the whole
    later = [json.loads(f.read_text())["options"]["time_budget"]
             for f in (tmp_path / "s").glob("*/results.json")]
    assert all(b <= 3.01 for b in later)


def test_sweep_resume_keeps_finished_points(tmp_path):
    args = ["sweep", "--engines", "hf", "--preset", "tiny-opt", "--batches", "2,3",
            "--prompt-len", "8", "--gen-len", "8", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--phases", "generate", "--out", tmp_path / "s"]
    cli(*args, check=0)
    first = (tmp_path / "s" / "tiny-opt_b2_g8" / "results.json").read_text()
    (tmp_path / "s" / "tiny-opt_b3_g8" / "results.json").unlink()  # as if cut off there
    p = cli(*args, check=2)  # a sweep is never replaced unasked
    assert "already holds a sweep" in p.stderr
    p = cli(*args, "--resume", check=0)
    assert "resume: hf already finished" in p.stderr  # the first point, kept as it was
    assert json.loads(first)["rows"] == json.loads(
        (tmp_path / "s" / "tiny-opt_b2_g8" / "results.json").read_text())["rows"]
    table = pd.read_csv(tmp_path / "s" / "sweep.csv")
    assert list(table.batch) == [2, 3] and (table.status == "ok").all()


def test_generation_path_parity_is_measured_and_gated(two_engine_run, tmp_path):
    out, _ = two_engine_run
    data = json.loads((out / "results.json").read_text())
    gen = {r["engine"]: r["value"] for r in data["rows"] if r["metric"] == "gen_max_abs_diff"}
    assert gen["hf"] == 0.0 and 0 <= gen["hybrid"] < 1e-4  # hf: the reference
    # scoring is shared (diff 0) and tokens agree: only the generation path can fail this
    p = cli("run", "--engines", "hf,hybrid", *RUN, "--phases", "generate", "--parity-tol",
            "1e-12", "--out", tmp_path / "p")
    status = json.loads((tmp_path / "p" / "results.json").read_text())["engines"]
    assert p.returncode == 1 and status["hf"]["status"] == "ok"
    assert status["hybrid"]["status"].startswith("failed: parity with hf"), status
    assert "scoring 0, generation " in status["hybrid"]["status"]


def test_top_logit_scale_is_the_largest_top_logit_over_answer_positions():
    from bench.parity import top_logit_scale
    from core.data import synthetic_prompts
    from core.models import build_bundle
    from core.types import Rollout
    b = build_bundle("tiny-opt", seed=0)
    p = synthetic_prompts(2, 6, b.config.vocab_size, b.pad_id, seed=0)
    answer = torch.randint(3, b.config.vocab_size, (2, 4))
    seq = torch.cat([p.input_ids, answer], 1)
    am = torch.cat([p.attention_mask, torch.ones_like(answer)], 1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        logits = b.actor(input_ids=seq, attention_mask=am,
                         position_ids=am.long().cumsum(-1).sub(1).clamp(min=0)).logits
    top = logits[:, 5:9].amax(-1).abs()  # positions P-1..T-2 emit the answer
    got = top_logit_scale(b.actor, Rollout(seq, am, mask, 6))
    assert got == pytest.approx(float(top[mask].max()), rel=1e-5)
    full = top_logit_scale(b.actor, Rollout(seq, am, torch.ones_like(mask), 6))
    assert full == pytest.approx(float(top.max()), rel=1e-5)


def test_parity_tolerance_grows_with_the_dtype_spacing_at_the_largest_logit():
    from bench.parity import parity_tolerance
    nan = float("nan")
    # bf16 spacing in [4, 8) is 2^-5: 4 spacings = 0.125 > 5e-2; in [1, 2) 2^-7: the default
    assert parity_tolerance("bfloat16", 6.9) == 0.125
    assert parity_tolerance("bfloat16", 1.5) == 5e-2
    # a trained model's top logits, ~20: bf16 spacing 2^-3 there, fp16 2^-6
    assert parity_tolerance("bfloat16", 20.0) == 0.5
    assert parity_tolerance("float16", 20.0) == 0.0625
    assert parity_tolerance("float16", 6.9) == 5e-2
    assert parity_tolerance("float32", 30.0) == 1e-3
    for scale in (nan, 0.0, float("inf")):  # not measured (an older run) or broken
        assert parity_tolerance("bfloat16", scale) == 5e-2
    assert parity_tolerance("bfloat16", 6.9, override=1e-2) == 1e-2  # --parity-tol wins


def test_divergence_margin_tells_a_near_tie_from_a_wrong_token():
    """On a real model: a rollout that leaves hf's greedy path for a token the model finds much
    less likely has a large margin; the same rollout kept on hf's path has none."""
    import engines
    from bench.parity import divergence_margin
    from core.data import synthetic_prompts
    from core.models import build_bundle
    from core.types import GenerationConfig, RunConfig
    b = build_bundle("tiny-opt", seed=0)
    hf = engines.get("hf")
    s = hf.init(b, RunConfig(preset="tiny-opt", batch=3, prompt_len=8), seed=0)
    p = synthetic_prompts(3, 8, b.config.vocab_size, b.pad_id, seed=0)
    ref = hf.generate(s, p, GenerationConfig(gen_len=6, greedy=True), seed=0)
    on_ref = hf.score(s, ref).logprobs
    same = torch.ones(3, 6, dtype=torch.bool)
    assert divergence_margin(same, on_ref, on_ref) == 0.0
    # row 1 takes, at answer position 2, the token hf found least likely there
    with torch.no_grad():
        logits = b.actor(input_ids=ref.seq, attention_mask=ref.attention_mask).logits
    worst = int(logits[1, 8 + 2 - 1].argmin())
    seq = ref.seq.clone()
    seq[1, 8 + 2] = worst
    own = type(ref)(seq, *ref[1:])
    same = seq[:, 8:] == ref.seq[:, 8:]
    margin = divergence_margin(same, on_ref, hf.score(s, own).logprobs)
    gap = float(on_ref[1, 2] - hf.score(s, own).logprobs[1, 2])
    assert margin == pytest.approx(gap) and margin > 0.5


def test_parity_gate_fails_wrong_tokens_not_near_ties():
    from bench.parity import parity_failure
    row = dict(engine="hybrid", parity_max_abs_diff=0.02, score_parity_max_abs_diff=0.01,
               parity_token_agreement=0.3, parity_divergence_margin=0.008)
    # bf16: low agreement after near-ties is no failure; the tolerance is 5e-2, ties 1e-1
    assert parity_failure(pd.Series(row), 5e-2) == ""
    why = parity_failure(pd.Series(dict(row, parity_divergence_margin=0.7)), 5e-2)
    assert why.startswith("failed: parity with hf") and "divergence margin 0.7 (max 0.1" in why
    assert parity_failure(pd.Series(dict(row, parity_max_abs_diff=0.2)), 5e-2)
    nan = float("nan")  # not measured: a failure, but for the reference itself
    assert "not measured" in parity_failure(pd.Series(dict(row, parity_max_abs_diff=nan)), 5e-2)
    assert parity_failure(pd.Series(dict(row, engine="hf", parity_max_abs_diff=nan,
                                         parity_divergence_margin=nan)), 5e-2) == ""


def test_a_nan_log_prob_fails_parity_instead_of_passing_as_unmeasured():
    from bench.parity import divergence_margin, max_gap, parity_failure
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    padded = torch.tensor([[0.0, 0.01, 0.0], [0.0, 0.0, float("nan")]])  # NaN at padding
    assert max_gap(padded, ref, mask) == pytest.approx(0.01)
    broken = padded.clone()
    broken[0, 1] = float("nan")
    assert max_gap(broken, ref, mask) == float("inf")
    same = torch.tensor([[True, False, False], [True, True, True]])
    assert divergence_margin(same, ref, broken) == float("inf")
    row = dict(engine="hybrid", parity_max_abs_diff=max_gap(broken, ref, mask),
               score_parity_max_abs_diff=0.0, parity_token_agreement=1.0,
               parity_divergence_margin=0.0)
    assert parity_failure(pd.Series(row), 1e-3).startswith("failed: parity with hf")


def test_memory_baseline_comes_after_the_lazy_imports():
    """peak_mem_mb counts from a baseline taken after _import_libraries: building the bundle
    and drawing sampling noise through the CPU kernels must then load (almost) no new modules,
    or library code (the kernels' loader: ~90 modules) would count as the run's memory."""
    code = ("import sys, torch\n"
            "from bench.options import BenchOptions\n"
            "from bench.worker import _import_libraries\n"
            "from core.models import build_bundle\n"
            "from core.rng import gumbel\n"
            "from engines import kernels\n"
            "import engines\n"
            "_import_libraries(BenchOptions(preset='tiny-opt'), 'hf', engines.get('hf'))\n"
            "before = set(sys.modules)\n"
            "build_bundle('tiny-opt', seed=0)\n"
            "gumbel(0, (2, 8), uniform=kernels.counter_uniform)\n"
            "print(len(set(sys.modules) - before))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) < 20  # without the warm-up: over 1000


def test_summary_takes_gpu_memory_rows():
    """What a CUDA worker records per phase (this machine has no GPU to make real ones)."""
    from bench.report import summarize
    rows = [["hybrid", 0, "generate", "seconds", 1.0, "s"],
            ["hybrid", 0, "generate", "peak_mem_mb", 900.0, "MB"],
            ["hybrid", 0, "generate", "peak_reserved_mb", 1500.0, "MB"],
            ["hybrid", 0, "train", "peak_reserved_mb", 1200.0, "MB"],
            ["hybrid", 0, "step", "seconds", 2.0, "s"]]
    data = dict(options=dict(engines_run=["hybrid"], warmup=0, batch=2, generation_batches=1,
                             gen_len=4, prompt_len=4),
                engines={"hybrid": {"status": "ok"}}, rows=[dict(zip(
                    ["engine", "step", "phase", "metric", "value", "unit"], r)) for r in rows])
    d = summarize(data).iloc[0]
    assert d.peak_mem_mb == 900 and d.peak_reserved_mb == 1500 and d.note == ""
    assert d.gen_peak_mem_mb == 900


def test_cpu_phases_record_their_own_peak_rss(tmp_path):
    """On Linux the worker resets the process's peak RSS at each phase, so each phase's row
    is its own peak above the baseline (a later, smaller phase is not hidden under an earlier
    one), while the process's peak, which the reset also clears, is kept."""
    import json as js

    from bench import worker as W
    if W._hwm_mb() is None:
        pytest.skip("no /proc/self/status VmHWM on this OS: phases record no RSS peak")
    rec = W.Recorder(str(tmp_path / "rows.jsonl"), "hf", "cpu", {"generate", "train"})
    rec.base_rss, rec.step = W._rss_mb(), 0
    with rec.phase("train"):
        big = torch.ones(300 * 2 ** 20 // 4)  # 300 MB, touched
        del big
    with rec.phase("generate"):
        # above glibc's largest mmap threshold (32 MB): fresh pages, never free heap that the
        # tests before this one in the process left resident (20 MB once read as 0 MB here).
        # A phase's peak counts from the baseline, and the process can fall below it (heap
        # returned to the system: 40 MB once read as 27.5): 100 MB leaves room for that
        small = torch.ones(100 * 2 ** 20 // 4)
        del small
    rows = [js.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    peak = {r["phase"]: r["value"] for r in rows if r.get("metric") == "peak_rss_mb"}
    assert peak["train"] > 250 and 50 < peak["generate"] < 200, peak
    assert W._peak_rss_mb() - rec.base_rss > 250  # the process's peak survives the resets


@pytest.mark.parametrize("step_peak, expected", [(90.0, 100.0), (150.0, 150.0)])
def test_summary_peak_memory_counts_the_largest_rank(step_peak, expected):
    """CPU peak RSS: the process's own (setup row, rank 0's only) or, in a multi-rank run
    where rank 0 writes the largest rank's step rows, that one when larger."""
    from bench.report import summarize
    rows = [["hf", -1, "setup", "peak_rss_mb", 100.0, "MB"],
            ["hf", 0, "step", "peak_rss_mb", step_peak, "MB"],
            ["hf", 0, "step", "seconds", 2.0, "s"]]
    data = dict(options=dict(engines_run=["hf"], warmup=0, batch=2, generation_batches=1,
                             gen_len=4, prompt_len=4),
                engines={"hf": {"status": "ok"}}, rows=[dict(zip(
                    ["engine", "step", "phase", "metric", "value", "unit"], r)) for r in rows])
    assert summarize(data).iloc[0].peak_mem_mb == expected


def test_flops_hand_count():
    # a toy shape: 1000 matmul weights of which 300 are the head, 2 layers, attention width 8
    s = F.Shape(linear_params=1000, head_params=300, n_layers=2, attn_width=8, kv_width=8,
                weight_bytes=4000)
    # 3 tokens, no past, batch 2: linear 2*1000*3 = 6000; attention 4*2*8*(1+2+3) = 384
    assert F.forward_flops(s, batch=2, new=3) == 2 * (6000 + 384)
    # one token after 5 cached: linear 2000, attention 4*2*8*6 = 384
    assert F.forward_flops(s, batch=1, new=1, past=5) == 2000 + 384
    # without the head: 2*(1000-300)*3 = 4200 + 384
    assert F.forward_flops(s, batch=1, new=3, logits=0) == 4200 + 384
    # logits at the last position only: 4200 + 2*300*1 = 4800 + 384
    assert F.forward_flops(s, batch=1, new=3, logits=1) == 4800 + 384
    # generate: prefill of 2 with logits at the last (2*700*2 + 2*300 + 4*2*8*3 = 3592)
    # + 1 decode step at past 2 (2000 + 4*2*8*3 = 2192)
    assert F.generate_flops(s, batch=1, prompt=2, gen=2) == 3592 + 2192
    # scoring P=2, G=1: actor twice with logits at G+1 = 2 positions (2*700*3 + 2*300*2
    # + 4*2*8*6 = 5784) and the critic twice without a head, on the same toy shape (4584)
    assert F.score_flops(s, s, batch=1, prompt=2, gen=1) == 2 * (5784 + 4584)
    assert F.train_flops(s, s, batch=1, prompt=2, gen=1) == 3 * (5784 + 4584)
    # KV bytes: 2 (K and V) * 2 layers * batch 3 * ctx 4 * width 8 * 4 bytes
    assert F.kv_bytes(s, batch=3, ctx=4, dtype_bytes=4) == 2 * 2 * 3 * 4 * 8 * 4


def test_shape_of_counts_real_module():
    from core.models import build_bundle
    b = build_bundle("tiny-opt", seed=0)
    s = F.shape_of(b.actor, b.config)
    # tiny-opt: 2 layers x (4 * 64*64 attention + 2 * 64*256 MLP) + head 512*64
    assert s.linear_params == 2 * (4 * 64 * 64 + 2 * 64 * 256) + 512 * 64
    assert s.head_params == 512 * 64 and s.n_layers == 2 and s.kv_width == 64
    assert s.weight_bytes == 4 * s.linear_params


def test_roofline_fraction_is_never_above_one(two_engine_run):
    out, _ = two_engine_run
    summary = pd.read_csv(out / "summary.csv")
    # the roofline is a lower bound on time from the limits measured in the same run: allow 5%
    # for timer noise, no more
    assert (summary.decode_roofline_frac <= 1.05).all()
    assert (summary.decode_roofline_frac > 0).all()
    # generation's own peak, measured per phase, lies under the process's (training's) peak
    assert ((summary.gen_peak_mem_mb > 0) & (summary.gen_peak_mem_mb < summary.peak_mem_mb)).all()


def test_phases_subset_measures_only_generation(tmp_path):
    out = tmp_path / "g"
    cli("run", "--engines", "hybrid", *RUN, "--phases", "generate", "--out", out, check=0)
    rows = pd.read_csv(out / "rows.csv")
    measured = set(rows[(rows.step >= 0) & (rows.metric == "seconds")].phase)
    assert measured == {"generate", "step"}
    assert not (rows.metric == "actor_loss").any()
    # the bundle was the actor alone: no critic, so no scoring or training FLOPs to count
    assert set(rows[rows.metric == "flops"].phase) == {"generate"}


@pytest.mark.parametrize("engine", ["hf", "hybrid", "ds-inference"])
def test_generation_only_runs_hold_no_optimiser_state(engine):
    """--phases generate trains nothing, so the engines that train with torch skip Adam's
    moments (8-12 bytes a parameter: opt-1.3b's bundle then fits where it did not)."""
    import engines
    from bench.options import BenchOptions
    from core.models import build_bundle
    from core.types import Experience
    gen_only = BenchOptions(phases=("generate",)).run_config()
    assert not gen_only.train and BenchOptions(phases=("generate", "train")).run_config().train
    b = build_bundle("tiny-opt", seed=0)
    e = engines.get(engine)
    state = e.init(b, gen_only, seed=0)
    assert state.actor_opt is None and state.critic_opt is None
    exp = Experience(*(None,) * len(Experience._fields))
    with pytest.raises(ValueError, match="no optimiser state"):
        e.train_step(state, exp, gen_only.ppo, seed=0)
    e.release()
    full = engines.get(engine).init(b, gen_only.replace(train=True), seed=0)
    assert full.actor_opt is not None and full.critic_opt is not None


@pytest.mark.parametrize("engine", ["hf", "hybrid", "ds-inference"])
def test_generation_only_bundle_is_the_actor_alone(engine):
    """A generation-only run builds the actor alone, with the full bundle's weights: every
    engine generates from it as from the full bundle, and scoring (which needs reference,
    critic and reward) says in one line why it cannot."""
    import engines
    from bench.options import BenchOptions
    from core.data import synthetic_prompts
    from core.models import build_bundle
    from engines.common import actor_logprobs
    gen_only = BenchOptions(preset="tiny-opt", batch=2, prompt_len=6, gen_len=5,
                            phases=("generate",)).run_config()
    full, alone = (build_bundle("tiny-opt", seed=0, actor_only=a) for a in (False, True))
    assert alone.ref is None and alone.critic is None and alone.reward is None
    a_sd, f_sd = alone.actor.state_dict(), full.actor.state_dict()
    assert a_sd.keys() == f_sd.keys() and all(torch.equal(a_sd[k], f_sd[k]) for k in a_sd)
    e = engines.get(engine)
    state = e.init(alone, gen_only, seed=0)
    assert state.critic_params == {}
    p = synthetic_prompts(2, 6, alone.config.vocab_size, alone.pad_id, seed=0)
    r = e.generate(state, p, gen_only.gen, seed=3)
    twin = engines.get(engine)
    assert torch.equal(r.seq, twin.generate(twin.init(full, gen_only, seed=0), p, gen_only.gen,
                                            seed=3).seq)
    with pytest.raises(ValueError, match="has the actor alone") as err:
        e.score(state, r)
    assert "\n" not in str(err.value)
    assert torch.equal(actor_logprobs(alone, r), actor_logprobs(full, r))


def test_config_file_gives_the_same_keys(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('engines = "hybrid"\npreset = "tiny-llama"\nbatch = 2\nprompt_len = 8\n'
                   'gen_len = 4\nsteps = 1\nwarmup = 0\nthreads = 1\ngreedy = true\n')
    out = tmp_path / "c"
    cli("run", "--config", cfg, "--out", out, check=0)
    data = json.loads((out / "results.json").read_text())
    assert data["options"]["preset"] == "tiny-llama" and data["options"]["greedy"] is True
    assert data["engines"]["hybrid"]["status"] == "ok"


def test_sweep_config_file_takes_the_sweep_axes(tmp_path, monkeypatch):
    """A sweep's TOML holds its grid too (strings or lists); flags override it."""
    import bench.sweep
    from bench import cli as bench_cli
    from bench.options import ConfigError
    seen = {}
    monkeypatch.setattr(bench.sweep, "sweep", lambda o, **axes: seen.update(o=o, **axes) or 0)
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('engines = "hf,hybrid"\nbatches = [1, 4]\ngen_lens = "8,16"\n'
                   'presets = "tiny-opt,tiny-llama"\nsteps = 1\n')
    args = bench_cli.parser().parse_args(["sweep", "--config", str(cfg), "--gen-lens", "32"])
    assert args.func(args) == 0
    assert (seen["batches"], seen["gen_lens"], seen["presets"]) == ("1,4", "32",
                                                                    "tiny-opt,tiny-llama")
    assert seen["o"].engines == ("hf", "hybrid") and seen["o"].steps == 1
    def call(*argv):
        a = bench_cli.parser().parse_args(list(argv))
        return a.func(a)
    cfg.write_text('gen-lens = "8,16"\n')  # dashed, as every other key may be
    assert call("sweep", "--config", str(cfg)) == 0 and seen["gen_lens"] == "8,16"
    cfg.write_text("batches = 4\n")
    with pytest.raises(ConfigError, match="config key 'batches': expected a comma-separated"):
        call("sweep", "--config", str(cfg))
    cfg.write_text('batches = "1,4"\n')  # and `run` still refuses what only a sweep takes
    with pytest.raises(ConfigError, match="unknown config key"):
        call("run", "--config", str(cfg))


def test_harness_killed_by_sigkill_loses_no_finished_step(tmp_path):
    out = tmp_path / "kill9"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    args = ["run", "--engines", "hf", "--preset", "tiny-opt", "--batch", "2", "--prompt-len",
            "8", "--gen-len", "32", "--steps", "500", "--warmup", "0", "--threads", "1",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out, 240, lambda d: len(_steps(d, "hf")) >= 3, every=0.3)
    proc.kill()  # SIGKILL: no handler runs, no final save
    proc.wait()
    from bench.results import load_results, read_jsonl, recover
    data = load_results(out)  # still a whole, readable file
    worker_rows = [r for r in read_jsonl(out / "engines" / "hf.jsonl") if "event" not in r]
    finished = {r["step"] for r in worker_rows if r["phase"] == "step" and r["metric"] == "seconds"}
    assert len(finished) >= 3
    data = recover(data, out)
    got = {r["step"] for r in data["rows"] if r["phase"] == "step" and r["metric"] == "seconds"}
    assert finished <= got  # every step the worker finished is read back
    p = cli("report", out)
    assert p.returncode == 0 and "hf" in p.stdout, p.stderr
    # the orphaned worker notices the harness is gone and stops by itself
    time.sleep(3)
    n = len(read_jsonl(out / "engines" / "hf.jsonl"))
    time.sleep(2)
    assert len(read_jsonl(out / "engines" / "hf.jsonl")) == n


def test_resume_keeps_finished_engines_and_runs_the_rest(two_engine_run, tmp_path):
    import shutil
    src, _ = two_engine_run
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    data = json.loads((out / "results.json").read_text())
    # as if the run had been interrupted during hybrid: its rows partial, its status failed
    data["engines"]["hybrid"]["status"] = "failed: interrupted (SIGINT)"
    data["rows"] = [r for r in data["rows"] if not (r["engine"] == "hybrid" and r["step"] >= 1)]
    data["limits"] = {k: v * 1.5 if isinstance(v, float) else v  # marked: kept or not?
                      for k, v in data["limits"].items()}
    (out / "results.json").write_text(json.dumps(data))
    hf_rows = [r for r in data["rows"] if r["engine"] == "hf"]
    p = cli("run", "--engines", "hf,hybrid", *RUN, "--out", out, "--resume", check=0)
    assert "resume: hf already finished" in p.stderr
    after = json.loads((out / "results.json").read_text())
    assert [r for r in after["rows"] if r["engine"] == "hf"] == hf_rows  # kept, not re-measured
    # hf's fractions of the machine's limits were taken against the saved limits: kept too
    assert after["limits"] == data["limits"]
    assert after["engines"]["hybrid"]["status"] == "ok"
    steps = {r["step"] for r in after["rows"] if r["engine"] == "hybrid" and r["phase"] == "step"}
    assert steps == {0, 1, 2}


def test_atomic_write_keeps_the_old_file_on_failure_and_gives_umask_permissions(tmp_path):
    from bench.results import atomic_write, atomic_write_text
    target = tmp_path / "results.json"
    atomic_write_text(target, "old\n")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def half_then_crash(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]
    target.chmod(0o600)  # a file the user restricted stays restricted when rewritten
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("with_memory", [True, False])
def test_sweep_plot_draws_memory_where_recorded(tmp_path, monkeypatch, with_memory):
    """sweep.png: throughput, and generation's own peak where the results have it (sweeps from
    before gen_peak_mem_mb plot throughput alone rather than fail)."""
    import matplotlib.pyplot as plt

    from bench.report import plot_sweep
    df = pd.DataFrame(dict(engine=["hf", "hf"], preset=["tiny-opt"] * 2, gen_len=[8, 8],
                           batch=[2, 4], status=["ok", "ok"], gen_tokens_per_s=[10.0, 18.0]))
    if with_memory:
        df["gen_peak_mem_mb"] = [30.0, 41.0]
    drawn = []
    real = plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        drawn.append(axes)
        return fig, axes
    monkeypatch.setattr(plt, "subplots", spy)
    plot_sweep(df, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    mem = drawn[0][1]
    assert [list(line.get_ydata()) for line in mem.get_lines()] == (
        [[30.0, 41.0]] if with_memory else [])


def test_engines_that_do_not_fit_together_run_in_groups_beside_hf():
    from bench.rounds import FIT, groups
    GB = 2 ** 30
    need = dict(hf=6 * GB, hybrid=6 * GB, packed=6.5 * GB, ds=6.5 * GB, vllm=7.5 * GB)
    names = list(need)
    assert groups(names, need, 100 * GB, sequential=False) == ([names], "interleaved")
    plan, how = groups(names, need, 22 * GB, sequential=False)
    assert how == "interleaved with hf in groups"
    assert all(g[0] == "hf" for g in plan)                    # every ratio to hf stays paired
    assert sorted(n for g in plan for n in g[1:]) == sorted(names[1:])  # each engine once
    assert all(sum(need[n] for n in g) <= FIT * 22 * GB for g in plan)
    assert plan[0] == ["hf", "hybrid", "packed"]
    assert groups(names, need, 100 * GB, sequential=True) == ([[n] for n in names],
                                                               "sequential")


def test_sequential_runs_each_engine_alone(tmp_path):
    out = tmp_path / "seq"
    p = cli("run", "--engines", "hf,hybrid", *RUN, "--sequential", "--out", out, check=0)
    from bench.results import read_jsonl
    done = [(e["began"], e["ended"], n) for n in ("hf", "hybrid")
            for e in read_jsonl(out / "engines" / f"{n}.jsonl") if e.get("event") == "stepped"]
    assert [n for *_, n in sorted(done)] == ["hf"] * 3 + ["hybrid"] * 3
    assert json.loads((out / "results.json").read_text())["schedule"]["mode"] == "sequential"
    assert "round 4 of 6: hybrid" in p.stderr


def test_a_fraction_above_the_limit_is_flagged_never_printed_plain():
    from bench.report import format_table
    df = pd.DataFrame([dict(engine="hf", status="ok", decode_roofline_frac=0.4),
                       dict(engine="hybrid", status="ok", decode_roofline_frac=1.33)],
                      columns=SUMMARY_COLUMNS)
    text = format_table(df, dict(limits=dict(matmul_flops=87e9, mem_bw=30e9, measurements=9)))
    assert "1.33 (!)" in text and "0.4 " in text and "0.4 (!)" not in text
    assert "the limit is under-measured" in text and "from 9 readings" in text


def test_interval_columns_hold_the_median_between_their_ends(two_engine_run, tmp_path):
    """Six measured rounds give a 95% interval (min, max); paired ratios come per round."""
    from bench.report import step_samples, summarize
    from bench.stats import median_ci, order_ranks
    assert order_ranks(5) is None and order_ranks(6) == (1, 6) and order_ranks(9) == (2, 8)
    assert median_ci([3, 1, 2, 5, 4, 6]) == (3.5, 1, 6)
    out, _ = two_engine_run
    data = json.loads((out / "results.json").read_text())
    s = summarize(data).set_index("engine")
    assert s.loc["hybrid", "steps_measured"] == 2 and s.gen_s_lo.isna().all()  # 2 < 6 steps
    hf, hy = step_samples(data, "hf"), step_samples(data, "hybrid")
    assert list(hf.index) == list(hy.index) == [1, 2]  # rounds, warm-up left out
    want = (hf.generate / hy.generate).median()
    assert s.loc["hybrid", "gen_speedup_vs_hf"] == pytest.approx(want)


def test_tokens_are_counted_as_generated_and_set_up_time_is_split(two_engine_run):
    out, _ = two_engine_run
    data = json.loads((out / "results.json").read_text())
    tokens = [r["value"] for r in data["rows"] if r["metric"] == "tokens" and r["step"] >= 0]
    assert tokens and set(tokens) == {2 * 8}  # fixed-length answers: batch x gen_len
    from bench.report import summarize
    s = summarize(data).set_index("engine")
    assert (s[["setup_s", "first_call_s", "probe_s"]] > 0).all().all()
    # a run whose rows stopped early (--stop-at-eos) is credited what it generated
    for r in data["rows"]:
        if r["metric"] == "tokens":
            r["value"] = 5.0
    assert summarize(data).set_index("engine").gen_tokens_per_s.tolist() == pytest.approx(
        (5.0 / s.gen_s).tolist())


def test_roofline_takes_one_ranks_rows_and_reads_weights_per_generation_batch():
    from bench.report import _roofline
    shape = F.Shape(linear_params=200_000, head_params=30_000, n_layers=2, attn_width=64,
                    kv_width=64, weight_bytes=800_000)
    setup = {("setup", f"shape_{k}"): v for k, v in shape._asdict().items()}
    setup[("setup", "dtype_bytes")] = 4
    lim = dict(matmul_flops=1e11, mem_bw=3e10)
    o = dict(batch=8, generation_batches=1, prompt_len=8, gen_len=8)
    one = F.decode_roofline_s(shape, 8, 8, 8, 4, 1e11, 3e10)
    assert _roofline(setup, o, lim) == pytest.approx(one)
    assert _roofline(setup, o, lim, world=2) == pytest.approx(
        F.decode_roofline_s(shape, 4, 8, 8, 4, 1e11, 3e10))
    assert _roofline(setup, dict(o, batch=4, generation_batches=2), lim) == pytest.approx(
        2 * F.decode_roofline_s(shape, 4, 8, 8, 4, 1e11, 3e10))
