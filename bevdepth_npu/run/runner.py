"""The entry point of the runs behind test/*.sh: ``bevdepth-npu run full|performance|eval|smoke``.

Parses the settings (bevdepth_npu/run/settings.py), finds the interpreter of the stack one way
(``stack_python``) and continues under it, then runs the mode's plan: full and performance in
bevdepth_npu/run/train.py, eval in evaluate.py, smoke in smoke.py, over the shared core in
core.py (run directory, record, stages, summary). To add a step to a mode, put a method in its
plan; to pass one more flag to evaluation, add it in the mode's ``eval_command``.

The console shows stage lines, the training progress line and the results
(bevdepth_npu/run/console.py); each stage's output goes to its log in the run directory.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Type

from bevdepth_npu import devices, envvars, paths
from bevdepth_npu.errors import UserError
from bevdepth_npu.run import settings as settings_module
from bevdepth_npu.run import smoke
from bevdepth_npu.run.console import Console
from bevdepth_npu.run.core import Run, Stop
from bevdepth_npu.run.evaluate import EvalRun
from bevdepth_npu.run.settings import Settings, SettingsError
from bevdepth_npu.run.stages import install_signal_handlers
from bevdepth_npu.run.train import TrainRun
from bevdepth_npu.runrecord import now_s

RUNS: Dict[str, Type[Run]] = {"full": TrainRun, "performance": TrainRun, "eval": EvalRun,
                              "smoke": smoke.SmokeRun}

# Set when the runner starts itself again under the stack's interpreter: the start time of the
# command, for E2ETrainingTime.
START_ENV = envvars.RUN_START


def stack_python(settings: Settings, note) -> Optional[str]:
    """The interpreter of the stack, decided here only: --python (BEVDEPTH_NPU_PYTHON); else,
    for the smoke run, the environment ``bevdepth-npu env`` builds or reuses for the device;
    else the environment it built for the device, where there is one; else None (the
    interpreter running this)."""
    if settings.python:
        return settings.python
    device = devices.choose(settings.device)
    if settings.mode == "smoke":
        return smoke.prepare_environment(device, note)
    built = paths.environment_python(device)
    return str(built) if built.is_file() else None


def _prog(argv: Sequence[str]) -> str:
    """The launcher's name when a test/*.sh script started the run (it passes --launcher)."""
    head = list(argv[:argv.index("--")] if "--" in argv else argv)
    for index, arg in enumerate(head):
        if arg.startswith("--launcher="):
            return os.path.basename(arg.split("=", 1)[1])
        if arg == "--launcher" and index + 1 < len(head):
            return os.path.basename(head[index + 1])
    return ""


def _with_python(argv: Sequence[str], python: str) -> List[str]:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut] + [f"--python={python}"] + argv[cut:]


def _switch_interpreter(mode: str, argv: Sequence[str], python: str, start_s: float,
                        console: Console) -> None:
    """Continue this command under ``python`` (the stack's interpreter) unless it is this one;
    the second start gets ``--python`` naming it, and so finds itself there."""
    found = shutil.which(python) or python
    if not (os.path.isfile(found) and os.access(found, os.X_OK)):
        raise Stop(f"--python={python} is not an executable")
    if os.path.abspath(found) == os.path.abspath(sys.executable):
        return
    env = dict(os.environ, **{START_ENV: repr(start_s)})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(paths.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    console.note(f"using the environment of {found}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(found, [found, "-m", "bevdepth_npu", "run", mode, *_with_python(argv, found)], env)


def main(mode: str, argv: Sequence[str]) -> int:
    """``bevdepth-npu run MODE ARGV``; the exit status."""
    launcher = _prog(argv)
    console = Console(launcher or f"bevdepth-npu run {mode}")
    restarted = START_ENV in os.environ
    start_s = float(os.environ.pop(START_ENV)) if restarted else now_s()
    try:
        # The old-name notices once, in the first process (not again after the restart).
        settings = settings_module.parse(
            mode, argv, prog=f"bash test/{launcher}" if launcher else None,
            notice=None if restarted else console.warning)
    except SettingsError as err:
        console.error(str(err))
        return 1
    console.verbose = settings.verbose
    install_signal_handlers()
    try:
        if not restarted:
            python = stack_python(settings, console.note)
            if python:
                _switch_interpreter(mode, argv, python, start_s, console)
    except (Stop, smoke.DataError, UserError) as err:
        console.error(str(err))
        return getattr(err, "status", 1)
    try:
        return RUNS[mode](settings, console, start_s, settings.python or sys.executable).execute()
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130
