"""Shared pieces of the model-half tests of bevdepth.patch (not a test module).

- ENV_REASON / require_env(): skip unless the bevdepth-npu env (patched bevdepth, mmcv with ops,
  mmdet3d) is importable;
- reference voxel pooling (a plain loop and an independent index_put_ version);
- realistic camera / box inputs for the R50 recipe at a reduced image size;
- run_upstream(): runs upstream_runner.py on the pristine checkout in a subprocess.

Imported by tests/integration/test_voxel_pooling.py, test_parity.py, test_bevdepth_model.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ENV_REASON = ("needs the bevdepth-npu env (create it with `bevdepth-npu env`): bevdepth from the "
              "patched tree, mmcv with ops, mmdet3d, pytorch-lightning")
RUNNER = Path(__file__).resolve().parent / "upstream_runner.py"

def require_env():
    """Import and return the patched bevdepth package, or skip naming `bevdepth-npu env`."""
    pytest.importorskip("torch", reason=ENV_REASON)
    pytest.importorskip("mmcv.ops", reason=ENV_REASON)
    pytest.importorskip("mmdet3d", reason=ENV_REASON)
    pytest.importorskip("pytorch_lightning", reason=ENV_REASON)
    bevdepth = pytest.importorskip("bevdepth", reason=ENV_REASON)
    root = Path(bevdepth.__file__).resolve().parent
    if not (root / "utils" / "device.py").is_file():
        pytest.fail(f"bevdepth is imported from {root}, which is not the patched tree "
                    "(no bevdepth/utils/device.py); reinstall it with `bevdepth-npu env`")
    return bevdepth


def patched_root() -> Path:
    """Checkout the imported (patched) bevdepth package comes from."""
    import bevdepth
    return Path(bevdepth.__file__).resolve().parents[1]


# ---------------------------------------------------------------- reference voxel pooling


def pool_loop(geom, features, voxel_num):
    """Naive per-point loop: (B, N, 3) ints, (B, N, C) -> (B, C, Y, X), in float64."""
    import torch
    grid_x, grid_y, grid_z = (int(v) for v in voxel_num)
    batch, num_points, channels = features.shape
    out = torch.zeros(batch, grid_y, grid_x, channels, dtype=torch.float64)
    for b in range(batch):
        for n in range(num_points):
            x, y, z = (int(v) for v in geom[b, n])
            if 0 <= x < grid_x and 0 <= y < grid_y and 0 <= z < grid_z:
                out[b, y, x] += features[b, n].double()
    return out.permute(0, 3, 1, 2)


def pool_reference(geom, features, voxel_num):
    """Vectorised reference with index_put_(accumulate=True), differentiable (the gradient is
    index's gather). Written independently of bevdepth.ops.voxel_pooling."""
    import torch
    grid_x, grid_y, grid_z = (int(v) for v in voxel_num)
    batch, channels = features.shape[0], features.shape[-1]
    geom = geom.reshape(batch, -1, 3).long()
    features = features.reshape(batch, -1, channels)
    keep = ((geom >= 0) & (geom < torch.tensor([grid_x, grid_y, grid_z]))).all(-1)
    b_idx = torch.arange(batch).view(batch, 1).expand_as(keep)[keep]
    y_idx, x_idx = geom[..., 1][keep], geom[..., 0][keep]
    out = features.new_zeros(batch, grid_y, grid_x, channels)
    out = out.index_put((b_idx, y_idx, x_idx), features[keep], accumulate=True)
    return out.permute(0, 3, 1, 2)


def gather_reference(geom, grad_out, voxel_num):
    """Gradient of pooling w.r.t. the features: the cell's gradient, zero for dropped points."""
    import torch
    grid_x, grid_y, grid_z = (int(v) for v in voxel_num)
    geom = geom.long()
    keep = ((geom >= 0) & (geom < torch.tensor([grid_x, grid_y, grid_z]))).all(-1)
    batch, num_points = keep.shape
    channels = grad_out.shape[1]
    grad = grad_out.new_zeros(batch, num_points, channels)
    b_idx = torch.arange(batch).view(batch, 1).expand_as(keep)[keep]
    rows = grad_out.permute(0, 2, 3, 1)[b_idx, geom[..., 1][keep], geom[..., 0][keep]]
    grad[keep] = rows.reshape(-1, channels)
    return grad


# ---------------------------------------------------------------- realistic inputs


def _yaw_matrix(torch, yaw: float):
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_mats(batch: int, num_sweeps: int, final_dim=(256, 704), seed: int = 0,
                dtype=None) -> Dict[str, object]:
    """nuScenes-like matrices: six cameras around the car (1600x900 images, focal about
    1260 px), ida = resize + crop to ``final_dim`` with a small rotation and random flip,
    bda = rotation, scale and flips as in the recipe's augmentation."""
    import torch
    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    cam_to_ego_axes = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    yaws = [math.radians(a) for a in (55, 0, -55, 110, 180, -110)]
    num_cams = len(yaws)
    sensor2ego = torch.eye(4).repeat(batch, num_sweeps, num_cams, 1, 1)
    intrin = torch.eye(4).repeat(batch, num_sweeps, num_cams, 1, 1)
    ida = torch.eye(4).repeat(batch, num_sweeps, num_cams, 1, 1)
    for b in range(batch):
        for s in range(num_sweeps):
            for c, yaw in enumerate(yaws):
                jitter = (rand(1).item() - 0.5) * 0.05
                sensor2ego[b, s, c, :3, :3] = _yaw_matrix(torch, yaw + jitter) @ cam_to_ego_axes
                sensor2ego[b, s, c, :3, 3] = torch.tensor(
                    [1.5 * math.cos(yaw), 0.8 * math.sin(yaw), 1.5]) + (rand(3) - 0.5) * 0.2
                focal = 1250.0 + 20.0 * rand(1).item()
                intrin[b, s, c, 0, 0] = focal
                intrin[b, s, c, 1, 1] = focal
                intrin[b, s, c, 0, 2] = 800.0 + (rand(1).item() - 0.5) * 20
                intrin[b, s, c, 1, 2] = 450.0 + (rand(1).item() - 0.5) * 20
                resize = final_dim[1] / 1600.0 * (1.0 + (rand(1).item() - 0.5) * 0.2)
                rot = math.radians((rand(1).item() - 0.5) * 10.8)
                flip = -1.0 if rand(1).item() < 0.5 else 1.0
                top = max(0.0, 900.0 * resize - final_dim[0])
                affine = torch.eye(3)
                affine[0, 0] = resize * flip
                affine[1, 1] = resize
                affine[0, 2] = -0.0 if flip > 0 else 1600.0 * resize
                affine[1, 2] = -top
                rot_m = torch.eye(3)
                rot_m[:2, :2] = torch.tensor([[math.cos(rot), math.sin(rot)],
                                              [-math.sin(rot), math.cos(rot)]])
                centre = torch.tensor([final_dim[1] / 2.0, final_dim[0] / 2.0])
                rot_m[:2, 2] = centre - rot_m[:2, :2] @ centre
                affine = rot_m @ affine
                ida[b, s, c, :2, :2] = affine[:2, :2]
                ida[b, s, c, :2, 3] = affine[:2, 2]
    bda = torch.eye(4).repeat(batch, 1, 1)
    for b in range(batch):
        angle = math.radians((rand(1).item() - 0.5) * 45)
        scale = 0.95 + 0.1 * rand(1).item()
        rot = _yaw_matrix(torch, angle) * scale
        if rand(1).item() < 0.5:
            rot = rot @ torch.diag(torch.tensor([1.0, -1.0, 1.0]))
        if rand(1).item() < 0.5:
            rot = rot @ torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
        bda[b, :3, :3] = rot
    sensor2sensor = torch.eye(4).repeat(batch, num_sweeps, num_cams, 1, 1)
    mats = dict(sensor2ego_mats=sensor2ego, intrin_mats=intrin, ida_mats=ida,
                sensor2sensor_mats=sensor2sensor, bda_mat=bda)
    return {k: v.to(dtype) for k, v in mats.items()}


def gt_boxes(num_boxes: int, seed: int = 0):
    """(n, 9) boxes (x, y, z, w, l, h, yaw, vx, vy) mostly inside +-51.2 m, some outside, and
    (n,) labels over the ten classes."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.zeros(num_boxes, 9)
    boxes[:, :2] = (torch.rand(num_boxes, 2, generator=gen) - 0.5) * 120.0
    boxes[:, 2] = (torch.rand(num_boxes, generator=gen) - 0.5) * 2.0
    boxes[:, 3:6] = 0.4 + torch.rand(num_boxes, 3, generator=gen) * 4.0
    boxes[:, 6] = (torch.rand(num_boxes, generator=gen) - 0.5) * 2 * math.pi
    boxes[:, 7:9] = (torch.rand(num_boxes, 2, generator=gen) - 0.5) * 10.0
    labels = torch.randint(0, 10, (num_boxes,), generator=gen)
    return boxes, labels


def training_batch(final_dim=(128, 352), num_sweeps: int = 2, num_boxes: int = 12,
                   seed: int = 0) -> tuple:
    """The tuple NuscDetDataset + collate_fn give a training step (batch 1)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    height, width = final_dim
    imgs = torch.randn(1, num_sweeps, 6, 3, height, width, generator=gen)
    mats = camera_mats(1, num_sweeps, final_dim, seed=seed)
    boxes, labels = gt_boxes(num_boxes, seed=seed)
    depth = torch.zeros(1, 6, height, width)
    hit = torch.rand(1, 6, height, width, generator=gen) < 0.05
    depth[hit] = 1.0 + torch.rand(int(hit.sum()), generator=gen) * 60.0
    timestamps = torch.zeros(1, num_sweeps, 6)
    return (imgs, mats, timestamps, [dict()], [boxes], [labels], depth)


# ---------------------------------------------------------------- upstream subprocess


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def run_upstream(source: Path, inputs: Path, outputs: Path, tasks: List[str],
                 timeout_s: int = 1200) -> None:
    """Run upstream_runner.py with the pristine checkout ``source`` for ``tasks``."""
    cmd = [sys.executable, str(RUNNER), str(source), str(inputs), str(outputs), *tasks]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e| (0 when both are all zero)."""
    actual = actual.double()
    expected = expected.double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def norm_relative_error(actual, expected) -> float:
    """||a - e|| / ||e|| (absolute when ||e|| is 0)."""
    import torch
    actual = actual.double()
    expected = expected.double()
    scale = torch.linalg.vector_norm(expected).item()
    diff = torch.linalg.vector_norm(actual - expected).item()
    return diff / scale if scale else diff


def flatten_preds(preds) -> Dict[str, object]:
    """Head output (tuple over tasks of [dict]) as name -> tensor."""
    flat = {}
    for task_id, task in enumerate(preds):
        for key, value in task[0].items():
            flat[f"task{task_id}.{key}"] = value.detach()
    return flat
