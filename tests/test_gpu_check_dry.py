"""bench/micro/gpu_check.sh --dry-run runs the GPU check's steps on CPU on a tiny preset."""
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DS_ACCELERATOR="cpu")
    p = subprocess.run(["bash", "bench/micro/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.engine) == ["hf", "ds-inference", "ds-hybrid", "hybrid"]
    status = dict(zip(summary.engine, summary.status))
    assert status["hf"] == "ok" and status["hybrid"] == "ok"
    assert status["ds-hybrid"].startswith("unavailable:")
    note = dict(zip(summary.engine, summary.note.fillna("")))
    assert note["ds-inference"].startswith("no kernel injection") and note["hybrid"] == ""
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert sorted(set(sweep.batch)) == [2, 4]
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "phases.png").exists()
    log = (tmp_path / "log.txt").read_text()
    assert "skipped" in log and "done (status 0)" in log  # GPU tests skip on CPU
    # what the device tool brings back: at most 8 plain files, none in a sub-folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "details.tgz", "log.txt", "phases.png", "summary.csv", "sweep.csv", "sweep.png"]
    with tarfile.open(tmp_path / "details.tgz") as tar:
        names = tar.getnames()
    assert "compare/results.json" in names and "compare/engines/hybrid.log" in names
    assert "sweep/tiny-opt_b4_g8/results.json" in names
    with tarfile.open(tmp_path / "details.tgz") as tar:
        options = json.load(tar.extractfile("compare/results.json"))["options"]
    assert options["time_budget"] == 1200   # the engines share one budget
