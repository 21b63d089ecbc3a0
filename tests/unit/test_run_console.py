"""Tests of what a run shows and how a stage runs (bevdepth_npu/run/console.py, stages.py,
report.py): the training progress line from steps.jsonl, plain lines when not a terminal, a
stage's output into its log only, its exit status, the tail of a failed stage's log, the
metrics table.

Run: python -m pytest tests/unit/test_run_console.py -q
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from bevdepth_npu.run import console as console_module
from bevdepth_npu.run.console import Console, Heartbeat, TrainProgress
from bevdepth_npu.run.report import metrics_table, summary_lines
from bevdepth_npu.run.stages import log_tail, run_stage


class Terminal(io.StringIO):
    def isatty(self):
        return True


def record(step, total=30, process_step=None, step_time_s=0.5):
    return json.dumps({"step": step, "epoch": 0, "step_time_s": step_time_s,
                       "data_time_s": 0.1, "loss": 100.0 / 2 ** step, "lr": 1e-3, "global_batch": 2,
                       "images_per_sample": 12, "total_steps": total,
                       "process_step": process_step or step}) + "\n"


def test_plain_progress_lines_every_tenth_of_the_run(tmp_path):
    out = io.StringIO()
    steps = tmp_path / "steps.jsonl"
    steps.write_text(record(1))            # an earlier attempt's step: not this stage's
    progress = TrainProgress(Console("x", out=out), steps)
    with open(steps, "a") as handle:
        for step in range(1, 31):
            handle.write(record(step))
            if step % 7 == 0:
                handle.flush()
                progress.poll()
        handle.write(record(31)[:20])      # being written: not shown
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "x: train: step 1/30", "x: train: step 5/30", "x: train: step 10/30",
        "x: train: step 15/30", "x: train: step 20/30", "x: train: step 25/30",
        "x: train: step 30/30"]
    # 2 samples per 0.5 s step; the first step of the process is left out of speed and ETA.
    assert "loss 9.313e-08" in lines[-1] and "ETA" not in lines[-1]
    assert "4 samples/s" in lines[2] and "ETA 0:10" in lines[2]   # 20 steps x 0.5 s


def test_a_terminal_gets_one_line_rewritten(tmp_path):
    out = Terminal()
    steps = tmp_path / "steps.jsonl"
    progress = TrainProgress(Console("x", out=out), steps)
    steps.write_text(record(1) + record(2) + record(3))
    progress.poll()
    progress.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 3 and text.count("\n") == 1
    assert text.endswith("step 3/30, epoch 0, loss 12.5, 4 samples/s, ETA 0:14\n")


def test_a_silent_stage_gets_a_heartbeat(monkeypatch):
    out = io.StringIO()
    console = Console("x", out=out)
    beat = Heartbeat(console, "eval")
    beat.poll()
    assert out.getvalue() == ""            # not yet 30 s
    beat = Heartbeat(console, "eval", detail=lambda: "3/7 files", gaps=iter([0.0, 0.0, 1e9]))
    beat.poll()
    beat.poll()
    beat.poll()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("x: eval: running, 0:0")
    assert lines[0].endswith(", 3/7 files")


def test_a_stage_writes_to_its_log_only_and_returns_its_status(tmp_path, capfd):
    log = tmp_path / "train_0.log"
    code = "import sys; print('per-parameter init dump'); print('oops', file=sys.stderr)"
    status = run_stage(Console("x"), "training", [sys.executable, "-c", code], log, tmp_path,
                       {}, header="BEVDEPTH_BIND_CORES=0 ")
    assert status == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    text = log.read_text()
    assert text.splitlines()[0].endswith(f"BEVDEPTH_BIND_CORES=0 {sys.executable} -c {code}")
    assert "per-parameter init dump\n" in text and "oops\n" in text


def test_a_failed_stage_shows_the_end_of_its_log(tmp_path, capfd):
    log = tmp_path / "eval_0.log"
    code = "import sys\nfor i in range(40): print('line', i)\nsys.exit(3)"
    assert run_stage(Console("x"), "evaluation", [sys.executable, "-c", code], log, tmp_path,
                     {}) == 3
    out = capfd.readouterr().out
    assert f"x: evaluation failed (exit 3); last lines of {log}:" in out
    assert "  line 39" in out and "  line 15" in out and "line 14\n" not in out


def test_a_killed_stage_reports_128_plus_the_signal(tmp_path):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_stage(Console("x"), "training", [sys.executable, "-c", code],
                     tmp_path / "log", tmp_path, {}) == 137


def test_verbose_shows_the_output_and_keeps_the_log(tmp_path, capfd):
    log = tmp_path / "log"
    run_stage(Console("x", verbose=True), "training", [sys.executable, "-c", "print('hello')"],
              log, tmp_path, {})
    assert "hello" in capfd.readouterr().out and "hello\n" in log.read_text()


def test_log_tail_keeps_the_last_frame_of_progress_bars(tmp_path):
    log = tmp_path / "log"
    log.write_text("a\n 10%|#\r 50%|#####\r100%|##########\nb\n\n")
    assert log_tail(log) == ["a", "100%|##########", "b"]
    assert log_tail(tmp_path / "missing") == []


METRICS = {
    "mean_ap": 0.25, "nd_score": 0.3125,
    "tp_errors": {"trans_err": 0.5, "scale_err": 0.25, "orient_err": 1.0, "vel_err": 0.75,
                  "attr_err": 0.125},
    "mean_dist_aps": {"car": 0.5, "pedestrian": 0.0},
    "label_tp_errors": {name: {"trans_err": 0.5, "scale_err": 0.25, "orient_err": 1.0,
                               "vel_err": 0.75, "attr_err": 0.125}
                        for name in ("car", "pedestrian")},
}


def test_metrics_table(tmp_path):
    path = tmp_path / "metrics_summary.json"
    path.write_text(json.dumps(METRICS))
    lines = metrics_table(path, "mini_val")
    assert lines[1] == ("nuScenes detection metrics (devkit detection_cvpr_2019 protocol, "
                        "mini_val split)")
    assert lines[2:9] == ["mAP: 0.2500", "mATE: 0.5000", "mASE: 0.2500", "mAOE: 1.0000",
                          "mAVE: 0.7500", "mAAE: 0.1250", "NDS: 0.3125"]
    assert lines[-3].startswith("car") and lines[-3].split()[1:3] == ["0.500", "0.500"]


def test_summary_lines_leave_the_metrics_to_the_table():
    lines = summary_lines({"Network": "N", "ActualFPS": 2.5, "TrainingTime": 12.0, "mAP": 0.1})
    assert lines == ["  ActualFPS 2.5 samples/s, TrainingTime 12.0 s"]
    assert summary_lines({"mAP": 0.1}) == []


def test_paths_in_messages_are_plain(tmp_path):
    out = io.StringIO()
    Console("train_smoke.sh", out=out).note(f"run directory: {Path(tmp_path)}")
    assert out.getvalue() == f"train_smoke.sh: run directory: {tmp_path}\n"
