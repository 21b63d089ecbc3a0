"""Tests of ``bevdepth-npu summarize`` (bevdepth_npu/summarize.py) on temporary run directories.

Run: python -m pytest tests/unit/test_summarize.py -q
Expected figures are worked out by hand from tests/fixtures/steps/clean.jsonl:
  steps 1-8, global_batch 64, images_per_sample 12,
  step_time_s 9.5 3.25 2.5 2.25 2.125 | 2.0 2.0 4.0   (the first 5 are warm-up by default)
  data_time_s 5.0 1.0  0.5 0.5  0.25  | 0.25 0.5 0.75
  loss        4.0 3.5  3.0 2.75 2.5   | 2.25 2.0 2.0
so samples/s = 3 x 64 / (2 + 2 + 4) = 24, images/s = 24 x 12 = 288, mean step 8/3 s,
mean data 0.5 s, data fraction 1.5 / 8 = 0.1875, ActualLoss = mean of all 8 losses = 22 / 8 = 2.75,
sum of all step times = 27.625 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

import pytest

from bevdepth_npu.summarize import (
    SummarizeInputError,
    add_arguments,
    find_steps,
    run,
    summarize,
)

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "steps")

# The devkit's metrics_summary.json layout (nuscenes.eval.detection DetectionMetrics.serialize),
# trimmed to two classes.
METRICS = {
    "label_aps": {"car": {"0.5": 0.31, "1.0": 0.52, "2.0": 0.66, "4.0": 0.73},
                  "pedestrian": {"0.5": 0.22, "1.0": 0.35, "2.0": 0.41, "4.0": 0.46}},
    "mean_dist_aps": {"car": 0.555, "pedestrian": 0.36},
    "mean_ap": 0.33041234567,
    "label_tp_errors": {"car": {"trans_err": 0.5, "scale_err": 0.16, "orient_err": 0.15,
                                "vel_err": 0.4, "attr_err": 0.2}},
    "tp_errors": {"trans_err": 0.6081, "scale_err": 0.2768, "orient_err": 0.5512,
                  "vel_err": 0.4124, "attr_err": 0.2147},
    "tp_scores": {"trans_err": 0.3919, "scale_err": 0.7232, "orient_err": 0.4488,
                  "vel_err": 0.5876, "attr_err": 0.7853},
    "nd_score": 0.43551234567,
    "eval_time": 120.5,
    "cfg": {"class_range": {"car": 50}, "dist_fcn": "center_distance"},
}

RUN_JSON_FULL = {
    "network": "BEVDepth",
    "rank_size": 8,
    "batch_size_per_device": 8,
    "device_type": "Ascend910B",
    "start_time_s": 1699999990.0,
    "end_time_s": 1700000100.25,
    "train_start_s": 1700000000.0,
    "train_end_s": 1700000031.5,
    "mode": "full",
    "git_commit": "ignored by summarize",
}


def make_run(root, log="clean.jsonl", run_json=None, metrics=None, log_name="steps.jsonl",
             metrics_rel="output/metrics_summary.json"):
    run_dir = root / "run"
    run_dir.mkdir()
    if log is not None:
        shutil.copyfile(os.path.join(FIXTURES, log), run_dir / log_name)
    if run_json is not None:
        (run_dir / "run.json").write_text(json.dumps(run_json))
    if metrics is not None:
        path = run_dir / metrics_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))
    return run_dir


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def listing(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def read_summary(run_dir):
    with open(run_dir / "summary.json", encoding="utf-8") as handle:
        return json.load(handle)


# ----- whole runs -------------------------------------------------------------------------------

def test_full_run_end_to_end(tmp_path, capsys):
    run_dir = make_run(tmp_path, run_json=RUN_JSON_FULL, metrics=METRICS)
    assert cli(run_dir, "--no-plot") == 0
    expected_log = (
        "Network = BEVDepth\n"
        "RankSize = 8\n"
        "BatchSize = 8\n"
        "DeviceType = Ascend910B\n"
        "CaseName = BEVDepth_bs8_8p_acc\n"
        "ActualFPS = 24.0\n"
        "ActualLoss = 2.75\n"
        "TrainingTime = 31.5\n"
        "E2ETrainingTime = 110.25\n"
        "mAP = 0.33041234567\n"
        "mATE = 0.6081\n"
        "mASE = 0.2768\n"
        "mAOE = 0.5512\n"
        "mAVE = 0.4124\n"
        "mAAE = 0.2147\n"
        "NDS = 0.43551234567\n"
    )
    assert (run_dir / "BEVDepth_bs8_8p_acc.log").read_text() == expected_log
    summary = read_summary(run_dir)
    sources = summary.pop("sources")
    assert summary == {
        "Network": "BEVDepth", "RankSize": 8, "BatchSize": 8, "DeviceType": "Ascend910B",
        "CaseName": "BEVDepth_bs8_8p_acc",
        "ActualFPS": 24.0, "samples_per_s": 24.0, "images_per_s": 288.0,
        "ActualLoss": 2.75, "TrainingTime": 31.5, "E2ETrainingTime": 110.25,
        "mAP": 0.33041234567, "mATE": 0.6081, "mASE": 0.2768, "mAOE": 0.5512,
        "mAVE": 0.4124, "mAAE": 0.2147, "NDS": 0.43551234567,
        "mean_step_time_s": 2.66667, "mean_data_time_s": 0.5, "data_time_fraction": 0.1875,
        "samples_measured": 192, "step_time_measured_s": 8.0,
        "warmup_steps": 5, "loss_window_steps": 10,
        "steps_total": 8, "steps_measured": 3, "first_step": 1, "last_step": 8,
        "steps_duplicate_dropped": 0, "restarts": 0, "nonfinite_loss_steps": 0,
        "malformed_lines": 0, "malformed_examples": [],
        "mode": "full", "complete": True, "warnings": [],
        "files": ["BEVDepth_bs8_8p_acc.log", "summary.json"],
    }
    assert sources["TrainingTime"] == "run.json train_end_s - train_start_s"
    assert sources["E2ETrainingTime"] == "run.json end_time_s - start_time_s"
    assert sources["mAP"] == "output/metrics_summary.json mean_ap"
    assert sources["mAVE"] == "output/metrics_summary.json tp_errors.vel_err"
    assert sources["step_log"] == "steps.jsonl"
    assert sources["ActualFPS"].startswith("steps.jsonl: sum(global_batch) / sum(step_time_s) "
                                           "over 3")
    assert sources["ActualLoss"] == "steps.jsonl: mean loss of the last 8 steps (steps 1-8)"
    assert sources["CaseName"].startswith("derived")
    assert sources["Network"] == sources["mode"] == "run.json"
    out = capsys.readouterr().out
    assert "ActualFPS" in out and "24.0" in out
    assert str(run_dir / "BEVDepth_bs8_8p_acc.log") in out and str(run_dir / "summary.json") in out


def test_performance_run_flags_override_and_training_time_falls_back(tmp_path):
    run_json = {"network": "Other", "rank_size": 2, "batch_size_per_device": 32,
                "mode": "performance"}
    run_dir = make_run(tmp_path, run_json=run_json)
    code = cli(run_dir, "--no-plot", "--network", "BEVDepth_R50", "--rank-size", "8",
               "--batch-size", "8", "--device-type", "Ascend910B")
    assert code == 0
    assert (run_dir / "BEVDepth_R50_bs8_8p_perf.log").read_text() == (
        "Network = BEVDepth_R50\n"
        "RankSize = 8\n"
        "BatchSize = 8\n"
        "DeviceType = Ascend910B\n"
        "CaseName = BEVDepth_R50_bs8_8p_perf\n"
        "ActualFPS = 24.0\n"
        "ActualLoss = 2.75\n"
        "TrainingTime = 27.625\n"
    )
    summary = read_summary(run_dir)
    assert summary["sources"]["Network"] == "--network"
    assert summary["sources"]["RankSize"] == "--rank-size"
    assert summary["sources"]["TrainingTime"] == (
        "steps.jsonl: sum of step_time_s over all 8 logged steps")
    assert "E2ETrainingTime" not in summary and "mAP" not in summary
    assert summary["complete"] is True


def test_case_name_from_run_json(tmp_path):
    run_json = {"case_name": "BEVDepth_bs8_8p_perf", "mode": "performance"}
    run_dir = make_run(tmp_path, run_json=run_json)
    assert cli(run_dir, "--no-plot") == 0
    assert (run_dir / "BEVDepth_bs8_8p_perf.log").read_text().startswith(
        "Network = BEVDepth\nCaseName = BEVDepth_bs8_8p_perf\nActualFPS = 24.0\n")
    assert read_summary(run_dir)["sources"]["Network"] == "default"


def test_running_twice_gives_identical_bytes_and_leaves_no_temp_files(tmp_path):
    run_dir = make_run(tmp_path, run_json=RUN_JSON_FULL, metrics=METRICS)
    assert cli(run_dir) == 0
    first = {name: (run_dir / name).read_bytes()
             for name in ("BEVDepth_bs8_8p_acc.log", "summary.json")}
    assert cli(run_dir) == 0
    for name, data in first.items():
        assert (run_dir / name).read_bytes() == data, name
    expected = ["BEVDepth_bs8_8p_acc.log", "curves.png", "output", "output/metrics_summary.json",
                "run.json", "steps.jsonl", "summary.json"]
    assert listing(run_dir) == expected   # no temporary files left behind


def test_an_earlier_summary_is_replaced_not_appended(tmp_path):
    run_dir = make_run(tmp_path, run_json=RUN_JSON_FULL, metrics=METRICS)
    (run_dir / "BEVDepth_bs8_8p_acc.log").write_text("ActualFPS = 1.0\nmAP = 0.1\nmAP = 0.2\n")
    assert cli(run_dir, "--no-plot") == 0
    text = (run_dir / "BEVDepth_bs8_8p_acc.log").read_text()
    assert text.count("mAP = ") == 1 and "ActualFPS = 24.0\n" in text and "0.1" not in text


@pytest.mark.parametrize("warmup, fps, images_per_s, measured, step_mean_s", [
    (0, 18.5339, 222.407, 8, 3.45312),    # 512 / 27.625, 6144 / 27.625, 27.625 / 8
    (5, 24.0, 288.0, 3, 2.66667),         # 192 / 8
    (7, 16.0, 192.0, 1, 4.0),             # only step 8: 64 / 4
])
def test_warmup_exclusion(tmp_path, warmup, fps, images_per_s, measured, step_mean_s):
    run_dir = make_run(tmp_path)
    summary = summarize(str(run_dir), warmup_steps=warmup, plot=False)
    assert summary["ActualFPS"] == fps
    assert summary["images_per_s"] == images_per_s
    assert summary["steps_measured"] == measured and summary["steps_total"] == 8
    assert summary["mean_step_time_s"] == step_mean_s
    assert summary["warmup_steps"] == warmup
    assert f"ActualFPS = {fps}\n" in (run_dir / "BEVDepth_perf.log").read_text()


def test_every_step_warm_up_means_no_fps_and_exit_1(tmp_path, capsys):
    run_dir = make_run(tmp_path, run_json={"mode": "performance"})
    assert cli(run_dir, "--no-plot", "--warmup-steps", "8") == 1
    summary = read_summary(run_dir)
    assert "ActualFPS" not in summary and summary["steps_measured"] == 0
    assert summary["ActualLoss"] == 2.75 and summary["complete"] is False
    assert "all 8 logged steps in steps.jsonl are warm-up" in capsys.readouterr().err


def test_loss_window(tmp_path):
    run_dir = make_run(tmp_path)
    summary = summarize(str(run_dir), loss_window=3, plot=False)
    assert summary["ActualLoss"] == 2.08333   # (2.25 + 2.0 + 2.0) / 3
    summary = summarize(str(run_dir), loss_window=1, plot=False)
    assert summary["ActualLoss"] == 2.0


def test_eval_only_run(tmp_path, capsys):
    run_json = {"mode": "eval", "network": "BEVDepth", "rank_size": 1, "device_type": "Ascend910B",
                "case_name": "BEVDepth_eval_1p", "start_time_s": 100, "end_time_s": 160.5}
    run_dir = make_run(tmp_path, log=None, run_json=run_json, metrics=METRICS,
                       metrics_rel="outputs/eval/metrics_summary.json")
    assert cli(run_dir) == 0
    assert (run_dir / "BEVDepth_eval_1p.log").read_text() == (
        "Network = BEVDepth\n"
        "RankSize = 1\n"
        "DeviceType = Ascend910B\n"
        "CaseName = BEVDepth_eval_1p\n"
        "E2ETrainingTime = 60.5\n"
        "mAP = 0.33041234567\n"
        "mATE = 0.6081\n"
        "mASE = 0.2768\n"
        "mAOE = 0.5512\n"
        "mAVE = 0.4124\n"
        "mAAE = 0.2147\n"
        "NDS = 0.43551234567\n"
    )
    summary = read_summary(run_dir)
    assert summary["steps_total"] == 0 and summary["steps_measured"] == 0
    assert "ActualFPS" not in summary and "TrainingTime" not in summary
    assert summary["files"] == ["BEVDepth_eval_1p.log", "summary.json"]
    assert summary["sources"]["metrics"] == "outputs/eval/metrics_summary.json"
    assert summary["complete"] is True and summary["warnings"] == []
    assert not (run_dir / "curves.png").exists()
    assert capsys.readouterr().err == ""


def test_no_step_lines_in_a_performance_run_warns_and_exits_1(tmp_path, capsys):
    run_dir = make_run(tmp_path, log="empty.jsonl", run_json={"mode": "performance"})
    assert cli(run_dir) == 1
    summary = read_summary(run_dir)
    assert summary["steps_total"] == 0 and "ActualFPS" not in summary
    assert "ActualLoss" not in summary and "TrainingTime" not in summary
    assert summary["complete"] is False
    assert summary["warnings"] == ["performance run is missing ActualFPS (no measured step lines)"]
    assert (run_dir / "BEVDepth_perf.log").read_text() == (
        "Network = BEVDepth\nCaseName = BEVDepth_perf\n")
    assert not (run_dir / "curves.png").exists()
    assert "warning: performance run is missing ActualFPS" in capsys.readouterr().err


def test_no_step_lines_in_an_eval_run_is_fine(tmp_path):
    run_dir = make_run(tmp_path, log="empty.jsonl", run_json={"mode": "eval"}, metrics=METRICS)
    assert cli(run_dir, "--steps", run_dir / "steps.jsonl") == 0
    summary = read_summary(run_dir)
    assert summary["steps_total"] == 0 and summary["mAP"] == 0.33041234567
    assert summary["sources"]["step_log"] == "steps.jsonl"


def test_full_run_without_metrics_exits_1(tmp_path, capsys):
    run_dir = make_run(tmp_path, run_json={"mode": "full"})
    assert cli(run_dir, "--no-plot") == 1
    summary = read_summary(run_dir)
    assert summary["ActualFPS"] == 24.0 and "mAP" not in summary
    assert "missing mAP/NDS" in capsys.readouterr().err


@pytest.mark.parametrize("log, metrics, mode", [
    ("clean.jsonl", None, "performance"),
    ("clean.jsonl", METRICS, "full"),
    (None, METRICS, "eval"),
    ("empty.jsonl", METRICS, "eval"),
])
def test_mode_is_inferred_without_run_json(tmp_path, log, metrics, mode):
    run_dir = make_run(tmp_path, log=log, metrics=metrics)
    summary = summarize(str(run_dir), plot=False)
    assert summary["mode"] == mode and summary["complete"] is True
    assert summary["sources"]["mode"] == "inferred from what RUN_DIR holds"


def test_log_without_steps_and_no_metrics_is_incomplete(tmp_path):
    run_dir = make_run(tmp_path, log="empty.jsonl")
    assert cli(run_dir) == 1
    assert read_summary(run_dir)["mode"] is None


def test_resumed_run(tmp_path):
    run_dir = make_run(tmp_path, log="resumed.jsonl")
    summary = summarize(str(run_dir), warmup_steps=2, plot=False)
    # Measured: step 3 of the first process (2 s) and steps 6-8 of the resumed one (4 s each).
    assert summary["steps_total"] == 8 and summary["steps_measured"] == 4
    assert summary["steps_duplicate_dropped"] == 3 and summary["restarts"] == 1
    assert summary["ActualFPS"] == 18.2857      # 4 x 64 / 14
    assert summary["data_time_fraction"] == 0.25   # (0.5 + 3 x 1.0) / 14
    assert summary["ActualLoss"] == 20.75       # (11 + 12 + 13 + 24 + 25 + 26 + 27 + 28) / 8
    assert summary["TrainingTime"] == 32.0      # 3 + 3 + 2 + 6 + 6 + 4 + 4 + 4


def test_malformed_lines_and_nan_loss_are_reported(tmp_path):
    run_dir = make_run(tmp_path, log="malformed.jsonl", run_json={"mode": "performance"})
    summary = summarize(str(run_dir), warmup_steps=0, plot=False)
    assert summary["malformed_lines"] == 13
    assert len(summary["malformed_examples"]) == 10
    first = summary["malformed_examples"][0]
    assert (first["line"], first["reason"]) == (2, "missing key(s): images_per_sample")
    assert first["excerpt"].startswith('{"step": 2, "epoch": 0, "step_time_s": 2.0')
    assert summary["steps_total"] == 3 and summary["ActualFPS"] == 32.0   # 3 x 64 / 6
    # Step 2's loss is nan, so the final-loss window holds a nan: left out, not averaged away.
    assert "ActualLoss" not in summary and summary["nonfinite_loss_steps"] == 1
    assert any(w.startswith("13 malformed step line(s) in steps.jsonl")
               for w in summary["warnings"])
    assert any("ActualLoss left out" in w for w in summary["warnings"])
    assert summary["complete"] is True


def test_batch_mismatch_is_a_warning(tmp_path):
    run_dir = make_run(tmp_path, run_json={"rank_size": 4, "batch_size_per_device": 8})
    summary = summarize(str(run_dir), plot=False)
    assert ("global_batch in the log is 64, but BatchSize x RankSize is 8 x 4 = 32"
            in summary["warnings"])


def test_summary_json_is_strict_sorted_and_what_python_gets(tmp_path):
    run_dir = make_run(tmp_path, log="malformed.jsonl", metrics=METRICS)
    returned = summarize(str(run_dir), plot=False)
    text = (run_dir / "summary.json").read_text()

    def no_constants(name):
        raise AssertionError(f"summary.json holds {name}")

    data = json.loads(text, parse_constant=no_constants)
    assert data == returned
    assert text == json.dumps(data, sort_keys=True, indent=2) + "\n"


# ----- finding inputs ---------------------------------------------------------------------------

def test_the_step_log_is_found_in_the_run_directory_or_below_it(tmp_path):
    run_dir = make_run(tmp_path, log=None)
    for node, fixture in ((0, "clean.jsonl"), (1, "resumed.jsonl")):
        path = run_dir / "output" / f"node{node}" / "steps.jsonl"
        path.parent.mkdir(parents=True)
        shutil.copyfile(os.path.join(FIXTURES, fixture), path)
    os.utime(run_dir / "output/node0/steps.jsonl", (2000, 2000))
    os.utime(run_dir / "output/node1/steps.jsonl", (1000, 1000))
    assert find_steps(str(run_dir)) == str(run_dir / "output/node0/steps.jsonl")
    summary = summarize(str(run_dir), plot=False)
    assert summary["sources"]["step_log"] == "output/node0/steps.jsonl"
    # The run directory's own step log comes first, however old.
    shutil.copyfile(os.path.join(FIXTURES, "resumed.jsonl"), run_dir / "steps.jsonl")
    os.utime(run_dir / "steps.jsonl", (10, 10))
    assert find_steps(str(run_dir)) == str(run_dir / "steps.jsonl")


def test_newest_metrics_summary_is_used_unless_named(tmp_path):
    old = dict(METRICS, mean_ap=0.1)
    run_dir = make_run(tmp_path, metrics=old, metrics_rel="eval_1/metrics_summary.json")
    newer = run_dir / "eval_2" / "metrics_summary.json"
    newer.parent.mkdir()
    newer.write_text(json.dumps(METRICS))
    os.utime(run_dir / "eval_1/metrics_summary.json", (1000, 1000))
    os.utime(newer, (2000, 2000))
    assert summarize(str(run_dir), plot=False)["mAP"] == 0.33041234567
    named = summarize(str(run_dir), metrics_path=str(run_dir / "eval_1/metrics_summary.json"),
                      plot=False)
    assert named["mAP"] == 0.1 and named["sources"]["metrics"] == "eval_1/metrics_summary.json"


# ----- bad input --------------------------------------------------------------------------------

def test_missing_run_dir_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert cli(missing) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


@pytest.mark.parametrize("case, message", [
    ("performance_without_log", "no step log in"),
    ("missing_log_flag", "(--steps) does not exist"),
    ("missing_metrics_flag", "(--metrics) does not exist"),
    ("eval_without_metrics", "no metrics_summary.json below"),
    ("empty_dir", "nothing to summarize in"),
    ("run_json_not_json", "cannot read run metadata"),
    ("run_json_bad_field", "rank_size must be an integer >= 1, got '8'"),
    ("run_json_bad_mode", "mode must be one of full, performance, eval"),
    ("metrics_without_tp_errors", "not a nuScenes metrics summary: no tp_errors.trans_err"),
    ("case_name_with_slash", "is not a plain file name"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case, message):
    argv = ["--no-plot"]
    if case == "performance_without_log":
        run_dir = make_run(tmp_path, log=None, run_json={"mode": "performance"}, metrics=METRICS)
    elif case == "missing_log_flag":
        run_dir = make_run(tmp_path)
        argv += ["--steps", str(run_dir / "nope.jsonl")]
    elif case == "missing_metrics_flag":
        run_dir = make_run(tmp_path)
        argv += ["--metrics", str(run_dir / "nope.json")]
    elif case == "eval_without_metrics":
        run_dir = make_run(tmp_path, run_json={"mode": "eval"})
    elif case == "empty_dir":
        run_dir = make_run(tmp_path, log=None)
    elif case == "run_json_not_json":
        run_dir = make_run(tmp_path)
        (run_dir / "run.json").write_text("{mode: full")
    elif case == "run_json_bad_field":
        run_dir = make_run(tmp_path, run_json={"rank_size": "8"})
    elif case == "run_json_bad_mode":
        run_dir = make_run(tmp_path, run_json={"mode": "train"})
    elif case == "metrics_without_tp_errors":
        run_dir = make_run(tmp_path, metrics={"mean_ap": 0.3, "nd_score": 0.4})
    else:
        run_dir = make_run(tmp_path)
        argv += ["--case-name", "../escape"]
    before = listing(run_dir)
    assert cli(run_dir, *argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert listing(run_dir) == before


def test_bad_input_raises_from_python(tmp_path):
    with pytest.raises(SummarizeInputError, match="does not exist"):
        summarize(str(tmp_path / "missing"))
    run_dir = make_run(tmp_path)
    with pytest.raises(SummarizeInputError, match="--warmup-steps"):
        summarize(str(run_dir), warmup_steps=-1)


def test_never_overwrites_the_training_log(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "train_0.log").write_text("Epoch 0: 100%|##########| 4/4\n")
    before = (run_dir / "train_0.log").read_bytes()
    assert cli(run_dir, "--no-plot", "--case-name", "train_0") == 2
    assert "not an earlier summary" in capsys.readouterr().err
    assert (run_dir / "train_0.log").read_bytes() == before


def test_never_replaces_a_file_that_is_not_a_summary(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    notes = run_dir / "BEVDepth_perf.log"
    notes.write_text("operator notes: rerun on node 3\n")
    assert cli(run_dir, "--no-plot") == 2
    assert "not an earlier summary" in capsys.readouterr().err
    assert notes.read_text() == "operator notes: rerun on node 3\n"
    assert not (run_dir / "summary.json").exists()


def test_bad_flag_values_are_rejected_by_argparse(tmp_path):
    run_dir = make_run(tmp_path)
    for argv in (["--warmup-steps", "-1"], ["--rank-size", "0"], ["--mode", "train"],
                 ["--loss-window", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(run_dir, *argv)
        assert exit_info.value.code == 2


# ----- the plot -----------------------------------------------------------------------------------

def test_curves_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = make_run(tmp_path)
    summary = summarize(str(run_dir))
    assert "curves.png" in summary["files"]
    with open(run_dir / "curves.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_loss_is_plotted_on_a_log_scale_when_it_is_positive():
    pytest.importorskip("matplotlib")
    from bevdepth_npu.steplog import read_steps
    from bevdepth_npu.summarize.plot import curves_figure
    log = read_steps(os.path.join(FIXTURES, "clean.jsonl"))
    loss_axes, lr_axes, _ = curves_figure(log, 5, "t").axes
    assert loss_axes.get_yscale() == "log" and lr_axes.get_yscale() == "linear"
    # A loss that is zero or negative somewhere keeps the linear scale.
    negative = read_steps(os.path.join(FIXTURES, "malformed.jsonl"))
    negative.records[0] = dataclasses.replace(negative.records[0], loss=-1.0)
    assert curves_figure(negative, 0, "t").axes[0].get_yscale() == "linear"


def test_missing_matplotlib_skips_only_the_png(tmp_path, monkeypatch, capsys):
    # Make "import matplotlib" fail as it does where the package is not installed.
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run_dir = make_run(tmp_path, run_json={"mode": "performance"})
    assert cli(run_dir) == 0
    assert not (run_dir / "curves.png").exists()
    summary = read_summary(run_dir)
    assert summary["files"] == ["BEVDepth_perf.log", "summary.json"]
    assert summary["ActualFPS"] == 24.0
    assert any(w.startswith("matplotlib is not installed") for w in summary["warnings"])
    assert "warning: matplotlib is not installed" in capsys.readouterr().err
