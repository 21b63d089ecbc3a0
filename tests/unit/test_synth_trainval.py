"""The synthetic nuScenes past ten scenes: the v1.0-trainval layout (``synth --version``).

The held-out learning check trains on scenes named after the devkit's train split and scores
scenes named after its val split. These tests check the names against the devkit, the errors for
counts the layout cannot hold, that a scene's world does not depend on how many scenes are
generated beside it, and that the devkit's evaluation loader finds each split's samples.

    python -m pytest tests/unit/test_synth_trainval.py -q
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("PIL")

from bevdepth_npu import cli  # noqa: E402
from bevdepth_npu.synth import taxonomy as tx  # noqa: E402
from bevdepth_npu.synth.dataset import SynthError, plan_scenes, validate  # noqa: E402

SEED = 3


def test_trainval_names_are_the_first_of_the_devkit_splits():
    splits = pytest.importorskip("nuscenes.utils.splits")
    assert list(tx.TRAINVAL_TRAIN) == splits.train[:len(tx.TRAINVAL_TRAIN)]
    assert list(tx.TRAINVAL_VAL) == splits.val[:len(tx.TRAINVAL_VAL)]
    names = tx.scene_names(tx.TRAINVAL, 7, 2)
    assert names == tx.TRAINVAL_VAL[:2] + tx.TRAINVAL_TRAIN[:5]
    assert not set(names[:2]) & set(splits.train) and set(names[:2]) <= set(splits.val)
    assert tx.scene_names(tx.TRAINVAL, 10) == tx.TRAINVAL_VAL[:2] + tx.TRAINVAL_TRAIN[:8]
    assert tx.scene_names(tx.MINI, 3) == tx.SCENE_NAMES[:3]


@pytest.mark.parametrize("kwargs, names", [
    (dict(scenes=11), "scenes must be between 1 and 10"),
    (dict(scenes=4, val_scenes=1), "val_scenes is for --version v1.0-trainval"),
    (dict(scenes=81, version=tx.TRAINVAL), "scenes must be between 2 and 80"),
    (dict(scenes=3, val_scenes=3, version=tx.TRAINVAL), "val_scenes must be between 1 and 2"),
    (dict(scenes=70, val_scenes=2, version=tx.TRAINVAL), "scenes - val_scenes must be between 1 and 64"),
    (dict(scenes=4, version="v1.0-test"), "version must be one of v1.0-mini, v1.0-trainval"),
])
def test_counts_the_layout_cannot_hold_are_named(kwargs, names):
    args = dict(samples_per_scene=2, sweeps=0, seed=0, workers=1, version=tx.MINI, val_scenes=None)
    args.update(kwargs)
    with pytest.raises(SynthError, match=names):
        validate(args.pop("scenes"), **args)


def test_a_scenes_world_does_not_depend_on_the_scenes_beside_it():
    few = {p.name: p for p in plan_scenes(3, 2, SEED, tx.TRAINVAL, 1)}
    many = {p.name: p for p in plan_scenes(6, 2, SEED, tx.TRAINVAL, 2)}
    shared = set(few) & set(many)
    assert shared == {"scene-0003", "scene-0001", "scene-0002"}
    for name in shared:
        assert few[name].ego == many[name].ego
        assert few[name].objects == many[name].objects
    # distinct scenes have distinct worlds
    assert few["scene-0001"].ego != few["scene-0002"].ego


def test_the_command_line_writes_a_trainval_dataset_the_devkit_splits(tmp_path):
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    from nuscenes.eval.common.loaders import load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox

    out = tmp_path / "trainval"
    assert cli.main(["synth", "--out", str(out), "--version", tx.TRAINVAL, "--scenes", "3",
                     "--val-scenes", "1", "--samples-per-scene", "2", "--sweeps", "0",
                     "--seed", str(SEED), "--workers", "1", "--quiet"]) == 0
    assert os.path.isdir(out / tx.TRAINVAL) and not os.path.exists(out / tx.MINI)
    nusc = nuscenes.NuScenes(version=tx.TRAINVAL, dataroot=str(out), verbose=False)
    assert sorted(s["name"] for s in nusc.scene) == ["scene-0001", "scene-0002", "scene-0003"]
    assert len(load_gt(nusc, "val", DetectionBox, verbose=False).sample_tokens) == 2
    assert len(load_gt(nusc, "train", DetectionBox, verbose=False).sample_tokens) == 4


def test_more_than_ten_mini_scenes_point_to_the_trainval_layout(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "never"), "--scenes", "11"]) == 2
    err = capsys.readouterr().err
    assert "scenes must be between 1 and 10" in err and "--version v1.0-trainval" in err
    assert not (tmp_path / "never").exists()
