"""The held-out learning check (``python -m bench.learning_check --held-out``) and its ablations.

The check is a benchmark of half an hour; here its code paths run at the smallest size (two
training scenes, one held-out scene, two training steps of batch 1), once unbroken and once per
ablation, so that a change that breaks the held-out data, the train-split evaluation, the
picture, the match rate or the ablation wrapper fails in CI. The ablations' own effect on the
loader is checked directly on the functions they replace. Needs the bevdepth-npu env.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.integration import _bevdepth_helpers

REPO_ROOT = Path(__file__).resolve().parents[2]


def _dataset_module():
    _bevdepth_helpers.require_env()
    return pytest.importorskip("bevdepth.datasets.nusc_det_dataset",
                               reason=_bevdepth_helpers.ENV_REASON)


@pytest.mark.parametrize("name, flip, rotate, matrix_of", [
    ("rotation-geometry", False, 5.0, (False, 0.0)),
    ("flip-geometry", True, 3.0, (False, 3.0)),
])
def test_geometry_breaks_augment_the_image_but_not_the_matrix(name, flip, rotate, matrix_of):
    from PIL import Image

    from bench import ablation

    module = _dataset_module()
    broken = types.SimpleNamespace(img_transform=module.img_transform)
    {"rotation-geometry": ablation.break_rotation_geometry,
     "flip-geometry": ablation.break_flip_geometry}[name](broken)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
    params = (0.5, (45, 80), (4, 5, 84, 50))
    image, matrix = broken.img_transform(img, *params, flip, rotate)
    true_image, true_matrix = module.img_transform(img, *params, flip, rotate)
    _, matrix_left_out = module.img_transform(img, *params, *matrix_of)
    assert np.array_equal(np.asarray(image), np.asarray(true_image))
    assert np.allclose(matrix.numpy(), matrix_left_out.numpy())
    assert not np.allclose(matrix.numpy(), true_matrix.numpy(), atol=1e-3)


def test_augmentation_break_gives_the_evaluation_matrix():
    from PIL import Image

    from bench import ablation

    module = _dataset_module()
    # A subclass, so that the break's replacement method stays off the real class.
    broken = types.SimpleNamespace(img_transform=module.img_transform,
                                   NuscDetDataset=type("Dataset", (module.NuscDetDataset,), {}))
    ablation.break_augmentation_geometry(broken)
    dataset = object.__new__(broken.NuscDetDataset)
    dataset.is_train = True
    dataset.ida_aug_conf = dict(H=90, W=160, final_dim=(32, 88), resize_lim=(0.4, 0.6),
                                bot_pct_lim=(0.0, 0.0), rot_lim=(-5.4, 5.4), rand_flip=True)
    np.random.seed(3)
    drawn = dataset.sample_ida_augmentation()
    assert dataset.is_train
    dataset.is_train = False
    evaluation = module.NuscDetDataset.sample_ida_augmentation(dataset)
    assert drawn != evaluation
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    image, matrix = broken.img_transform(img, *drawn)
    true_image, true_matrix = module.img_transform(img, *drawn)
    _, evaluation_matrix = module.img_transform(img, *evaluation)
    assert np.array_equal(np.asarray(image), np.asarray(true_image))
    assert np.allclose(matrix.numpy(), evaluation_matrix.numpy())
    assert not np.allclose(matrix.numpy(), true_matrix.numpy(), atol=1e-3)


def test_depth_break_shifts_only_the_depth_column():
    from bench import ablation

    rows = np.array([[10.0, 20.0, 5.0], [30.0, 40.0, 12.5]], dtype=np.float32)
    broken = types.SimpleNamespace(load_depth_gt=lambda path: rows,
                                   project_lidar_depth=lambda *a: rows)
    ablation.break_depth_labels(broken, 2.0)
    for got in (broken.load_depth_gt("x.bin"), broken.project_lidar_depth(1, 2, 3, 4)):
        assert np.array_equal(got[:, :2], rows[:, :2])
        assert np.array_equal(got[:, 2], rows[:, 2] + 2.0)
    assert rows[0, 2] == 5.0   # the loaded array itself is left alone


def test_no_depth_labels_break_gives_empty_rows_the_loader_can_use():
    from bench import ablation

    module = _dataset_module()
    rows = np.array([[10.0, 20.0, 5.0], [30.0, 40.0, 12.5]], dtype=np.float32)
    broken = types.SimpleNamespace(load_depth_gt=lambda path: rows,
                                   project_lidar_depth=lambda *a: rows)
    ablation.drop_depth_labels(broken)
    for got in (broken.load_depth_gt("x.bin"), broken.project_lidar_depth(1, 2, 3, 4)):
        assert got.shape == (0, 3) and got.dtype == rows.dtype
        # the loader's own transform turns them into a depth map with no label anywhere
        depth = module.depth_transform(got, 0.5, (32, 88), (0, 0, 88, 32), False, 0.0)
        assert tuple(depth.shape) == (32, 88) and not depth.any()
    assert len(rows) == 2   # the loaded array itself is left alone


@pytest.mark.slow
@pytest.mark.parametrize("ablation_args", [[], ["--ablation", "rotation-geometry"],
                                           ["--ablation", "flip-geometry"],
                                           ["--ablation", "augmentation-geometry"],
                                           ["--ablation", "depth-shift", "--depth-shift-m", "3"],
                                           ["--ablation", "no-depth-labels"]],
                         ids=["real", "rotation-geometry", "flip-geometry", "augmentation-geometry",
                              "depth-shift", "no-depth-labels"])
def test_held_out_check_runs_its_first_steps(tmp_path, ablation_args):
    _dataset_module()
    pytest.importorskip("nuscenes", reason=_bevdepth_helpers.ENV_REASON)
    out = tmp_path / "check"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.learning_check", "--held-out", "--train-scenes", "2",
         "--val-scenes", "1", "--samples-per-scene", "2", "--steps", "2", "--eval-every", "2",
         "--batch-size", "1", "--device", "cpu", "--num-workers", "0", "--out-dir", str(out),
         *ablation_args],
        cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((out / "learning_check.json").read_text())
    assert result["held_out"] is True and result["target_mAP"] == 0.4
    assert result["machine"]["cpu_model"] and result["machine"]["torch_cpu_capability"]
    assert result["ablation"] == (ablation_args[1] if ablation_args else "none")
    assert result["settings"]["train_samples"] == 4 and result["settings"]["samples"] == 2
    assert [s["step"] for s in result["steps"]] == [1, 2]
    assert 0.0 <= result["train_scene_mAP"] <= 1.0
    assert len(result["per_class_AP"]) == 10 and len(result["train_scene_per_class_AP"]) == 10
    rates = result["match_rate"]
    assert rates["sample"]["samples"] == 1 and rates["held_out"]["samples"] == 2
    assert 0 < rates["sample"]["gt_boxes"] <= rates["held_out"]["gt_boxes"]
    (picture,) = result["picture"]
    assert Path(picture).read_bytes().startswith(b"\x89PNG")
    train_log = (out / "train_00002" / "train.log").read_text()
    if ablation_args:
        assert f"bench.ablation: {ablation_args[1]} broken on purpose" in train_log
        if ablation_args[1] == "depth-shift":
            assert "(3 m)" in train_log
    else:
        assert "bench.ablation" not in train_log
    assert "train scenes mAP" in proc.stdout and "ground-truth boxes with a prediction" in proc.stdout
