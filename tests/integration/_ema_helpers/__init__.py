"""Shared pieces of the EMA tests (not a test module).

- TINY_EMA_EXP: the test-sized smoke experiment with the EMA callback (tiny_ema_exp.py here);
  SMOKE_EMA_EXP: the shipped smoke EMA experiment, relative to the patched checkout;
- run_exp(): runs an experiment file in a subprocess from the patched checkout on CPU, its
  output appended to a log file;
- ema_state(): the EMA callback's state in a checkpoint file.

Used by tests/integration/test_ema.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence

from tests.integration import _scripts_helpers

REPO_ROOT = Path(__file__).resolve().parents[3]
TINY_EMA_EXP = Path(__file__).resolve().parent / "tiny_ema_exp.py"
SMOKE_EMA_EXP = "bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key_ema.py"

# Every run: CPU, fp32, one process per call unless --gpus says otherwise, no loader workers
# (exact resume needs them off; two cores have no room for them), no progress bar.
BASE_ARGS = ("--device", "cpu", "--seed", "0", "--precision", "32", "-b", "1",
             "--num_workers", "0", "--enable_progress_bar", "false")

# Long enough for a small run under load on two cores, short enough to end a hung DDP run.
RUN_TIMEOUT_S = 900


def exp_env(threads: int = 1, **settings: str) -> Dict[str, str]:
    """Environment of an experiment subprocess: this checkout importable (tiny_ema_exp imports
    the tests package), no inherited DDP or fault-injection settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BEVDEPTH_NPU_BIND_CORES", "BEVDEPTH_NPU_ALLOWED_CORES",
                        "BEVDEPTH_BIND_CORES", "BEVDEPTH_ALLOWED_CORES", "MASTER_ADDR",
                        "MASTER_PORT", "NODE_RANK", "RANK",
                        "LOCAL_RANK", "WORLD_SIZE", "BEVDEPTH_TEST_KILL_AT_STEPS",
                        "BEVDEPTH_TEST_KILL_MARKERS", "BEVDEPTH_TEST_EMA_DUMP")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(settings)
    return env


def run_exp(script, args: Sequence[str], log: Path, env: Dict[str, str],
            check: bool = True) -> subprocess.CompletedProcess:
    """``python script BASE_ARGS args`` in the patched checkout; output appended to ``log``."""
    command = [sys.executable, str(script), *BASE_ARGS, *map(str, args)]
    proc = subprocess.run(command, cwd=str(_scripts_helpers.checkout_root()), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=RUN_TIMEOUT_S)
    with open(log, "a") as handle:
        handle.write(proc.stdout)
    if check:
        assert proc.returncode == 0, (f"{' '.join(command)} exited {proc.returncode}:\n"
                                      f"{proc.stdout[-6000:]}")
    return proc


def ema_state(checkpoint: Path) -> dict:
    import torch
    return torch.load(checkpoint, map_location="cpu")["callbacks"]["EMACallback"]
