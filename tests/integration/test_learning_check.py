"""The learning check (bench/learning_check.py) starts and runs its first steps.

It is a benchmark, not a test, so nothing else runs it; it broke once without the suite noticing
(it imported a step-log parser that had gone). Here it runs at the smallest size: 2 samples, two
training steps of batch 1, one evaluation, and its JSON must hold the steps' losses as
steps.jsonl recorded them, the evaluation's metrics and the plot. Needs the bevdepth-npu env.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import _bevdepth_helpers

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_learning_check_runs_its_first_steps_and_reads_the_step_log(tmp_path):
    _bevdepth_helpers.require_env()
    pytest.importorskip("nuscenes", reason=_bevdepth_helpers.ENV_REASON)
    out = tmp_path / "check"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.learning_check", "--steps", "2", "--eval-every", "2",
         "--samples", "2", "--batch-size", "1", "--device", "cpu", "--num-workers", "0",
         "--out-dir", str(out)],
        cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((out / "learning_check.json").read_text())
    assert [s["step"] for s in result["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) and s["step_time_s"] > 0 for s in result["steps"])
    (point,) = result["points"]
    assert point["step"] == 2 and point["train_time_source"] == "step log"
    assert 0.0 <= point["mAP"] <= 1.0 and 0.0 <= point["NDS"] <= 1.0
    assert result["notes"] == []
    assert (out / "learning_check.png").read_bytes().startswith(b"\x89PNG")
    assert "learning_check: final mAP" in proc.stdout
