"""compare decides by the interval of each change: the two halves of a real run pass at the
default 10%, a 1.5x slowdown in any one phase of any engine (hf included) fails, runs of
different work are refused, --strict fails on what the samples cannot decide, and lost times,
failed engines and setups that differ are named."""
from __future__ import annotations

import copy
import json
import math
import platform

import numpy as np
import pytest

from bench.cli import main
from bench.compare import compare, verdict
from tests.test_harness import ROOT, cli

ENGINES = ("hf", "hybrid", "hybrid-packed")  # hybrid-packed's sync copies weights: a real one
PHASES = ("generate", "sync", "score", "train", "step")
RUN = ["run", "--engines", ",".join(ENGINES), "--preset", "tiny-opt", "--steps", "16",
       "--warmup", "1", "--threads", "1"]
# what a whole machine and its software record (bench.machine.environment), one setup
ENV = dict(python="3.11.7", torch="2.13.0+cpu", transformers="5.19.0", cpu="AMD EPYC",
           cpu_isa="avx2 fma", threads=1, world_size=1, deepspeed=None, vllm=None)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same code measured twice: one real run of 16 steps, its even measured rounds saved as
    one run and its odd rounds as the other. Every round runs each engine once, so whatever else
    loads the machine (the other test worker, the OS) falls on both halves alike. Two whole runs
    did not share it: side by side, each pinned to a core of its own, the core shared with the
    other test worker once moved hybrid-packed's ratio to hf by 65% (0.49 -> 0.82), a verdict
    on that load, not on the code."""
    d = tmp_path_factory.mktemp("runs")
    cli(*RUN, "--out", d / "whole", check=0)
    whole = _load(d / "whole")
    warm = whole["options"]["warmup"]
    halves = []
    for name, parity in (("x", 0), ("y", 1)):
        half = copy.deepcopy(whole)
        half["rows"] = [r for r in whole["rows"]
                        if r["step"] < warm or (r["step"] - warm) % 2 == parity]
        halves.append(_save(half, d / name))
    return tuple(halves)


def _load(run) -> dict:
    return json.loads((run / "results.json").read_text())


def _save(data: dict, where) -> object:
    where.mkdir(parents=True, exist_ok=True)
    (where / "results.json").write_text(json.dumps(data))
    return where


def _compare(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _slowed(data: dict, engine: str, phase: str, factor: float = 1.5) -> dict:
    """A copy of a run whose `engine` took `factor` times as long in `phase`, every step."""
    d = copy.deepcopy(data)
    for r in d["rows"]:
        if (r["engine"], r["phase"], r["metric"]) == (engine, phase, "seconds"):
            r["value"] *= factor
    return d


def _results(times: dict, env=ENV, warmup: int = 0) -> dict:
    """A run from {engine: {phase: [seconds of each step]}}, no round rows (as older results)."""
    rows = [dict(engine=e, step=k, phase=p, metric="seconds", value=v, unit="s")
            for e, phases in times.items() for p, vs in phases.items() for k, v in enumerate(vs)]
    options = dict(engines_run=list(times), batch=2, generation_batches=1, prompt_len=8,
                   gen_len=8, warmup=warmup)
    return dict(version=1, options=options, engines={e: {"status": "ok"} for e in times},
                rows=rows, env=dict(env) if env else None)


def _line(table, engine: str, metric: str) -> dict:
    hit = table[(table.engine == engine) & (table.metric == metric)]
    assert len(hit) == 1, (engine, metric, table.to_string())
    return hit.iloc[0].to_dict()


def _metric(engine: str, phase: str) -> str:
    col = dict(generate="gen_s", sync="sync_s", score="score_s", train="train_s",
               step="step_s")[phase]
    return col if engine == "hf" else col + ("/hf_step" if phase == "sync" else "/hf")


# (a) the same code twice

def test_two_runs_of_the_same_code_pass_at_the_default_threshold(two_runs, capsys):
    x, y = two_runs
    assert any(r["metric"] == "round" for r in _load(x)["rows"])  # interleaved rounds
    code, out, err = _compare(capsys, x, y)
    assert code == 0 and "no regression" in out and "REGRESSED" not in out, out + err
    table, problems, _ = compare(_load(x), _load(y), 0.1, 0.1)
    assert problems == [] and set(table.verdict) <= {"ok", "inconclusive", "negligible"}
    # every engine and phase, and both memories; hf's own in seconds: one machine, one software
    for engine in ENGINES:
        for phase in PHASES:
            _line(table, engine, _metric(engine, phase))
        for col in ("peak_mem_mb", "gen_peak_mem_mb"):
            _line(table, engine, col if engine == "hf" else col + "/hf")
    # an engine that copies nothing has a sync of a timer's resolution: never judged
    assert _line(table, "hybrid", "sync_s/hf_step")["verdict"] == "negligible"
    assert _line(table, "hybrid-packed", "sync_s/hf_step")["verdict"] != "negligible"


# (b) a 1.5x slowdown of any one phase of any engine

@pytest.fixture(scope="module")
def run_and_quieted(two_runs):
    return _load(two_runs[0]), _quieted(_load(two_runs[0]))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phase", PHASES)
def test_a_slowdown_of_any_phase_of_any_engine_fails(run_and_quieted, engine, phase, tmp_path,
                                                     capsys):
    """The same run as base and, slowed, as new. On the real run the slowed line is never ok:
    REGRESSED, or inconclusive where this machine's load left too wide an interval (which
    --strict fails). With the spread a quiet run of this machine shows, it is REGRESSED at the
    default threshold and the gate exits 1. hf's and hybrid's syncs copy nothing (microseconds
    of timer): negligible however slowed."""
    metric = _metric(engine, phase)
    for data in run_and_quieted:
        slow = _slowed(data, engine, phase)
        table, problems, unsure = compare(data, slow, 0.1, 0.1)
        line = _line(table, engine, metric)
        assert line["change"] == pytest.approx(1.5)
        others = table[(table.engine != engine) | (table.metric != metric)]
        assert not (others.change > 1.1).any(), others.to_string()  # only that line slowed
        if phase == "sync" and engine != "hybrid-packed":
            assert line["verdict"] == "negligible" and problems == []
            continue
        if line["verdict"] == "inconclusive" and data is run_and_quieted[0]:
            assert f"{engine} {metric}" in unsure and problems == []
            continue
        assert line["verdict"] == "REGRESSED" and len(problems) == 1, line
        assert problems[0].startswith(f"{engine}: {metric} ")
    paths = _save(data, tmp_path / "base"), _save(slow, tmp_path / "new")
    code, out, err = _compare(capsys, *paths)
    assert code == (0 if phase == "sync" and engine != "hybrid-packed" else 1), out + err


def _quieted(data: dict) -> dict:
    """The run as a quiet machine measures it: each engine's and phase's seconds their median
    times a fixed 10% log-normal spread (runs b and c here: 4% to 18%)."""
    from bench.report import step_samples
    d = copy.deepcopy(data)
    noise = np.random.default_rng(0)
    med = {e: step_samples(data, e).median() for e in d["options"]["engines_run"]}
    for r in d["rows"]:
        if r["metric"] == "seconds" and r["step"] >= 0:
            r["value"] = float(med[r["engine"]][r["phase"]] * math.exp(0.1 * noise.normal()))
    return d


# (c) what the samples cannot decide, different work, lost times

def test_verdicts_by_the_interval():
    assert verdict(1.5, 1.2, 1.8, 0.1) == "REGRESSED"
    assert verdict(1.15, 1.05, 1.3, 0.1) == "inconclusive"  # straddles 1.1
    assert verdict(1.02, 0.95, 1.15, 0.1) == "inconclusive"  # a 15% slowdown not ruled out
    assert verdict(1.02, 0.95, 1.08, 0.1) == "ok"
    assert verdict(1.5, math.nan, math.nan, 0.1) == "inconclusive"  # too few for an interval
    assert verdict(1.05, math.nan, math.nan, 0.1) == "ok"
    assert verdict(0.6, 0.5, 0.7, 0.0) == "ok"


SPREAD = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8, 1.0]


def test_strict_fails_on_an_inconclusive_line(tmp_path, capsys):
    base = _results({"hf": {"generate": SPREAD}})
    new = _results({"hf": {"generate": [1.12 * v for v in SPREAD]}})
    paths = _save(base, tmp_path / "b"), _save(new, tmp_path / "n")
    table, problems, unsure = compare(base, new, 0.1, 0.1)
    line = _line(table, "hf", "gen_s")
    assert line["verdict"] == "inconclusive" and line["low"] < 1.1 < line["high"], line
    assert problems == [] and unsure == ["hf gen_s"]
    code, out, err = _compare(capsys, *paths)
    assert code == 0 and "no regression (1 inconclusive)" in out
    assert "note: inconclusive" in err and "hf gen_s" in err and "--strict fails on it" in err
    code, out, err = _compare(capsys, *paths, "--strict")
    assert code == 1 and "INCONCLUSIVE (--strict):\n  hf gen_s" in out, out
    # a 1.5x slowdown of the same spread is decided
    new = _results({"hf": {"generate": [1.5 * v for v in SPREAD]}})
    assert _line(compare(base, new, 0.1, 0.1)[0], "hf", "gen_s")["verdict"] == "REGRESSED"


def test_too_few_samples_are_inconclusive_not_a_regression(tmp_path, capsys):
    base = _results({"hf": {"generate": [1.0, 1.0]}, "hybrid": {"generate": [0.5, 0.5]}})
    new = _results({"hf": {"generate": [1.0, 1.0]}, "hybrid": {"generate": [1.0, 1.0]}})
    table, problems, unsure = compare(base, new, 0.1, 0.1)
    line = _line(table, "hybrid", "gen_s/hf")
    assert line["change"] == pytest.approx(2.0) and math.isnan(line["low"])
    assert line["verdict"] == "inconclusive" and problems == [] and unsure == ["hybrid gen_s/hf"]
    assert _line(table, "hf", "gen_s")["verdict"] == "ok"  # unchanged: no interval needed
    paths = _save(base, tmp_path / "b"), _save(new, tmp_path / "n")
    assert _compare(capsys, *paths)[0] == 0
    assert _compare(capsys, *paths, "--strict")[0] == 1


def test_runs_of_different_work_are_refused_unless_asked(two_runs, tmp_path, capsys):
    """An engine unavailable in the base and absent from the new run never ran, so it cannot
    regress. Runs of different work exit 2 with one line naming the differences, unless
    --allow-different-work, which judges them with a note."""
    out = two_runs[0]
    data = _load(out)
    data["options"]["engines_run"] = [*data["options"]["engines_run"], "ds-hybrid"]
    data["engines"]["ds-hybrid"] = {"status": "unavailable: needs CUDA", "exit_code": 3}
    base = _save(data, tmp_path / "base")
    code, stdout, err = _compare(capsys, base, out)
    assert code == 0 and "ds-hybrid" not in stdout and "note: the runs" not in err
    batch = data["options"]["batch"]
    data["options"].update(batch=batch + 1, dtype="bfloat16")
    _save(data, base)
    code, stdout, err = _compare(capsys, base, out)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert (f"rlhf-bench compare: error: the runs measured different work: batch ({batch + 1} "
            f"-> {batch}), dtype (bfloat16 -> float32) (--allow-different-work") in err
    code, stdout, err = _compare(capsys, base, out, "--allow-different-work")
    assert code == 0 and "hybrid" in stdout and "no regression" in stdout
    assert (f"note: the runs measured different work: batch ({batch + 1} -> {batch}), dtype "
            f"(bfloat16 -> float32); judged as asked") in err


def test_an_ok_run_without_usable_times_is_a_regression(tmp_path, capsys):
    """The gate must not pass a run whose rows were lost or are not numbers: "ok" with nothing
    measured once read as "nothing to compare, no regression"."""
    rows = {"hf": {p: [1.0] for p in ("generate", "score", "train", "step")}}
    base = _save(_results(rows, env=None), tmp_path / "base")
    for name, data in (("empty", _results({"hf": {}}, env=None)),
                       ("inf", _results({"hf": {p: [math.inf] for p in rows["hf"]}}, env=None))):
        code, out, _ = _compare(capsys, base, _save(data, tmp_path / name))
        assert code == 1 and "hf: gen_s 1 -> " in out, out
        assert "no usable measurement in the new run" in out


def test_an_engines_lost_time_is_its_own_even_in_ratio_mode():
    times = {"hf": {"generate": SPREAD}, "hybrid": {"generate": SPREAD}}
    lost = copy.deepcopy(times)
    lost["hybrid"]["generate"] = [math.nan] * len(SPREAD)
    table, problems, _ = compare(_results(times), _results(lost), 0.1, 0.1)
    assert _line(table, "hybrid", "gen_s")["verdict"] == "MISSING"
    assert problems == ["hybrid: gen_s 1 -> nan (no usable measurement in the new run)"]


def test_hf_is_judged_in_seconds_only_on_one_setup(tmp_path, capsys):
    """A slowdown of what every engine shares cancels out of every ratio: hf's own seconds
    catch it, where both runs name one machine and software; elsewhere they are not judged,
    and the note says why."""
    times = {"hf": {"score": SPREAD}, "hybrid": {"score": SPREAD}}
    slow = {e: {"score": [1.5 * v for v in SPREAD]} for e in times}
    table, problems, _ = compare(_results(times), _results(slow), 0.1, 0.1)
    assert _line(table, "hybrid", "score_s/hf")["change"] == pytest.approx(1.0)
    assert _line(table, "hf", "score_s")["verdict"] == "REGRESSED"
    assert [p.split(":")[0] for p in problems] == ["hf"]
    base = _save(_results(times), tmp_path / "b")
    for other in (dict(ENV, torch="2.11.0"), dict(ENV, cpu_isa=None), None):
        new = _save(_results(slow, env=other), tmp_path / "n")
        code, out, err = _compare(capsys, base, new)
        assert code == 0 and not any(ln.split()[:1] == ["hf"] for ln in out.splitlines())
        assert "hf's own times and memory are not judged" in err, err
    code, out, err = _compare(capsys, base, new, "--absolute")  # every engine's seconds
    assert code == 1 and "hf: score_s" in out and "hybrid: score_s" in out


def test_memory_of_generation_and_of_the_process_are_judged():
    data = _results({"hf": {"generate": SPREAD}, "hybrid": {"generate": SPREAD}})
    for e, peak, gen in (("hf", 100.0, 20.0), ("hybrid", 100.0, 20.0)):
        data["rows"] += [dict(engine=e, step=0, phase="generate", metric="peak_rss_mb",
                              value=gen, unit="MB"),
                         dict(engine=e, step=0, phase="step", metric="peak_rss_mb", value=peak,
                              unit="MB")]
    grown = copy.deepcopy(data)
    for r in grown["rows"]:
        if r["engine"] == "hybrid" and r["metric"] == "peak_rss_mb" and r["phase"] == "generate":
            r["value"] = 25.0  # generation's own peak +25%, the process's the same
    table, problems, _ = compare(data, grown, 0.1, 0.2)
    assert _line(table, "hybrid", "gen_peak_mem_mb/hf")["change"] == pytest.approx(1.25)
    assert _line(table, "hybrid", "peak_mem_mb/hf")["verdict"] == "ok"
    assert problems == ["hybrid: gen_peak_mem_mb/hf 1 -> 1.25 (+25%; limit +20%)"]
    assert compare(data, grown, 0.1, 0.25)[1] == []


# notes, engines that leave, older results

def test_compare_without_hf_says_it_compares_raw_seconds(two_runs, tmp_path, capsys):
    out = two_runs[0]
    data = _load(out)
    data["options"]["engines_run"] = ["hybrid"]
    data["rows"] = [r for r in data["rows"] if r["engine"] == "hybrid"]
    alone = _save(data, tmp_path / "alone")
    code, stdout, err = _compare(capsys, alone, alone)
    assert code == 0 and f"note: no hf in {alone}, {alone}: comparing raw seconds" in err
    assert any(ln.split()[:2] == ["hybrid", "gen_s"] for ln in stdout.splitlines())
    assert "note: no hf" not in _compare(capsys, alone, alone, "--absolute")[2]
    code, stdout, _ = _compare(capsys, out, alone)  # hf left the new run: a regression too
    assert code == 1 and "hf: in the base run but not in the new one" in stdout


def test_compare_notes_runs_from_other_machines_or_software(two_runs, tmp_path, capsys):
    """Ratios to hf move with the CPU (measured: hybrid-packed's generation took 0.66x hf's
    time on a Xeon, 0.94x on a Zen 4), so compare names a machine or software difference; a
    commit difference is the code under test and is not noted."""
    out = two_runs[0]
    data = _load(out)
    isa = data["env"]["cpu_isa"]
    if platform.machine() in ("x86_64", "AMD64"):  # /proc/cpuinfo lists x86 flags
        assert isa == "none" or isa.split() == [f for f in ("avx2", "fma", "avx512f",
                                                             "avx512_bf16", "amx_tile")
                                                 if f in isa.split()], isa
    data["env"]["git_commit"] = "0" * 40
    other = _save(data, tmp_path / "other")
    assert "note: the runs'" not in _compare(capsys, other, out)[2]
    # values no real run records (an AVX2-only CPU records "avx2 fma": the note would lack it)
    data["env"].update(cpu="AMD EPYC 9999", cpu_isa="sse4_2", torch="2.11.0")
    _save(data, other)
    now = _load(out)["env"]
    err = _compare(capsys, other, out)[2]
    assert (f"note: the runs' setups differ: torch (2.11.0 -> {now['torch']}), cpu (AMD EPYC "
            f"9999 -> {now['cpu']}), cpu_isa (sse4_2 -> {now['cpu_isa']}); speed ratios to hf "
            f"move with these too, so a change may be theirs, not the code's; hf's own times "
            f"and memory are not judged") in err
    del data["env"]["cpu_isa"]  # results older than the field: no difference, but no one setup
    data["env"].update(cpu=now["cpu"], torch=now["torch"])
    _save(data, other)
    err = _compare(capsys, other, out)[2]
    assert "note: the runs' setups differ" not in err
    assert ("note: the runs' setups are not known to match: cpu_isa (not recorded); hf's own "
            "times and memory are not judged") in err


def test_workload_differences_skip_options_older_results_lack():
    from bench.compare import workload_differences
    from bench.options import BenchOptions
    now = BenchOptions().to_dict()
    old = {k: v for k, v in now.items() if k not in ("lora_mode", "inference_tp")}
    assert workload_differences({"options": old}, {"options": now}) == []
    listed = dict(now, phases=list(now["phases"]))  # as read back from JSON
    assert workload_differences({"options": listed}, {"options": now}) == []
    assert workload_differences({"options": dict(now, offload=True)}, {"options": now}) == [
        "offload (True -> False)"]
