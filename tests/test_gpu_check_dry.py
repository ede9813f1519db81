"""bench/gpu_check.sh --dry-run runs the GPU check's steps on CPU on a tiny preset."""
import os
import subprocess
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DS_ACCELERATOR="cpu")
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.engine) == ["hf", "ds-inference", "ds-hybrid", "hybrid"]
    status = dict(zip(summary.engine, summary.status))
    assert status["hf"] == "ok" and status["hybrid"] == "ok"
    assert status["ds-hybrid"].startswith("unavailable:")
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert sorted(set(sweep.batch)) == [2, 4]
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "phases.png").exists()
    assert "skipped" in (tmp_path / "gpu_tests.txt").read_text()  # GPU tests skip on CPU
