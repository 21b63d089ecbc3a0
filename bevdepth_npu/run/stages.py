"""One stage of a run: a subprocess whose whole output goes to its log in the run directory.

``run_stage`` starts the command in a process group of its own, appends its stdout and stderr
to the log (and shows them too with --verbose), polls a progress object while it runs and
returns its exit status as a shell reports it (128 + N when killed by signal N): the status
decides what the runner does next. On failure the last lines of the log are shown, unless the
stage ended with a one-line checkpoint error (``stage_error``: the runner shows that line).
Ctrl-C or SIGTERM to the runner reach the whole stage (every DDP rank), which gets time to stop.

Part of ``bevdepth-npu run`` (bevdepth_npu/run/). Tests: tests/unit/test_run_console.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Sequence

from bevdepth_npu.checkpoints import child_error
from bevdepth_npu.run.console import Console
from bevdepth_npu.runrecord import exit_status

TAIL_LINES = 25             # lines of a failed stage's log shown on the console
POLL_S = 0.5
STOP_GRACE_S = 60.0         # time a stage gets to stop after Ctrl-C before SIGTERM, then SIGKILL


class Progress(Protocol):
    def poll(self) -> None: ...

    def close(self) -> None: ...


class Terminated(SystemExit):
    """SIGTERM to the runner (exit status 143, as a shell reports it)."""


def _on_sigterm(signum, frame):
    raise Terminated(143)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def log_tail(path: Path, lines: int = TAIL_LINES, width: int = 300) -> List[str]:
    """The last lines of a log, a progress bar's last frame only (text after its last \\r)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    shown = [line.rsplit("\r", 1)[-1][:width] for line in text.split("\n")]
    return [line for line in shown if line.strip()][-lines:]


def stage_error(log_path: Path) -> Optional[str]:
    """The one-line checkpoint error a failed stage ended with (bevdepth_npu/checkpoints.py),
    or None."""
    return child_error(log_tail(log_path, width=4000))


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, first: int) -> None:
    """Stop the stage's process group: ``first``, then SIGTERM, then SIGKILL."""
    for signum, grace_s in ((first, STOP_GRACE_S), (signal.SIGTERM, 30.0), (signal.SIGKILL, 30.0)):
        _signal_group(proc, signum)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(console: Console, name: str, command: Sequence[str], log_path: Path, cwd: Path,
              env: Dict[str, str], progress: Optional[Progress] = None,
              header: str = "") -> int:
    """Run ``command``; return its exit status (see the module docstring)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"[{stamp}] {header}{' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(command), cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if console.verbose else log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            if console.verbose:
                _tee(proc, log)
            else:
                while True:
                    try:
                        proc.wait(timeout=POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        if progress is not None:
                            progress.poll()
        except KeyboardInterrupt:
            _stop(proc, signal.SIGINT)
            raise
        except BaseException:
            _stop(proc, signal.SIGTERM)
            raise
        finally:
            if progress is not None:
                progress.close()
    status = exit_status(proc.returncode)
    if status != 0 and not console.verbose:
        tail = log_tail(log_path)
        if tail and child_error(tail) is None:
            console.note(f"{name} failed (exit {status}); last lines of {log_path}:")
            console.lines(["  " + line for line in tail])
    return status


def _tee(proc: subprocess.Popen, log) -> None:
    assert proc.stdout is not None
    out = sys.stdout.buffer
    while True:
        chunk = proc.stdout.read1(1 << 16)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        out.write(chunk)
        out.flush()
    proc.wait()
