"""test/train_full_8p.sh, train_performance_8p.sh and eval_bevdepth.sh end to end on CPU.

Each script runs with 1 and with 2 processes (DDP over gloo) on the smoke experiment at test
sizes (tests/integration/_scripts_helpers/tiny_exp.py) and a 10-sample synthetic nuScenes; the
assertions check the ModelZoo files, the summary keys and values against the step log, run.json
and the devkit's metrics, that a 2-process evaluation scores exactly what a 1-process one does,
that a failing training exits non-zero without evaluating, and that no run touches an earlier
run's directory. The performance run with one process uses the classic layout (the scripts
copied into BEVDepth/test/).

Run: python -m pytest tests/integration/test_scripts_e2e.py -q   (in the bevdepth-npu env; ~5 min)
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

from tests.integration import _scripts_helpers as helpers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NETWORK = "BEVDepth_for_PyTorch"
TRAIN_STEPS = 3   # --limit_train_batches: 3 steps of batch 1 per process


@pytest.fixture(scope="module")
def stack():
    return helpers.require_stack()


@pytest.fixture(scope="module")
def data(stack, tmp_path_factory):
    return helpers.tiny_dataset(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("scripts_out")


def _train_args():
    return ["--", *helpers.EXP_ARGS, "--limit_train_batches", str(TRAIN_STEPS)]


@pytest.fixture(scope="module")
def full_1p(data, out):
    env = helpers.script_env(out / "full1", data, CARDS=1, EPOCHS=1, EVAL_CARDS=1, DOCTOR=1)
    proc = helpers.run_script("train_full_8p.sh", env, _train_args())
    (run_dir,) = helpers.run_dirs(out / "full1")
    return proc, run_dir, helpers.snapshot(run_dir)


@pytest.fixture(scope="module")
def full_2p(data, out):
    env = helpers.script_env(out / "full2", data, CARDS=2, EPOCHS=1, EVAL_CARDS=2,
                             OMP_NUM_THREADS=1)
    proc = helpers.run_script("train_full_8p.sh", env, _train_args())
    (run_dir,) = helpers.run_dirs(out / "full2")
    return proc, run_dir


def _step_log(run_dir: Path):
    from bevdepth_npu.steplog import read_steps
    return read_steps(run_dir / "steps.jsonl")


def _check_training_summary(run_dir: Path, cards: int, mode: str):
    """Case log and summary.json of a training run agree with its step log and run.json."""
    kind = {"full": "acc", "performance": "perf"}[mode]
    case = f"{NETWORK}_bs1_{cards}p_{kind}"
    values = helpers.read_case_log(run_dir / f"{case}.log")
    summary = helpers.read_json(run_dir / "summary.json")
    run = helpers.read_json(run_dir / "run.json")
    assert values["Network"] == NETWORK
    assert values["RankSize"] == str(cards)
    assert values["BatchSize"] == "1"
    assert values["CaseName"] == case
    assert values["DeviceType"] == os.uname().machine
    assert run["status"] == "completed" and run["mode"] == mode

    log = _step_log(run_dir)
    assert not log.malformed, log.malformed
    # Rank 0 alone writes one line per step: steps 1..n, each with the global batch.
    assert [r.step for r in log.records] == list(range(1, TRAIN_STEPS + 1))
    assert all(r.global_batch == cards and r.images_per_sample == 12 for r in log.records)
    assert all(r.lr == pytest.approx(3.125e-06 * cards) for r in log.records)
    measured = log.records[1:]   # WARMUP_STEPS=1
    samples_per_s = sum(r.global_batch for r in measured) / sum(r.step_time_s for r in measured)
    assert float(values["ActualFPS"]) == pytest.approx(samples_per_s, rel=1e-5)
    assert summary["images_per_s"] == pytest.approx(samples_per_s * 12, rel=1e-5)
    assert float(values["ActualLoss"]) == pytest.approx(
        sum(r.loss for r in log.records) / len(log.records), rel=1e-5)
    training_time_s = float(values["TrainingTime"])
    assert training_time_s == pytest.approx(run["train_end_s"] - run["train_start_s"], rel=1e-5)
    assert float(values["E2ETrainingTime"]) >= training_time_s > 0
    for key, value in values.items():
        if key in summary and isinstance(summary[key], (int, float)):
            assert float(value) == pytest.approx(summary[key]), key
    assert (run_dir / "curves.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # The ModelZoo paths are links to this (the newest) run's files.
    device_dir = run_dir.parent
    assert (device_dir / "train_0.log").resolve() == (run_dir / "train_0.log").resolve()
    assert (device_dir / f"{case}.log").resolve() == (run_dir / f"{case}.log").resolve()
    assert (device_dir / "latest").resolve() == run_dir.resolve()
    # Core binding is for NPU training only; never for evaluation.
    attempt = run["attempts"][-1]
    assert attempt["bind_cores"] == 0
    return values


def _check_metrics(run_dir: Path, values) -> dict:
    (metrics_json,) = (run_dir / "eval").rglob("metrics_summary.json")
    metrics = helpers.devkit_metrics(metrics_json)
    for key in helpers.METRIC_KEYS:
        assert float(values[key]) == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key
        assert math.isfinite(float(values[key]))
    return metrics


@pytest.mark.parametrize("cards", [1, 2])
def test_train_full(cards, full_1p, full_2p):
    proc, run_dir = (full_1p[:2] if cards == 1 else full_2p)
    values = _check_training_summary(run_dir, cards, "full")
    _check_metrics(run_dir, values)
    assert (run_dir.parent / "eval_0.log").resolve() == (run_dir / "eval_0.log").resolve()
    run = helpers.read_json(run_dir / "run.json")
    assert run["attempts"][-1]["bind_cores_eval"] == 0
    assert run["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert "new run directory" in proc.stdout
    if cards == 1:  # the self-test ran first, quietly, and passed
        doctor = helpers.read_json(run_dir / "doctor.json")
        assert doctor["ok"] is True and doctor["device"] == "cpu"
        assert "self-test: bevdepth-npu doctor --quick" in proc.stdout
        assert "PASS" not in proc.stdout


@pytest.mark.parametrize("cards", [1, 2])
def test_train_performance(cards, data, out, stack):
    script_dir = None
    env_settings = dict(CARDS=cards, EPOCHS=1)
    if cards == 1:
        # Classic flow: the scripts copied into BEVDepth/test/ and run from the checkout, which
        # here is a tree of links to the patched checkout; the helper package comes from
        # PYTHONPATH (an installed bevdepth-npu in a real environment).
        classic = helpers.link_checkout(out / "classic" / "BEVDepth")
        for script in helpers.TEST_DIR.glob("*.sh"):
            shutil.copy(script, classic / "test" / script.name)
        script_dir = classic / "test"
    env = helpers.script_env(out / f"perf{cards}", data, **env_settings)
    if cards == 1:
        del env["BEVDEPTH_NPU_BEVDEPTH_ROOT"]
        del env["BEVDEPTH_NPU_OUTPUT_ROOT"]
        env["PYTHONPATH"] = os.pathsep.join([str(helpers.REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = helpers.run_script("train_performance_8p.sh", env, _train_args(),
                              script_dir=script_dir, cwd=script_dir)
    output_root = (script_dir / "output") if cards == 1 else out / f"perf{cards}"
    (run_dir,) = helpers.run_dirs(output_root)
    values = _check_training_summary(run_dir, cards, "performance")
    assert not any(key in values for key in helpers.METRIC_KEYS)
    assert not (run_dir / "eval_0.log").exists()
    if cards == 1:
        assert str(classic) in (run_dir / "run.json").read_text()
    assert proc.returncode == 0


def test_eval_two_processes_score_like_one(full_2p, out, data):
    """eval_bevdepth.sh with 1 and with 2 processes on the same checkpoint gives the same
    metrics, bit for bit, and those of the 2-process evaluation inside train_full_8p.sh: every
    validation sample (5, an odd count, so the 2-rank sampler pads one) is scored exactly
    once. One torch thread per process everywhere, so that only the process count differs."""
    train_run = full_2p[1]
    expected = _check_metrics(train_run, helpers.read_case_log(
        train_run / f"{NETWORK}_bs1_2p_acc.log"))
    ckpt = train_run / "checkpoints" / "last.ckpt"
    scored = {}
    for cards, target in ((1, ckpt), (2, train_run)):   # a file, and a run directory
        env = helpers.script_env(out / f"eval{cards}", data, CARDS=cards, BATCH_SIZE=1,
                                 OMP_NUM_THREADS=1)
        proc = helpers.run_script("eval_bevdepth.sh", env,
                                  [f"--ckpt={target}", "--", *helpers.EXP_ARGS])
        (run_dir,) = helpers.run_dirs(out / f"eval{cards}")
        case = f"{NETWORK}_bs1_{cards}p_eval"
        values = helpers.read_case_log(run_dir / f"{case}.log")
        assert values["CaseName"] == case and values["RankSize"] == str(cards)
        assert not any(key in values for key in ("ActualFPS", "ActualLoss", "TrainingTime"))
        scored[cards] = _check_metrics(run_dir, values)
        results = helpers.read_json(next((run_dir / "eval").rglob("results_nusc.json")))
        assert len(results["results"]) == 5
        run = helpers.read_json(run_dir / "run.json")
        assert run["mode"] == "eval" and run["status"] == "completed"
        assert run["checkpoint"] == str(ckpt)
        assert run["attempts"][-1]["bind_cores_eval"] == 0
        assert (run_dir.parent / "eval_0.log").resolve() == (run_dir / "eval_0.log").resolve()
        assert proc.returncode == 0
    assert scored[1] == scored[2] == expected


def test_eval_without_a_checkpoint_says_so(out, data):
    # A checkout without outputs/ and an empty output root: nothing to evaluate.
    empty = helpers.script_env(out / "nothing_here", data,
                               BEVDEPTH_ROOT=helpers.link_checkout(out / "bare" / "BEVDepth"))
    proc = helpers.run_script("eval_bevdepth.sh", empty, check=False)
    assert proc.returncode == 1
    assert "no checkpoint found below" in proc.stdout and "--ckpt=PATH" in proc.stdout
    assert not helpers.run_dirs(out / "nothing_here")


def test_failing_training_exits_nonzero_without_evaluating(full_1p, out, data):
    proc0, first_run, before = full_1p
    env = helpers.script_env(out / "full1", data, CARDS=1, EPOCHS=1)
    proc = helpers.run_script("train_full_8p.sh", env, ["--", "--no_such_flag"], check=False)
    assert proc.returncode != 0
    assert "training failed" in proc.stdout and "evaluation skipped" in proc.stdout
    runs = helpers.run_dirs(out / "full1")
    new_run = [r for r in runs if r != first_run and (r / "run.json").is_file()
               and "--no_such_flag" in (r / "run.json").read_text()]
    assert len(new_run) == 1
    assert not (new_run[0] / "eval_0.log").exists()
    run = helpers.read_json(new_run[0] / "run.json")
    assert run["status"] == "failed" and run["attempts"][-1]["train_exit_code"] != 0
    assert "eval_exit_code" not in run["attempts"][-1]
    # The earlier run kept every file, byte count and time stamp.
    assert helpers.snapshot(first_run) == before
    # ...and the ModelZoo links follow the newest run.
    assert (first_run.parent / "latest").resolve() == new_run[0].resolve()
