"""``bevdepth-npu show`` (bevdepth_npu/show.py) on a synthetic nuScenes, with the real devkit.

- The viewer's projection of the ground truth lands on the cuboids the generator rendered: at the
  projected centre of every box, in every camera that sees it, the image shows that box's class
  colour (the generator's palette); the same boxes moved 4 m mostly do not.
- A results JSON made of the ground truth gives a picture whose predicted and ground-truth boxes
  coincide, line for line, in every camera and the bird's-eye panel; one box moved breaks that.
- The command line writes one PNG per sample and prints its path, from a run directory or a
  results file; an unknown sample, a missing image, a malformed results file or a run without
  results is a clear error (exit status 2, message naming the file).

Run: python -m pytest tests/integration/test_show.py -q   (in the bevdepth-npu env; ~2 min)
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("nuscenes", reason="needs the nuScenes devkit: bevdepth-npu env")
pytest.importorskip("matplotlib", reason="needs matplotlib: bevdepth-npu env")
from nuscenes.nuscenes import NuScenes  # noqa: E402
from PIL import Image  # noqa: E402

from bevdepth_npu import show  # noqa: E402
from bevdepth_npu.errors import UserError  # noqa: E402
from bevdepth_npu.synth import generate  # noqa: E402
from bevdepth_npu.synth import taxonomy as tx  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402

VERSION = "v1.0-mini"
FACES = ("front", "back", "left", "right", "top")
# Colour distance (RGB) under which a pixel counts as a face of a class: JPEG noise is a few
# units, different classes and the background are more than 35 apart (tests/unit/test_synth.py).
COLOUR_TOLERANCE = 30.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("show") / "nuscenes"
    generate(str(root), scenes=2, samples_per_scene=2, sweeps=0, seed=3, workers=2)
    return root


@pytest.fixture(scope="module")
def nusc(data):
    return NuScenes(version=VERSION, dataroot=str(data), verbose=False)


def _ground_truth_results(nusc, path, shift_first_box_m=0.0):
    """A results JSON holding every sample's ground truth as predictions of score 1."""
    results = {}
    for sample in nusc.sample:
        boxes = []
        for box in show.ground_truth(nusc, sample["token"]):
            entry = json.loads(json.dumps(box.serialize(), default=np.ndarray.tolist))
            entry["detection_score"] = 1.0
            boxes.append(entry)
        results[sample["token"]] = boxes
    first = next(iter(results.values()))[0]
    first["translation"][0] += shift_first_box_m
    meta = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False,
                use_external=False)
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return path


def _nearest_class(rgb):
    best = (float("inf"), None)
    for spec in tx.CLASSES:
        for face in FACES:
            colour = np.array(tx.face_colour(spec.colour_rgb, face), float)
            best = min(best, (float(np.linalg.norm(rgb - colour)), spec.detection_name))
    return best


def _centre_colours(nusc, shift_m=0.0):
    """(agreed, checked, cameras per box) over every ground-truth box of every sample, in every
    camera whose image holds its projected centre, unless a nearer box's outline covers it."""
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.utils.geometry_utils import view_points
    checked, agreed, cameras = 0, 0, {}
    for sample in nusc.sample:
        gt = show.ground_truth(nusc, sample["token"])
        if shift_m:
            gt = [DetectionBox.deserialize(dict(b.serialize(), translation=[
                b.translation[0] + shift_m, b.translation[1], b.translation[2]])) for b in gt]
        for view in show.camera_views(nusc, sample["token"], gt).values():
            image = np.asarray(Image.open(view.image_path).convert("RGB"), float)
            width, height = view.size_px
            projected = []
            for src, box in view.boxes:
                corners = view_points(box.corners(), view.intrinsic, normalize=True)[:2]
                centre = view_points(box.center.reshape(3, 1), view.intrinsic, True)[:2, 0]
                projected.append((src, box, corners, centre))
            for src, box, _corners, (u, v) in projected:
                if not (2 <= u < width - 2 and 2 <= v < height - 2):
                    continue
                hidden = any(
                    other is not box and np.linalg.norm(other.center) < np.linalg.norm(box.center)
                    and c[0].min() <= u <= c[0].max() and c[1].min() <= v <= c[1].max()
                    for _s, other, c, _p in projected)
                if hidden:
                    continue
                patch = image[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2].reshape(-1, 3)
                distance, name = _nearest_class(patch.mean(axis=0))
                checked += 1
                agreed += name == src.detection_name and distance < COLOUR_TOLERANCE
                cameras.setdefault(src.sample_token + src.detection_name + str(src.translation),
                                   []).append(view.channel)
    return agreed, checked, cameras


def test_projected_ground_truth_lands_on_the_rendered_cuboids(nusc):
    agreed, checked, cameras = _centre_colours(nusc)
    assert checked >= 40, checked
    assert any(len(seen) > 1 for seen in cameras.values())   # boxes seen by two cameras
    # Cameras fire up to 46 ms after the key frame (as in nuScenes); the annotations hold the
    # key-frame positions, so a fast car has moved up to 0.55 m in its image. Its centre stays
    # on the cuboid but may reach an edge shaded by JPEG; allow one in twenty.
    assert agreed >= 0.95 * checked, (agreed, checked)
    # Control: the same boxes 4 m off mostly miss their cuboids (a bus is 11 m long).
    agreed_off, checked_off, _ = _centre_colours(nusc, shift_m=4.0)
    assert agreed_off < 0.5 * checked_off, (agreed_off, checked_off)


def _lines(fig, gid):
    """Per axis, the sorted data of the lines with this gid, rounded to 1e-6."""
    found = []
    for index, ax in enumerate(fig.axes):
        lines = sorted(tuple(np.round(np.asarray(line.get_xydata()), 6).ravel())
                       for line in ax.lines if line.get_gid() == gid)
        found.append((index, lines))
    return found


def test_ground_truth_results_coincide_with_the_ground_truth(nusc, tmp_path):
    results = _ground_truth_results(nusc, tmp_path / "results_nusc.json")
    predictions = show.load_predictions(results)
    for sample in nusc.sample:
        gt = show.ground_truth(nusc, sample["token"])
        fig = show.draw_sample(nusc, sample["token"], predictions[sample["token"]], gt)
        pred_lines, gt_lines = _lines(fig, show.PRED_GID), _lines(fig, show.GT_GID)
        assert sum(len(lines) for _, lines in gt_lines) > 0
        assert pred_lines == gt_lines
        # six cameras and the bird's eye, and every box in the bird's eye (Box.render: 13 lines)
        assert len(fig.axes) == 7 and len(gt_lines[-1][1]) == 13 * len(gt)

    moved = _ground_truth_results(nusc, tmp_path / "moved.json", shift_first_box_m=1.0)
    token = nusc.sample[0]["token"]
    fig = show.draw_sample(nusc, token, show.load_predictions(moved)[token],
                           show.ground_truth(nusc, token))
    assert _lines(fig, show.PRED_GID) != _lines(fig, show.GT_GID)

    paths = show.render(results, nusc.dataroot, VERSION, samples=2, out_dir=tmp_path / "png")
    assert paths == [tmp_path / "png" / f"{s['token']}.png" for s in nusc.sample[:2]]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 1000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bevdepth_npu", "show", *map(str, args)],
                          cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=600)


def test_command_line_draws_the_first_sample_of_a_run(nusc, data, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    _ground_truth_results(nusc, run_dir / "eval" / "results_nusc.json")
    proc = _cli(run_dir, "--data-root", data, "--version", VERSION)
    assert proc.returncode == 0, proc.stderr
    first = nusc.sample[0]["token"]   # the evaluator writes results in dataset order
    expected = run_dir / "eval" / "show" / f"{first}.png"
    assert proc.stdout.splitlines() == [f"show: {expected}"]
    assert expected.is_file()

    token = nusc.sample[-1]["token"]
    proc = _cli(run_dir / "eval" / "results_nusc.json", "--data-root", data, "--version",
                VERSION, "--sample", token, "--score-threshold", "0.5", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / f"{token}.png").is_file()


def test_bad_input_is_a_clear_error(nusc, data, tmp_path):
    results = _ground_truth_results(nusc, tmp_path / "results_nusc.json")
    content = json.loads(results.read_text())
    content["results"]["no-such-sample"] = []
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(content))
    with pytest.raises(UserError, match=re.escape(f"{unknown}: sample no-such-sample is not in")):
        show.render(unknown, data, VERSION)
    proc = _cli(unknown, "--data-root", data, "--version", VERSION)
    assert proc.returncode == 2
    assert f"bevdepth-npu show: error: {unknown}: sample no-such-sample is not in" in proc.stderr

    # A dataset with one image missing: the error names the image.
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    sample = NuScenes(version=VERSION, dataroot=str(copy), verbose=False).sample[0]
    image = copy / nusc.get("sample_data", sample["data"]["CAM_BACK"])["filename"]
    image.unlink()
    with pytest.raises(UserError, match=re.escape(f"{image}: missing (CAM_BACK image of sample")):
        show.render(results, copy, VERSION)

    not_results = tmp_path / "metrics_summary.json"
    not_results.write_text(json.dumps({"mean_ap": 0.0}))
    with pytest.raises(UserError, match="metrics_summary.json: not a nuScenes detection results"):
        show.render(not_results, data, VERSION)
    with pytest.raises(UserError, match="no evaluation results there"):
        show.render(tmp_path / "copy", data, VERSION)
    with pytest.raises(UserError, match="no nuScenes release v1.0-trainval there.*v1.0-mini"):
        show.render(results, data, "v1.0-trainval")
    with pytest.raises(UserError, match="has no results for sample nope"):
        show.render(results, data, VERSION, sample_tokens=["nope"])


def test_ground_truth_without_the_per_sample_loader(nusc, monkeypatch):
    """nuscenes-devkit 1.1.11 (Python 3.8) has no load_gt_of_sample_tokens: the viewer takes the
    sample's boxes from the devkit's loader of the whole split, and they are the same."""
    from nuscenes.eval.common import loaders

    def serialized(token):
        return json.dumps([b.serialize() for b in show.ground_truth(nusc, token)],
                          default=np.ndarray.tolist)

    expected = {s["token"]: serialized(s["token"]) for s in nusc.sample}
    monkeypatch.delattr(loaders, "load_gt_of_sample_tokens")
    for token, boxes in expected.items():
        assert serialized(token) == boxes and json.loads(boxes)
