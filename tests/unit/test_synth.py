"""Tests of the synthetic nuScenes generator (``bevdepth_npu.synth``).

They write small datasets into pytest's tmp_path and read them back with the real nuScenes
devkit (tests that need it skip without it), checking the layout, the record chains, byte-level
determinism, that images, lidar, boxes and velocities agree, the mini splits, the detection
evaluation's ground-truth loader and the handling of bad input.

    python -m pytest tests/unit/test_synth.py -q
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from bevdepth_npu import cli  # noqa: E402
from bevdepth_npu.synth import generate  # noqa: E402
from bevdepth_npu.synth import taxonomy as tx  # noqa: E402
from bevdepth_npu.synth.dataset import SUMMARY_FILE, TABLES, SynthError, instance_token, plan_scenes  # noqa: E402

SEED = 7
SCENES = 2
SAMPLES = 3
SWEEPS = 1


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "nuscenes"
    lines = []
    summary = generate(str(out), scenes=SCENES, samples_per_scene=SAMPLES, sweeps=SWEEPS, seed=SEED,
                       workers=2, progress=lines.append)
    assert summary["out_dir"] == str(out)
    assert any("sensor files" in line for line in lines), lines
    return str(out)


@pytest.fixture(scope="module")
def nusc(dataset_dir):
    nuscenes = pytest.importorskip("nuscenes.nuscenes")
    return nuscenes.NuScenes(version="v1.0-mini", dataroot=dataset_dir, verbose=False)


def _tree_digest(root: str) -> dict:
    digests = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


# ---------------------------------------------------------------- layout and devkit loading

def test_devkit_loads_all_tables_and_every_file_exists(dataset_dir, nusc):
    for name in TABLES:
        assert os.path.isfile(os.path.join(dataset_dir, "v1.0-mini", f"{name}.json")), name
        assert len(getattr(nusc, name)) > 0, f"table {name} is empty"
    assert len(nusc.scene) == SCENES
    assert len(nusc.sample) == SCENES * SAMPLES
    assert {s["channel"] for s in nusc.sensor} == set(tx.CAMERA_CHANNELS) | {"LIDAR_TOP"}
    # sensor files: per scene and channel, a key frame per sample and SWEEPS before all but the first
    per_channel = SAMPLES + (SAMPLES - 1) * SWEEPS
    assert len(nusc.sample_data) == SCENES * 7 * per_channel
    for sd in nusc.sample_data:
        path = os.path.join(dataset_dir, sd["filename"])
        assert os.path.isfile(path), path
        folder = "samples" if sd["is_key_frame"] else "sweeps"
        log = nusc.get("log", nusc.get("scene", nusc.get("sample", sd["sample_token"])["scene_token"])["log_token"])
        ext = "pcd.bin" if sd["channel"] == "LIDAR_TOP" else "jpg"
        assert sd["filename"] == f"{folder}/{sd['channel']}/{log['logfile']}__{sd['channel']}__{sd['timestamp']}.{ext}"
        if sd["channel"] == "LIDAR_TOP":
            raw = np.fromfile(path, dtype=np.float32)
            assert raw.size % 5 == 0, path
            cloud = raw.reshape(-1, 5)
            assert 10_000 < len(cloud) < 60_000, (path, len(cloud))
            assert set(np.unique(cloud[:, 4])) <= set(range(tx.LIDAR_BEAMS))
            assert sd["fileformat"] == "pcd" and sd["width"] == 0
        else:
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.size == (1600, 900), path
            assert (sd["width"], sd["height"]) == (1600, 900) and sd["fileformat"] == "jpg"
    assert re.match(r"^n015-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d\+0800$", nusc.log[0]["logfile"])
    for record in nusc.map:
        assert os.path.isfile(os.path.join(dataset_dir, record["filename"]))
        assert record["filename"] == f"maps/{record['token']}.png"
    mask = nusc.map[0]["mask"]
    # the ego drives on the drivable area of the map
    pose = nusc.ego_pose[0]["translation"]
    assert mask.is_on_mask(pose[0], pose[1])
    # global positions are a few hundred metres from the origin: ego/global conversions matter
    assert min(np.hypot(p["translation"][0], p["translation"][1]) for p in nusc.ego_pose) > 200.0
    with open(os.path.join(dataset_dir, SUMMARY_FILE)) as f:
        assert '"seed": 7' in f.read()


def test_vocabulary_is_the_real_nuscenes_one(nusc):
    detection = pytest.importorskip("nuscenes.eval.detection.utils")
    names = {detection.category_to_detection_name(c["name"]) for c in nusc.category}
    assert names == {"car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                     "motorcycle", "bicycle", "pedestrian", "traffic_cone"}
    assert {a["name"] for a in nusc.attribute} == {
        "vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider",
        "cycle.without_rider", "pedestrian.sitting_lying_down", "pedestrian.standing",
        "pedestrian.moving"}
    assert [(v["token"], v["level"]) for v in nusc.visibility] == [
        ("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100")]
    allowed = {"car": "vehicle.", "truck": "vehicle.", "bus": "vehicle.", "trailer": "vehicle.",
               "construction_vehicle": "vehicle.", "motorcycle": "cycle.", "bicycle": "cycle.",
               "pedestrian": "pedestrian."}
    for ann in nusc.sample_annotation:
        name = detection.category_to_detection_name(ann["category_name"])
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if name in ("barrier", "traffic_cone"):
            assert attrs == []
        else:
            assert len(attrs) == 1 and attrs[0].startswith(allowed[name]), (name, attrs)
        assert ann["num_radar_pts"] == 0 and len(ann["size"]) == 3 and len(ann["rotation"]) == 4
    for cs in nusc.calibrated_sensor:
        channel = nusc.get("sensor", cs["sensor_token"])["channel"]
        if channel == "LIDAR_TOP":
            assert cs["camera_intrinsic"] == []
            assert np.allclose(cs["translation"], [0.94, 0.0, 1.84], atol=0.05)
        else:
            k = np.array(cs["camera_intrinsic"])
            assert k.shape == (3, 3) and 800 < k[0, 0] < 1300 and abs(k[0, 2] - 800) < 40


def test_record_chains_are_consistent(nusc):
    for scene in nusc.scene:
        tokens = []
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            assert sample["scene_token"] == scene["token"]
            if tokens:
                assert sample["prev"] == tokens[-1]
            tokens.append(token)
            token = sample["next"]
        assert tokens[-1] == scene["last_sample_token"] and len(tokens) == scene["nbr_samples"]
        times = [nusc.get("sample", t)["timestamp"] for t in tokens]
        assert np.all(np.diff(times) == 500_000)              # key frames at 2 Hz
        for channel in tx.CAMERA_CHANNELS + ("LIDAR_TOP",):
            sd = nusc.get("sample_data", nusc.get("sample", tokens[0])["data"][channel])
            assert sd["prev"] == ""
            chain = [sd]
            while chain[-1]["next"]:
                nxt = nusc.get("sample_data", chain[-1]["next"])
                assert nxt["prev"] == chain[-1]["token"]
                chain.append(nxt)
            assert sum(s["is_key_frame"] for s in chain) == len(tokens)
            stamps = [s["timestamp"] for s in chain]
            assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
            period = 50_000 if channel == "LIDAR_TOP" else 83_333
            for s in chain:
                key = nusc.get("sample", s["sample_token"])
                if s["is_key_frame"]:
                    assert key["data"][channel] == s["token"]
                    assert abs(s["timestamp"] - key["timestamp"]) < 50_000
                else:
                    # sweeps belong to the next key frame, as BEVDepth's gen_info expects
                    key_sd = nusc.get("sample_data", key["data"][channel])
                    assert 0 < key_sd["timestamp"] - s["timestamp"] <= SWEEPS * period
                    assert s["filename"].startswith("sweeps/")
                assert nusc.get("ego_pose", s["ego_pose_token"])["timestamp"] == s["timestamp"]
    for inst in nusc.instance:
        chain = [nusc.get("sample_annotation", inst["first_annotation_token"])]
        while chain[-1]["next"]:
            nxt = nusc.get("sample_annotation", chain[-1]["next"])
            assert nxt["prev"] == chain[-1]["token"] and nxt["instance_token"] == inst["token"]
            chain.append(nxt)
        assert chain[-1]["token"] == inst["last_annotation_token"]
        assert len(chain) == inst["nbr_annotations"]
    assert sum(i["nbr_annotations"] for i in nusc.instance) == len(nusc.sample_annotation)


def test_boxes_are_within_range_of_the_ego(nusc):
    detection = pytest.importorskip("nuscenes.eval.detection.utils")
    in_class_range = {}
    for ann in nusc.sample_annotation:
        sample = nusc.get("sample", ann["sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        dist = np.hypot(*(np.array(ann["translation"][:2]) - pose["translation"][:2]))
        assert dist <= tx.VISIBLE_RADIUS_M + 1e-6
        name = detection.category_to_detection_name(ann["category_name"])
        in_class_range.setdefault(name, []).append(dist <= tx.CLASS_BY_NAME[name].eval_range_m)
    # every class is seen by the evaluation, and most boxes lie inside its class range
    assert len(in_class_range) == 10
    assert np.mean(list(itertools.chain(*in_class_range.values()))) > 0.7
    visibility = np.array([int(a["visibility_token"]) for a in nusc.sample_annotation])
    assert np.mean(visibility >= 3) > 0.7, "most boxes must be mostly visible in the cameras"


# ---------------------------------------------------------------- determinism

def test_same_seed_gives_identical_bytes(dataset_dir, tmp_path):
    again = tmp_path / "again"
    # one worker instead of two: parallelism must not change a single byte
    generate(str(again), scenes=SCENES, samples_per_scene=SAMPLES, sweeps=SWEEPS, seed=SEED, workers=1)
    first, second = _tree_digest(dataset_dir), _tree_digest(str(again))
    assert len(first) == SCENES * 7 * (SAMPLES + (SAMPLES - 1) * SWEEPS) + len(TABLES) + 2
    assert first == second


def test_different_seed_gives_different_data(dataset_dir, tmp_path):
    other = tmp_path / "other"
    generate(str(other), scenes=1, samples_per_scene=2, sweeps=0, seed=SEED + 1, workers=1)
    first, second = _tree_digest(dataset_dir), _tree_digest(str(other))
    for table in ("sample_annotation", "ego_pose", "sample"):
        name = f"v1.0-mini/{table}.json"
        assert first[name] != second[name], name
    lidar = sorted(n for n in second if "LIDAR_TOP" in n)
    assert lidar and all(second[n] not in set(first.values()) for n in lidar)
    # the fixed vocabulary does not depend on the seed
    for table in ("category", "attribute", "visibility", "sensor"):
        name = f"v1.0-mini/{table}.json"
        assert first[name] == second[name], name


# ---------------------------------------------------------------- sensors agree with the boxes

def _nearest_class(rgb: np.ndarray) -> tuple:
    best = (1e9, None)
    for spec in tx.CLASSES:
        for face in ("front", "back", "left", "right", "top"):
            d = float(np.linalg.norm(rgb - np.array(tx.face_colour(spec.colour_rgb, face), float)))
            best = min(best, (d, spec.detection_name))
    return best


def test_box_centres_project_onto_pixels_of_their_class(dataset_dir, nusc):
    pytest.importorskip("nuscenes")
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion

    checked, agreed = 0, 0
    for sample in nusc.sample:
        for channel in tx.CAMERA_CHANNELS:
            sd = nusc.get("sample_data", sample["data"][channel])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            k = np.array(cs["camera_intrinsic"])
            image = np.asarray(Image.open(os.path.join(dataset_dir, sd["filename"])).convert("RGB"), float)
            dt_s = (sd["timestamp"] - sample["timestamp"]) * 1e-6
            for ann_token in sample["anns"]:
                ann = nusc.get("sample_annotation", ann_token)
                if ann["visibility_token"] != "4":
                    continue
                box = nusc.get_box(ann_token)
                velocity = nusc.box_velocity(ann_token)
                # each image shows the world at its own timestamp: move the box there
                box.translate(np.nan_to_num(velocity) * dt_s)
                box.translate(-np.array(pose["translation"]))
                box.rotate(Quaternion(pose["rotation"]).inverse)
                box.translate(-np.array(cs["translation"]))
                box.rotate(Quaternion(cs["rotation"]).inverse)
                depth = box.center[2]
                if depth < 1.0 or min(box.wlh[:2]) * k[0, 0] / depth < 12:
                    continue
                u, v = view_points(box.center.reshape(3, 1), k, normalize=True)[:2, 0]
                if not (5 <= u < 1595 and 5 <= v < 895):
                    continue
                patch = image[int(v) - 1:int(v) + 2, int(u) - 1:int(u) + 2].reshape(-1, 3).mean(axis=0)
                distance, nearest = _nearest_class(patch)
                checked += 1
                agreed += nearest == category_to_detection_name(ann["category_name"]) and distance < 30
    assert checked >= 20, checked
    # a few centres may be hidden behind a nearer box; the rest must show their class colour
    assert agreed >= 0.9 * checked, (agreed, checked)


def test_palette_is_not_confusable():
    from bevdepth_npu.synth import sensors

    faces = ("front", "back", "left", "right", "top")
    colours = [(c.detection_name, np.array(tx.face_colour(c.colour_rgb, f), float))
               for c in tx.CLASSES for f in faces]
    background = [sensors.SKY_HORIZON_RGB, sensors.SKY_ZENITH_RGB, sensors.ROAD_RGB,
                  sensors.SIDEWALK_RGB, sensors.VERGE_RGB, sensors.HAZE_RGB]
    for (a, ca), (b, cb) in itertools.combinations(colours, 2):
        if a != b:
            assert np.linalg.norm(ca - cb) > 35, (a, b)
    for name, colour in colours:
        assert min(np.linalg.norm(colour - bg) for bg in background) > 35, name


def test_lidar_points_inside_boxes_match_num_lidar_pts(dataset_dir, nusc):
    pytest.importorskip("nuscenes")
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box

    total_boxes, with_points = 0, 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        cloud = LidarPointCloud.from_file(path)
        inside_any = np.zeros(cloud.points.shape[1], dtype=bool)
        for box in boxes:
            inside = points_in_box(box, cloud.points[:3])
            inside_any |= inside
            ann = nusc.get("sample_annotation", box.token)
            assert int(inside.sum()) == ann["num_lidar_pts"], box.token
            total_boxes += 1
            if ann["visibility_token"] == "4" and np.linalg.norm(box.center[:2]) < 30:
                assert ann["num_lidar_pts"] > 0, box.token
            with_points += ann["num_lidar_pts"] > 0
        # the rest of the returns lie on the ground plane (z_ego = 0, the lidar is at 1.84 m)
        ground_z = cloud.points[2, ~inside_any]
        assert np.all(np.abs(ground_z + 1.84) < 0.5)
        assert inside_any.sum() > 500
    assert with_points >= 0.8 * total_boxes


def test_velocities_agree_with_the_generated_motion(nusc):
    plans = plan_scenes(SCENES, SAMPLES, SEED)
    truth = {instance_token(SEED, plan.index, obj.index): obj for plan in plans for obj in plan.objects}
    moving = 0
    for inst in nusc.instance:
        obj = truth[inst["token"]]
        ann = nusc.get("sample_annotation", inst["first_annotation_token"])
        assert nusc.get("category", inst["category_token"])["name"] == tx.CLASS_BY_NAME[obj.detection_name].category
        velocity = nusc.box_velocity(ann["token"])
        if inst["nbr_annotations"] < 2:
            assert np.all(np.isnan(velocity))
            continue
        assert np.allclose(velocity[:2], obj.velocity_xy_mps, atol=1e-3), (velocity, obj)
        assert abs(velocity[2]) < 1e-6
        moving += np.hypot(*obj.velocity_xy_mps) > 0.5
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        if np.hypot(*obj.velocity_xy_mps) > 0.5:
            assert attrs and attrs[0].endswith(("moving", "with_rider"))
    assert moving >= 5


def test_sweeps_interpolate_boxes_in_the_devkit(nusc):
    sample = nusc.get("sample", nusc.scene[0]["last_sample_token"])
    sd = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
    sweep = nusc.get("sample_data", sd["prev"])
    assert not sweep["is_key_frame"]
    path, boxes, k = nusc.get_sample_data(sweep["token"])
    assert os.path.isfile(path) and k.shape == (3, 3) and len(boxes) > 0


# ---------------------------------------------------------------- splits and evaluation

def test_mini_splits_each_pick_up_a_scene(nusc):
    splits = pytest.importorskip("nuscenes.utils.splits")
    names = {s["name"] for s in nusc.scene}
    assert names & set(splits.mini_train) and names & set(splits.mini_val)
    assert set(tx.MINI_TRAIN) == set(splits.mini_train) and set(tx.MINI_VAL) == set(splits.mini_val)
    assert set(tx.SCENE_NAMES) == set(splits.mini_train) | set(splits.mini_val)


def test_detection_ground_truth_loads(nusc):
    pytest.importorskip("nuscenes")
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox

    for split in ("mini_val", "mini_train"):
        gt = load_gt(nusc, split, DetectionBox)
        assert len(gt.sample_tokens) == SAMPLES
        names = {box.detection_name for box in gt.all}
        assert names == set(tx.CLASS_BY_NAME), (split, names)
        gt = add_center_dist(nusc, gt)
        kept = filter_eval_boxes(nusc, gt, config_factory("detection_cvpr_2019").class_range)
        assert len(kept.all) > 0.6 * len(gt.all)


# ---------------------------------------------------------------- bad input

def test_non_empty_output_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SynthError, match=re.escape(str(out))):
        generate(str(out), scenes=1, samples_per_scene=2, sweeps=0)
    code = cli.main(["synth", "--out", str(out), "--scenes", "1", "--samples-per-scene", "2", "--sweeps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and "not empty" in err and "--force" in err
    assert sorted(os.listdir(out)) == ["keep.txt"]          # nothing was written or deleted
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SynthError, match="not a directory"):
        generate(str(a_file), scenes=1, samples_per_scene=2, sweeps=0)


def test_force_writes_into_a_non_empty_directory_without_deleting(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(["synth", "--out", str(out), "--scenes", "1", "--samples-per-scene", "2",
                     "--sweeps", "0", "--force", "--quiet", "--workers", "1"])
    assert code == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert (out / "v1.0-mini" / "sample_data.json").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"scenes": 0}, "scenes must be between 1 and 10"),
    ({"scenes": 11}, "scenes must be between 1 and 10"),
    ({"samples_per_scene": 1}, "samples_per_scene must be between 2 and 40"),
    ({"sweeps": 6}, "sweeps must be between 0 and 5"),
    ({"seed": -1}, "seed must be"),
    ({"scenes": 2.5}, "scenes must be an integer"),
    ({"sweeps": True}, "sweeps must be an integer"),
    ({"workers": 0}, "workers must be at least 1"),
])
def test_invalid_counts_are_rejected(tmp_path, kwargs, message):
    out = tmp_path / "never"
    with pytest.raises(SynthError, match=re.escape(message)):
        generate(str(out), **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--scenes", "0"], ["--scenes", "81"], ["--samples-per-scene", "1"],
                                  ["--sweeps", "6"], ["--seed", "-3"], ["--scenes", "two"]])
def test_cli_rejects_invalid_counts(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--out", str(tmp_path / "never")] + argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
