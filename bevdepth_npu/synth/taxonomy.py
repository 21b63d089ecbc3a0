"""Fixed settings and vocabulary of the synthetic nuScenes: defaults, sensors, rig calibration,
classes, attributes, visibility levels.

Nothing here depends on the seed or imports numpy (the command line reads the defaults cheaply). Names follow the real nuScenes v1.0 taxonomy so that the devkit,
its detection evaluation and BEVDepth's ``scripts/gen_info.py`` treat the output like nuScenes.
Imported by the other ``bevdepth_npu.synth`` modules; not meant to be run.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

# Defaults: the smallest dataset that still exercises everything (both mini splits, all ten
# classes in each scene, sweeps and prev/next chains, two-key-frame training windows) and that
# generates in well under a minute on two cores.
DEFAULT_SCENES = 2               # one mini_train scene and one mini_val scene
DEFAULT_SAMPLES_PER_SCENE = 10   # 5 s of driving at 2 Hz
DEFAULT_SWEEPS = 2               # two sweeps per sensor before each key frame (real data: 5/9)
DEFAULT_SEED = 0
MAX_SAMPLES_PER_SCENE = 40       # a real nuScenes scene is 20 s, ~40 key frames

IMAGE_WIDTH_PX = 1600
IMAGE_HEIGHT_PX = 900
JPEG_QUALITY = 90            # what the issue asks for; nuScenes JPEGs are of similar quality

KEY_FRAME_PERIOD_US = 500_000    # nuScenes annotates key frames at 2 Hz
LIDAR_PERIOD_US = 50_000         # LIDAR_TOP spins at 20 Hz
CAMERA_PERIOD_US = 83_333        # cameras run at 12 Hz
MAX_SWEEPS = 5                   # camera sweeps that fit between two key frames at 12 Hz

# One radius for everything an object takes part in: rendering, lidar and annotation. A single
# rule keeps images, point clouds and labels in agreement (nothing visible is left unlabelled);
# it equals the largest nuScenes detection class range (50 m).
VISIBLE_RADIUS_M = 50.0

# the devkit's mini splits (nuscenes.utils.splits); copied as names, checked against the devkit
# by the tests. Interleaved so that any two or more scenes hit both splits.
MINI_TRAIN = ("scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796",
              "scene-1077", "scene-1094", "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")
SCENE_NAMES = ("scene-0061", "scene-0103", "scene-0553", "scene-0655", "scene-0757",
               "scene-0796", "scene-0916", "scene-1077", "scene-1094", "scene-1100")
MAX_SCENES = len(SCENE_NAMES)

# Past ten scenes: the v1.0-trainval layout, with the first names of the devkit's train and val
# splits (nuscenes.utils.splits; copied as names, checked against the devkit by the tests).
# Training scenes never share a name, a world or a token with the held-out val scenes.
TRAINVAL_TRAIN = tuple(f"scene-{n:04d}" for n in (
    1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
    34, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
    63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 120, 121))
TRAINVAL_VAL = tuple(f"scene-{n:04d}" for n in (
    3, 12, 13, 14, 15, 16, 17, 18, 35, 36, 38, 39, 92, 93, 94, 95))
MINI = "v1.0-mini"
TRAINVAL = "v1.0-trainval"
VERSIONS = (MINI, TRAINVAL)
MAX_TRAINVAL_SCENES = len(TRAINVAL_TRAIN) + len(TRAINVAL_VAL)


def default_val_scenes(scenes: int) -> int:
    """Held-out scenes of a v1.0-trainval dataset when none are asked for: one in five."""
    return max(1, scenes // 5)


def scene_names(version: str, scenes: int, val_scenes: Optional[int] = None) -> Tuple[str, ...]:
    """Names of the ``scenes`` scenes of a dataset in ``version``'s layout.

    v1.0-mini: the mini scenes alternating mini_train/mini_val (``val_scenes`` is implied).
    v1.0-trainval: ``val_scenes`` names from the val split, then the rest from the train split.
    Callers validate the counts first (``bevdepth_npu.synth.dataset.validate``).
    """
    if version == MINI:
        return SCENE_NAMES[:scenes]
    val = default_val_scenes(scenes) if val_scenes is None else val_scenes
    return TRAINVAL_VAL[:val] + TRAINVAL_TRAIN[:scenes - val]


def world_key(version: str, index: int, name: str) -> int:
    """What, beside the seed, draws a scene's world: its position in a mini dataset (as the
    generator always did), its scene number in a v1.0-trainval one, so that a scene's world does
    not change with the number of scenes generated beside it."""
    return index if version == MINI else 10_000 + int(name.rsplit("-", 1)[1])

VEHICLE_NAME = "n015"
LOCATION = "singapore-onenorth"
UTC_OFFSET_H = 8                 # Singapore local time, used in log file names like the real ones


@dataclasses.dataclass(frozen=True)
class CameraSpec:
    """Nominal mounting of one camera on the ego car (ego frame: x forward, y left, z up)."""
    channel: str
    translation_m: Tuple[float, float, float]
    yaw_deg: float               # optical axis direction, counter-clockwise from ego x
    focal_px: float
    principal_px: Tuple[float, float]
    # time after the lidar key frame at which the camera fires: nuScenes cameras are triggered
    # when the spinning lidar sweeps across their field of view, so they are not simultaneous
    trigger_offset_us: int


# Positions, headings and intrinsics close to the nuScenes data-collection car (rounded).
# CAM_BACK has the wider lens of the real car (focal ~809 px) so that the six views close the circle.
CAMERAS = (
    CameraSpec("CAM_FRONT", (1.70, 0.016, 1.511), 0.0, 1266.4, (816.3, 491.5), 12_500),
    CameraSpec("CAM_FRONT_RIGHT", (1.551, -0.493, 1.496), -55.0, 1260.8, (808.0, 495.3), 20_800),
    CameraSpec("CAM_FRONT_LEFT", (1.524, 0.495, 1.509), 55.0, 1272.6, (826.6, 479.8), 4_200),
    CameraSpec("CAM_BACK", (0.028, 0.003, 1.579), 180.0, 809.2, (829.2, 481.8), 37_500),
    CameraSpec("CAM_BACK_LEFT", (1.036, 0.485, 1.591), 110.0, 1256.7, (817.8, 452.0), 45_800),
    CameraSpec("CAM_BACK_RIGHT", (1.015, -0.481, 1.562), -110.0, 1259.5, (807.3, 501.2), 29_200),
)
CAMERA_CHANNELS = tuple(c.channel for c in CAMERAS)

LIDAR_CHANNEL = "LIDAR_TOP"
LIDAR_TRANSLATION_M = (0.943713, 0.0, 1.84023)
LIDAR_YAW_DEG = -90.0            # nuScenes LIDAR_TOP: x to the right of the car, y forward
LIDAR_BEAM_ELEVATIONS_DEG = (-30.67, 10.67)   # HDL-32E: 32 beams evenly between these
LIDAR_BEAMS = 32
LIDAR_AZIMUTH_STEPS = 1084       # ~0.33 deg at 20 Hz: ~34.7k rays per sweep, like nuScenes
LIDAR_MAX_RANGE_M = 70.0

# per-log calibration spread: real calibrations differ a little between logs
CALIBRATION_JITTER_DEG = 0.3
CALIBRATION_JITTER_M = 0.01

EGO_LENGTH_M = 4.7
EGO_WIDTH_M = 1.9
EGO_CENTRE_AHEAD_M = 1.4         # the ego frame origin is the rear axle; the body centre is ahead


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """One of the ten nuScenes detection classes as the generator draws it."""
    detection_name: str
    category: str                # real nuScenes category that the devkit maps to detection_name
    size_wlh_m: Tuple[float, float, float]   # nuScenes order: width, length, height
    colour_rgb: Tuple[int, int, int]
    per_scene: int               # instances placed in each scene
    eval_range_m: float          # nuScenes detection evaluation class range
    moving_fraction: float
    speed_mps: Tuple[float, float]
    intensity: float             # lidar return strength (nuScenes intensities are 0..255)


# Saturated colours that are far from each other and from the background (sky blue, asphalt
# grey, verge olive) so that a network can tell the classes apart from pixels alone.
CLASSES = (
    ClassSpec("car", "vehicle.car", (1.95, 4.6, 1.7), (220, 40, 40), 10, 50.0, 0.6, (3.0, 12.0), 40.0),
    ClassSpec("truck", "vehicle.truck", (2.5, 6.9, 2.9), (30, 70, 220), 2, 50.0, 0.5, (3.0, 9.0), 45.0),
    ClassSpec("construction_vehicle", "vehicle.construction", (2.8, 6.4, 3.2), (235, 215, 0), 1, 50.0,
              0.2, (1.0, 3.0), 45.0),
    ClassSpec("bus", "vehicle.bus.rigid", (2.95, 11.0, 3.5), (140, 50, 210), 1, 50.0, 0.7, (3.0, 9.0),
              45.0),
    ClassSpec("trailer", "vehicle.trailer", (2.9, 12.0, 3.8), (130, 80, 40), 1, 50.0, 0.0, (0.0, 0.0),
              35.0),
    ClassSpec("barrier", "movable_object.barrier", (2.5, 0.5, 1.0), (230, 40, 170), 4, 30.0, 0.0,
              (0.0, 0.0), 70.0),
    ClassSpec("motorcycle", "vehicle.motorcycle", (0.8, 2.1, 1.5), (0, 200, 210), 1, 40.0, 0.6,
              (3.0, 8.0), 30.0),
    ClassSpec("bicycle", "vehicle.bicycle", (0.6, 1.7, 1.3), (40, 190, 60), 2, 40.0, 0.6, (2.0, 5.0),
              25.0),
    ClassSpec("pedestrian", "human.pedestrian.adult", (0.67, 0.73, 1.77), (255, 160, 200), 6, 40.0,
              0.6, (0.8, 1.6), 20.0),
    ClassSpec("traffic_cone", "movable_object.trafficcone", (0.41, 0.41, 1.07), (255, 130, 0), 4,
              30.0, 0.0, (0.0, 0.0), 90.0),
)
CLASS_BY_NAME: Dict[str, ClassSpec] = {c.detection_name: c for c in CLASSES}

# Brightness of each box face relative to the class colour: a lit top, darker sides, a light
# front and a dark back, so that heading is visible in the image (not only the footprint).
FACE_SHADES = {"front": 1.25, "back": 0.55, "left": 0.8, "right": 0.7, "top": 1.0, "bottom": 0.4}


def face_colour(class_colour: Tuple[int, int, int], face: str) -> Tuple[int, int, int]:
    """RGB of one face: shades above 1 blend towards white, below 1 darken."""
    shade = FACE_SHADES[face]
    if shade >= 1.0:
        mix = shade - 1.0
        return tuple(int(round(c + (255 - c) * mix)) for c in class_colour)  # type: ignore
    return tuple(int(round(c * shade)) for c in class_colour)  # type: ignore


# Real nuScenes category names, in the order of their lidarseg indices (the devkit colormap order).
CATEGORY_INDEX = {
    "noise": 0, "animal": 1, "human.pedestrian.adult": 2, "human.pedestrian.child": 3,
    "human.pedestrian.construction_worker": 4, "human.pedestrian.personal_mobility": 5,
    "human.pedestrian.police_officer": 6, "human.pedestrian.stroller": 7,
    "human.pedestrian.wheelchair": 8, "movable_object.barrier": 9, "movable_object.debris": 10,
    "movable_object.pushable_pullable": 11, "movable_object.trafficcone": 12,
    "static_object.bicycle_rack": 13, "vehicle.bicycle": 14, "vehicle.bus.bendy": 15,
    "vehicle.bus.rigid": 16, "vehicle.car": 17, "vehicle.construction": 18,
    "vehicle.emergency.ambulance": 19, "vehicle.emergency.police": 20, "vehicle.motorcycle": 21,
    "vehicle.trailer": 22, "vehicle.truck": 23,
}

CATEGORY_DESCRIPTIONS = {
    "vehicle.car": "Synthetic passenger car.",
    "vehicle.truck": "Synthetic truck.",
    "vehicle.construction": "Synthetic construction vehicle.",
    "vehicle.bus.rigid": "Synthetic rigid bus.",
    "vehicle.trailer": "Synthetic trailer.",
    "movable_object.barrier": "Synthetic temporary road barrier.",
    "vehicle.motorcycle": "Synthetic motorcycle.",
    "vehicle.bicycle": "Synthetic bicycle.",
    "human.pedestrian.adult": "Synthetic adult pedestrian.",
    "movable_object.trafficcone": "Synthetic traffic cone.",
}

ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver, is stationary but can move at any time."),
    ("vehicle.parked", "Vehicle is stationary and has no one in it."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is no rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The pedestrian is sitting or lying down."),
    ("pedestrian.standing", "The pedestrian is standing."),
    ("pedestrian.moving", "The pedestrian is moving."),
)

# nuScenes visibility: fraction of the object visible over all six images, in four bins
VISIBILITY = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%", 0.0),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%", 0.4),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%", 0.6),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%", 0.8),
)


def visibility_token(visible_fraction: float) -> str:
    """The visibility token of the bin that holds ``visible_fraction`` (0..1)."""
    token = VISIBILITY[0][0]
    for tok, _level, _desc, lower in VISIBILITY:
        if visible_fraction >= lower:
            token = tok
    return token


def attribute_for(detection_name: str, moving: bool) -> Optional[str]:
    """The nuScenes attribute of an instance, as BEVDepth's evaluator infers it from speed.

    DetNuscEvaluator (bevdepth/evaluators/det_evaluators.py) predicts no attributes: it names
    one from the box's speed (moving above 0.2 m/s, else a per-class default: parked vehicles, a
    stopped bus, a standing pedestrian, a cycle without rider). Ground truth labelled by the same
    rule scores mAAE = 0 when fed back through it, so the evaluation sanity check can hold NDS to
    1; the real dataset's stopped cars and sitting pedestrians are left out for that reason.
    """
    if detection_name in ("barrier", "traffic_cone"):
        return None              # nuScenes gives these classes no attribute
    if detection_name in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    if detection_name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    if moving:
        return "vehicle.moving"
    return "vehicle.stopped" if detection_name == "bus" else "vehicle.parked"
