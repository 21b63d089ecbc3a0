"""Data checks of ``bevdepth-npu doctor --data-root DIR``: the info files, one training sample
through the recipe's own dataset code, depth_gt coverage, and with ``--full`` every file the info
files name (missing or undecodable ones listed).

Files are read with the dataset's own readers (bevdepth.datasets.nusc_det_dataset), so a file
the doctor passes is one training can read.
"""
from __future__ import annotations

import concurrent.futures
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from bevdepth_npu.doctor.report import Fail

INFO_FILES = {"train": "nuscenes_infos_train.pkl", "val": "nuscenes_infos_val.pkl"}
RELEASES = ("v1.0-trainval", "v1.0-mini", "v1.0-test")
GEN_INFO = "python scripts/gen_info.py --data-root {root} --version v1.0-trainval"
LIST_LIMIT = 10  # bad files named on the console; the JSON has them all


def load_infos(root: Path, split: str) -> List[dict]:
    path = root / INFO_FILES[split]
    if not path.is_file():
        raise Fail(f"{path} is missing", "make the info files: " + GEN_INFO.format(root=root))
    try:
        with open(path, "rb") as handle:
            infos = pickle.load(handle)
    except Exception as error:
        raise Fail(f"{path} does not load ({type(error).__name__}: {error})",
                   "regenerate it: " + GEN_INFO.format(root=root)) from None
    if not isinstance(infos, list) or not infos or "cam_infos" not in infos[0] \
            or "lidar_infos" not in infos[0]:
        raise Fail(f"{path} is not a BEVDepth info file (a list of samples with cam_infos and "
                   "lidar_infos)", "regenerate it: " + GEN_INFO.format(root=root))
    return infos


def _release_of(root: Path, token: str) -> Optional[str]:
    for release in RELEASES:
        table = root / release / "sample.json"
        if table.is_file() and token in table.read_text():
            return release
    return None


def check_info_files(root: Path) -> str:
    parts = []
    for split in INFO_FILES:
        infos = load_infos(root, split)
        release = _release_of(root, infos[0]["sample_token"])
        if release is None:
            present = [r for r in RELEASES if (root / r).is_dir()] or ["none"]
            raise Fail(f"{INFO_FILES[split]}: its samples are in none of the releases under "
                       f"{root} ({', '.join(present)})",
                       "make the info files from the release that is there: "
                       + GEN_INFO.format(root=root))
        size_mb = (root / INFO_FILES[split]).stat().st_size / 2 ** 20
        parts.append(f"{split} {len(infos):,} samples ({release}, {size_mb:.1f} MB)")
    return "; ".join(parts)


def check_sample(root: Path) -> str:
    """The first training sample through the smoke experiment's dataset (the recipe's data code
    and augmentation at a smaller image size), with its depth labels."""
    from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
    load_infos(root, "train")
    scratch = tempfile.mkdtemp(prefix="bevdepth-npu-doctor-")
    try:
        module = smoke.BEVDepthLightningModel(data_root=str(root), default_root_dir=scratch,
                                              num_workers=0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dataset = module.train_dataloader().dataset
    t0 = time.monotonic()
    item = dataset[0]
    seconds = time.monotonic() - t0
    images, depth = item[0], item[-1]
    points = (depth > 0).flatten(-2).sum(-1)
    if not bool((points > 0).any()):
        raise Fail("the first sample has no depth labels in any camera",
                   "check the lidar files and calibration (or depth_gt files)")
    return (f"{len(dataset):,} training samples; images {tuple(images.shape)}, depth points per "
            f"camera {int(points.min())}-{int(points.max())}, {seconds:.2f} s")


def _key_frame_images(infos: List[dict]) -> Iterator[str]:
    for info in infos:
        for cam in info["cam_infos"].values():
            yield cam["filename"]


def check_depth_gt(root: Path) -> str:
    from bevdepth.datasets.nusc_det_dataset import DEPTH_GT_DIR, depth_gt_path
    images = [name for split in INFO_FILES for name in _key_frame_images(load_infos(root, split))]
    directory = root / DEPTH_GT_DIR
    if not directory.is_dir():
        return (f"no {DEPTH_GT_DIR}/: depth labels are projected from lidar during training "
                f"(slower loader; make them with scripts/gen_depth_gt.py)")
    present = set(os.listdir(directory))
    have = sum(os.path.basename(depth_gt_path(str(root), name)) in present for name in images)
    detail = f"{have:,} of {len(images):,} key-frame images have a depth_gt file"
    if have < len(images):
        detail += "; the others are projected from lidar (scripts/gen_depth_gt.py resumes)"
    return detail


def dataset_files(root: Path) -> List[Tuple[str, str]]:
    """(kind, path) of every file the info files name, and of the depth_gt files present."""
    from bevdepth.datasets.nusc_det_dataset import DEPTH_GT_DIR
    files: Dict[str, str] = {}
    for split in INFO_FILES:
        for info in load_infos(root, split):
            for frame in [info["cam_infos"], *info.get("cam_sweeps", [])]:
                for cam in frame.values():
                    files[str(root / cam["filename"])] = "image"
            for frame in [info["lidar_infos"], *info.get("lidar_sweeps", [])]:
                for lidar in frame.values():
                    files[str(root / lidar["filename"])] = "lidar"
    depth_dir = root / DEPTH_GT_DIR
    if depth_dir.is_dir():
        for name in os.listdir(depth_dir):
            files[str(depth_dir / name)] = "depth_gt"
    return sorted((kind, path) for path, kind in files.items())


def _verify(batch: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """The (path, problem) of each file of ``batch`` that training could not read."""
    from bevdepth.datasets import nusc_det_dataset as data
    bad = []
    for kind, path in batch:
        try:
            if kind == "image":
                data.read_image(path).close()
            else:
                rows = data.read_float32_rows(path, 5 if kind == "lidar" else 3)
                if kind == "lidar" and not len(rows):
                    raise data.DataFileError(path, "no points")
        except data.DataFileError as error:
            bad.append((path, str(error).split(": ", 1)[1].split(". `bevdepth-npu")[0]))
    return bad


class Progress:
    """One progress line: rewritten in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, what: str, stream=None) -> None:
        # the real stderr: the checks' own stderr is held back
        self.total, self.what, self.stream = total, what, stream or sys.__stderr__
        self.tty = self.stream.isatty()
        self.done, self.next_tenth, self.t0 = 0, 1, time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        line = (f"  {self.what}: {self.done:,}/{self.total:,} files "
                f"({time.monotonic() - self.t0:.0f} s)")
        if self.tty:
            print("\r" + line, end="" if self.done < self.total else "\n", file=self.stream,
                  flush=True)
        elif self.done * 10 >= self.next_tenth * self.total:
            print(line, file=self.stream, flush=True)
            self.next_tenth = self.done * 10 // self.total + 1


def check_every_file(root: Path, workers: int = 0) -> Tuple[str, List[Tuple[str, str]]]:
    files = dataset_files(root)
    workers = workers or min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1)
    size = max(1, min(256, len(files) // (workers * 8) or 1))
    batches = [files[i:i + size] for i in range(0, len(files), size)]
    progress = Progress(len(files), "checking the dataset")
    bad: List[Tuple[str, str]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_verify, batch): len(batch) for batch in batches}
        for future in concurrent.futures.as_completed(futures):
            bad.extend(future.result())
            progress.update(futures[future])
    bad.sort()
    counts = {kind: sum(k == kind for k, _ in files) for kind in ("image", "lidar", "depth_gt")}
    detail = (f"{counts['image']:,} images, {counts['lidar']:,} lidar sweeps, "
              f"{counts['depth_gt']:,} depth_gt files")
    if bad:
        named = "; ".join(f"{path}: {problem}" for path, problem in bad[:LIST_LIMIT])
        more = f" and {len(bad) - LIST_LIMIT} more (all in the JSON)" if len(bad) > LIST_LIMIT \
            else ""
        raise BadFiles(f"{len(bad)} of {len(files):,} files cannot be read: {named}{more}",
                       "replace them from the dataset's source; depth_gt files can be remade "
                       "with scripts/gen_depth_gt.py", bad)
    return f"all readable: {detail}", bad


class BadFiles(Fail):
    def __init__(self, cause: str, hint: str, files: List[Tuple[str, str]]) -> None:
        super().__init__(cause, hint)
        self.files = files


def check_root(root: Path) -> str:
    if not root.is_dir():
        raise Fail(f"--data-root {root} is not a directory", "")
    present = [r for r in RELEASES if (root / r).is_dir()]
    if not present:
        raise Fail(f"no nuScenes tables ({', '.join(RELEASES)}) under {root}",
                   "point --data-root at the folder that holds samples/, sweeps/ and v1.0-*")
    return f"{root}: {', '.join(present)}"
