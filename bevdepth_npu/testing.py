"""Realistic inputs and reference implementations shared by the tests and the benchmarks
(tests/integration/, bench/), in the spirit of numpy.testing: one module both import, so that
neither imports the other.

- ``camera_mats``, ``gt_boxes``, ``training_batch``: nuScenes-like camera matrices, boxes and a
  training batch of the R50 recipe at a chosen image size;
- ``pool_reference``, ``gather_reference``: voxel pooling and its gradient written independently
  of bevdepth.ops.voxel_pooling;
- ``lss_case``, ``product_reference``: the lift's inputs as the backbone hands them to the
  pooling, and their float64 depth x context product pooled, with the gradients of both factors;
- ``flatten_preds``: head outputs as name -> tensor;
- ``relative_error``: max |actual - expected| / max |expected|, the one figure the tests assert
  on, the self-test reports and the benchmarks print;
- ``assert_same``: exact equality of nested checkpoint contents (tensors through
  ``torch.testing.assert_close`` without tolerance), the message naming the path;
- ``settings_env``: run settings named as flags in capitals (``CARDS``) as the environment
  variables of bevdepth_npu/envvars.py (``BEVDEPTH_NPU_CARDS``), for the tests of the scripts;
- ``import_pristine``, ``install_cpu_shims``: run a pristine upstream checkout on a CPU-only
  torch (its CUDA pooling replaced by ``pool_reference``, ``.cuda()`` mapped to the CPU).

torch is imported inside the functions: importing this module needs only the standard library.
Used by tests/integration/_bevdepth_helpers (and so the parity, pooling and model tests), by
bench/harness.py and bench/worker.py, and by `bevdepth-npu doctor` (its on-device references);
checked by those tests.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types
from pathlib import Path
from typing import Dict


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e| in float64 (the absolute difference when e is all zero)."""
    actual, expected = actual.double(), expected.double()
    if not expected.numel():
        return 0.0
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale else diff


def assert_same(ours, theirs, where: str = "checkpoint") -> None:
    """``ours`` equals ``theirs`` exactly: tensors by ``torch.testing.assert_close`` with no
    tolerance (dtype and device checked), mappings and sequences item by item, anything else
    with ==; the message names the first path that differs."""
    import torch
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(ours, dict):
        assert isinstance(theirs, dict) and ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(ours, (list, tuple)):
        assert isinstance(theirs, (list, tuple)) and len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert ours == theirs, where


def settings_env(**values: object) -> Dict[str, str]:
    """``values`` as environment variables: a setting's name in capitals (``CARDS``) becomes
    its variable (``BEVDEPTH_NPU_CARDS``, bevdepth_npu/envvars.py); other names stay."""
    from bevdepth_npu import envvars
    from bevdepth_npu.run.settings import OPTION_BY_NAME
    return {envvars.setting_variable(key.lower()) if key.lower() in OPTION_BY_NAME else key:
            str(value) for key, value in values.items()}


# ---------------------------------------------------------------- reference pooling


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


def lss_case(batch, cams, bins, height, width, channels, seed, grid=(32, 32, 1), margin=5,
             dtype=None):
    """(geom (B, cams, D, H, W, 3) int32 cells, x and y up to ``margin`` cells outside the grid
    and z in -1..1; depth (B*cams, D, H, W) softmaxed over D; context (B*cams, C, H, W)) in
    ``dtype`` (default float32), from ``seed``."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cams, bins, height, width)
    geom = torch.stack([torch.randint(-margin, grid[0] + margin, shape, generator=gen),
                        torch.randint(-margin, grid[1] + margin, shape, generator=gen),
                        torch.randint(-1, 2, shape, generator=gen)], -1).int()
    depth = torch.randn(batch * cams, bins, height, width, generator=gen).softmax(1)
    context = torch.randn(batch * cams, channels, height, width, generator=gen)
    dtype = dtype or torch.float32
    return geom, depth.to(dtype), context.to(dtype)


def product_reference(geom, depth, context, grad_out, grid):
    """The product path in float64 on the host: (pooled grid, gradient of depth, gradient of
    context) for the upstream gradient ``grad_out``."""
    import torch
    batch = geom.shape[0]
    depth = depth.detach().cpu().double().requires_grad_(True)
    context = context.detach().cpu().double().requires_grad_(True)
    product = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*cams, C, D, H, W)
    product = product.view(batch, -1, *product.shape[1:]).permute(0, 1, 3, 4, 5, 2)
    out = pool_reference(geom.cpu(), product.reshape(batch, -1, product.shape[-1]), grid)
    grads = torch.autograd.grad(out, (depth, context), grad_out.cpu().double())
    return out.detach(), grads[0], grads[1]


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


def flatten_preds(preds) -> Dict[str, object]:
    """Head output (tuple over tasks of [dict]) as name -> tensor."""
    flat = {}
    for task_id, task in enumerate(preds):
        for key, value in task[0].items():
            flat[f"task{task_id}.{key}"] = value.detach()
    return flat


# ---------------------------------------------------------------- pristine upstream on CPU


def install_cpu_shims() -> None:
    """Let CUDA-only upstream code run on a CPU-only torch."""
    import torch

    def to_cpu(device):
        return "cpu" if device is not None and "cuda" in str(device) else device

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    new_zeros = torch.Tensor.new_zeros

    def new_zeros_cpu(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_cpu(kwargs["device"])
        return new_zeros(self, *args, **kwargs)

    torch.Tensor.new_zeros = new_zeros_cpu
    tensor = torch.tensor

    def tensor_cpu(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_cpu(kwargs["device"])
        return tensor(*args, **kwargs)

    torch.tensor = tensor_cpu

    def voxel_pooling_train(geom_xyz, features, voxel_num):
        batch = features.shape[0]
        return pool_reference(geom_xyz.reshape(batch, -1, 3),
                                      features.reshape(batch, -1, features.shape[-1]),
                                      [int(v) for v in voxel_num])

    def voxel_pooling_inference(geom_xyz, depth, context, voxel_num):
        product = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*cams, C, D, H, W)
        batch, cams = geom_xyz.shape[:2]
        product = product.reshape(batch, cams, *product.shape[1:]).permute(0, 1, 3, 4, 5, 2)
        return voxel_pooling_train(geom_xyz, product, voxel_num)

    for name, func in (("voxel_pooling_train", voxel_pooling_train),
                       ("voxel_pooling_inference", voxel_pooling_inference)):
        module = types.ModuleType(f"bevdepth.ops.{name}")
        setattr(module, name, func)
        sys.modules[module.__name__] = module


def import_pristine(source: Path) -> None:
    """Make ``bevdepth`` the pristine checkout's package, whatever else is on sys.path (the
    patched tree may be installed in this environment)."""
    package_dir = source / "bevdepth"
    spec = importlib.machinery.ModuleSpec("bevdepth", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(package_dir)]
    sys.modules["bevdepth"] = package
    ops = importlib.machinery.ModuleSpec("bevdepth.ops", None, is_package=True)
    ops_module = importlib.util.module_from_spec(ops)
    ops_module.__path__ = [str(package_dir / "ops")]
    sys.modules["bevdepth.ops"] = ops_module
