"""Shared pieces of the model-half tests of bevdepth.patch (not a test module).

- ENV_REASON / require_env(): skip unless the bevdepth-npu env (patched bevdepth, mmcv with ops,
  mmdet3d) is importable;
- reference voxel pooling: a plain loop here, the index_put_ version and the realistic camera /
  box inputs of the R50 recipe from bevdepth_npu/testing.py (shared with the benchmarks),
  re-exported so that the tests name them in one place;
- a stand-in for mx_driving that checks the documented limits of npu_voxel_pooling_train;
- run_upstream(): runs upstream_runner.py on the pristine checkout in a subprocess.

Imported by tests/integration/test_voxel_pooling.py, test_parity.py, test_bevdepth_model.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

# The inputs and references the benchmarks share live in bevdepth_npu/testing.py.
from bevdepth_npu.testing import (camera_mats, flatten_preds, gt_boxes,  # noqa: F401
                                  pool_reference, training_batch)

ENV_REASON = ("needs the bevdepth-npu env (create it with `bevdepth-npu env`): bevdepth from the "
              "patched tree, mmcv with ops, mmdet3d, pytorch-lightning")
RUNNER = Path(__file__).resolve().parent / "upstream_runner.py"

# Documented limits of mx_driving.npu_voxel_pooling_train (DrivingSDK
# docs/zh/api/context/npu_voxel_pooling_train.md), forward and backward.
MX_LIMITS = dict(batch=128, points=100_000, channels=256, grid_xy=1000, grid_z=10,
                 elements=100_000_000)


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


# ---------------------------------------------------------------- mx_driving stand-in


class LimitViolation(AssertionError):
    pass


def _check_limits(where: str, batch: int, points: int, channels: int, grid: Sequence[int]):
    grid_x, grid_y, grid_z = grid
    problems = []
    if batch > MX_LIMITS["batch"]:
        problems.append(f"B={batch} > {MX_LIMITS['batch']}")
    if points > MX_LIMITS["points"]:
        problems.append(f"N={points} > {MX_LIMITS['points']}")
    if points == 0:
        problems.append("N=0 (the op raises on empty input)")
    if channels > MX_LIMITS["channels"]:
        problems.append(f"C={channels} > {MX_LIMITS['channels']}")
    if grid_x > MX_LIMITS["grid_xy"] or grid_y > MX_LIMITS["grid_xy"]:
        problems.append(f"X, Y = {grid_x}, {grid_y} > {MX_LIMITS['grid_xy']}")
    if grid_z > MX_LIMITS["grid_z"]:
        problems.append(f"Z={grid_z} > {MX_LIMITS['grid_z']}")
    if batch * grid_y * grid_x * channels > MX_LIMITS["elements"]:
        problems.append(f"B*Y*X*C={batch * grid_y * grid_x * channels} > 1e8")
    if batch * points * channels > MX_LIMITS["elements"]:
        problems.append(f"B*N*C={batch * points * channels} > 1e8")
    if problems:
        raise LimitViolation(f"npu_voxel_pooling_train {where}: " + "; ".join(problems))


def make_fake_mx_driving() -> types.ModuleType:
    """A module standing in for mx_driving: npu_voxel_pooling_train checks the documented input
    contract and limits on every forward and backward call, records each call in
    ``module.calls`` as (direction, B, N, C), and computes with the reference."""
    import torch

    module = types.ModuleType("mx_driving")
    module.calls = []

    class _Pool(torch.autograd.Function):

        @staticmethod
        def forward(ctx, geom, features, voxel_num):
            ctx.save_for_backward(geom)
            ctx.voxel_num = voxel_num
            return pool_reference(geom, features, voxel_num)

        @staticmethod
        def backward(ctx, grad_out):
            geom, = ctx.saved_tensors
            batch, channels, grid_y, grid_x = grad_out.shape
            _check_limits("backward", batch, geom.shape[1], channels, ctx.voxel_num)
            module.calls.append(("backward", batch, geom.shape[1], channels))
            return None, gather_reference(geom, grad_out, ctx.voxel_num), None

    def npu_voxel_pooling_train(geom_xyz, input_features, voxel_num):
        assert isinstance(voxel_num, (list, tuple)) and len(voxel_num) == 3, voxel_num
        assert all(isinstance(v, int) for v in voxel_num), voxel_num
        assert geom_xyz.dtype == torch.int32, geom_xyz.dtype
        assert input_features.dtype in (torch.float32, torch.float16), input_features.dtype
        assert geom_xyz.dim() == 3 and geom_xyz.shape[2] == 3, tuple(geom_xyz.shape)
        assert input_features.dim() == 3, tuple(input_features.shape)
        assert geom_xyz.shape[:2] == input_features.shape[:2]
        assert geom_xyz.is_contiguous() and input_features.is_contiguous()
        batch, points, channels = input_features.shape
        _check_limits("forward", batch, points, channels, voxel_num)
        module.calls.append(("forward", batch, points, channels))
        return _Pool.apply(geom_xyz, input_features, list(voxel_num))

    module.npu_voxel_pooling_train = npu_voxel_pooling_train
    return module


# ---------------------------------------------------------------- realistic inputs


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
