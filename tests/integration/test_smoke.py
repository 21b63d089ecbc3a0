"""End-to-end smoke run and evaluation sanity check on the synthetic nuScenes.

- test/train_smoke.sh, the README's main-job command, at CI sizes (a 2 x 2-sample dataset, two
  training steps of batch 1): exit 0, the metrics table on stdout, the devkit's metrics JSON with
  finite values, summary.json agreeing with it, a loss-curve PNG, run.json, the ModelZoo links;
  the default dataset is cached under BEVDEPTH_NPU_CACHE and reused; a failing training exits
  non-zero without evaluating and leaves the earlier run untouched.
- Evaluation sanity: the ground truth of the synthetic mini_val scene, converted to the model's
  ego-frame output by NuscDetDataset.get_gt and fed through DetNuscEvaluator with the image
  metadata of NuscDetDataset.__getitem__, scores mAP >= 0.99 and NDS >= 0.99 with the nuScenes
  devkit. This checks the ego/global box conversions, yaw and velocity end to end; the same
  boxes with a yaw or velocity error must score lower (the check can fail).

They need the bevdepth-npu env (patched bevdepth with the smoke experiment, mmcv with ops,
mmdet3d, nuscenes-devkit, pytorch-lightning) and skip without it. Run (about 3 minutes on CPU):
    PYTHONPATH=. python -m pytest tests/integration/test_smoke.py -q
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from bevdepth_npu.run.settings import OPTIONS
from bevdepth_npu.steplog import read_steps
from tests.integration import _bevdepth_helpers

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "test" / "train_smoke.sh"
SMOKE_EXP = Path("bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py")
CASE_NAME = "BEVDepth_smoke_bs1_1p_acc"
STEPS = 2
SCRIPT_TIMEOUT_S = 1200  # a tiny run takes ~2 minutes on two busy cores
TP_ERRORS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
CLASSES = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
           "bicycle", "pedestrian", "traffic_cone"]


@pytest.fixture(scope="module")
def bevdepth_root() -> Path:
    _bevdepth_helpers.require_env()
    pytest.importorskip("nuscenes", reason=_bevdepth_helpers.ENV_REASON)
    root = _bevdepth_helpers.patched_root()
    if not (root / SMOKE_EXP).is_file():
        pytest.fail(f"{root / SMOKE_EXP} is missing: bevdepth is imported from {root}, which "
                    "is not the patched tree (bevdepth-npu env)")
    return root


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for option in OPTIONS:
        env.pop(option.env, None)  # settings of the caller's shell must not leak into the runs
    env.update(extra)
    return env


def _run_script(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=str(REPO_ROOT), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=SCRIPT_TIMEOUT_S)


def _run_dirs(output_root: Path) -> List[Path]:
    return sorted(p for p in (output_root / "0").glob(f"{CASE_NAME}_*") if p.is_dir())


# ------------------------------------------------------------------------------ train_smoke.sh

@pytest.fixture(scope="module")
def smoke_run(bevdepth_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    env = _env(BEVDEPTH_NPU_CACHE=str(base / "cache"), BEVDEPTH_NPU_DEVICE="cpu")
    args = [f"--python={sys.executable}", f"--output-root={base / 'out'}", f"--steps={STEPS}",
            "--batch-size=1", "--scenes=2", "--samples-per-scene=2", "--warmup-steps=1"]
    proc = _run_script(args, env)
    return dict(base=base, env=env, args=args, proc=proc)


def test_train_smoke_runs_the_pipeline_and_prints_the_metrics_table(smoke_run):
    proc = smoke_run["proc"]
    assert proc.returncode == 0, proc.stdout[-5000:]
    (run_dir,) = _run_dirs(smoke_run["base"] / "out")
    out = proc.stdout
    # the table comes last: mAP, the five errors, NDS, one row per class
    table = out[out.rindex("nuScenes detection metrics"):]
    for key in ("mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS"):
        assert re.search(rf"^{key}: \d+\.\d{{4}}$", table, re.M), (key, table)
    for name in CLASSES:
        assert re.search(rf"^{name}\s+\d+\.\d{{3}}", table, re.M), (name, table)
    assert f"run directory: {run_dir}" in out
    assert "data: generating" in out
    # Quiet: stage lines, progress, results; mmcv's per-parameter initialisation report and
    # the rest of each stage's output are in the run directory's logs only.
    assert len(out.splitlines()) < 100, out
    dump = "calling `init_weights`"   # mmcv's report: one entry per parameter
    assert dump not in out and "mmcv - INFO" not in out
    assert dump in (run_dir / "train_0.log").read_text()
    assert re.search(rf"^train_smoke\.sh: train: step {STEPS}/{STEPS}, ", out, re.M), out
    # the first validation sample drawn against the ground truth, its path printed
    (picture,) = (run_dir / "eval" / "show").glob("*.png")
    assert f"predictions drawn: {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_smoke_writes_metrics_json_summary_and_loss_curve(smoke_run):
    (run_dir,) = _run_dirs(smoke_run["base"] / "out")
    metrics = json.loads((run_dir / "eval" / "metrics_summary.json").read_text())
    assert math.isfinite(metrics["mean_ap"]) and 0.0 <= metrics["mean_ap"] <= 1.0
    assert math.isfinite(metrics["nd_score"]) and 0.0 <= metrics["nd_score"] <= 1.0
    assert set(metrics["tp_errors"]) == set(TP_ERRORS)
    assert all(math.isfinite(v) and v >= 0.0 for v in metrics["tp_errors"].values())
    assert set(metrics["mean_dist_aps"]) == set(CLASSES)
    assert all(math.isfinite(v) for v in metrics["mean_dist_aps"].values())

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mAP"] == pytest.approx(metrics["mean_ap"], rel=1e-5)
    assert summary["NDS"] == pytest.approx(metrics["nd_score"], rel=1e-5)
    assert summary["steps_total"] == STEPS and summary["steps_measured"] == STEPS - 1
    assert summary["complete"] is True and summary["ActualFPS"] > 0
    assert math.isfinite(summary["ActualLoss"])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / f"{CASE_NAME}.log").read_text().startswith("Network = ")

    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["mode"] == "full" and run["steps"] == STEPS
    assert run["start_time_s"] <= run["train_start_s"] < run["train_end_s"] <= run["end_time_s"]
    assert Path(run["checkpoint"]).is_file() and run_dir in Path(run["checkpoint"]).parents
    step_log = read_steps(run_dir / "steps.jsonl")
    assert [r.step for r in step_log.records] == list(range(1, STEPS + 1))
    assert step_log.malformed == []

    device_dir = smoke_run["base"] / "out" / "0"
    assert (device_dir / "latest").resolve() == run_dir.resolve()
    for name in ("train_0.log", "eval_0.log", f"{CASE_NAME}.log"):
        assert (device_dir / name).is_symlink() and (device_dir / name).resolve().parent == run_dir


def test_train_smoke_caches_the_dataset_and_a_failed_training_stops_before_evaluation(smoke_run):
    (first_run,) = _run_dirs(smoke_run["base"] / "out")
    before = sorted(p.relative_to(first_run) for p in first_run.rglob("*"))
    (data_dir,) = (smoke_run["base"] / "cache" / "data").iterdir()
    assert re.fullmatch(r"synth-v1\.0-mini-s2-n2-seed0-[0-9a-f]{12}", data_dir.name)
    assert (data_dir / "nuscenes_infos_val.pkl").is_file()
    assert any((data_dir / "depth_gt").iterdir())

    # an unknown experiment flag makes the training process fail
    proc = _run_script(smoke_run["args"] + ["--", "--no_such_flag"], smoke_run["env"])
    assert proc.returncode != 0
    assert f"data: reusing {data_dir}" in proc.stdout
    assert "training failed" in proc.stdout and "nuScenes detection metrics" not in proc.stdout
    runs = _run_dirs(smoke_run["base"] / "out")
    assert len(runs) == 2 and runs[0] == first_run
    failed = runs[1]
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    assert not (failed / "eval").exists()
    assert sorted(p.relative_to(first_run) for p in first_run.rglob("*")) == before


def test_train_smoke_rejects_bad_settings():
    proc = subprocess.run(["bash", str(SCRIPT), "--steps=0"], cwd=str(REPO_ROOT), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1 and "--steps: must be at least 1, got 0" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "--device=tpu"], cwd=str(REPO_ROOT), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1 and "must be one of: auto npu cuda cpu, got 'tpu'" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "--steps=5"], cwd=str(REPO_ROOT), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 1 and "--warmup-steps=5 must be below --steps=5" in proc.stdout
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], cwd=str(REPO_ROOT), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0 and "--steps=N" in proc.stdout and "usage:" in proc.stdout


# ------------------------------------------------------------------------ evaluation sanity

@pytest.fixture(scope="module")
def synth_data(bevdepth_root, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("sanity") / "nuscenes"
    env = _env()
    for command in (
            [sys.executable, "-m", "bevdepth_npu", "synth", "--out", str(data), "--scenes", "2",
             "--samples-per-scene", "6", "--seed", "3", "--quiet"],
            [sys.executable, "scripts/gen_info.py", "--data-root", str(data), "--version",
             "v1.0-mini"]):
        proc = subprocess.run(command, cwd=str(bevdepth_root), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stdout[-3000:]}"
    return data


def _evaluate_ground_truth(data: Path, out_dir: Path, yaw_error_rad: float = 0.0,
                           velocity_scale: float = 1.0) -> dict:
    """Ground truth as the model's output, through DetNuscEvaluator; the devkit's summary."""
    import numpy as np

    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
    from bevdepth.evaluators.det_evaluators import DetNuscEvaluator
    from bevdepth.exps.nuscenes import base_exp

    dataset = NuscDetDataset(ida_aug_conf=base_exp.ida_aug_conf,
                             bda_aug_conf=base_exp.bda_aug_conf, classes=CLASSES,
                             data_root=str(data), info_paths=str(data / "nuscenes_infos_val.pkl"),
                             is_train=False, img_conf=base_exp.img_conf)
    rng = np.random.default_rng(0)
    results, img_metas = [], []
    for index, info in enumerate(dataset.infos):
        boxes, labels = dataset.get_gt(info, dataset.ida_aug_conf["cams"])
        boxes = boxes.numpy().copy()  # ego frame: x y z, l w h (dx dy dz), yaw, vx vy
        boxes[:, 6] += yaw_error_rad
        boxes[:, 7:9] *= velocity_scale
        # Distinct scores: with equal scores the devkit's TP errors would be those of one box.
        scores = rng.uniform(0.2, 1.0, len(boxes)).astype(np.float32)
        results.append([boxes, scores, labels.numpy()])
        img_metas.append(dataset[index][7])  # the metadata the model's eval step passes on
    evaluator = DetNuscEvaluator(class_names=CLASSES, data_root=str(data), version="v1.0-mini",
                                 output_dir=str(out_dir))
    evaluator.evaluate(results, img_metas)
    return json.loads((out_dir / "metrics_summary.json").read_text())


def test_ground_truth_through_the_evaluator_scores_perfectly(synth_data, tmp_path):
    metrics = _evaluate_ground_truth(synth_data, tmp_path / "gt")
    assert metrics["mean_ap"] >= 0.99, metrics["mean_dist_aps"]
    assert metrics["nd_score"] >= 0.99, metrics["tp_errors"]
    errors = metrics["tp_errors"]
    for key in ("trans_err", "scale_err", "orient_err", "vel_err"):
        assert errors[key] < 0.01, (key, metrics["label_tp_errors"])
    # the generator labels attributes by the evaluator's speed rule
    assert errors["attr_err"] == 0.0, metrics["label_tp_errors"]


@pytest.mark.parametrize("yaw_error_rad, velocity_scale, worse",
                         [(0.3, 1.0, "orient_err"), (0.0, -1.0, "vel_err")])
def test_wrong_yaw_or_velocity_lowers_the_score(synth_data, tmp_path, yaw_error_rad,
                                                velocity_scale, worse):
    metrics = _evaluate_ground_truth(synth_data, tmp_path / "bad", yaw_error_rad, velocity_scale)
    assert metrics["mean_ap"] >= 0.99  # centres are still right
    assert metrics["tp_errors"][worse] > 0.1
    assert metrics["nd_score"] < 0.99
