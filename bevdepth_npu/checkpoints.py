"""Checkpoints of a run directory: which one a rerun can resume from, and the one-line error an
experiment prints for a bad checkpoint.

The check of a file is the patched BEVDepth tree's own (``bevdepth/utils/checkpoint_file.py``,
standard library only): a checkpoint this module passes is one the training's ``--resume``
accepts. ``resume_point`` is what a rerun of a training command resumes from: ``last.ckpt``
when it passes, else the newest other ``*.ckpt`` of the directory that passes, with
``last.ckpt`` renamed ``last.ckpt.unreadable-<time>`` (kept, never picked again); with none
readable it raises ``NoReadableCheckpoint``. ``bevdepth-npu doctor --checkpoint`` reports the
same findings.

Used by bevdepth_npu/run/runner.py and bevdepth_npu/doctor. Tests: tests/unit/test_checkpoints.py,
tests/integration/test_checkpoint_errors.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from bevdepth_npu.runrecord import CHECKPOINTS, LAST_CKPT

__all__ = ["ERROR_PREFIX", "LAST_CKPT", "NoReadableCheckpoint", "load_check", "child_error",
           "checkpoint_dir", "candidates", "survey", "resume_point", "has_checkpoint"]

# The start of the last line an experiment prints when a checkpoint stops it
# (ERROR_PREFIX of bevdepth/utils/checkpoint_file.py; tests/integration checks they agree).
ERROR_PREFIX = "checkpoint error: "
UNREADABLE = ".unreadable-"
LINES_SEARCHED = 5      # a line or two may follow the error (interpreter shutdown warnings)

# path -> None (the file can be resumed from) or an exception whose ``problem`` and ``str()``
# say why not (checkpoint_file.CheckpointError).
Check = Callable[[Path], Optional[Exception]]


class NoReadableCheckpoint(Exception):
    """No checkpoint of a run directory can be resumed from; ``str()`` is the console line."""


def load_check() -> Optional[Check]:
    """The patched tree's check of a checkpoint file, or None where this Python cannot import
    it (no environment, or a tree older than the check)."""
    try:
        from bevdepth.utils.checkpoint_file import run_checkpoint_problem
    except ImportError:
        return None
    return run_checkpoint_problem


def child_error(lines: Sequence[str]) -> Optional[str]:
    """The one-line checkpoint error among the last lines of a stage's log, without its
    prefix; None when the stage ended otherwise."""
    for line in reversed(list(lines)[-LINES_SEARCHED:]):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip()
    return None


def checkpoint_dir(path: Path) -> Path:
    """The checkpoints/ directory of a run directory (or the directory itself)."""
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def candidates(directory: Path) -> List[Path]:
    """The checkpoints a rerun may resume from, in the order it tries them: last.ckpt, then
    the other ``*.ckpt`` files, newest first."""
    last = directory / LAST_CKPT
    others = sorted((p for p in directory.glob("*.ckpt") if p.name != LAST_CKPT and p.is_file()),
                    key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    return ([last] if last.is_file() else []) + others


def survey(directory: Path, check: Check) -> List[Tuple[Path, Optional[Exception]]]:
    """Each candidate with its problem (None: readable), in the order a rerun tries them,
    stopping at the first readable one."""
    found = []
    for path in candidates(directory):
        problem = check(path)
        found.append((path, problem))
        if problem is None:
            break
    return found


def _problem(error: Exception) -> str:
    return getattr(error, "problem", None) or str(error)


def _unused_name(path: Path, stamp: str) -> Path:
    target = path.with_name(f"{path.name}{UNREADABLE}{stamp}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}{UNREADABLE}{stamp}-{n}")
        n += 1
    return target


def resume_point(directory: Path, check: Check, note: Callable[[str], None],
                 stamp: Optional[str] = None) -> Path:
    """The checkpoint of ``directory`` (a run's checkpoints/) a rerun resumes from (module
    docstring). A bad last.ckpt is renamed and ``note`` gets one line saying so."""
    found = survey(directory, check)
    if not found:
        raise NoReadableCheckpoint(f"{directory} holds no checkpoint; --fresh starts a new run")
    path, problem = found[-1]
    if problem is None and path.name == LAST_CKPT:
        return path
    last, last_problem = found[0]
    if problem is not None:
        unreadable = ", ".join(p.name for p, _ in found[1:])
        raise NoReadableCheckpoint(
            f"{last}: {_problem(last_problem)}; "
            + (f"the other checkpoints there cannot be read either ({unreadable}); "
               if unreadable else "no other checkpoint there; ")
            + "--fresh starts a new run (this one is kept)")
    if last.name != LAST_CKPT:      # no last.ckpt (an earlier rerun renamed it)
        note(f"resuming from the newest readable checkpoint, {path}")
        return path
    renamed = _unused_name(last, stamp or time.strftime("%Y%m%d-%H%M%S"))
    last.rename(renamed)
    note(f"{last}: {_problem(last_problem)}; kept as {renamed.name}, resuming from the newest "
         f"readable checkpoint, {path.name}")
    return path


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint a rerun could try."""
    return bool(candidates(run_dir / CHECKPOINTS))
