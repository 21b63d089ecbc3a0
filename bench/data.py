"""Benchmark of the data pipeline: precomputed depth against on-the-fly lidar projection.

    python -m bench --only data [--quick] [--repeats N]

On the synthetic nuScenes (bevdepth_npu.synth: 1600x900 JPEGs, LIDAR_TOP sweeps; built once in
the work dir, with the patched tree's scripts/gen_info.py and scripts/gen_depth_gt.py), the
R50 2key training dataset (NuscDetDataset: 6 cameras x 2 key frames, 256x704 augmentation,
depth labels of the key frame) is read through a DataLoader (batch 1) with 1 worker and with
one worker per usable core. Variants, interleaved:
  precomputed   patched dataset, data root with depth_gt/<image>.bin
  on-the-fly    patched dataset, a mirror of the data root without depth_gt/ (it projects the
                lidar sweep, as upstream does)
  upstream      upstream's dataset (pristine checkout, its worker), on the fly
Figures are samples/s over a fixed run of samples after a warm-up epoch (loader workers kept
alive between runs). Target: precomputed / on-the-fly >= 2.

Two experiments explain the figures (single process, one image or camera at a time):
  parts          the per-sample work split into images (decode, resize/crop/flip/rotate,
                 normalise: 12 images), lidar projection (read + 6 projections) and depth file
                 reads (6 files)
  image options  ways to produce the same 256x704 image faster, each written here for the
                 experiment (not in the patched tree), with their pixel difference against the
                 dataset's own img_transform: resize of only the rows the crop keeps, resize of
                 only the crop window (Pillow's box), JPEG draft (reduced-size DCT decode), both
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench import harness
from bevdepth_npu import envvars

NAME = "data"
TITLE = "data pipeline: precomputed depth against on-the-fly lidar projection"

SYNTH_SCENES = 2                # one mini_train scene, one mini_val scene
SYNTH_SAMPLES_PER_SCENE = 10
SYNTH_SWEEPS = 2
SYNTH_SEED = 0
DATASET_DIR = "synth-data"      # under the work dir, reused between runs
READY_FILE = "bench_ready.json"  # written last: its presence means the dataset is complete
SAMPLES_PER_RUN_FULL, SAMPLES_PER_RUN_QUICK = 12, 6
REPEATS_FULL, REPEATS_QUICK = 3, 2
TARGET_RATIO = 2.0              # precomputed-depth loader at least 2x the on-the-fly one
KEY_IDXES = [-1]                # the 2key recipe: the sample and the previous key frame
INFO_NAME = "nuscenes_infos_train.pkl"  # the loader reads the training infos
IMAGE_OPTION_AUGS = 60          # augmentations compared pixel by pixel per image option

VARIANTS = ("precomputed", "on-the-fly", "upstream")
IMAGE_OPTIONS = ("as shipped", "rows-box resize", "box resize", "draft decode",
                 "draft + box resize")
PARTS = ("images", "lidar projection", "depth_gt read")


# ---------------------------------------------------------------- synthetic dataset


def patched_root() -> Path:
    """Checkout of the installed (patched) bevdepth, found without importing it."""
    import importlib.util
    spec = importlib.util.find_spec("bevdepth")
    if spec is None or not spec.submodule_search_locations:
        raise harness.BenchError("bevdepth is not importable: run the benchmarks in the "
                                 "bevdepth-npu environment")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def ensure_dataset(ctx: harness.Context) -> Tuple[Path, Path]:
    """The synthetic dataset with infos and depth_gt, and a mirror of it without depth_gt.

    Built under a temporary name and renamed when complete, so an interrupted build is never
    mistaken for a dataset; reused while its settings match.
    """
    settings = dict(scenes=SYNTH_SCENES, samples_per_scene=SYNTH_SAMPLES_PER_SCENE,
                    sweeps=SYNTH_SWEEPS, seed=SYNTH_SEED, version="v1.0-mini")
    root = ctx.work_dir / DATASET_DIR
    ready = root / READY_FILE
    if not (ready.is_file() and json.loads(ready.read_text()).get("settings") == settings):
        if root.exists():
            raise harness.BenchError(
                f"{root} exists but is not a complete dataset of these settings; move it "
                "away (nothing is deleted automatically)")
        tmp = ctx.work_dir / f"{DATASET_DIR}.tmp{os.getpid()}"
        ctx.log(f"  building the synthetic dataset in {root} (once)")
        from bevdepth_npu.synth import generate
        generate(str(tmp), scenes=SYNTH_SCENES, samples_per_scene=SYNTH_SAMPLES_PER_SCENE,
                 sweeps=SYNTH_SWEEPS, seed=SYNTH_SEED)
        scripts = patched_root() / "scripts"
        for script, extra in (("gen_info.py", ["--version", "v1.0-mini"]),
                              ("gen_depth_gt.py", [])):
            cmd = [sys.executable, str(scripts / script), "--data-root", str(tmp)] + extra
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp))
            if proc.returncode != 0:
                raise harness.BenchError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        harness.write_json(tmp / READY_FILE, dict(settings=settings))
        os.replace(tmp, root)
    mirror = ctx.work_dir / f"{DATASET_DIR}-no-depth-gt"
    mirror.mkdir(exist_ok=True)
    for entry in sorted(os.listdir(root)):
        if entry in ("depth_gt", READY_FILE):
            continue
        link = mirror / entry
        if not os.path.lexists(link):
            os.symlink(root / entry, link)
    if (mirror / "depth_gt").exists():
        raise harness.BenchError(f"{mirror} must not contain depth_gt/")
    return root, mirror


# ---------------------------------------------------------------- loader case (any worker)


def build_dataset(data_root: str, info_path: str):
    """The R50 2key training dataset of whichever bevdepth this worker imports."""
    import copy

    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
    from bevdepth.exps.nuscenes import base_exp
    return NuscDetDataset(ida_aug_conf=copy.deepcopy(base_exp.ida_aug_conf),
                          bda_aug_conf=copy.deepcopy(base_exp.bda_aug_conf),
                          classes=base_exp.CLASSES, data_root=data_root, info_paths=info_path,
                          is_train=True, img_conf=base_exp.img_conf, num_sweeps=1,
                          sweep_idxes=[], key_idxes=list(KEY_IDXES), return_depth=True,
                          use_fusion=False)


class LoaderCase:
    """Reads ``samples_per_run`` samples through a DataLoader; the loader workers live on."""

    def __init__(self, params: Dict[str, Any]):
        import torch.utils.data
        from bevdepth.datasets.nusc_det_dataset import collate_fn
        dataset = build_dataset(params["data_root"], params["info_path"])
        self.samples = params["samples_per_run"]
        order = [i % len(dataset) for i in range(self.samples)]
        num_workers = params["num_workers"]
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=1, sampler=order, num_workers=num_workers,
            collate_fn=partial(collate_fn, is_return_depth=True),
            persistent_workers=num_workers > 0)

    def run(self) -> Dict[str, float]:
        started = time.perf_counter()
        count = sum(1 for _ in self.loader)
        elapsed = time.perf_counter() - started
        if count != self.samples:
            raise harness.BenchError(f"read {count} samples, expected {self.samples}")
        return dict(time_s=elapsed, samples_per_s=count / elapsed)


def make_loader_case(params: Dict[str, Any]) -> LoaderCase:
    return LoaderCase(params)


# ---------------------------------------------------------------- experiments (patched worker)


def _sample_images(data_root: str, info_path: str) -> List[Dict[str, Any]]:
    """Camera infos of the 12 images of the first sample with a previous key frame."""
    with open(info_path, "rb") as fh:
        infos = pickle.load(fh)
    index = 1 if len(infos) > 1 and infos[1]["scene_token"] == infos[0]["scene_token"] else 0
    frames = [infos[index], infos[max(0, index + KEY_IDXES[0])]]
    return [dict(path=os.path.join(data_root, frame["cam_infos"][cam]["filename"]),
                 cam_info=frame["cam_infos"][cam], lidar_infos=frame["lidar_infos"],
                 key=(position == 0))
            for position, frame in enumerate(frames) for cam in sorted(frame["cam_infos"])]


def _augmentations(count: int, seed: int) -> List[Tuple]:
    """(resize, resize_dims, crop, flip, rotate) drawn by the dataset's own sampler."""
    import numpy as np
    dataset = _AugSampler()
    np.random.seed(seed)
    return [dataset.sample_ida_augmentation() for _ in range(count)]


class _AugSampler:
    """Just enough of a NuscDetDataset to call its sample_ida_augmentation."""

    def __init__(self):
        import copy

        from bevdepth.exps.nuscenes import base_exp
        self.ida_aug_conf = copy.deepcopy(base_exp.ida_aug_conf)
        self.is_train = True

    def sample_ida_augmentation(self):
        from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
        return NuscDetDataset.sample_ida_augmentation(self)


def transform_image(option: str, path: str, aug: Tuple):
    """The augmented 256x704 image as a uint8 array, produced the way ``option`` says.

    "as shipped" is the dataset's own img_transform; the others are experiments written here.
    """
    import numpy as np
    from PIL import Image

    from bevdepth.datasets.nusc_det_dataset import img_transform
    resize, resize_dims, crop, flip, rotate = aug
    img = Image.open(path)
    if option == "as shipped":
        out, _ = img_transform(img, resize=resize, resize_dims=resize_dims, crop=crop,
                               flip=flip, rotate=rotate)
        return np.asarray(out)
    new_w, new_h = resize_dims
    if option in ("draft decode", "draft + box resize"):
        # libjpeg scales by 1/2, 1/4 or 1/8 while decoding: never below the requested size
        img.draft("RGB", (new_w, new_h))
    scale_x, scale_y = img.width / new_w, img.height / new_h
    if option in ("box resize", "draft + box resize"):
        window = (max(crop[0], 0), max(crop[1], 0), min(crop[2], new_w), min(crop[3], new_h))
    elif option == "rows-box resize":
        window = (0, max(crop[1], 0), new_w, min(crop[3], new_h))
    else:  # "draft decode": the whole resized image
        window = (0, 0, new_w, new_h)
    part = img.resize((window[2] - window[0], window[3] - window[1]),
                      box=(window[0] * scale_x, window[1] * scale_y, window[2] * scale_x,
                           window[3] * scale_y))
    # the crop of the (virtual) resized image, relative to the part resized
    out = part.crop((crop[0] - window[0], crop[1] - window[1], crop[2] - window[0],
                     crop[3] - window[1]))
    if flip:
        out = out.transpose(method=Image.FLIP_LEFT_RIGHT)
    return np.asarray(out.rotate(rotate))


class ImageOptionCase:
    """Produces the 12 images of one sample with fixed augmentations, one option."""

    def __init__(self, params: Dict[str, Any]):
        self.option = params["option"]
        self.images = _sample_images(params["data_root"], params["info_path"])
        self.augs = _augmentations(len(self.images), params["seed"])
        self.check_augs = _augmentations(IMAGE_OPTION_AUGS, params["seed"] + 1)

    def run(self) -> Dict[str, float]:
        started = time.perf_counter()
        for image, aug in zip(self.images, self.augs):
            transform_image(self.option, image["path"], aug)
        elapsed = time.perf_counter() - started
        return dict(time_s=elapsed, per_image_s=elapsed / len(self.images))

    def check(self) -> Dict[str, float]:
        """Pixel differences against "as shipped" over many augmentations."""
        import numpy as np
        worst, differing, total, images_differing = 0, 0, 0, 0
        for i, aug in enumerate(self.check_augs):
            path = self.images[i % len(self.images)]["path"]
            expected = transform_image("as shipped", path, aug).astype(np.int16)
            got = transform_image(self.option, path, aug).astype(np.int16)
            if got.shape != expected.shape:
                raise harness.BenchError(f"{self.option}: shape {got.shape} != "
                                         f"{expected.shape}")
            diff = np.abs(got - expected)
            worst = max(worst, int(diff.max()))
            differing += int((diff > 0).sum())
            total += diff.size
            images_differing += int(diff.max() > 0)
        return dict(max_abs_diff=worst, differing_fraction=differing / total,
                    images_differing=images_differing, images=len(self.check_augs))


class PartsCase:
    """One part of a sample's work: all 12 images, the lidar projection, or the depth files."""

    def __init__(self, params: Dict[str, Any]):
        import numpy as np

        from bevdepth.exps.nuscenes import base_exp
        self.part = params["part"]
        self.data_root = params["data_root"]
        self.images = _sample_images(params["data_root"], params["info_path"])
        self.augs = _augmentations(len(self.images), params["seed"])
        self.mean = np.array(base_exp.img_conf["img_mean"], np.float32)
        self.std = np.array(base_exp.img_conf["img_std"], np.float32)

    def run(self) -> None:
        import mmcv
        from PIL import Image

        from bevdepth.datasets import nusc_det_dataset as nd
        keys = [image for image in self.images if image["key"]]
        if self.part == "images":
            for image, aug in zip(self.images, self.augs):
                img = transform_image("as shipped", image["path"], aug)
                mmcv.imnormalize(img, self.mean, self.std, True)
        elif self.part == "lidar projection":
            points = nd.load_lidar_points(self.data_root, keys[0]["lidar_infos"])
            for image in keys:
                with Image.open(image["path"]) as img:
                    nd.project_lidar_depth(points, img, image["lidar_infos"], image["cam_info"])
        else:
            for image in keys:
                nd.load_depth_gt(nd.depth_gt_path(self.data_root, image["cam_info"]["filename"]))


def make_image_option_case(params: Dict[str, Any]) -> ImageOptionCase:
    return ImageOptionCase(params)


def make_parts_case(params: Dict[str, Any]) -> PartsCase:
    return PartsCase(params)


# ---------------------------------------------------------------- driver


def _loader_runs(ctx: harness.Context, patched: harness.Worker, upstream: harness.Worker,
                 root: Path, mirror: Path, worker_counts: List[int], repeats: int,
                 samples_per_run: int, figures: Dict[str, Any]
                 ) -> Tuple[List[List[Any]], Dict[Tuple[int, str], Optional[float]]]:
    """The DataLoader variants, interleaved, for each worker count: table rows and median
    samples/s by (workers, variant); adds their figures to ``figures``."""
    roots = {"precomputed": root, "on-the-fly": mirror, "upstream": mirror}
    workers = {"precomputed": patched, "on-the-fly": patched, "upstream": upstream}
    loader_rows: List[List[Any]] = []
    rates: Dict[Tuple[int, str], Optional[float]] = {}
    for num_workers in worker_counts:
        ctx.log(f"  loader with {num_workers} worker(s), {samples_per_run} samples per run")
        runners = {}
        for variant in VARIANTS:
            key = f"loader-{num_workers}-{variant}"
            workers[variant].setup(key, "bench.data:make_loader_case", dict(
                data_root=str(roots[variant]),
                info_path=str(roots[variant] / INFO_NAME), num_workers=num_workers,
                samples_per_run=samples_per_run))
            runners[variant] = workers[variant].runner(key)
        samples = harness.interleave(runners, repeats, ctx.warmup)
        for variant in VARIANTS:
            stats = harness.Stats.of(samples[variant]["samples_per_s"])
            rates[(num_workers, variant)] = stats.median
            loader_rows.append([num_workers, variant, stats.median, stats.minimum,
                                stats.maximum, 1.0 / stats.median * 1e3])
            figures[f"loader.w{num_workers}.{variant}"] = dict(samples_per_s=stats.to_json())
            workers[variant].drop(f"loader-{num_workers}-{variant}")
    return loader_rows, rates


def _interleaved_cases(ctx: harness.Context, patched: harness.Worker, root: Path, repeats: int,
                       key_prefix: str, field: str, names: Sequence[str], factory: str,
                       seed: int) -> Dict[str, Any]:
    """One case per name in the patched worker (``factory`` called with ``{field: name}``, set
    up as ``<key_prefix>-<name>``), run interleaved at least 3 times: the samples by name."""
    runners = {}
    for name in names:
        key = f"{key_prefix}-{name}"
        patched.setup(key, factory, {field: name, "data_root": str(root),
                                     "info_path": str(root / INFO_NAME), "seed": seed})
        runners[name] = patched.runner(key)
    return harness.interleave(runners, max(3, repeats), ctx.warmup)


def _parts_runs(ctx: harness.Context, patched: harness.Worker, root: Path,
                repeats: int) -> Dict[str, float]:
    """Median ms of each part of one sample's work, parts interleaved."""
    ctx.log("  parts of one sample")
    part_samples = _interleaved_cases(ctx, patched, root, repeats, "part", "part", PARTS,
                                      "bench.data:make_parts_case", seed=5)
    return {p: harness.median_of(part_samples, p) * 1e3 for p in PARTS}


def _image_option_runs(ctx: harness.Context, patched: harness.Worker, root: Path, repeats: int,
                       figures: Dict[str, Any]) -> List[List[Any]]:
    """Time and pixel check of each image option, options interleaved: table rows; adds their
    figures to ``figures``."""
    ctx.log("  image options")
    option_samples = _interleaved_cases(ctx, patched, root, repeats, "image", "option",
                                        IMAGE_OPTIONS,
                                        "bench.data:make_image_option_case", seed=7)
    option_rows = []
    shipped_s = harness.median_of(option_samples, "as shipped", "per_image_s")
    for option in IMAGE_OPTIONS:
        per_image = harness.median_of(option_samples, option, "per_image_s")
        check = patched.call(f"image-{option}", "check")
        option_rows.append([option, per_image * 1e3, harness.safe_ratio(shipped_s, per_image),
                            check["max_abs_diff"], check["differing_fraction"],
                            f"{check['images_differing']}/{check['images']}"])
        figures[f"image_option.{option}"] = dict(per_image_s=per_image, **check)
    return option_rows


def _add_tables(result: harness.BenchResult, repeats: int, samples_per_run: int,
                loader_rows: List[List[Any]], parts_ms: Dict[str, float],
                option_rows: List[List[Any]]) -> None:
    """The loader, parts and image-option tables."""
    result.tables.append(harness.Table(
        f"DataLoader, R50 2key training samples (12 images of 1600x900 -> 256x704), batch 1, "
        f"median of {repeats} runs of {samples_per_run} samples",
        ["workers", "variant", "samples/s", "min", "max", "ms/sample"], loader_rows))
    result.tables.append(harness.Table(
        "one sample's work, single process (images: 12 x decode + img_transform + normalise; "
        "lidar: read + 6 projections; depth_gt: 6 file reads)",
        ["part", "median ms"], [[p, parts_ms[p]] for p in PARTS]))
    result.tables.append(harness.Table(
        "image options, per image (decode + resize/crop/flip/rotate), pixel differences "
        f"against the shipped img_transform over {IMAGE_OPTION_AUGS} augmentations",
        ["option", "ms/image", "speed-up", "max |diff|", "pixels differing",
         "images differing"], option_rows))


def _add_ratios(result: harness.BenchResult, worker_counts: List[int],
                rates: Dict[Tuple[int, str], Optional[float]], parts_ms: Dict[str, float]
                ) -> float:
    """The ratios and the note on what precomputing can gain; returns that bound."""
    for num_workers in worker_counts:
        pre, fly, up = (rates[(num_workers, v)] for v in VARIANTS)
        result.ratios.append(harness.Ratio(
            f"data.w{num_workers}.precomputed/on-the-fly", harness.safe_ratio(pre, fly),
            f"samples/s, precomputed depth against on-the-fly projection, {num_workers} "
            "worker(s)", (">=", TARGET_RATIO)))
        result.ratios.append(harness.Ratio(
            f"data.w{num_workers}.precomputed/upstream", harness.safe_ratio(pre, up),
            f"samples/s, patched precomputed against upstream's dataset, {num_workers} "
            "worker(s)"))
    images_ms, lidar_ms, file_ms = (parts_ms[p] for p in PARTS)
    result.ratios.append(harness.Ratio(
        "data.depth-labels.lidar/depth_gt", harness.safe_ratio(lidar_ms, file_ms),
        "depth labels of one sample: lidar read + projection against depth_gt file reads"))
    # What precomputing can gain at most: a sample of the precomputed loader (1 worker) plus
    # the projection it saves, over that sample.
    sample_ms = 1e3 / rates[(1, "precomputed")]
    bound = (sample_ms + lidar_ms - file_ms) / sample_ms
    result.notes.append(
        f"per sample (1 worker, precomputed): {sample_ms:.0f} ms, of which images "
        f"{images_ms:.0f} ms (12 x decode + resize/crop/flip/rotate + normalise); the lidar "
        f"projection that depth_gt saves costs {lidar_ms:.1f} ms against {file_ms:.2f} ms of "
        f"file reads. Precomputed depth can make a sample at most {bound:.2f}x faster; 2x "
        f"needs everything else in a sample to cost under {lidar_ms - file_ms:.0f} ms")
    return bound


def run(ctx: harness.Context) -> harness.BenchResult:
    """The data benchmark: loader variants per worker count, the parts of one sample, the
    image options; then the tables, ratios and notes."""
    result = harness.BenchResult(NAME, TITLE)
    repeats = ctx.repeats_for(REPEATS_FULL, REPEATS_QUICK)
    samples_per_run = SAMPLES_PER_RUN_QUICK if ctx.quick else SAMPLES_PER_RUN_FULL
    root, mirror = ensure_dataset(ctx)
    all_workers = harness.usable_cores()
    worker_counts = sorted({1, all_workers})
    patched = ctx.worker(harness.ROLE_PATCHED, "data-patched", env={envvars.DEVICE: "cpu"})
    upstream = ctx.worker(harness.ROLE_UPSTREAM_CPU, "data-upstream")
    figures: Dict[str, Any] = {}
    try:
        loader_rows, rates = _loader_runs(ctx, patched, upstream, root, mirror, worker_counts,
                                          repeats, samples_per_run, figures)
        upstream.close()
        parts_ms = _parts_runs(ctx, patched, root, repeats)
        option_rows = _image_option_runs(ctx, patched, root, repeats, figures)
    finally:
        upstream.close()
        patched.close()

    _add_tables(result, repeats, samples_per_run, loader_rows, parts_ms, option_rows)
    bound = _add_ratios(result, worker_counts, rates, parts_ms)
    result.data = dict(repeats=repeats, warmup=ctx.warmup, samples_per_run=samples_per_run,
                       worker_counts=worker_counts, parts_ms=parts_ms,
                       bound_precomputed_over_on_the_fly=bound, figures=figures,
                       dataset=dict(scenes=SYNTH_SCENES, samples_per_scene=SYNTH_SAMPLES_PER_SCENE,
                                    sweeps=SYNTH_SWEEPS, seed=SYNTH_SEED))
    return result
