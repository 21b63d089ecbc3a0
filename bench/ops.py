"""The op inventory's wall time: ``bevdepth-npu ops --exp smoke`` (one recorded training step
and one evaluation step, classified against torch_npu's op table), run as a user runs it, in a
fresh process; one round (the command takes tens of seconds, its variation is small against
that).

    python -m bench --only ops

Reports the wall time and the inventory's counts (from its ``--json``); no target: it is the
figure the README quotes for the command. The R50 inventory and ``--memory`` / ``--roofline``
(four recordings) cost minutes and are not timed here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

from bench import harness

NAME = "ops"
TITLE = "op inventory wall time: bevdepth-npu ops --exp smoke"
EXPERIMENT = "smoke"   # the R50 code path at toy sizes: the cheap one


def run(ctx: harness.Context) -> harness.BenchResult:
    result = harness.BenchResult(NAME, TITLE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(harness.REPO_ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if ctx.threads:
        env["OMP_NUM_THREADS"] = str(ctx.threads)
    with tempfile.TemporaryDirectory(prefix="ops-", dir=str(ctx.work_dir)) as scratch:
        json_path = os.path.join(scratch, "ops.json")
        command = [sys.executable, "-m", "bevdepth_npu", "ops", "--exp", EXPERIMENT,
                   "--json", json_path]
        ctx.log(f"  {' '.join(command[1:])}")
        started = time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=str(harness.REPO_ROOT),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        wall_s = time.perf_counter() - started
        if proc.returncode not in (0, 1):   # 1: a CPU fallback found, still a timing
            raise RuntimeError(f"bevdepth-npu ops exited with {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}")
        with open(json_path) as f:
            report: Dict[str, Any] = json.load(f)
    rows: List[List[Any]] = [[EXPERIMENT, phase, klass, calls]
                             for phase, counts in report["counts"].items()
                             for klass, calls in sorted(counts.items())]
    result.tables.append(harness.Table(
        f"bevdepth-npu ops --exp {EXPERIMENT}: {wall_s:.1f} s wall, exit {proc.returncode}",
        ["experiment", "phase", "class", "calls"], rows))
    result.ratios.append(harness.Ratio(
        f"ops.{EXPERIMENT}.wall_s", wall_s,
        "wall time of the inventory command (seconds; a figure, not a ratio)"))
    result.data = dict(wall_s=wall_s, exit_status=proc.returncode, command=command[1:],
                       counts=report["counts"])
    return result
