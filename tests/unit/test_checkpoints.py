"""Which checkpoint a rerun resumes from, and the one-line error of a stage (bevdepth_npu/
checkpoints.py, the runner's failure line), with a stand-in for the patched tree's file check:
the check itself is tested on real checkpoints in tests/integration/test_checkpoint_errors.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bevdepth_npu import checkpoints
from bevdepth_npu.run.core import failure_line
from bevdepth_npu.runrecord import find_resumable_run, RunRecord


class Problem(Exception):
    def __init__(self, problem: str):
        super().__init__(f"...: {problem}; remedy")
        self.problem = problem


def bad_when_marked(path: Path):
    """A check that finds a file bad when its content says so."""
    return Problem("cut short") if path.read_text().startswith("bad") else None


def write(path: Path, text: str, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))
    return path


def test_a_readable_last_ckpt_is_resumed_from(tmp_path):
    last = write(tmp_path / "last.ckpt", "good", 300)
    write(tmp_path / "epoch=0-step=2.ckpt", "good", 200)
    notes = []
    assert checkpoints.resume_point(tmp_path, bad_when_marked, notes.append) == last
    assert notes == [] and last.is_file()


def test_a_bad_last_ckpt_is_kept_aside_and_the_newest_readable_one_taken(tmp_path):
    write(tmp_path / "last.ckpt", "bad", 400)
    write(tmp_path / "epoch=1-step=4.ckpt", "bad", 300)         # newest other: bad as well
    good = write(tmp_path / "epoch=0-step=2.ckpt", "good", 200)
    write(tmp_path / "epoch=0-step=1.ckpt", "good", 100)        # older
    notes = []
    chosen = checkpoints.resume_point(tmp_path, bad_when_marked, notes.append, stamp="T1")
    assert chosen == good
    assert not (tmp_path / "last.ckpt").exists()
    kept = tmp_path / "last.ckpt.unreadable-T1"
    assert kept.read_text() == "bad"                            # renamed, not deleted
    assert len(notes) == 1 and "cut short" in notes[0] and kept.name in notes[0] \
        and good.name in notes[0]
    # A second bad last.ckpt in the same second does not overwrite the first one.
    write(tmp_path / "last.ckpt", "bad again", 500)
    checkpoints.resume_point(tmp_path, bad_when_marked, notes.append, stamp="T1")
    assert kept.read_text() == "bad"
    assert (tmp_path / "last.ckpt.unreadable-T1-2").read_text() == "bad again"
    # Renamed files are never candidates again.
    assert all(".unreadable-" not in p.name for p in checkpoints.candidates(tmp_path))


def test_without_last_ckpt_the_newest_readable_checkpoint_is_taken(tmp_path):
    good = write(tmp_path / "epoch=0-step=2.ckpt", "good", 200)
    notes = []
    assert checkpoints.resume_point(tmp_path, bad_when_marked, notes.append) == good
    assert notes and good.name in notes[0]


def test_none_readable_stops_with_the_line_and_the_fresh_flag(tmp_path):
    write(tmp_path / "last.ckpt", "bad", 400)
    write(tmp_path / "epoch=0-step=2.ckpt", "bad", 200)
    with pytest.raises(checkpoints.NoReadableCheckpoint) as stop:
        checkpoints.resume_point(tmp_path, bad_when_marked, lambda note: None)
    line = str(stop.value)
    assert "\n" not in line and str(tmp_path / "last.ckpt") in line
    assert "cut short" in line and "epoch=0-step=2.ckpt" in line and "--fresh" in line
    assert (tmp_path / "last.ckpt").is_file()                    # nothing renamed or deleted


def test_a_run_whose_last_ckpt_was_set_aside_can_still_be_continued(tmp_path):
    run_dir = tmp_path / "case_20260101-000000"
    write(run_dir / "checkpoints" / "epoch=0-step=2.ckpt", "good", 200)
    write(run_dir / "checkpoints" / "last.ckpt.unreadable-T1", "bad", 300)
    record = RunRecord().update(status="failed", settings="same")
    record.save(run_dir)
    assert find_resumable_run(tmp_path, "case", "same") == run_dir
    assert checkpoints.has_checkpoint(run_dir)


def test_the_child_error_line_replaces_the_failure_message(tmp_path):
    log = tmp_path / "eval_0.log"
    log.write_text("Traceback? no: details: RuntimeError: PytorchStreamReader failed\n"
                   "checkpoint error: /x/last.ckpt: cut short; copy it again\n"
                   "warning printed at interpreter exit\n")
    assert checkpoints.child_error(log.read_text().splitlines()) == \
        "/x/last.ckpt: cut short; copy it again"
    assert failure_line(log, "evaluation failed (exit 2)") == \
        f"/x/last.ckpt: cut short; copy it again (log: {log})"
    log.write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    assert failure_line(log, "evaluation failed (exit 1)") == "evaluation failed (exit 1)"
    assert checkpoints.child_error([]) is None
