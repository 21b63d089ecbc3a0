"""The synthetic world of one scene: the ego path, the objects and their motion, the rig calibration.

Everything is drawn from a seeded ``numpy.random.Generator`` so that a seed fixes the world.
Motion is simple on purpose: the ego drives at constant speed along a circular arc (or a straight
line) and every object keeps a constant velocity and heading, so that the velocities the devkit
derives from consecutive annotations are exactly the velocities used to render the sensors.
The global frame is offset a few hundred metres from the ego so that ego/global conversions matter.
Imported by ``bevdepth_npu.synth.dataset``; not meant to be run.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from bevdepth_npu.synth import taxonomy as tx
from bevdepth_npu.synth.geometry import rot_x, rot_y, rot_z

ROAD_HALF_WIDTH_M = 11.0         # four lanes plus parking strips; beyond it lie verge and sidewalks
LANE_WIDTH_M = 3.5
EGO_SPEED_MPS = (4.0, 10.0)      # urban driving, like most nuScenes scenes
MAX_CURVATURE_PER_M = 1.0 / 300  # gentle bends: straight-moving traffic stays near its lane
WORLD_OFFSET_M = (250.0, 150.0)  # the ego starts 250-400 m from the global origin (x and y)
COLLISION_MARGIN_M = 0.4         # clearance kept between any two footprints, ego included
COLLISION_STEP_S = 0.05          # fine enough that an oncoming car cannot jump through another
PLACEMENT_ATTEMPTS = 400
# Keep boxes mostly visible: an object may be more than half hidden (seen from the cameras, by
# nearer boxes at least 60 % as tall) in at most a third of the key frames where it is annotated.
OCCLUDED_COVER = 0.5
OCCLUDED_FRAMES = 1.0 / 3.0
OCCLUDER_MIN_HEIGHT = 0.6
BASE_TIMESTAMP_US = 1_532_402_927_000_000   # July 2018, like the nuScenes mini logs


@dataclasses.dataclass(frozen=True)
class EgoPath:
    """Constant-speed drive along an arc of curvature ``curvature_per_m`` (0: straight)."""
    start_xy: Tuple[float, float]
    heading0_rad: float
    curvature_per_m: float
    speed_mps: float

    def at_arclength(self, s_m: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Positions (n, 2) and headings (n,) at arc lengths ``s_m`` (may be negative)."""
        s = np.asarray(s_m, dtype=np.float64)
        h0, k = self.heading0_rad, self.curvature_per_m
        heading = h0 + k * s
        if k == 0.0:
            x = self.start_xy[0] + s * math.cos(h0)
            y = self.start_xy[1] + s * math.sin(h0)
        else:
            x = self.start_xy[0] + (np.sin(heading) - math.sin(h0)) / k
            y = self.start_xy[1] - (np.cos(heading) - math.cos(h0)) / k
        return np.stack([x, y], axis=-1), heading

    def pose_at(self, t_s: float) -> Tuple[np.ndarray, float]:
        xy, heading = self.at_arclength(np.array([self.speed_mps * t_s]))
        return xy[0], float(heading[0])

    def lateral_offset(self, xy: np.ndarray) -> np.ndarray:
        """Signed distance (left of the path positive) of global points (n, 2) from the path."""
        p = np.asarray(xy, dtype=np.float64)
        h0, k = self.heading0_rad, self.curvature_per_m
        left = np.array([-math.sin(h0), math.cos(h0)])
        start = np.array(self.start_xy)
        if k == 0.0:
            return (p - start) @ left
        radius = 1.0 / k
        centre = start + radius * left
        return math.copysign(1.0, k) * (abs(radius) - np.linalg.norm(p - centre, axis=-1))


@dataclasses.dataclass(frozen=True)
class SynthObject:
    """One annotated instance: fixed size and heading, constant velocity."""
    index: int
    detection_name: str
    size_wlh_m: Tuple[float, float, float]
    yaw_rad: float
    position0_xy: Tuple[float, float]      # where it is at scene time 0
    velocity_xy_mps: Tuple[float, float]
    attribute: Optional[str]

    def centre_at(self, t_s: float) -> np.ndarray:
        """Global box centre at scene time ``t_s`` (boxes stand on the ground plane z = 0)."""
        return np.array([self.position0_xy[0] + self.velocity_xy_mps[0] * t_s,
                         self.position0_xy[1] + self.velocity_xy_mps[1] * t_s,
                         self.size_wlh_m[2] / 2.0])


@dataclasses.dataclass(frozen=True)
class SensorCalibration:
    """Sensor-to-ego pose and, for cameras, the 3x3 intrinsic matrix."""
    channel: str
    rotation: np.ndarray           # 3x3, sensor -> ego
    translation_m: np.ndarray      # (3,)
    intrinsic: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True)
class ScenePlan:
    index: int
    name: str
    logfile: str
    date_captured: str
    start_us: int
    n_samples: int
    ego: EgoPath
    objects: Tuple[SynthObject, ...]
    calibration: Dict[str, SensorCalibration]

    def seconds(self, timestamp_us: int) -> float:
        return (timestamp_us - self.start_us) * 1e-6

    def duration_s(self) -> float:
        return (self.n_samples - 1) * tx.KEY_FRAME_PERIOD_US * 1e-6


# camera axes (x right, y down, z forward) expressed in the ego frame of a forward camera
_CAMERA_BASE = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _jitter(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    angles = np.radians(rng.uniform(-tx.CALIBRATION_JITTER_DEG, tx.CALIBRATION_JITTER_DEG, 3))
    rotation = rot_z(angles[2]) @ rot_y(angles[1]) @ rot_x(angles[0])
    return rotation, rng.uniform(-tx.CALIBRATION_JITTER_M, tx.CALIBRATION_JITTER_M, 3)


def plan_calibration(rng: np.random.Generator) -> Dict[str, SensorCalibration]:
    calibration = {}
    for cam in tx.CAMERAS:
        jitter_r, jitter_t = _jitter(rng)
        rotation = rot_z(math.radians(cam.yaw_deg)) @ jitter_r @ _CAMERA_BASE
        intrinsic = np.array([[cam.focal_px, 0.0, cam.principal_px[0]],
                              [0.0, cam.focal_px, cam.principal_px[1]],
                              [0.0, 0.0, 1.0]])
        calibration[cam.channel] = SensorCalibration(
            cam.channel, rotation, np.array(cam.translation_m) + jitter_t, intrinsic)
    jitter_r, jitter_t = _jitter(rng)
    calibration[tx.LIDAR_CHANNEL] = SensorCalibration(
        tx.LIDAR_CHANNEL, rot_z(math.radians(tx.LIDAR_YAW_DEG)) @ jitter_r,
        np.array(tx.LIDAR_TRANSLATION_M) + jitter_t, None)
    return calibration


def _footprints_overlap(c1: np.ndarray, yaw1: np.ndarray, half1: np.ndarray,
                        c2: np.ndarray, yaw2: np.ndarray, half2: np.ndarray) -> np.ndarray:
    """Separating-axis test of two oriented rectangles at many times: centres (T, 2), yaws (T,)
    (or scalars), half extents (half_length, half_width). Returns a (T,) boolean."""
    delta = c2 - c1
    # bounding circles first: most pairs are far apart at most times
    overlap = np.hypot(delta[:, 0], delta[:, 1]) <= float(np.hypot(*half1) + np.hypot(*half2))
    if not overlap.any():
        return overlap
    near = np.nonzero(overlap)[0]
    delta = delta[near]
    yaw1 = np.broadcast_to(yaw1, c1.shape[:1])[near]
    yaw2 = np.broadcast_to(yaw2, c2.shape[:1])[near]
    axes1 = np.stack([np.stack([np.cos(yaw1), np.sin(yaw1)], -1),
                      np.stack([-np.sin(yaw1), np.cos(yaw1)], -1)], 1)   # (T, 2 axes, 2)
    axes2 = np.stack([np.stack([np.cos(yaw2), np.sin(yaw2)], -1),
                      np.stack([-np.sin(yaw2), np.cos(yaw2)], -1)], 1)
    hit = np.ones(len(near), dtype=bool)
    for axes in (axes1, axes2):
        for a in range(2):
            axis = axes[:, a]
            r1 = (half1[0] * np.abs(np.einsum("ij,ij->i", axes1[:, 0], axis))
                  + half1[1] * np.abs(np.einsum("ij,ij->i", axes1[:, 1], axis)))
            r2 = (half2[0] * np.abs(np.einsum("ij,ij->i", axes2[:, 0], axis))
                  + half2[1] * np.abs(np.einsum("ij,ij->i", axes2[:, 1], axis)))
            hit &= np.abs(np.einsum("ij,ij->i", delta, axis)) <= r1 + r2
    overlap[near] = hit
    return overlap


def _propose(spec: tx.ClassSpec, ego: EgoPath, duration_s: float, rng: np.random.Generator,
             index: int) -> SynthObject:
    """One random instance of ``spec`` near the road, placed relative to the ego at a random time."""
    name = spec.detection_name
    moving = bool(rng.uniform() < spec.moving_fraction)
    attribute = tx.attribute_for(name, moving)
    scale = rng.uniform(0.9, 1.1, 3)
    w, l, h = (float(round(v * f, 3)) for v, f in zip(spec.size_wlh_m, scale))

    t_ref_s = float(rng.uniform(0.0, duration_s)) if duration_s > 0 else 0.0
    s_ref = ego.speed_mps * t_ref_s + float(rng.uniform(-0.9, 0.9)) * spec.eval_range_m
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    reverse = False                      # heading against the path direction
    speed = float(rng.uniform(*spec.speed_mps)) if moving else 0.0
    yaw_offset = 0.0
    if name in ("car", "truck", "bus", "trailer", "construction_vehicle"):
        if moving:
            lane = int(rng.integers(0, 4))   # 0, 1: with the ego; 2, 3: oncoming
            d = (0.0, LANE_WIDTH_M, -LANE_WIDTH_M, -2 * LANE_WIDTH_M)[lane]
            reverse = lane >= 2
        elif attribute == "vehicle.stopped":
            d = side * LANE_WIDTH_M
            reverse = side < 0
        else:
            d = side * float(rng.uniform(8.5, 10.5))
            reverse = bool(rng.uniform() < 0.3)
    elif name in ("motorcycle", "bicycle"):
        if moving:
            d = side * 5.5
            reverse = side < 0
        else:
            d = side * float(rng.uniform(11.5, 13.0))
            yaw_offset = float(rng.uniform(-0.3, 0.3))
    elif name == "pedestrian":
        d = side * float(rng.uniform(12.0, 15.0))
        if moving and rng.uniform() < 0.2:
            yaw_offset = -side * math.pi / 2     # crossing the road towards the other side
        else:
            reverse = bool(rng.uniform() < 0.5)
            yaw_offset = float(rng.uniform(-0.2, 0.2)) if moving else float(rng.uniform(-math.pi, math.pi))
    elif name == "barrier":
        d = side * float(rng.uniform(6.5, 9.5))
        yaw_offset = math.pi / 2            # the long side (width) runs along the road
    else:  # traffic_cone
        d = side * float(rng.uniform(5.5, 9.5))
        yaw_offset = float(rng.uniform(-math.pi, math.pi))

    xy, heading = ego.at_arclength(np.array([s_ref]))
    left = np.array([-math.sin(heading[0]), math.cos(heading[0])])
    position_ref = xy[0] + d * left
    yaw = float(heading[0]) + (math.pi if reverse else 0.0) + yaw_offset
    yaw = math.atan2(math.sin(yaw), math.cos(yaw))
    velocity = speed * np.array([math.cos(yaw), math.sin(yaw)])
    position0 = position_ref - velocity * t_ref_s
    return SynthObject(index, name, (w, l, h), yaw, (float(position0[0]), float(position0[1])),
                       (float(velocity[0]), float(velocity[1])), attribute)


def _object_track(obj: SynthObject, times_s: np.ndarray) -> np.ndarray:
    return np.array(obj.position0_xy) + np.outer(times_s, obj.velocity_xy_mps)


@dataclasses.dataclass
class _Silhouette:
    """How one object looks from the ego at each key frame, in azimuth: a 2-D occlusion model."""
    height_m: float
    centre_az: np.ndarray      # (K,) azimuth of the centre seen from the cameras
    lo: np.ndarray             # (K,) angular extent relative to centre_az
    hi: np.ndarray
    distance_m: np.ndarray     # (K,)
    annotated: np.ndarray      # (K,) bool: within the visible radius
    cover: np.ndarray          # (K,) fraction of the extent hidden by nearer objects so far

    def mostly_hidden(self, cover: np.ndarray) -> bool:
        frames = int(np.count_nonzero(self.annotated))
        hidden = int(np.count_nonzero((cover > OCCLUDED_COVER) & self.annotated))
        return frames > 0 and hidden > OCCLUDED_FRAMES * frames


def _silhouette(obj: SynthObject, key_track: np.ndarray, eye: np.ndarray) -> _Silhouette:
    w, l, h = obj.size_wlh_m
    c, s = math.cos(obj.yaw_rad), math.sin(obj.yaw_rad)
    corners = np.array([[sx * l / 2 * c - sy * w / 2 * s, sx * l / 2 * s + sy * w / 2 * c]
                        for sx in (-1, 1) for sy in (-1, 1)])
    rel = key_track - eye
    centre_az = np.arctan2(rel[:, 1], rel[:, 0])
    rel_corners = rel[:, None, :] + corners[None]
    delta = np.angle(np.exp(1j * (np.arctan2(rel_corners[..., 1], rel_corners[..., 0]) - centre_az[:, None])))
    distance = np.linalg.norm(rel, axis=-1)
    return _Silhouette(h, centre_az, delta.min(axis=1), delta.max(axis=1), distance,
                       distance <= tx.VISIBLE_RADIUS_M, np.zeros(len(distance)))


def _cover(target: _Silhouette, occluder: _Silhouette) -> np.ndarray:
    """(K,) fraction of ``target``'s angular extent that ``occluder`` hides (0 where it is farther
    or much lower). Overlaps of several occluders are added: an over-estimate, on the safe side."""
    if occluder.height_m < OCCLUDER_MIN_HEIGHT * target.height_m:
        return np.zeros_like(target.cover)
    shift = np.angle(np.exp(1j * (occluder.centre_az - target.centre_az)))
    lo = np.maximum(target.lo, occluder.lo + shift)
    hi = np.minimum(target.hi, occluder.hi + shift)
    span = np.maximum(target.hi - target.lo, 1e-9)
    weight = min(1.0, occluder.height_m / target.height_m)
    nearer = occluder.distance_m < target.distance_m
    return np.where(nearer, np.clip(hi - lo, 0.0, None) / span * weight, 0.0)


def plan_scene(index: int, n_samples: int, rng: np.random.Generator,
               name: Optional[str] = None) -> ScenePlan:
    """Draw the ego path, the calibration and the objects of scene number ``index`` (named
    ``name``; default: the ``index``-th v1.0-mini scene)."""
    speed = float(rng.uniform(*EGO_SPEED_MPS))
    curvature = 0.0 if rng.uniform() < 0.5 else float(rng.uniform(-MAX_CURVATURE_PER_M, MAX_CURVATURE_PER_M))
    start = (WORLD_OFFSET_M[0] + float(rng.uniform(0.0, WORLD_OFFSET_M[1])),
             WORLD_OFFSET_M[0] + float(rng.uniform(0.0, WORLD_OFFSET_M[1])))
    ego = EgoPath(start, float(rng.uniform(-math.pi, math.pi)), curvature, speed)
    calibration = plan_calibration(rng)
    # an hour apart plus a random part, all from the seed: never from the clock
    start_us = BASE_TIMESTAMP_US + index * 3_600_000_000 + int(rng.integers(0, 600)) * 1_000_000
    local = datetime.datetime.fromtimestamp(
        start_us // 1_000_000, datetime.timezone(datetime.timedelta(hours=tx.UTC_OFFSET_H)))
    logfile = f"{tx.VEHICLE_NAME}-{local:%Y-%m-%d-%H-%M-%S}+{tx.UTC_OFFSET_H:02d}00"

    duration_s = (n_samples - 1) * tx.KEY_FRAME_PERIOD_US * 1e-6
    # sensors fire up to one camera trigger offset after the last key frame
    times = np.arange(0.0, duration_s + 0.1 + 1e-9, COLLISION_STEP_S)
    key_times = np.arange(n_samples) * tx.KEY_FRAME_PERIOD_US * 1e-6
    ego_xy, ego_yaw = ego.at_arclength(speed * times)
    ego_centre = ego_xy + tx.EGO_CENTRE_AHEAD_M * np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], -1)
    # extra clearance around the ego: cameras and lidar need a few metres to see anything
    ego_half = np.array([tx.EGO_LENGTH_M / 2 + 1.0, tx.EGO_WIDTH_M / 2 + 0.8])
    ego_key_xy, ego_key_yaw = ego.at_arclength(speed * key_times)
    # the cameras sit around (1, 0, 1.5) in the ego frame
    eye = ego_key_xy + np.stack([np.cos(ego_key_yaw), np.sin(ego_key_yaw)], -1)
    silhouettes: List[_Silhouette] = []

    placed: List[Tuple[SynthObject, np.ndarray, np.ndarray]] = []   # object, track, half extents
    objects: List[SynthObject] = []
    # large objects first: they are the hardest to fit
    order = sorted(tx.CLASSES, key=lambda c: -c.size_wlh_m[0] * c.size_wlh_m[1])
    for spec in order:
        got = 0
        for _ in range(spec.per_scene):
            for attempt in range(PLACEMENT_ATTEMPTS):
                # crowded scenes: after half the attempts, accept an object even if it is hidden
                strict = attempt < PLACEMENT_ATTEMPTS // 2
                obj = _propose(spec, ego, duration_s, rng, len(objects))
                key_track = _object_track(obj, key_times)
                key_dist = np.linalg.norm(key_track - ego_key_xy, axis=-1)
                # the detection evaluation must see it: inside the class range at a key frame
                if not np.any(key_dist <= spec.eval_range_m - 2.0):
                    continue
                track = _object_track(obj, times)
                half = np.array([obj.size_wlh_m[1] / 2, obj.size_wlh_m[0] / 2]) + COLLISION_MARGIN_M / 2
                if np.any(_footprints_overlap(ego_centre, ego_yaw, ego_half, track, obj.yaw_rad, half)):
                    continue
                if any(np.any(_footprints_overlap(other_track, other.yaw_rad, other_half,
                                                  track, obj.yaw_rad, half))
                       for other, other_track, other_half in placed):
                    continue
                mine = _silhouette(obj, key_track, eye)
                cover = mine.cover + sum((_cover(mine, other) for other in silhouettes),
                                         np.zeros(n_samples))
                if strict and mine.mostly_hidden(cover):
                    continue
                extra = [_cover(other, mine) for other in silhouettes]
                if strict and any(other.mostly_hidden(other.cover + more)
                                  for other, more in zip(silhouettes, extra)):
                    continue
                mine.cover = cover
                for other, more in zip(silhouettes, extra):
                    other.cover = other.cover + more
                silhouettes.append(mine)
                placed.append((obj, track, half))
                objects.append(obj)
                got += 1
                break
        if got == 0:
            raise RuntimeError(f"could not place any {spec.detection_name} in scene {index} "
                               f"after {PLACEMENT_ATTEMPTS} attempts")
    return ScenePlan(index=index, name=name or tx.SCENE_NAMES[index], logfile=logfile,
                     date_captured=f"{local:%Y-%m-%d}", start_us=start_us, n_samples=n_samples,
                     ego=ego, objects=tuple(objects), calibration=calibration)
