"""Tests of the run record and run directories (bevdepth_npu/runrecord.py) and of the file
operations they use (bevdepth_npu/fsutil.py): the one schema of run.json, resume selection,
fresh run directories, the newest-checkpoint search, ModelZoo links, atomic writes.

Run: python -m pytest tests/unit/test_runrecord.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bevdepth_npu import fsutil, runrecord
from bevdepth_npu.runrecord import RunRecord, RunRecordError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_attempts_and_derived_times(tmp_path):
    record = RunRecord().update(mode="full", status="running")
    record.new_attempt(start_time_s=10.5, train_start_s=11, train_end_s=20, end_time_s=21)
    record.save(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    assert (data["start_time_s"], data["train_start_s"], data["train_end_s"],
            data["end_time_s"]) == (10.5, 11, 20, 21)
    # A resumed run: E2E spans both attempts; TrainingTime falls back to the step times.
    record = RunRecord.load(tmp_path / "run.json")
    record.new_attempt(start_time_s=100, train_start_s=101, train_end_s=150, end_time_s=151)
    record.save(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    assert (data["start_time_s"], data["end_time_s"]) == (10.5, 151)
    assert "train_start_s" not in data and "train_end_s" not in data
    assert len(data["attempts"]) == 2 and data["mode"] == "full"
    assert (tmp_path / "run.json").read_text().endswith("}\n")


def test_records_without_attempts_keep_their_times_and_unknown_fields(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"start_time_s": 1, "end_time_s": 5, "git_commit": "abc", "mode": "eval"}))
    record = RunRecord.load(tmp_path / "run.json")
    assert record.times() == {"start_time_s": 1, "end_time_s": 5}
    record.update(status="completed").save(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["git_commit"] == "abc" and data["status"] == "completed"


@pytest.mark.parametrize("content, message", [
    ("{mode: full", "cannot read run metadata"),
    ("[1]", "must hold a JSON object"),
    ('{"rank_size": "8"}', "rank_size must be an integer >= 1, got '8'"),
    ('{"mode": "train"}', "mode must be one of full, performance, eval"),
    ('{"status": "done"}', "status must be one of running, completed"),
    ('{"attempts": [{"train_exit_code": "1"}]}', "attempts[0]: train_exit_code must be an integer"),
    ('{"attempts": {}}', "attempts must be a list"),
])
def test_bad_records_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_text(content)
    with pytest.raises(RunRecordError) as info:
        RunRecord.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_missing_record_is_empty_unless_required(tmp_path):
    assert RunRecord.load(tmp_path / "run.json").fields == {}
    with pytest.raises(RunRecordError):
        RunRecord.load(tmp_path / "run.json", missing_ok=False)


def test_times_are_set_on_attempts_only():
    with pytest.raises(ValueError, match="derived"):
        RunRecord().update(start_time_s=1)


def _fake_run(device_dir, name, status, settings, ckpt):
    run_dir = device_dir / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": status, "settings": settings}))
    if ckpt:
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run_dir


def test_resume_picks_the_newest_unfinished_identical_run(tmp_path):
    device_dir = tmp_path / "0"
    case = "BEVDepth_for_PyTorch_bs8_8p_acc"

    def find():
        found = runrecord.find_resumable_run(device_dir, case, "S")
        return found.name if found else None

    assert find() is None                                                  # no runs at all
    _fake_run(device_dir, f"{case}_20240101-000000", "failed", "S", ckpt=True)
    assert find() == f"{case}_20240101-000000"                             # failed with a ckpt
    _fake_run(device_dir, f"{case}_20240102-000000", "interrupted", "OTHER", ckpt=True)
    _fake_run(device_dir, f"{case}_20240103-000000", "failed", "S", ckpt=False)
    (device_dir / f"{case}_20240103-500000").mkdir()                      # no run.json
    bad = _fake_run(device_dir, f"{case}_20240103-600000", "failed", "S", ckpt=True)
    (bad / "run.json").write_text("{broken")                               # unreadable
    # Other settings, runs without a checkpoint or a record are passed over.
    assert find() == f"{case}_20240101-000000"
    _fake_run(device_dir, f"{case}_20240104-000000", "completed", "S", ckpt=True)
    assert find() is None   # a completed run after it: start afresh
    _fake_run(device_dir, f"{case}_20240105-000000", "running", "S", ckpt=True)
    assert find() == f"{case}_20240105-000000"
    # Another case name with the same prefix is not this case.
    _fake_run(device_dir, f"{case}x_20240106-000000", "failed", "S", ckpt=True)
    assert find() == f"{case}_20240105-000000"


def test_new_run_dirs_never_reuse_a_name(tmp_path):
    names = [runrecord.new_run_dir(tmp_path, "C", "20240101-000000").name for _ in range(3)]
    assert names == ["C_20240101-000000", "C_20240101-000000-2", "C_20240101-000000-3"]


def test_the_newest_checkpoint_is_found_below_runs_and_the_checkout_outputs(tmp_path):
    device_dir, checkout = tmp_path / "out" / "0", tmp_path / "BEVDepth"
    older = device_dir / "run_a" / "checkpoints" / "last.ckpt"
    newer = checkout / "outputs" / "exp" / "lightning_logs" / "version_2" / "checkpoints" / "e.ckpt"
    newest = device_dir / "run_b" / "checkpoints" / "epoch=1-step=4.ckpt"
    assert runrecord.newest_checkpoint(device_dir, checkout / "outputs") is None
    for age_s, path in ((300, older), (200, newer), (100, newest)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000 - age_s, 1_700_000_000 - age_s))
    (device_dir / "run_b" / "notes.txt").write_text("not a checkpoint")
    assert runrecord.newest_checkpoint(device_dir, checkout / "outputs") == newest
    newest.unlink()
    assert runrecord.newest_checkpoint(device_dir, checkout / "outputs") == newer


def test_last_checkpoint_of_a_file_or_a_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    assert runrecord.last_checkpoint(run_dir) is None
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert runrecord.last_checkpoint(run_dir) == last
    assert runrecord.last_checkpoint(run_dir / "checkpoints") == last
    assert runrecord.last_checkpoint(last) == last


def test_links_replace_links_but_never_files(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "train_0.log").write_text("from an older script\n")
    assert runrecord.link_latest(tmp_path, "latest", "run1") is None
    assert runrecord.link_latest(tmp_path, "latest", "run2") is None
    note = runrecord.link_latest(tmp_path, "train_0.log", "run2/train_0.log")
    assert os.readlink(tmp_path / "latest") == "run2"
    assert (tmp_path / "train_0.log").read_text() == "from an older script\n"
    assert "is a regular file from an earlier tool; leaving it" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run1", "run2", "train_0.log"]


def test_exit_status_is_the_shells():
    assert runrecord.exit_status(0) == 0 and runrecord.exit_status(3) == 3
    assert runrecord.exit_status(-signal.SIGKILL) == 137


SLOW_WRITE = textwrap.dedent("""
    import sys, time
    from bevdepth_npu.fsutil import atomic_write

    def write(handle):
        handle.write(b"half")
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)

    atomic_write(sys.argv[1], write)
""")


def test_a_kill_during_an_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    fsutil.atomic_write_text(target, "old\n")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(target)],
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert target.read_text() == "old\n"
    fsutil.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
