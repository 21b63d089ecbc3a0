"""Integration tests of the data half of bevdepth.patch.

What they check, on the one nuScenes sample that upstream ships in test/data/nuscenes (six
camera images and infos.pkl, but no lidar file: the tests write a synthetic LIDAR_TOP sweep
where the info points):
  - NuscDetDataset gives the same depth labels whether it reads depth_gt/<image>.bin or projects
    the lidar sweep on the fly, without and with image augmentation;
  - the depth labels of augmented images agree with the matrices the model lifts them through
    (a lidar point at each label's pixel and depth), and bench/ablation.py's breaks, a half-bin
    depth shift among them, fail that;
  - scripts/gen_depth_gt.py resumes, writes atomically, counts written/skipped/failed files and
    exits non-zero on failures;
  - scripts/gen_info.py and scripts/gen_depth_gt.py reject bad arguments with clear messages;
  - a truncated or missing camera image, and a truncated lidar or depth_gt file, stop the
    dataset with an error that names the file (not PIL's bare "image file is truncated");
  - upstream's own dataset test (test/test_dataset) passes on a CPU-only machine;
  - on a small synthetic v1.0-mini (bevdepth_npu.synth), gen_info.py and gen_depth_gt.py run end
    to end and depth_gt files give the same labels with two key frames and with lidar fusion.

They need the bevdepth-npu env (bevdepth installed from the patched tree, with mmcv, mmdet3d and
nuscenes-devkit) and skip without it. Run:
    PYTHONPATH=. python -m pytest tests/integration/test_bevdepth_data.py -q
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ENV_REASON = ("needs the bevdepth-npu env (create it with `bevdepth-npu env`): "
              "bevdepth from the patched tree, mmcv, mmdet3d, nuscenes-devkit")

np = pytest.importorskip("numpy", reason=ENV_REASON)
Image = pytest.importorskip("PIL.Image", reason=ENV_REASON)
torch = pytest.importorskip("torch", reason=ENV_REASON)
pytest.importorskip("mmdet3d", reason=ENV_REASON)
pytest.importorskip("nuscenes", reason=ENV_REASON)
nusc_det_dataset = pytest.importorskip("bevdepth.datasets.nusc_det_dataset",
                                       reason=ENV_REASON)

# The checkout the imported bevdepth comes from: its scripts/ and test/ belong to the same code.
BEVDEPTH_ROOT = Path(nusc_det_dataset.__file__).resolve().parents[2]
GEN_INFO = BEVDEPTH_ROOT / "scripts" / "gen_info.py"
GEN_DEPTH_GT = BEVDEPTH_ROOT / "scripts" / "gen_depth_gt.py"
SAMPLE_DATA = BEVDEPTH_ROOT / "test" / "data" / "nuscenes"

CLASSES = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
           "bicycle", "pedestrian", "traffic_cone"]
CAMS = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK",
        "CAM_BACK_RIGHT"]
# Image augmentation of the recipe (bevdepth/exps/nuscenes/base_exp.py).
IDA_AUG_CONF = {
    "resize_lim": (0.386, 0.55),
    "final_dim": (256, 704),
    "rot_lim": (-5.4, 5.4),
    "H": 900,
    "W": 1600,
    "rand_flip": True,
    "bot_pct_lim": (0.0, 0.0),
    "cams": CAMS,
    "Ncams": 6,
}
BDA_AUG_CONF = {"rot_lim": (-22.5, 22.5), "scale_lim": (0.95, 1.05), "flip_dx_ratio": 0.5,
                "flip_dy_ratio": 0.5}
# About the size of a real nuScenes LIDAR_TOP sweep.
NUM_LIDAR_POINTS = 34_000
DEPTH_INDEX = 10  # position of the depth labels in NuscDetDataset.__getitem__'s list
SUMMARY_RE = re.compile(r"depth_gt: written=(\d+) skipped=(\d+) failed=(\d+)")


@pytest.fixture(scope="module", autouse=True)
def patched_checkout() -> None:
    assert GEN_DEPTH_GT.is_file(), (
        f"{GEN_DEPTH_GT} is missing: bevdepth is imported from {BEVDEPTH_ROOT}, "
        "which is not the patched tree")
    assert (SAMPLE_DATA / "infos.pkl").is_file(), f"{SAMPLE_DATA}/infos.pkl is missing"


def load_infos(data_root: Path, name: str = "infos.pkl") -> List[dict]:
    with open(data_root / name, "rb") as f:
        return pickle.load(f)


def write_lidar_sweep(path: Path, seed: int = 0) -> None:
    """Points all around the car (so every camera sees some), in the lidar frame, float32 x5."""
    rng = np.random.default_rng(seed)
    azimuth_rad = rng.uniform(0.0, 2.0 * np.pi, NUM_LIDAR_POINTS)
    range_m = rng.uniform(1.0, 70.0, NUM_LIDAR_POINTS)
    points = np.zeros((NUM_LIDAR_POINTS, 5), dtype=np.float32)
    points[:, 0] = range_m * np.cos(azimuth_rad)
    points[:, 1] = range_m * np.sin(azimuth_rad)
    points[:, 2] = rng.uniform(-2.0, 3.0, NUM_LIDAR_POINTS)  # metres above/below the sensor
    points[:, 3] = rng.uniform(0.0, 255.0, NUM_LIDAR_POINTS)  # intensity
    points[:, 4] = rng.integers(0, 32, NUM_LIDAR_POINTS)  # ring index
    path.parent.mkdir(parents=True, exist_ok=True)
    points.tofile(path)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A copy of upstream's sample with a lidar sweep and the info file under the name
    gen_depth_gt.py reads (nuscenes_infos_train.pkl)."""
    root = tmp_path / "nuscenes"
    shutil.copytree(SAMPLE_DATA, root)
    (info,) = load_infos(root)
    write_lidar_sweep(root / info["lidar_infos"]["LIDAR_TOP"]["filename"])
    shutil.copy(root / "infos.pkl", root / "nuscenes_infos_train.pkl")
    return root


def lidar_path(root: Path) -> Path:
    (info,) = load_infos(root)
    return root / info["lidar_infos"]["LIDAR_TOP"]["filename"]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BEVDEPTH_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=BEVDEPTH_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


Counts = Tuple[int, int, int]  # files written, skipped, failed


def gen_depth_gt(root: Path, *args: str) -> Tuple[subprocess.CompletedProcess, Counts]:
    """Run scripts/gen_depth_gt.py (on the train split unless told) and parse its counts."""
    if "--splits" not in args:
        args = ("--splits", "train", *args)
    proc = run_script(GEN_DEPTH_GT, "--data-root", str(root), *args)
    match = SUMMARY_RE.search(proc.stdout)
    assert match, f"no summary line in gen_depth_gt output:\n{proc.stdout}\n{proc.stderr}"
    return proc, (int(match[1]), int(match[2]), int(match[3]))


def depth_gt_files(root: Path) -> List[str]:
    return sorted(os.listdir(root / "depth_gt"))


def make_dataset(root: Path, is_train: bool, **kwargs):
    return nusc_det_dataset.NuscDetDataset(
        IDA_AUG_CONF, BDA_AUG_CONF, CLASSES, str(root), str(root / "infos.pkl"), is_train,
        return_depth=True, **kwargs)


def get_item(dataset, seed: int) -> list:
    np.random.seed(seed)
    torch.manual_seed(seed)
    return dataset[0]


# --- a broken file of the dataset is named ---------------------------------------------------

def test_truncated_camera_image_is_named(data_root: Path) -> None:
    (info,) = load_infos(data_root)
    image = data_root / info["cam_infos"]["CAM_BACK"]["filename"]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    with pytest.raises(nusc_det_dataset.DataFileError) as raised:
        get_item(make_dataset(data_root, is_train=False), seed=0)
    assert str(image) in str(raised.value) and "truncated" in str(raised.value)
    assert "doctor --data-root" in str(raised.value)


def test_missing_camera_image_is_named(data_root: Path) -> None:
    (info,) = load_infos(data_root)
    image = data_root / info["cam_infos"]["CAM_FRONT"]["filename"]
    image.unlink()
    with pytest.raises(nusc_det_dataset.DataFileError, match=re.escape(str(image))):
        get_item(make_dataset(data_root, is_train=False), seed=0)


def test_truncated_lidar_and_depth_gt_files_are_named(data_root: Path) -> None:
    lidar = lidar_path(data_root)
    lidar.write_bytes(lidar.read_bytes()[:-6])
    with pytest.raises(nusc_det_dataset.DataFileError, match=re.escape(str(lidar)) + ".*rows of 5"):
        get_item(make_dataset(data_root, is_train=False), seed=0)
    broken = data_root / "depth_gt" / "broken.jpg.bin"
    broken.parent.mkdir()
    broken.write_bytes(b"\0" * 14)
    with pytest.raises(nusc_det_dataset.DataFileError, match="broken.jpg.bin: 14 bytes"):
        nusc_det_dataset.load_depth_gt(str(broken))


# --- depth_gt files give the same depth labels as on-the-fly projection -------------------

def assert_depth_gt_matches(root: Path, is_train: bool, seeds: List[int], **dataset_kwargs):
    """Depth labels (and everything else) from on-the-fly projection, then from depth_gt files
    with the lidar file gone (so they can only come from the files), must be identical."""
    on_the_fly = [get_item(make_dataset(root, is_train, **dataset_kwargs), s) for s in seeds]
    proc, counts = gen_depth_gt(root, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert counts == (6, 0, 0)
    lidar_path(root).unlink()
    from_files = [get_item(make_dataset(root, is_train, **dataset_kwargs), s) for s in seeds]
    for seed, expected, got in zip(seeds, on_the_fly, from_files):
        depth = expected[DEPTH_INDEX]
        # The synthetic sweep must put points into every camera, or the comparison proves little.
        points_per_image = (depth > 0).flatten(2).sum(-1)
        assert (points_per_image > 100).all(), f"seed {seed}: {points_per_image}"
        assert torch.equal(got[DEPTH_INDEX], depth), f"seed {seed}: depth labels differ"
        for index in range(7):  # images and matrices do not depend on where depth comes from
            assert torch.equal(got[index], expected[index]), f"seed {seed}: output {index} differs"
    return on_the_fly


@pytest.mark.slow
def test_depth_gt_equals_projection_without_augmentation(data_root: Path) -> None:
    (item,) = assert_depth_gt_matches(data_root, is_train=False, seeds=[0])
    assert item[DEPTH_INDEX].shape == (1, 6, 256, 704)


@pytest.mark.slow
def test_depth_gt_equals_projection_with_augmentation(data_root: Path) -> None:
    seeds = list(range(6))
    items = assert_depth_gt_matches(data_root, is_train=True, seeds=seeds)
    ida_mats = torch.stack([item[3] for item in items])  # seeds x frames x cams x 4 x 4
    # The seeds must exercise the augmentation: some images flipped, rotated, resized apart.
    assert (ida_mats[..., 0, 0] < 0).any() and (ida_mats[..., 0, 0] > 0).any(), "no flip"
    assert (ida_mats[..., 0, 1].abs() > 1e-3).any(), "no rotation"
    assert len({round(float(m[..., :2, :2].det().abs().max()), 4) for m in ida_mats}) > 1
    eval_depth = get_item(make_dataset(data_root, is_train=False), 0)[DEPTH_INDEX]
    assert not any(torch.equal(item[DEPTH_INDEX], eval_depth) for item in items)


def test_depth_gt_used_for_every_key_frame_with_fusion(data_root: Path) -> None:
    # Two key frames (the sample has no previous one, so both are the same frame) and lidar
    # depth for each of them, as the fusion recipes ask.
    assert_depth_gt_matches(data_root, is_train=True, seeds=[3], key_idxes=[-1], use_fusion=True)


def test_depth_gt_file_holds_unaugmented_projection(data_root: Path) -> None:
    proc, _ = gen_depth_gt(data_root, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    (info,) = load_infos(data_root)
    points = nusc_det_dataset.load_lidar_points(str(data_root), info["lidar_infos"])
    for cam in CAMS:
        cam_info = info["cam_infos"][cam]
        with Image.open(data_root / cam_info["filename"]) as img:
            expected = nusc_det_dataset.project_lidar_depth(points, img, info["lidar_infos"],
                                                            cam_info)
        name = os.path.basename(cam_info["filename"]) + ".bin"
        stored = np.fromfile(data_root / "depth_gt" / name, dtype=np.float32).reshape(-1, 3)
        assert stored.shape[0] > 100
        assert np.array_equal(stored, expected), cam
        # Pixel coordinates of the 1600 x 900 original, not of the 704 x 256 network input.
        assert stored[:, 0].max() > 704 and stored[:, 1].max() > 256


# --- depth labels agree with the matrices the model lifts them through ---------------------

def _pose(record: dict) -> np.ndarray:
    """4x4 of a devkit calibrated_sensor or ego_pose record, by the devkit's own function."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion
    return transform_matrix(record["translation"], Quaternion(record["rotation"]))


def depth_label_agreement(root: Path, item: list) -> List[Tuple[int, float]]:
    """Per camera of the key frame: (labelled pixels, share of them that a lidar point lands on
    with the label's depth). The reference projects the lidar points into each augmented image
    through the matrices the item gives the model (sensor2ego, intrinsics, image augmentation),
    which get_geometry inverts to lift a pixel at a depth; a label is where some point falls
    within a pixel of it at its depth (1 cm)."""
    (info,) = load_infos(root)
    lidar = info["lidar_infos"]["LIDAR_TOP"]
    points = nusc_det_dataset.load_lidar_points(str(root), info["lidar_infos"])[:, :3]
    lidar2global = _pose(lidar["ego_pose"]) @ _pose(lidar["calibrated_sensor"])
    points = np.concatenate([points, np.ones((len(points), 1))], axis=1).astype(np.float64)
    sensor2ego, intrin, ida = (item[i][0].double().numpy() for i in (1, 2, 3))
    depth_labels = item[DEPTH_INDEX][0].numpy()
    height, width = depth_labels.shape[-2:]
    shares = []
    for cam, cam_name in enumerate(CAMS):
        ego2global = _pose(info["cam_infos"][cam_name]["ego_pose"])
        cam_points = (np.linalg.inv(sensor2ego[cam]) @ np.linalg.inv(ego2global)
                      @ lidar2global @ points.T)
        cam_points = cam_points[:, cam_points[2] > 0.1]
        pixels = intrin[cam] @ cam_points
        pixels[:2] /= pixels[2]
        u, v, d = (ida[cam] @ pixels)[:3]
        # every point counts for the pixels within one of it: rounding is not what is checked
        keys, depths = [], []
        for du in (-1, 0, 1):
            for dv in (-1, 0, 1):
                keys.append(np.floor(v + dv) * width + np.floor(u + du))
                depths.append(d)
        order_key = np.concatenate(keys) * 1000.0 + np.concatenate(depths)
        order_key.sort()
        rows, cols = np.nonzero(depth_labels[cam])
        label_depth = depth_labels[cam][rows, cols].astype(np.float64)
        wanted = (rows * width + cols) * 1000.0 + label_depth
        at = np.searchsorted(order_key, wanted - 0.01).clip(max=len(order_key) - 1)
        matched = np.abs(order_key[at] - wanted) <= 0.01
        shares.append((len(rows), float(matched.mean()) if len(rows) else 0.0))
    return shares


AGREEMENT_SEEDS = [0, 1, 2, 3]


def training_items(root: Path) -> List[list]:
    return [get_item(make_dataset(root, is_train=True), seed) for seed in AGREEMENT_SEEDS]


def agreement(root: Path, items: List[list]) -> List[List[Tuple[int, float]]]:
    return [depth_label_agreement(root, item) for item in items]


def agrees(per_item: List[List[Tuple[int, float]]]) -> bool:
    """Every camera of every item has labels (the sweep puts hundreds in each), nearly all on
    a lidar point at their depth."""
    return all(labels >= 100 and share >= 0.99 for cams in per_item for labels, share in cams)


def test_depth_labels_lie_where_the_model_lifts_them(data_root: Path) -> None:
    """The depth labels of augmented training images agree with the matrices the model gets:
    get_geometry, lifting a labelled pixel at its label's depth, lands on the lidar point the
    label came from. A shift of the labels by one depth bin, or an augmentation the matrices
    do not carry, breaks this (the next test); the held-out learning check cannot see a depth
    shift (README, "Held-out check")."""
    items = training_items(data_root)
    per_item = agreement(data_root, items)
    assert agrees(per_item), per_item
    ida_mats = torch.stack([item[3] for item in items])
    # the seeds exercise the augmentation: some images flipped, some not, most rotated
    assert (ida_mats[..., 0, 0] < 0).any() and (ida_mats[..., 0, 0] > 0).any(), "no flip"
    assert (ida_mats[..., 0, 1].abs() > 1e-3).float().mean() > 0.5, "no rotation"


@pytest.mark.parametrize("broken,shift_m", [("depth-shift", 1.0), ("depth-shift", -0.5),
                                            ("depth-shift", 0.1),
                                            ("no-depth-labels", None),
                                            ("flip-geometry", None),
                                            ("rotation-geometry", None),
                                            ("augmentation-geometry", None)])
def test_depth_label_agreement_fails_for_each_break(data_root: Path, monkeypatch, broken,
                                                   shift_m) -> None:
    """bench/ablation.py's breaks, through the dataset module the loader calls: each one fails
    the agreement, including a half-bin depth shift that the held-out check cannot see."""
    from bench import ablation
    module = types.SimpleNamespace(
        img_transform=nusc_det_dataset.img_transform,
        load_depth_gt=nusc_det_dataset.load_depth_gt,
        project_lidar_depth=nusc_det_dataset.project_lidar_depth,
        # a subclass: a break that replaces a method leaves the real class alone
        NuscDetDataset=type("Dataset", (nusc_det_dataset.NuscDetDataset,), {}))
    ablation.apply(broken, module, shift_m or 0.0)
    for name, value in vars(module).items():
        monkeypatch.setattr(nusc_det_dataset, name, value)
    assert not agrees(agreement(data_root, training_items(data_root)))


# --- gen_depth_gt.py ----------------------------------------------------------------------

@pytest.mark.slow
def test_gen_depth_gt_resumes_and_leaves_no_temp_files(data_root: Path) -> None:
    proc, counts = gen_depth_gt(data_root, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert counts == (6, 0, 0)
    files = depth_gt_files(data_root)
    assert len(files) == 6 and all(name.endswith(".jpg.bin") for name in files), files
    mtimes_ns = {name: (data_root / "depth_gt" / name).stat().st_mtime_ns for name in files}

    proc, counts = gen_depth_gt(data_root)
    assert proc.returncode == 0, proc.stderr
    assert counts == (0, 6, 0)
    assert {name: (data_root / "depth_gt" / name).stat().st_mtime_ns for name in files} == mtimes_ns

    (data_root / "depth_gt" / files[0]).unlink()
    proc, counts = gen_depth_gt(data_root, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert counts == (1, 5, 0)
    assert depth_gt_files(data_root) == files


@pytest.mark.slow
def test_gen_depth_gt_counts_failures_and_exits_nonzero(data_root: Path) -> None:
    (good,) = load_infos(data_root)
    infos = [good]
    # Two more samples whose lidar sweeps are broken: one missing, one truncated mid-point.
    for name, lidar_bytes in (("missing", None), ("truncated", b"\0" * 18)):
        bad = pickle.loads(pickle.dumps(good))
        bad["sample_token"] = f"{name}-sample"
        lidar_file = f"samples/LIDAR_TOP/{name}.pcd.bin"
        bad["lidar_infos"]["LIDAR_TOP"]["filename"] = lidar_file
        for cam in CAMS:
            bad["cam_infos"][cam]["filename"] = f"samples/{cam}/{name}__{cam}.jpg"
        if lidar_bytes is not None:
            (data_root / lidar_file).write_bytes(lidar_bytes)
        infos.append(bad)
    with open(data_root / "nuscenes_infos_train.pkl", "wb") as f:
        pickle.dump(infos, f)

    for workers in ("1", "2"):
        proc, counts = gen_depth_gt(data_root, "--workers", workers)
        assert proc.returncode == 1, proc.stderr
        assert counts == ((6, 0, 12) if workers == "1" else (0, 6, 12))
        # the dataset's own readers name the file and what is wrong with it
        assert "missing-sample: DataFileError" in proc.stderr
        assert "missing.pcd.bin: FileNotFoundError" in proc.stderr
        assert "truncated-sample: DataFileError" in proc.stderr
        assert "truncated.pcd.bin: 18 bytes is not a whole number of rows of 5" in proc.stderr
        assert len(depth_gt_files(data_root)) == 6


@pytest.mark.slow
def test_gen_depth_gt_reads_every_split_given(data_root: Path) -> None:
    shutil.move(data_root / "nuscenes_infos_train.pkl", data_root / "nuscenes_infos_val.pkl")
    proc = run_script(GEN_DEPTH_GT, "--data-root", str(data_root))
    assert proc.returncode != 0
    assert "nuscenes_infos_train.pkl not found" in proc.stderr
    proc, counts = gen_depth_gt(data_root, "--splits", "val")
    assert proc.returncode == 0, proc.stderr
    assert counts == (6, 0, 0)


@pytest.mark.slow
def test_gen_depth_gt_arguments(tmp_path: Path) -> None:
    proc = run_script(GEN_DEPTH_GT, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--data-root", "--splits", "--info-dir", "--workers"):
        assert flag in proc.stdout
    missing = tmp_path / "no-such-root"
    proc = run_script(GEN_DEPTH_GT, "--data-root", str(missing))
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "--data-root" in proc.stderr
    proc = run_script(GEN_DEPTH_GT, "--data-root", str(tmp_path), "--workers", "0")
    assert proc.returncode != 0 and "--workers" in proc.stderr


# --- gen_info.py --------------------------------------------------------------------------

def test_gen_info_help_lists_flags() -> None:
    proc = run_script(GEN_INFO, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in ("--data-root", "--version", "--out-dir", "v1.0-trainval", "v1.0-mini",
                 "v1.0-test"):
        assert text in proc.stdout


def test_gen_info_rejects_missing_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-root"
    proc = run_script(GEN_INFO, "--data-root", str(missing))
    assert proc.returncode != 0
    assert f"--data-root {missing} is not a directory" in proc.stderr


@pytest.mark.slow
def test_gen_info_rejects_missing_version_folder(tmp_path: Path) -> None:
    proc = run_script(GEN_INFO, "--data-root", str(tmp_path), "--version", "v1.0-mini")
    assert proc.returncode != 0
    assert f"{tmp_path / 'v1.0-mini'} not found" in proc.stderr
    # By default it reads trainval, like upstream did.
    proc = run_script(GEN_INFO, "--data-root", str(tmp_path))
    assert proc.returncode != 0
    assert f"{tmp_path / 'v1.0-trainval'} not found" in proc.stderr


def test_gen_info_refuses_mini_and_trainval_into_one_folder(tmp_path: Path) -> None:
    for version in ("v1.0-mini", "v1.0-trainval"):
        (tmp_path / version).mkdir()
    proc = run_script(GEN_INFO, "--data-root", str(tmp_path), "--version", "v1.0-mini",
                      "v1.0-trainval")
    assert proc.returncode != 0
    assert "run them separately" in proc.stderr
    assert not list(tmp_path.glob("*.pkl"))


# --- upstream's dataset test --------------------------------------------------------------

@pytest.mark.slow
def test_upstream_dataset_test_passes(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    # No cache directory: the checkout must stay clean for the patch export.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test/test_dataset", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        cwd=BEVDEPTH_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    suite = ElementTree.parse(report).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 1 and counts["failures"] == counts["errors"] == 0, counts
    assert counts["skipped"] == 0, counts


# --- end to end on the synthetic dataset ---------------------------------------------------

@pytest.mark.slow
def test_gen_info_and_gen_depth_gt_on_synthetic_mini(tmp_path: Path) -> None:
    synth = pytest.importorskip("bevdepth_npu.synth", reason="bevdepth_npu.synth is missing")
    root = tmp_path / "synth"
    # Two scenes (one mini_train, one mini_val) of two key frames, one sweep between them: the
    # second key frame has a previous key frame and camera and lidar sweeps.
    synth.generate(str(root), scenes=2, samples_per_scene=2, sweeps=1, seed=0, workers=1)

    proc = run_script(GEN_INFO, "--data-root", str(root), "--version", "v1.0-mini")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in root.glob("*.pkl")) == ["nuscenes_infos_train.pkl",
                                                          "nuscenes_infos_val.pkl"]
    for split in ("train", "val"):
        infos = load_infos(root, f"nuscenes_infos_{split}.pkl")
        assert len(infos) == 2, split
        assert len({info["scene_token"] for info in infos}) == 1, split
        for info in infos:
            assert sorted(info["cam_infos"]) == sorted(CAMS)
            assert (root / info["lidar_infos"]["LIDAR_TOP"]["filename"]).is_file()
            for cam_info in info["cam_infos"].values():
                assert (root / cam_info["filename"]).is_file()
    second = load_infos(root, "nuscenes_infos_train.pkl")[1]
    assert second["cam_sweeps"] and second["lidar_sweeps"], "the sweep paths go untested"

    proc, counts = gen_depth_gt(root, "--splits", "train", "val", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert counts == (24, 0, 0)
    assert len(depth_gt_files(root)) == 24

    # Two key frames (the recipe), and two key frames plus a sweep each with lidar depth for all
    # (the fusion recipes): sweep images are never read from depth_gt, so they still need lidar.
    settings = [dict(key_idxes=[-1]), dict(key_idxes=[-1], sweep_idxes=[0], use_fusion=True)]

    def items(setting: dict) -> list:
        dataset = nusc_det_dataset.NuscDetDataset(
            IDA_AUG_CONF, BDA_AUG_CONF, CLASSES, str(root),
            str(root / "nuscenes_infos_train.pkl"), True, return_depth=True, **setting)
        out = []
        for index in range(len(dataset)):
            np.random.seed(index)
            out.append(dataset[index])
        return out

    (root / "depth_gt").rename(root / "depth_gt.hidden")
    on_the_fly = [items(setting) for setting in settings]
    (root / "depth_gt.hidden").rename(root / "depth_gt")
    # Key-frame depth can now only come from depth_gt.
    shutil.rmtree(root / "samples" / "LIDAR_TOP")
    from_files = [items(setting) for setting in settings]
    for setting, expected_items, got_items in zip(settings, on_the_fly, from_files):
        for index, (expected, got) in enumerate(zip(expected_items, got_items)):
            depth = expected[DEPTH_INDEX]
            # Points in every camera of the current key frame (frame 0). Sweep frames may have
            # none: upstream gen_info gives lidar sweeps a camera's calibration.
            assert (depth[0] > 0).flatten(1).sum(-1).min() > 0, (setting, index)
            assert torch.equal(got[DEPTH_INDEX], depth), (setting, index)
