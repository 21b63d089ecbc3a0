"""Assemble and write a synthetic nuScenes dataset (v1.0-mini or v1.0-trainval layout):
``generate()``.

Layout written under the output directory, as in real nuScenes:

    v1.0-mini/{attribute,calibrated_sensor,category,ego_pose,instance,log,map,sample,
               sample_annotation,sample_data,scene,sensor,visibility}.json
    samples/<CHANNEL>/<logfile>__<CHANNEL>__<timestamp_us>.jpg|.pcd.bin   (key frames)
    sweeps/<CHANNEL>/<logfile>__<CHANNEL>__<timestamp_us>.jpg|.pcd.bin    (between key frames)
    maps/<map token>.png                                                   (drivable-area mask)
    synth_summary.json                                                     (parameters, counts)

Sensor files are written first and the tables last, so an interrupted run leaves no tables and
the devkit refuses to load it instead of reading half a dataset. Every file is written through a
temporary file and ``os.replace``. Tokens are hashes of the seed and the record's identity and no
clock is read, so the same arguments give the same bytes.

    python -c "from bevdepth_npu.synth import generate; print(generate('out', seed=0))"
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.synth import taxonomy as tx
from bevdepth_npu.synth.geometry import matrix_to_quaternion, yaw_quaternion
from bevdepth_npu.synth.sensors import FrameObjects, SensorJob, render_camera, render_lidar
from bevdepth_npu.synth.world import ROAD_HALF_WIDTH_M, ScenePlan, plan_scene

MAP_RESOLUTION_M = 0.1           # the devkit reads map masks at 0.1 m per pixel
MAP_MARGIN_M = 100.0
SUMMARY_FILE = "synth_summary.json"
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
          "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")


class SynthError(UserError):
    """Bad arguments or an unusable output directory; the message names the setting or path."""


def default_workers() -> int:
    """Worker processes used when none are given: one per core, at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def _check_count(name: str, value: object, low: int, high: Optional[int], why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SynthError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SynthError(f"{name} must be {bound} ({why}), got {value}")
    return int(value)


def validate(scenes: object, samples_per_scene: object, sweeps: object, seed: object,
             workers: object, version: object = tx.MINI,
             val_scenes: object = None) -> Tuple[int, int, int, int, int, str, Optional[int]]:
    """Check the generator's counts and layout; raise ``SynthError`` naming the bad one."""
    if version not in tx.VERSIONS:
        raise SynthError(f"version must be one of {', '.join(tx.VERSIONS)}, got {version!r}")
    if version == tx.MINI:
        scene_bound = (tx.MAX_SCENES, f"scene names come from the devkit's {tx.MAX_SCENES} "
                                      f"v1.0-mini scenes; --version {tx.TRAINVAL} goes further")
        if val_scenes is not None:
            raise SynthError(f"val_scenes is for --version {tx.TRAINVAL}; a v1.0-mini dataset "
                             f"alternates mini_train and mini_val scenes")
    else:
        scene_bound = (tx.MAX_TRAINVAL_SCENES,
                       f"names come from the first {len(tx.TRAINVAL_TRAIN)} train and "
                       f"{len(tx.TRAINVAL_VAL)} val scenes of the devkit's splits")
    scenes = _check_count("scenes", scenes, 1 if version == tx.MINI else 2, *scene_bound)
    if version == tx.TRAINVAL:
        val_scenes = _check_count(
            "val_scenes", tx.default_val_scenes(scenes) if val_scenes is None else val_scenes,
            1, min(len(tx.TRAINVAL_VAL), scenes - 1),
            "held-out scenes of the val split; at least one scene is left for training")
        _check_count("scenes - val_scenes", scenes - val_scenes, 1, len(tx.TRAINVAL_TRAIN),
                     "training scenes of the train split")
    return (
        scenes,
        _check_count("samples_per_scene", samples_per_scene, 2, tx.MAX_SAMPLES_PER_SCENE,
                     "velocities need two key frames; a nuScenes scene has about 40"),
        _check_count("sweeps", sweeps, 0, tx.MAX_SWEEPS,
                     "camera sweeps between two key frames at 12 Hz"),
        _check_count("seed", seed, 0, 2 ** 63 - 1, "a non-negative integer"),
        _check_count("workers", workers, 1, None, "worker processes"),
        str(version), val_scenes,
    )


def check_output_dir(out_dir: str, force: bool) -> None:
    """Refuse a non-empty output directory unless ``force``; nothing is ever deleted."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SynthError(f"output path {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and not force:
        entries = os.listdir(out_dir)
        if entries:
            raise SynthError(
                f"output directory {out_dir} is not empty ({len(entries)} entries); choose an empty "
                f"or new directory, or pass --force to write into it (files of the same name are "
                f"overwritten, nothing is deleted)")


class _Tokens:
    """32-hex-digit tokens like nuScenes', derived from the seed and a record's identity."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, *parts: object) -> str:
        text = "/".join(["bevdepth-npu-synth", str(self.seed)] + [str(p) for p in parts])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @staticmethod
    def fixed(*parts: object) -> str:
        """Tokens of the fixed vocabulary (sensors, categories, attributes): seed-independent."""
        text = "/".join(["bevdepth-npu-synth"] + [str(p) for p in parts])
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_scenes(scenes: int, samples_per_scene: int, seed: int, version: str = tx.MINI,
                val_scenes: Optional[int] = None) -> List[ScenePlan]:
    """The worlds that ``generate`` renders for these arguments: the ground truth behind the
    tables (object velocities, calibrations), for tests and tools."""
    names = tx.scene_names(version, scenes, val_scenes)
    return [plan_scene(i, samples_per_scene,
                       np.random.default_rng([seed, tx.world_key(version, i, name)]), name)
            for i, name in enumerate(names)]


def instance_token(seed: int, scene_index: int, object_index: int) -> str:
    """Token of the instance record of ``plan_scenes(...)[scene_index].objects[object_index]``."""
    return _Tokens(seed)("instance", scene_index, object_index)


def _floats(values: Sequence[float]) -> List[float]:
    return [float(v) for v in values]


def _sensor_schedule(scene: ScenePlan, channel: str, sweeps: int) -> List[Tuple[int, bool, int]]:
    """(timestamp_us, is_key_frame, sample index) of one channel in time order. Sweeps belong to
    the next key frame's sample, as in nuScenes (BEVDepth's gen_info relies on it)."""
    if channel == tx.LIDAR_CHANNEL:
        offset, period = 0, tx.LIDAR_PERIOD_US
    else:
        offset = next(c.trigger_offset_us for c in tx.CAMERAS if c.channel == channel)
        period = tx.CAMERA_PERIOD_US
    schedule = []
    for k in range(scene.n_samples):
        key_us = scene.start_us + k * tx.KEY_FRAME_PERIOD_US + offset
        if k > 0:
            for j in range(sweeps, 0, -1):
                schedule.append((key_us - j * period, False, k))
        schedule.append((key_us, True, k))
    return schedule


def _present(scene: ScenePlan, k: int) -> List[int]:
    """Instances annotated (and rendered) at sample ``k``: those within the visible radius."""
    t_s = k * tx.KEY_FRAME_PERIOD_US * 1e-6
    ego_xy, _ = scene.ego.pose_at(t_s)
    return [o.index for o in scene.objects
            if math.hypot(*(o.centre_at(t_s)[:2] - ego_xy)) <= tx.VISIBLE_RADIUS_M]


def _frame_objects(scene: ScenePlan, ids: List[int], t_s: float) -> FrameObjects:
    objs = [scene.objects[i] for i in ids]
    class_index = {c.detection_name: n for n, c in enumerate(tx.CLASSES)}
    return FrameObjects(
        ids=np.array(ids, dtype=np.int64),
        centres=np.array([o.centre_at(t_s) for o in objs]).reshape(-1, 3),
        yaws=np.array([o.yaw_rad for o in objs], dtype=np.float64),
        sizes_wlh=np.array([o.size_wlh_m for o in objs], dtype=np.float64).reshape(-1, 3),
        class_ids=np.array([class_index[o.detection_name] for o in objs], dtype=np.int64))


def _annotations(plans: Sequence[ScenePlan], seed: int, job_keys: List[Tuple[int, str, int]],
                 stats: List[object], attribute_token: Dict[str, str], category_token: Dict[str, str]):
    """sample_annotation and instance records (and annotations per class) from the plans and the
    key-frame statistics of the renderers: visible pixels per camera, lidar points per box."""
    token = _Tokens(seed)
    visible: Dict[Tuple[int, int, int], List[float]] = {}
    points: Dict[Tuple[int, int, int], int] = {}
    for (i, ch, k), result in zip(job_keys, stats):
        if i < 0:
            continue
        if ch == tx.LIDAR_CHANNEL:
            for obj_id, count in result.items():
                points[(i, k, obj_id)] = count
        else:
            for obj_id, (seen_px, area_px) in result.items():
                acc = visible.setdefault((i, k, obj_id), [0.0, 0.0])
                acc[0] += seen_px
                acc[1] += area_px
    sample_annotation, instance = [], []
    class_counts = {c.detection_name: 0 for c in tx.CLASSES}
    for plan in plans:
        i = plan.index
        present = [set(_present(plan, k)) for k in range(plan.n_samples)]
        for obj in plan.objects:
            keys = [k for k in range(plan.n_samples) if obj.index in present[k]]
            if not keys:
                continue
            ann_tokens = [token("sample_annotation", i, obj.index, k) for k in keys]
            for n, k in enumerate(keys):
                seen_px, area_px = visible.get((i, k, obj.index), (0.0, 0.0))
                fraction = min(1.0, seen_px / area_px) if area_px > 0 else 0.0
                sample_annotation.append({
                    "token": ann_tokens[n], "sample_token": token("sample", i, k),
                    "instance_token": instance_token(seed, i, obj.index),
                    "visibility_token": tx.visibility_token(fraction),
                    "attribute_tokens": [] if obj.attribute is None else [attribute_token[obj.attribute]],
                    "translation": _floats(obj.centre_at(k * tx.KEY_FRAME_PERIOD_US * 1e-6)),
                    "size": _floats(obj.size_wlh_m), "rotation": yaw_quaternion(obj.yaw_rad),
                    "prev": ann_tokens[n - 1] if n > 0 else "",
                    "next": ann_tokens[n + 1] if n + 1 < len(keys) else "",
                    "num_lidar_pts": points.get((i, k, obj.index), 0), "num_radar_pts": 0})
                class_counts[obj.detection_name] += 1
            instance.append({"token": instance_token(seed, i, obj.index),
                             "category_token": category_token[obj.detection_name],
                             "nbr_annotations": len(keys), "first_annotation_token": ann_tokens[0],
                             "last_annotation_token": ann_tokens[-1]})
    return sample_annotation, instance, class_counts


def _run_job(item: Tuple[str, SensorJob]):
    kind, job = item
    return render_camera(job) if kind == "camera" else render_lidar(job)


def _write_json(path: str, records: object) -> None:
    text = json.dumps(records, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
    atomic_write(path, text.encode())


def _write_map(path: str, scenes: Sequence[ScenePlan]) -> Tuple[int, int]:
    """Drivable-area mask (255 on the road) at 0.1 m per pixel with its origin at global (0, 0),
    which is how the devkit's MapMask reads nuScenes maps."""
    tracks = []
    extent = np.zeros(2)
    for scene in scenes:
        length = scene.ego.speed_mps * scene.duration_s()
        s = np.linspace(-MAP_MARGIN_M, length + MAP_MARGIN_M, 200)
        xy, _ = scene.ego.at_arclength(s)
        tracks.append(xy)
        driven, _ = scene.ego.at_arclength(np.linspace(0.0, length, 50))
        extent = np.maximum(extent, driven.max(axis=0) + MAP_MARGIN_M)
    width_px, height_px = (int(math.ceil(v / MAP_RESOLUTION_M)) for v in extent)
    mask = Image.new("L", (width_px, height_px), 0)
    draw = ImageDraw.Draw(mask)
    road_px = int(round(2 * ROAD_HALF_WIDTH_M / MAP_RESOLUTION_M))
    for xy in tracks:
        pixels = [(float(x / MAP_RESOLUTION_M), float(height_px - y / MAP_RESOLUTION_M)) for x, y in xy]
        draw.line(pixels, fill=255, width=road_px, joint="curve")
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return width_px, height_px


def _make_dirs(out: str, channels: Sequence[str], version: str) -> None:
    """The nuScenes folders: samples/ and sweeps/ per channel, the table folder and maps/."""
    for folder in ("samples", "sweeps"):
        for channel in channels:
            os.makedirs(os.path.join(out, folder, channel), exist_ok=True)
    os.makedirs(os.path.join(out, version), exist_ok=True)
    os.makedirs(os.path.join(out, "maps"), exist_ok=True)


class _Vocabulary:
    """Tokens and tables of the fixed vocabulary (sensors, categories, attributes, visibility
    levels), the same for every seed."""

    def __init__(self, channels: Sequence[str]):
        self.sensor_token = {ch: _Tokens.fixed("sensor", ch) for ch in channels}
        self.sensor = [{"token": self.sensor_token[ch], "channel": ch,
                        "modality": "lidar" if ch == tx.LIDAR_CHANNEL else "camera"}
                       for ch in channels]
        self.category_token = {c.detection_name: _Tokens.fixed("category", c.category)
                               for c in tx.CLASSES}
        self.category = [{"token": self.category_token[c.detection_name], "name": c.category,
                          "description": tx.CATEGORY_DESCRIPTIONS[c.category],
                          "index": tx.CATEGORY_INDEX[c.category]} for c in tx.CLASSES]
        self.attribute_token = {name: _Tokens.fixed("attribute", name)
                                for name, _ in tx.ATTRIBUTES}
        self.attribute = [{"token": self.attribute_token[name], "name": name, "description": desc}
                          for name, desc in tx.ATTRIBUTES]
        self.visibility = [{"token": tok, "level": level, "description": desc}
                           for tok, level, desc, _ in tx.VISIBILITY]


class _SceneTables:
    """The tables built scene by scene (log, calibrated_sensor, scene, sample, sample_data,
    ego_pose) and, in the same order as sample_data, the render job of every sensor file."""

    def __init__(self, out: str, seed: int, sweeps: int, channels: Sequence[str],
                 sensor_token: Dict[str, str]):
        self.out, self.seed, self.sweeps = out, seed, sweeps
        self.channels, self.sensor_token = channels, sensor_token
        self.token = _Tokens(seed)
        self.log: List[dict] = []
        self.calibrated_sensor: List[dict] = []
        self.scene: List[dict] = []
        self.sample: List[dict] = []
        self.sample_data: List[dict] = []
        self.ego_pose: List[dict] = []
        self.jobs: List[Tuple[str, SensorJob]] = []
        # (scene, channel, sample index) of key frames, (-1, "", -1) for sweeps
        self.job_keys: List[Tuple[int, str, int]] = []

    def add(self, plan: ScenePlan) -> None:
        """The records of one scene: its log, calibrations, samples, scene and sensor frames."""
        token, channels, i = self.token, self.channels, plan.index
        log_token = token("log", i)
        self.log.append({"token": log_token, "logfile": plan.logfile, "vehicle": tx.VEHICLE_NAME,
                         "date_captured": plan.date_captured, "location": tx.LOCATION})
        cs_token = {}
        for ch in channels:
            cal = plan.calibration[ch]
            cs_token[ch] = token("calibrated_sensor", i, ch)
            self.calibrated_sensor.append({
                "token": cs_token[ch], "sensor_token": self.sensor_token[ch],
                "translation": _floats(cal.translation_m),
                "rotation": matrix_to_quaternion(cal.rotation),
                "camera_intrinsic": [] if cal.intrinsic is None
                                    else [_floats(r) for r in cal.intrinsic]})
        sample_tokens = [token("sample", i, k) for k in range(plan.n_samples)]
        for k, tok in enumerate(sample_tokens):
            self.sample.append({
                "token": tok, "timestamp": plan.start_us + k * tx.KEY_FRAME_PERIOD_US,
                "prev": sample_tokens[k - 1] if k > 0 else "",
                "next": sample_tokens[k + 1] if k + 1 < plan.n_samples else "",
                "scene_token": token("scene", i)})
        self.scene.append({
            "token": token("scene", i), "log_token": log_token,
            "nbr_samples": plan.n_samples, "first_sample_token": sample_tokens[0],
            "last_sample_token": sample_tokens[-1], "name": plan.name,
            "description": f"Synthetic drive, seed {self.seed}, {len(plan.objects)} objects, "
                           f"ego {plan.ego.speed_mps:.1f} m/s"})
        self._add_frames(plan, cs_token, sample_tokens)

    def _add_frames(self, plan: ScenePlan, cs_token: Dict[str, str],
                    sample_tokens: List[str]) -> None:
        """sample_data, ego_pose and the render job of every frame of every channel of a scene."""
        token, i = self.token, plan.index
        present = [_present(plan, k) for k in range(plan.n_samples)]
        for ch in self.channels:
            is_lidar = ch == tx.LIDAR_CHANNEL
            schedule = _sensor_schedule(plan, ch, self.sweeps)
            sd_tokens = [token("sample_data", i, ch, ts) for ts, _, _ in schedule]
            for n, (ts, key, k) in enumerate(schedule):
                folder = "samples" if key else "sweeps"
                ext = "pcd.bin" if is_lidar else "jpg"
                filename = f"{folder}/{ch}/{plan.logfile}__{ch}__{ts}.{ext}"
                t_s = plan.seconds(ts)
                ego_xy, ego_yaw = plan.ego.pose_at(t_s)
                self.sample_data.append({
                    "token": sd_tokens[n], "sample_token": sample_tokens[k],
                    "ego_pose_token": sd_tokens[n], "calibrated_sensor_token": cs_token[ch],
                    "timestamp": ts, "fileformat": "pcd" if is_lidar else "jpg",
                    "is_key_frame": key, "height": 0 if is_lidar else tx.IMAGE_HEIGHT_PX,
                    "width": 0 if is_lidar else tx.IMAGE_WIDTH_PX, "filename": filename,
                    "prev": sd_tokens[n - 1] if n > 0 else "",
                    "next": sd_tokens[n + 1] if n + 1 < len(schedule) else ""})
                self.ego_pose.append({"token": sd_tokens[n], "timestamp": ts,
                                      "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0],
                                      "rotation": yaw_quaternion(ego_yaw)})
                job = SensorJob(path=os.path.join(self.out, filename),
                                calibration=plan.calibration[ch],
                                ego_xy=(float(ego_xy[0]), float(ego_xy[1])), ego_yaw_rad=ego_yaw,
                                road=plan.ego, objects=_frame_objects(plan, present[k], t_s),
                                want_stats=key)
                self.jobs.append(("lidar" if is_lidar else "camera", job))
                self.job_keys.append((i, ch, k) if key else (-1, "", -1))


def _summary(version: str, plans: Sequence[ScenePlan], seed: int, samples_per_scene: int, sweeps: int,
             built: _SceneTables, stats: List[object], instance: List[dict],
             sample_annotation: List[dict], class_counts: Dict[str, int],
             map_size_px: Tuple[int, int]) -> Dict[str, object]:
    """What synth_summary.json holds: the parameters and the counts of what was written."""
    lidar_key_points = [sum(r.values()) for (i, ch, k), r in zip(built.job_keys, stats)
                        if i >= 0 and ch == tx.LIDAR_CHANNEL]
    return {
        "generator": "bevdepth_npu.synth", "format": 1, "version": version, "seed": seed,
        "scenes": [p.name for p in plans], "samples_per_scene": samples_per_scene, "sweeps": sweeps,
        "image_size_px": [tx.IMAGE_WIDTH_PX, tx.IMAGE_HEIGHT_PX], "jpeg_quality": tx.JPEG_QUALITY,
        "samples": len(built.sample), "sample_data": len(built.sample_data),
        "camera_files": sum(1 for kind, _ in built.jobs if kind == "camera"),
        "lidar_files": sum(1 for kind, _ in built.jobs if kind == "lidar"),
        "instances": len(instance), "annotations": len(sample_annotation),
        "annotations_per_class": class_counts,
        "box_lidar_points_per_key_frame_mean": float(np.mean(lidar_key_points)),
        "map_size_px": list(map_size_px),
    }


def generate(out_dir: str, scenes: int = tx.DEFAULT_SCENES,
             samples_per_scene: int = tx.DEFAULT_SAMPLES_PER_SCENE, sweeps: int = tx.DEFAULT_SWEEPS,
             seed: int = tx.DEFAULT_SEED, *, force: bool = False, workers: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None, version: str = tx.MINI,
             val_scenes: Optional[int] = None) -> Dict[str, object]:
    """Write a synthetic nuScenes dataset into ``out_dir`` and return a summary dict.

    ``version`` is the devkit layout: v1.0-mini (default; ``scenes`` 1-10 take the mini scene
    names alternating between mini_train and mini_val) or v1.0-trainval (``scenes`` 2-80, of
    which ``val_scenes`` (default: one in five) take val split names and the rest train split
    names). ``samples_per_scene`` key frames 0.5 s apart; ``sweeps`` (0-5) non-key frames per
    sensor before every key frame but the first; ``workers`` processes render the sensor files
    (default: one per core, at most four); ``progress`` receives one line at a time.
    Raises ``SynthError`` for bad counts or a non-empty ``out_dir`` without ``force``.
    """
    if workers is None:
        workers = default_workers()
    scenes, samples_per_scene, sweeps, seed, workers, version, val_scenes = validate(
        scenes, samples_per_scene, sweeps, seed, workers, version, val_scenes)
    out = os.path.abspath(out_dir)
    check_output_dir(out, force)
    say = progress or (lambda line: None)
    token = _Tokens(seed)

    plans = plan_scenes(scenes, samples_per_scene, seed, version, val_scenes)
    channels = tx.CAMERA_CHANNELS + (tx.LIDAR_CHANNEL,)
    _make_dirs(out, channels, version)
    vocab = _Vocabulary(channels)
    built = _SceneTables(out, seed, sweeps, channels, vocab.sensor_token)
    for plan in plans:
        built.add(plan)
    jobs = built.jobs

    map_token = token("map")
    map_filename = f"maps/{map_token}.png"
    map_size_px = _write_map(os.path.join(out, map_filename), plans)
    say(f"synth: writing {len(jobs)} sensor files ({scenes} scenes x {samples_per_scene} key frames, "
        f"{sweeps} sweeps) to {out} with {workers} worker(s)")

    stats = _render_all(jobs, workers, say)

    sample_annotation, instance, class_counts = _annotations(
        plans, seed, built.job_keys, stats, vocab.attribute_token, vocab.category_token)
    map_table = [{"token": map_token, "category": "semantic_prior", "filename": map_filename,
                  "log_tokens": [entry["token"] for entry in built.log]}]

    summary = _summary(version, plans, seed, samples_per_scene, sweeps, built, stats, instance,
                       sample_annotation, class_counts, map_size_px)
    tables = {"attribute": vocab.attribute, "calibrated_sensor": built.calibrated_sensor,
              "category": vocab.category, "ego_pose": built.ego_pose, "instance": instance,
              "log": built.log, "map": map_table, "sample": built.sample,
              "sample_annotation": sample_annotation, "sample_data": built.sample_data,
              "scene": built.scene, "sensor": vocab.sensor, "visibility": vocab.visibility}
    for name in TABLES:
        _write_json(os.path.join(out, version, f"{name}.json"), tables[name])
    _write_json(os.path.join(out, SUMMARY_FILE), summary)
    say(f"synth: done: {len(built.sample)} samples, {len(sample_annotation)} annotations, "
        f"{len(jobs)} sensor files in {out}")
    result = dict(summary)
    result["out_dir"] = out
    return result


def _render_all(jobs: List[Tuple[str, SensorJob]], workers: int,
                say: Callable[[str], None]) -> List[object]:
    """Render every job (in parallel when ``workers`` > 1) and return results in job order."""
    results: List[object] = []
    total = len(jobs)
    next_report = 0

    def report(done: int) -> None:
        nonlocal next_report
        if done >= next_report or done == total:
            say(f"synth: {done}/{total} sensor files ({100 * done // total}%)")
            next_report = done + max(1, total // 10)

    if workers == 1:
        for n, item in enumerate(jobs):
            results.append(_run_job(item))
            report(n + 1)
        return results
    from concurrent.futures import ProcessPoolExecutor
    # fork is cheap and safe here (no threads yet); elsewhere spawn re-imports this package
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        for n, result in enumerate(pool.map(_run_job, jobs, chunksize=4)):
            results.append(result)
            report(n + 1)
    return results
