"""``bevdepth-npu show``: draw a run's predictions against the ground truth, one PNG per sample.

    bevdepth-npu show RUN_DIR|RESULTS_JSON --data-root DIR [--version v1.0-mini]
                      [--samples N | --sample TOKEN ...] [--score-threshold 0.3] [--out DIR]

RUN_DIR is a run directory holding the evaluator's results (``eval/results_nusc.json``, else
``results_nusc.json``); RESULTS_JSON is a nuScenes detection results file, the format
BEVDepth's evaluator writes and the nuScenes detection benchmark reads. The data root and release
are those the results were computed on. ``--samples N`` draws the first N samples of the results
(the evaluator writes them in dataset order: the first is the first validation sample),
``--sample TOKEN`` (repeatable) the named ones.

Each picture shows the six camera images with the predicted boxes (solid lines in the class
colours of the devkit's detection plots, with class and score; those below --score-threshold are
left out) and the ground-truth boxes (dashed, same colours), projected with the sample's camera
calibration and ego pose, and a bird's-eye panel of both around the ego vehicle with the lidar
points (ego frame, metres: x forward up the page, y to the left). Ground truth is every
annotation of the sample in a detection class; the devkit's evaluation further ignores boxes
beyond the class range or without lidar and radar points.

The geometry and drawing are the devkit's own: ``load_prediction`` and
``load_gt_of_sample_tokens`` read the boxes, ``boxes_to_sensor`` moves them from the global frame
into the ego and camera frames, ``box_in_image`` picks the cameras, ``Box.render`` (through
``view_points``) projects and draws, as its detection ``visualize_sample`` does.

From Python: ``render(source, data_root, version, samples=1)`` returns the PNG paths.
Needs the bevdepth-npu environment (nuscenes-devkit, matplotlib); exit status 2 with a message
naming the file for bad input (an unknown sample, a missing image, a malformed results file).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bevdepth_npu.argtypes import positive_int
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write

RESULTS_NAME = "results_nusc.json"
# Where a run directory keeps the evaluator's results: the scripts evaluate into eval/, an
# experiment run by hand into its --default_root_dir.
RUN_RESULTS = (Path("eval") / RESULTS_NAME, Path(RESULTS_NAME))
OUT_SUBDIR = "show"

# The devkit's camera order (nuScenes.render_sample): the front three above, the back three below.
CAMERA_GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
               ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
# The devkit's visualize_sample draws from 0.15; 0.3 keeps busy scenes readable.
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_VERSION = "v1.0-trainval"  # BEVDepth's evaluator default (the smoke run: v1.0-mini)
BEV_RANGE_M = 55.0                # the largest class range (50 m) plus the devkit's margin
CAMERA_PANEL_IN = (4.0, 2.25)     # one 1600x900 image at 16:9
DPI = 100
PRED_LINE_PT = 1.2
GT_LINE_PT = 1.6
GT_DASH = (0, (3.0, 2.0))
LIDAR_POINT_SIZE_PT2 = 0.3
# The nuScenes evaluation allows 500 boxes per sample; the bound protects the viewer from a
# results file that is not a detection results file.
MAX_BOXES_PER_SAMPLE = 500

PRED_GID = "pred"                 # matplotlib gids of the drawn lines: the tests tell them apart
GT_GID = "gt"


@dataclasses.dataclass
class CameraView:
    """One camera of a sample and the boxes it sees, in its own frame."""
    channel: str
    image_path: Path
    intrinsic: "object"            # (3, 3) numpy array
    size_px: Tuple[int, int]       # width, height
    boxes: List[Tuple["object", "object"]]   # (DetectionBox in the global frame, devkit Box)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR|RESULTS_JSON",
                        help=f"a run directory (its {RUN_RESULTS[0]} or {RUN_RESULTS[1]}) or a "
                             "nuScenes detection results JSON")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="nuScenes root the results were computed on")
    parser.add_argument("--version", default=DEFAULT_VERSION,
                        help="nuScenes release under --data-root, e.g. v1.0-mini "
                             "(default %(default)s)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--samples", type=positive_int, default=1, metavar="N",
                       help="draw the first N samples of the results (default %(default)s)")
    which.add_argument("--sample", action="append", metavar="TOKEN",
                       help="draw this sample (repeatable)")
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                        metavar="S", help="leave out predictions scoring below S "
                                          "(default %(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"where the PNGs go (default: {OUT_SUBDIR}/ beside the results file)")
    parser.add_argument("--dpi", type=positive_int, default=DPI,
                        help="resolution of the PNGs (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    paths = render(args.source, args.data_root, args.version, samples=args.samples,
                   sample_tokens=args.sample, score_threshold=args.score_threshold,
                   out_dir=args.out, dpi=args.dpi)
    for path in paths:
        print(f"show: {path}", flush=True)
    return 0


# ---------------------------------------------------------------------------------- inputs


def results_path(source) -> Path:
    """The results JSON that ``source`` (a run directory or the file itself) names."""
    source = Path(source)
    if source.is_dir():
        for rel in RUN_RESULTS:
            if (source / rel).is_file():
                return source / rel
        tried = " nor ".join(str(source / rel) for rel in RUN_RESULTS)
        raise UserError(f"{source}: no evaluation results there (neither {tried}); evaluate the "
                        "run first or pass a results JSON")
    if not source.is_file():
        raise UserError(f"{source}: no such run directory or results file")
    return source


def load_predictions(path: Path):
    """The devkit's ``load_prediction`` with its assertions turned into messages naming ``path``."""
    from nuscenes.eval.common.loaders import load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox
    try:
        boxes, _meta = load_prediction(str(path), MAX_BOXES_PER_SAMPLE, DetectionBox)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None
    except AssertionError as exc:
        raise UserError(f"{path}: not a nuScenes detection results file ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not a nuScenes detection results file (a box lacks or "
                        f"misstates {exc})") from None
    return boxes


def open_nuscenes(data_root, version: str):
    from nuscenes import NuScenes
    root = Path(data_root)
    if not (root / version).is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir()) if root.is_dir() else []
        hint = f" (it has {', '.join(found)}: pass --version)" if found else ""
        raise UserError(f"--data-root {root}: no nuScenes release {version} there{hint}")
    return NuScenes(version=version, dataroot=str(root), verbose=False)


def choose_samples(nusc, predictions, path: Path, samples: int,
                   sample_tokens: Optional[Sequence[str]]) -> List[str]:
    """The sample tokens to draw; every token of the results must be in the dataset."""
    known = {record["token"] for record in nusc.sample}
    for token in predictions.sample_tokens:
        if token not in known:
            raise UserError(f"{path}: sample {token} is not in {nusc.dataroot} ({nusc.version}); "
                            "were the results computed on another dataset or release?")
    if sample_tokens:
        missing = [t for t in sample_tokens if t not in predictions.sample_tokens]
        if missing:
            raise UserError(f"{path} has no results for sample {', '.join(missing)}")
        return list(dict.fromkeys(sample_tokens))
    if not predictions.sample_tokens:
        raise UserError(f"{path} holds results for no sample")
    return predictions.sample_tokens[:samples]


def ground_truth(nusc, sample_token: str):
    """The sample's annotations in detection classes, as the devkit's evaluation loads them."""
    from nuscenes.eval.common import loaders
    from nuscenes.eval.detection.data_classes import DetectionBox
    if hasattr(loaders, "load_gt_of_sample_tokens"):
        return loaders.load_gt_of_sample_tokens(nusc, [sample_token], DetectionBox)[sample_token]
    # nuscenes-devkit before 1.2 (the one for Python 3.8) loads whole splits only.
    return _split_ground_truth(nusc, _split_of(nusc, sample_token))[sample_token]


_SPLIT_GT: Dict[Tuple[int, str], object] = {}


def _split_of(nusc, sample_token: str) -> str:
    from nuscenes.utils.splits import create_splits_scenes
    scene = nusc.get("scene", nusc.get("sample", sample_token)["scene_token"])["name"]
    mini = nusc.version.endswith("mini")
    splits = create_splits_scenes()
    for split in (("mini_train", "mini_val") if mini else ("train", "val", "test")):
        if scene in splits[split]:
            return split
    raise UserError(f"{nusc.dataroot}: scene {scene} is in no split of {nusc.version}")


def _split_ground_truth(nusc, split: str):
    from nuscenes.eval.common.loaders import load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox
    key = (id(nusc), split)
    if key not in _SPLIT_GT:
        _SPLIT_GT[key] = load_gt(nusc, split, DetectionBox)
    return _SPLIT_GT[key]


def _existing(path: Path, what: str, sample_token: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: missing ({what} of sample {sample_token}); is --data-root the "
                        "dataset the results were computed on?")
    return path


# ---------------------------------------------------------------------------------- geometry


def camera_views(nusc, sample_token: str, eval_boxes: Sequence) -> Dict[str, CameraView]:
    """Per camera of the sample: its image, intrinsics and the ``eval_boxes`` (global frame) it
    sees, moved into its frame with the ego pose at its timestamp (the devkit's
    ``boxes_to_sensor``) and kept where the devkit's ``box_in_image`` says so."""
    import numpy as np
    from nuscenes.eval.common.utils import boxes_to_sensor
    from nuscenes.utils.geometry_utils import BoxVisibility, box_in_image

    sample = nusc.get("sample", sample_token)
    views = {}
    for channel in (c for row in CAMERA_GRID for c in row):
        record = nusc.get("sample_data", sample["data"][channel])
        calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        intrinsic = np.array(calibration["camera_intrinsic"])
        size = (int(record["width"]), int(record["height"]))
        in_camera = boxes_to_sensor(list(eval_boxes), pose, calibration)
        seen = [(src, box) for src, box in zip(eval_boxes, in_camera)
                if box_in_image(box, intrinsic, size, vis_level=BoxVisibility.ANY)]
        image = _existing(Path(nusc.dataroot) / record["filename"], f"{channel} image",
                          sample_token)
        views[channel] = CameraView(channel, image, intrinsic, size, seen)
    return views


def ego_boxes(nusc, sample_token: str, eval_boxes: Sequence) -> List:
    """``eval_boxes`` in the ego frame of the sample's lidar key frame (the sample's time)."""
    from nuscenes.eval.common.utils import boxes_to_sensor
    sample = nusc.get("sample", sample_token)
    record = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    pose = nusc.get("ego_pose", record["ego_pose_token"])
    identity = {"translation": [0.0, 0.0, 0.0], "rotation": [1.0, 0.0, 0.0, 0.0]}
    return boxes_to_sensor(list(eval_boxes), pose, identity)


def lidar_in_ego(nusc, sample_token: str):
    """(3, n) lidar points of the key frame in the ego frame."""
    import numpy as np
    from nuscenes.utils.data_classes import LidarPointCloud
    from pyquaternion import Quaternion
    sample = nusc.get("sample", sample_token)
    record = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    path = _existing(Path(nusc.dataroot) / record["filename"], "lidar sweep", sample_token)
    calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    cloud = LidarPointCloud.from_file(str(path))
    cloud.rotate(Quaternion(calibration["rotation"]).rotation_matrix)
    cloud.translate(np.array(calibration["translation"]))
    return cloud.points[:3]


# ---------------------------------------------------------------------------------- drawing


def _colour(name: str) -> str:
    from nuscenes.eval.detection.constants import DETECTION_COLORS
    return DETECTION_COLORS.get(name, "k")


def _draw(ax, box, view, normalize: bool, colour: str, gid: str) -> None:
    """``Box.render`` in one colour; ground truth dashed. The gid marks the lines for tests."""
    first = len(ax.lines)
    box.render(ax, view=view, normalize=normalize, colors=(colour, colour, colour),
               linewidth=GT_LINE_PT if gid == GT_GID else PRED_LINE_PT)
    for line in ax.lines[first:]:
        line.set_gid(gid)
        if gid == GT_GID:
            line.set_linestyle(GT_DASH)


def draw_sample(nusc, sample_token: str, predictions: Sequence, gt: Sequence,
                score_threshold: float = DEFAULT_SCORE_THRESHOLD, dpi: int = DPI):
    """The picture of one sample as a matplotlib Figure (no pyplot state involved)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from nuscenes.utils.geometry_utils import view_points
    from PIL import Image

    shown = [b for b in predictions if b.detection_score >= score_threshold]
    cam_w, cam_h = CAMERA_PANEL_IN
    fig = Figure(figsize=(3 * cam_w + 2 * cam_h, 2 * cam_h), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 5, width_ratios=[cam_w] * 3 + [cam_h, cam_h], wspace=0.02,
                            hspace=0.02, left=0.005, right=0.99, bottom=0.09, top=0.93)

    pred_views = camera_views(nusc, sample_token, shown)
    gt_views = camera_views(nusc, sample_token, gt)
    for row, channels in enumerate(CAMERA_GRID):
        for col, channel in enumerate(channels):
            ax = fig.add_subplot(grid[row, col])
            view = gt_views[channel]
            with Image.open(view.image_path) as image:
                ax.imshow(image)
            for src, box in view.boxes:
                _draw(ax, box, view.intrinsic, True, _colour(src.detection_name), GT_GID)
            for src, box in pred_views[channel].boxes:
                colour = _colour(src.detection_name)
                _draw(ax, box, view.intrinsic, True, colour, PRED_GID)
                corners = view_points(box.corners(), view.intrinsic, normalize=True)[:2]
                u = float(np.clip(corners[0].min(), 0, view.size_px[0] - 1))
                v = float(np.clip(corners[1].min(), 0, view.size_px[1] - 1))
                ax.text(u, v, f"{src.detection_name} {src.detection_score:.2f}", color="white",
                        fontsize=5, va="bottom", clip_on=True,
                        bbox=dict(facecolor=colour, edgecolor="none", pad=0.5, alpha=0.8))
            ax.set_xlim(0, view.size_px[0])
            ax.set_ylim(view.size_px[1], 0)
            ax.set_axis_off()
            ax.set_title(channel, fontsize=7, pad=2)

    # Bird's eye: ego x forward up the page, ego y to the left (the axis runs right to left).
    bev = fig.add_subplot(grid[:, 3:])
    swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    points = lidar_in_ego(nusc, sample_token)
    near = (np.abs(points[0]) < BEV_RANGE_M) & (np.abs(points[1]) < BEV_RANGE_M)
    bev.scatter(points[1, near], points[0, near], s=LIDAR_POINT_SIZE_PT2, c="0.6", linewidths=0)
    for src, box in zip(gt, ego_boxes(nusc, sample_token, gt)):
        _draw(bev, box, swap, False, _colour(src.detection_name), GT_GID)
    for src, box in zip(shown, ego_boxes(nusc, sample_token, shown)):
        _draw(bev, box, swap, False, _colour(src.detection_name), PRED_GID)
    bev.plot([0.0], [0.0], marker="^", color="black", markersize=5)
    bev.set_xlim(BEV_RANGE_M, -BEV_RANGE_M)
    bev.set_ylim(-BEV_RANGE_M, BEV_RANGE_M)
    bev.set_aspect("equal")
    bev.set_xlabel("ego y (m), left +", fontsize=7)
    bev.set_ylabel("ego x (m), forward +", fontsize=7)
    bev.tick_params(labelsize=6)
    names = sorted({b.detection_name for b in list(gt) + shown})
    handles = [Line2D([], [], color=_colour(n), label=n) for n in names]
    handles += [Line2D([], [], color="k", label="prediction"),
                Line2D([], [], color="k", linestyle=GT_DASH, label="ground truth")]
    bev.legend(handles=handles, fontsize=5, loc="lower left", framealpha=0.7)
    fig.suptitle(f"sample {sample_token}: {len(shown)} of {len(predictions)} predictions with "
                 f"score >= {score_threshold:g} (solid), {len(gt)} ground-truth boxes (dashed)",
                 fontsize=8)
    return fig


def save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    atomic_write(path, buffer.getvalue())


def render(source, data_root, version: str = DEFAULT_VERSION, samples: int = 1,
           sample_tokens: Optional[Sequence[str]] = None,
           score_threshold: float = DEFAULT_SCORE_THRESHOLD, out_dir=None,
           dpi: int = DPI) -> List[Path]:
    """Draw ``samples`` samples (or ``sample_tokens``) of the results that ``source`` (a run
    directory or a results JSON) names; return the PNG paths (``<out_dir>/<sample token>.png``,
    ``out_dir`` defaulting to ``show/`` beside the results file). Raises UserError for bad input."""
    path = results_path(source)
    predictions = load_predictions(path)
    nusc = open_nuscenes(data_root, version)
    tokens = choose_samples(nusc, predictions, path, samples, sample_tokens)
    out = Path(out_dir) if out_dir is not None else path.parent / OUT_SUBDIR
    written = []
    for token in tokens:
        fig = draw_sample(nusc, token, predictions[token], ground_truth(nusc, token),
                          score_threshold, dpi)
        target = out / f"{token}.png"
        save_png(fig, target)
        written.append(target)
    return written
