"""Shared pieces of the model-half tests of bevdepth.patch (not a test module).

- ENV_REASON / require_env(): skip unless the bevdepth-npu env (patched bevdepth, mmcv with ops,
  mmdet3d) is importable;
- reference voxel pooling: a plain loop here, the index_put_ version, the lift's inputs and
  their float64 product reference, and the realistic camera / box inputs of the R50 recipe from
  bevdepth_npu/testing.py (shared with the benchmarks),
  re-exported so that the tests name them in one place;
- SMALL_DIM, small_confs(): the R50 recipe's configuration at a small image size;
- run_upstream(): runs upstream_runner.py on the pristine checkout in a subprocess.

Imported by tests/integration/test_voxel_pooling.py, test_fused_pooling.py, test_npu_contract.py,
test_parity.py, test_bevdepth_model.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

# The inputs and references the benchmarks share live in bevdepth_npu/testing.py.
from bevdepth_npu.testing import (camera_mats, flatten_preds, gather_reference,  # noqa: F401
                                  gt_boxes, lss_case, pool_reference, product_reference,
                                  relative_error, training_batch)

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


# ---------------------------------------------------------------- upstream subprocess


SMALL_DIM = (64, 192)  # widths must divide by 32 for the R50 + SECONDFPN strides


def small_confs(final_dim=SMALL_DIM) -> Dict:
    """Copies of base_exp's backbone, head, image and BEV augmentation configurations at
    ``final_dim``, without the pretrained-weights download."""
    import copy
    from bevdepth.exps.nuscenes import base_exp
    backbone_conf = copy.deepcopy(base_exp.backbone_conf)
    backbone_conf["final_dim"] = final_dim
    backbone_conf["img_backbone_conf"]["init_cfg"] = None
    ida_aug_conf = copy.deepcopy(base_exp.ida_aug_conf)
    ida_aug_conf["final_dim"] = final_dim
    return dict(backbone_conf=backbone_conf, head_conf=copy.deepcopy(base_exp.head_conf),
                ida_aug_conf=ida_aug_conf, bda_aug_conf=copy.deepcopy(base_exp.bda_aug_conf))


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


def norm_relative_error(actual, expected) -> float:
    """||a - e|| / ||e|| (absolute when ||e|| is 0)."""
    import torch
    actual = actual.double()
    expected = expected.double()
    scale = torch.linalg.vector_norm(expected).item()
    diff = torch.linalg.vector_norm(actual - expected).item()
    return diff / scale if scale else diff
