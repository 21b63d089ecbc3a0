"""Shared pieces of the tests of the scripts, resume and DDP; not a test module.

- require_stack(): the patched BEVDepth with the run wiring (step log, --resume), or skip;
- tiny_dataset(): a synthetic nuScenes (2 scenes x 5 samples) with info files and depth ground
  truth, built once per test session with `bevdepth-npu synth`, scripts/gen_info.py and
  scripts/gen_depth_gt.py of the patched checkout;
- run_script(): runs test/<script> with bash and the settings of a small CPU run;
- link_checkout(): a user-like BEVDepth checkout made of links, for the classic flow;
- read_case_log(), snapshot(): readers for assertions.

Used by tests/integration/test_scripts_e2e.py, test_resume_e2e.py and test_ddp_multinode.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from bevdepth_npu.testing import settings_env
from tests.integration import _bevdepth_helpers

REPO_ROOT = Path(__file__).resolve().parents[3]
TEST_DIR = REPO_ROOT / "test"
TINY_EXP = Path(__file__).resolve().parent / "tiny_exp.py"

# Experiment arguments of every small run: no loader workers (two cores), no progress bar (it
# only makes the logs long).
EXP_ARGS = ["--num_workers", "0", "--enable_progress_bar", "false"]

METRIC_KEYS = ("mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS")

# Long enough for a tiny run under load on two cores, short enough to end a hung DDP run.
RUN_TIMEOUT_S = 900


def require_stack():
    """The patched bevdepth package with step log and resume wiring, or a skip/fail saying why."""
    bevdepth = _bevdepth_helpers.require_env()
    root = Path(bevdepth.__file__).resolve().parent
    missing = [rel for rel in ("callbacks/step_log.py", "callbacks/resume.py",
                               "utils/checkpoint_io.py")
               if not (root / rel).is_file()]
    if missing or "--resume" not in (root / "exps" / "base_cli.py").read_text():
        pytest.fail(f"bevdepth is imported from {root}, which lacks the run wiring "
                    f"({', '.join(missing) or 'no --resume in exps/base_cli.py'}); "
                    "reinstall the patched tree with `bevdepth-npu env`")
    return bevdepth


def checkout_root() -> Path:
    return _bevdepth_helpers.patched_root()


def tiny_dataset(base: Path) -> Path:
    """The synthetic dataset under ``base`` (built on the first call, under a file lock)."""
    data = base / "tiny_nuscenes"
    done = data / ".complete"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "tiny_nuscenes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return data
        root = checkout_root()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        steps = [
            [sys.executable, "-m", "bevdepth_npu", "synth", "--out", str(data), "--scenes", "2",
             "--samples-per-scene", "5", "--sweeps", "1", "--quiet", "--force"],
            [sys.executable, "scripts/gen_info.py", "--data-root", str(data),
             "--version", "v1.0-mini"],
            [sys.executable, "scripts/gen_depth_gt.py", "--data-root", str(data),
             "--splits", "train", "val", "--workers", "2"],
        ]
        for command in steps:
            proc = subprocess.run(command, cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=600)
            assert proc.returncode == 0, (
                f"{' '.join(command)} failed:\n" + proc.stdout.decode(errors="replace")[-3000:])
        done.write_text("ok\n")
    return data


def link_checkout(dest: Path) -> Path:
    """A tree of links to the patched checkout at ``dest``, without test/, outputs/ and .git:
    a checkout as a user's, into which the scripts can be copied (the classic flow)."""
    dest.mkdir(parents=True)
    for entry in checkout_root().iterdir():
        if entry.name not in ("test", "outputs", ".git", "build"):
            (dest / entry.name).symlink_to(entry)
    (dest / "test").mkdir()
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env(output_root: Path, data: Path, **settings: object) -> Dict[str, str]:
    """Environment of a small CPU run of one of the test/*.sh scripts (settings named as in
    ``settings_env``)."""
    from bevdepth_npu import envvars
    from bevdepth_npu.run.settings import OPTIONS
    # The caller's settings, core binding and rendezvous must not leak into the runs.
    leaking = {option.env for option in OPTIONS} | {v.name for v in envvars.VARIABLES
                                                    if v.name not in (envvars.CACHE,
                                                                      envvars.MIRRORS)}
    leaking |= {v.old_name for v in envvars.VARIABLES if v.old_name}
    env = {k: v for k, v in os.environ.items()
           if k not in leaking and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(settings_env(
        PYTHON=sys.executable, BEVDEPTH_ROOT=str(checkout_root()),
        OUTPUT_ROOT=str(output_root), DATA_ROOT=str(data), EXP=str(TINY_EXP),
        DEVICE="cpu", BATCH_SIZE="1", WARMUP_STEPS="1",
        # the self-test runs where a test asks for it (test_scripts_e2e's full_1p)
        DOCTOR="0"))
    env.update(settings_env(**settings))
    if "OMP_NUM_THREADS" not in settings:
        # One process per core share: more threads than cores make every process wait.
        processes = int(env.get(envvars.setting_variable("cards"), "1"))
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def run_script(script: str, env: Dict[str, str], args: Sequence[str] = (),
               script_dir: Optional[Path] = None, cwd: Optional[Path] = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """``bash <script_dir>/<script> args`` (stdout and stderr together, as text)."""
    path = (script_dir or TEST_DIR) / script
    proc = subprocess.run(["bash", str(path), *args], env=env, cwd=str(cwd or REPO_ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=RUN_TIMEOUT_S, universal_newlines=True)
    if check:
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def run_dirs(output_root: Path, device_id: str = "0") -> List[Path]:
    """Run directories under output_root/<id>, oldest first (their names carry the time)."""
    base = output_root / device_id
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())


def read_case_log(path: Path) -> Dict[str, str]:
    """The ``Key = value`` lines of a ${CaseName}.log."""
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(" = ")
        assert sep, f"{path}: line {line!r} is not 'Key = value'"
        assert key not in values, f"{path}: {key} appears twice"
        values[key] = value
    return values


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def snapshot(directory: Path) -> Dict[str, tuple]:
    """(size, mtime_ns) of every file below ``directory``: an earlier run must keep all of it."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            found[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns)
    return found


def devkit_metrics(metrics_json: Path) -> Dict[str, float]:
    """ModelZoo metric name -> value of a nuScenes metrics_summary.json."""
    data = read_json(metrics_json)
    errors = data["tp_errors"]
    return {"mAP": data["mean_ap"], "mATE": errors["trans_err"], "mASE": errors["scale_err"],
            "mAOE": errors["orient_err"], "mAVE": errors["vel_err"], "mAAE": errors["attr_err"],
            "NDS": data["nd_score"]}
