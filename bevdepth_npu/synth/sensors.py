"""Render one camera image or one lidar sweep of the synthetic world and write it to disk.

Cameras: a sky/ground background ray-cast at quarter resolution (sky gradient, asphalt road,
sidewalks and verge from the scene's road geometry, a faint 4 m checker for motion cues and haze
with distance), then every box as a projected cuboid: faces clipped to the view frustum (near
plane included), back faces culled, boxes painted far to near, each face in its class colour with
a per-face shade (light front, dark back) so that heading shows. Key frames also draw an id
buffer to measure how much of each box is visible.

Lidar: a 32-beam spinning sensor ray-cast against the ground plane and the boxes; returns are
float32 (x, y, z, intensity, ring index) in the LIDAR_TOP frame, as in nuScenes ``.pcd.bin``.

Both functions take one job, write one file atomically and return statistics for annotations.
Imported by ``bevdepth_npu.synth.dataset``; not meant to be run.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.synth import taxonomy as tx
from bevdepth_npu.synth.geometry import clip_polygon, face_polygons_local, polygon_area, rot_z
from bevdepth_npu.synth.world import ROAD_HALF_WIDTH_M, EgoPath, SensorCalibration

BACKGROUND_DOWNSCALE = 4        # the background is smooth: ray-cast it at 1/16 of the pixels
NEAR_PLANE_M = 0.1
SIDEWALK_OUTER_M = ROAD_HALF_WIDTH_M + 5.0
CHECKER_TILE_M = 4.0
SKY_HORIZON_RGB = np.array([200.0, 220.0, 240.0])
SKY_ZENITH_RGB = np.array([110.0, 160.0, 225.0])
ROAD_RGB = np.array([88.0, 88.0, 92.0])
SIDEWALK_RGB = np.array([140.0, 138.0, 130.0])
VERGE_RGB = np.array([118.0, 128.0, 98.0])
HAZE_RGB = np.array([190.0, 200.0, 212.0])
# ground intensities of the lidar: asphalt is dark, concrete and vegetation brighter
ROAD_INTENSITY = 8.0
SIDEWALK_INTENSITY = 18.0
VERGE_INTENSITY = 25.0
# lidar returns sit slightly inside what they hit so that a point-in-box test is unambiguous
GROUND_SINK_M = 0.005
BOX_PENETRATION_M = 0.02
BOX_MARGIN_M = 0.001


@dataclasses.dataclass(frozen=True)
class FrameObjects:
    """The boxes present in one sensor frame, at that frame's timestamp (global frame)."""
    ids: np.ndarray            # (n,) instance index within the scene
    centres: np.ndarray        # (n, 3)
    yaws: np.ndarray           # (n,)
    sizes_wlh: np.ndarray      # (n, 3)
    class_ids: np.ndarray      # (n,) index into taxonomy.CLASSES


@dataclasses.dataclass(frozen=True)
class SensorJob:
    """Everything a worker process needs to produce one file."""
    path: str                  # absolute destination
    calibration: SensorCalibration
    ego_xy: Tuple[float, float]
    ego_yaw_rad: float
    road: EgoPath
    objects: FrameObjects
    want_stats: bool           # key frames: report visibility / point counts


def _ego_pose(job: SensorJob) -> Tuple[np.ndarray, np.ndarray]:
    return rot_z(job.ego_yaw_rad), np.array([job.ego_xy[0], job.ego_xy[1], 0.0])


def _ground_colour(road: EgoPath, ground_xy: np.ndarray, distance_m: np.ndarray) -> np.ndarray:
    lateral = np.abs(road.lateral_offset(ground_xy))
    colour = np.where((lateral <= ROAD_HALF_WIDTH_M)[..., None], ROAD_RGB,
                      np.where((lateral <= SIDEWALK_OUTER_M)[..., None], SIDEWALK_RGB, VERGE_RGB))
    tiles = np.floor(ground_xy[..., 0] / CHECKER_TILE_M) + np.floor(ground_xy[..., 1] / CHECKER_TILE_M)
    colour = colour + np.where(np.mod(tiles, 2.0) == 0.0, 6.0, -6.0)[..., None]
    haze = np.clip((distance_m - 40.0) / 160.0, 0.0, 0.75)[..., None]
    return colour * (1.0 - haze) + HAZE_RGB * haze


@dataclasses.dataclass(frozen=True)
class _ViewRays:
    """What the background of one camera needs that does not change while the ego drives: the
    ego is flat (yaw only), so which pixels see sky or ground, and where in the ego frame they
    meet the ground, depend on the calibration alone."""
    sky_rgb: np.ndarray            # (h, w, 3) at background resolution
    ground: np.ndarray             # (h, w) bool
    ground_ego_xy: np.ndarray      # (g, 2) ego-frame ground points of the ground pixels
    ground_distance_m: np.ndarray  # (g,)


_VIEW_CACHE: Dict[bytes, _ViewRays] = {}


def _view_rays(cal: SensorCalibration) -> _ViewRays:
    key = cal.rotation.tobytes() + cal.translation_m.tobytes() + cal.intrinsic.tobytes()
    cached = _VIEW_CACHE.get(key)
    if cached is not None:
        return cached
    k = cal.intrinsic
    step = BACKGROUND_DOWNSCALE
    u = (np.arange(tx.IMAGE_WIDTH_PX // step) + 0.5) * step
    v = (np.arange(tx.IMAGE_HEIGHT_PX // step) + 0.5) * step
    uu, vv = np.meshgrid(u, v)
    rays_cam = np.stack([(uu - k[0, 2]) / k[0, 0], (vv - k[1, 2]) / k[1, 1], np.ones_like(uu)], -1)
    rays_ego = rays_cam @ cal.rotation.T
    rays_ego /= np.linalg.norm(rays_ego, axis=-1, keepdims=True)
    origin = cal.translation_m
    dz = rays_ego[..., 2]
    ground = dz < -1e-4
    reach = -origin[2] / dz[ground]
    ground_ego_xy = origin[:2] + rays_ego[ground][:, :2] * reach[:, None]
    up = np.clip(np.arcsin(np.clip(dz, -1.0, 1.0)) / 0.6, 0.0, 1.0)[..., None]
    sky_rgb = SKY_HORIZON_RGB * (1.0 - up) + SKY_ZENITH_RGB * up
    view = _ViewRays(sky_rgb, ground, ground_ego_xy,
                     np.linalg.norm(ground_ego_xy - origin[:2], axis=-1))
    if len(_VIEW_CACHE) > 64:          # bounded: a worker sees 6 cameras per scene
        _VIEW_CACHE.clear()
    _VIEW_CACHE[key] = view
    return view


def _background(job: SensorJob) -> Image.Image:
    view = _view_rays(job.calibration)
    r_eg, t_eg = _ego_pose(job)
    ground_global = view.ground_ego_xy @ r_eg[:2, :2].T + t_eg[:2]
    rgb = view.sky_rgb.copy()
    rgb[view.ground] = _ground_colour(job.road, ground_global, view.ground_distance_m)
    small = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    return small.resize((tx.IMAGE_WIDTH_PX, tx.IMAGE_HEIGHT_PX), Image.BILINEAR)


def _frustum_planes(intrinsic: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
    w, h = float(tx.IMAGE_WIDTH_PX), float(tx.IMAGE_HEIGHT_PX)
    return np.array([
        [0.0, 0.0, 1.0, -NEAR_PLANE_M],      # in front of the camera
        [fx, 0.0, cx, 0.0],                  # u >= 0
        [-fx, 0.0, w - cx, 0.0],             # u <= width
        [0.0, fy, cy, 0.0],                  # v >= 0
        [0.0, -fy, h - cy, 0.0],             # v <= height
    ])


def render_camera(job: SensorJob) -> Optional[Dict[int, Tuple[int, float]]]:
    """Render and write one JPEG; for key frames return {instance: (visible px, projected px)}."""
    cal = job.calibration
    image = _background(job)
    draw = ImageDraw.Draw(image)
    ids_image = Image.new("I", image.size, 0) if job.want_stats else None
    ids_draw = ImageDraw.Draw(ids_image) if ids_image is not None else None

    r_eg, t_eg = _ego_pose(job)
    r_gc = cal.rotation.T @ r_eg.T                        # global -> camera
    t_gc = -cal.rotation.T @ (r_eg.T @ t_eg + cal.translation_m)
    planes = _frustum_planes(cal.intrinsic)
    k = cal.intrinsic
    objs = job.objects
    centres_cam = objs.centres @ r_gc.T + t_gc
    order = np.argsort(-np.linalg.norm(centres_cam, axis=1), kind="stable")   # far to near
    areas: Dict[int, float] = {}
    for i in order:
        size = objs.sizes_wlh[i]
        if centres_cam[i, 2] < -0.5 * float(np.linalg.norm(size)):
            continue                                      # entirely behind the camera
        colour = tx.CLASSES[int(objs.class_ids[i])].colour_rgb
        r_oc = r_gc @ rot_z(float(objs.yaws[i]))          # box -> camera
        area = 0.0
        for face, corners, normal in face_polygons_local(size):
            corners_cam = corners @ r_oc.T + centres_cam[i]
            normal_cam = r_oc @ normal
            if float(np.dot(normal_cam, corners_cam.mean(axis=0))) >= 0.0:
                continue                                  # faces away from the camera
            clipped = clip_polygon(corners_cam, planes)
            if len(clipped) < 3:
                continue
            uv = clipped[:, :2] / clipped[:, 2:3] * [k[0, 0], k[1, 1]] + [k[0, 2], k[1, 2]]
            xy = [(float(a), float(b)) for a, b in uv]
            draw.polygon(xy, fill=tx.face_colour(colour, face))
            if ids_draw is not None:
                ids_draw.polygon(xy, fill=int(objs.ids[i]) + 1)
            area += polygon_area(uv)
        if area > 0.0:
            areas[int(objs.ids[i])] = area

    buf = io.BytesIO()
    # fixed encoder settings and no metadata: the same pixels always give the same bytes
    image.save(buf, format="JPEG", quality=tx.JPEG_QUALITY)
    atomic_write(job.path, buf.getvalue())
    if ids_image is None:
        return None
    counts = np.bincount(np.asarray(ids_image, dtype=np.int64).ravel())
    return {obj_id: (int(counts[obj_id + 1]) if obj_id + 1 < len(counts) else 0, area)
            for obj_id, area in areas.items()}


_RAYS: Optional[Tuple[np.ndarray, np.ndarray]] = None


def lidar_rays() -> Tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (beams, azimuth steps, 3) in the lidar frame and the beam elevations."""
    global _RAYS
    if _RAYS is None:
        elevation = np.radians(np.linspace(*tx.LIDAR_BEAM_ELEVATIONS_DEG, tx.LIDAR_BEAMS))
        azimuth = 2.0 * np.pi * np.arange(tx.LIDAR_AZIMUTH_STEPS) / tx.LIDAR_AZIMUTH_STEPS
        ce = np.cos(elevation)[:, None]
        rays = np.stack([ce * np.cos(azimuth)[None, :], ce * np.sin(azimuth)[None, :],
                         np.broadcast_to(np.sin(elevation)[:, None], (tx.LIDAR_BEAMS, tx.LIDAR_AZIMUTH_STEPS))],
                        axis=-1)
        _RAYS = (rays, elevation)
    return _RAYS


def _box_in_lidar(job: SensorJob, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (3,), rotation box->lidar (3x3) and half extents (l/2, w/2, h/2) of box ``i``."""
    cal = job.calibration
    r_eg, t_eg = _ego_pose(job)
    objs = job.objects
    centre_ego = r_eg.T @ (objs.centres[i] - t_eg)
    centre = cal.rotation.T @ (centre_ego - cal.translation_m)
    rotation = cal.rotation.T @ r_eg.T @ rot_z(float(objs.yaws[i]))
    w, l, h = objs.sizes_wlh[i]
    return centre, rotation, np.array([l / 2.0, w / 2.0, h / 2.0])


def _azimuth_columns(centre: np.ndarray, rotation: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Ray columns whose azimuth can meet the box: ray casting only tests those."""
    n = tx.LIDAR_AZIMUTH_STEPS
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    corners = (signs * half) @ rotation.T + centre
    ref = math.atan2(centre[1], centre[0])
    delta = np.angle(np.exp(1j * (np.arctan2(corners[:, 1], corners[:, 0]) - ref)))
    if np.hypot(centre[0], centre[1]) <= float(np.linalg.norm(half)) + 0.5 or delta.max() - delta.min() > np.pi:
        return np.arange(n)
    step = 2.0 * np.pi / n
    lo = int(math.floor((ref + delta.min()) / step)) - 1
    hi = int(math.ceil((ref + delta.max()) / step)) + 1
    return np.arange(lo, hi + 1) % n


def render_lidar(job: SensorJob) -> Optional[Dict[int, int]]:
    """Ray-cast and write one ``.pcd.bin``; for key frames return {instance: points inside}."""
    cal = job.calibration
    rays, _ = lidar_rays()
    beams, steps = rays.shape[:2]
    # ground plane z_ego = -sink written in the lidar frame: n . p = offset
    normal = cal.rotation.T @ np.array([0.0, 0.0, 1.0])
    offset = -GROUND_SINK_M - cal.translation_m[2]
    dn = rays @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = np.where(dn < -1e-6, offset / dn, np.inf)
    hit = np.full((beams, steps), -1, dtype=np.int64)          # -1: ground or nothing
    cosine = np.abs(dn)
    boxes = [_box_in_lidar(job, i) for i in range(len(job.objects.ids))]
    for i, (centre, rotation, half) in enumerate(boxes):
        cols = _azimuth_columns(centre, rotation, half)
        d_local = rays[:, cols] @ rotation                     # rays in the box frame
        o_local = -rotation.T @ centre
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d_local
            t1 = (-half - o_local) * inv
            t2 = (half - o_local) * inv
        t_near = np.minimum(t1, t2)
        t_enter = np.max(t_near, axis=-1)
        t_exit = np.min(np.maximum(t1, t2), axis=-1)
        entering_axis = np.argmax(t_near, axis=-1)
        closer = (t_exit >= t_enter) & (t_enter > 0.0) & (t_enter < reach[:, cols])
        if not closer.any():
            continue
        sub_reach = reach[:, cols]
        sub_hit = hit[:, cols]
        sub_cos = cosine[:, cols]
        sub_reach[closer] = t_enter[closer]
        sub_hit[closer] = i
        sub_cos[closer] = np.abs(np.take_along_axis(d_local, entering_axis[..., None], -1)[..., 0])[closer]
        reach[:, cols] = sub_reach
        hit[:, cols] = sub_hit
        cosine[:, cols] = sub_cos

    valid = reach <= tx.LIDAR_MAX_RANGE_M
    ring = np.broadcast_to(np.arange(beams, dtype=np.float64)[:, None], (beams, steps))
    on_box = valid & (hit >= 0)
    depth = np.where(on_box, reach + BOX_PENETRATION_M, reach)
    points = rays * np.where(valid, depth, 0.0)[..., None]

    intensity = np.zeros((beams, steps))
    if (valid & (hit < 0)).any():
        r_eg, t_eg = _ego_pose(job)
        ground_ego = points[valid & (hit < 0)] @ cal.rotation.T + cal.translation_m
        ground_global = ground_ego[:, :2] @ r_eg[:2, :2].T + t_eg[:2]
        lateral = np.abs(job.road.lateral_offset(ground_global))
        base = np.where(lateral <= ROAD_HALF_WIDTH_M, ROAD_INTENSITY,
                        np.where(lateral <= SIDEWALK_OUTER_M, SIDEWALK_INTENSITY, VERGE_INTENSITY))
        intensity[valid & (hit < 0)] = base
    class_intensity = np.array([tx.CLASSES[int(c)].intensity for c in job.objects.class_ids] + [0.0])
    intensity = np.where(on_box, class_intensity[hit], intensity)
    intensity = intensity * (0.5 + 0.5 * cosine)              # grazing returns are weaker

    keep = valid.copy()
    # a return that grazes an edge may land a hair outside its box; drop it like a lost return
    for i, (centre, rotation, half) in enumerate(boxes):
        mine = on_box & (hit == i)
        if mine.any():
            local = (points[mine] - centre) @ rotation
            inside = np.all(np.abs(local) <= half - BOX_MARGIN_M, axis=-1)
            sub = keep[mine]
            sub &= inside
            keep[mine] = sub
    cloud = np.stack([points[..., 0], points[..., 1], points[..., 2], intensity, ring], -1)[keep]
    cloud = cloud.astype(np.float32)
    atomic_write(job.path, cloud.tobytes())
    if not job.want_stats:
        return None
    # count what a reader of the file sees: float32 points tested against the boxes
    xyz = cloud[:, :3].astype(np.float64)
    counts = {}
    for i, (centre, rotation, half) in enumerate(boxes):
        local = (xyz - centre) @ rotation
        counts[int(job.objects.ids[i])] = int(np.count_nonzero(np.all(np.abs(local) <= half, axis=-1)))
    return counts
