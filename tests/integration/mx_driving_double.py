"""A CPU double of DrivingSDK's compiled pooling ops, run under DrivingSDK's own Python wrappers.

The NPU contract tests cannot run the NPU, so they run the next best thing: the real
``mx_driving/ops/voxel_pooling_train.py`` (AdsVoxelPoolingFunction) and
``mx_driving/ops/bev_pool_v3.py`` (BEVPoolV3) from the pinned DrivingSDK checkout in the cache
(``bevdepth-npu fetch drivingsdk``), over this double of ``mx_driving._C``. What the double does
follows these files of that commit, line for line where it matters.

Voxel pooling (``npu_voxel_pooling_train``, the product path):

- ``mx_driving/csrc/VoxelPoolingTrain.cpp`` (host code): both inputs must be NPU tensors
  (``TORCH_CHECK_NPU``) of 3 dims (backward: 4 and 3); fp16 features are converted to fp32 around
  the kernel and the result back to fp16; every other dtype is passed to aclnn unchanged; no size
  is checked.
- ``kernels/op_host/voxel_pooling_train.cpp`` and ``voxel_pooling_train_grad.cpp`` (OpDefs): geom
  and pos_memo int32, features, output and gradients float32 only. Anything else fails inside
  aclnn, as bf16 would on the device.
- ``kernels/op_kernel/voxel_pooling_train.cpp``: point p of the B*N points with cell (x, y, z)
  inside [0, X) x [0, Y) x [0, Z) writes pos_memo[p] = (p // N, y, x) and adds its C features to
  out[p // N, y, x] with an fp32 atomic add; other points are dropped and keep the pos_memo the
  wrapper initialised (-1). The attributes B, N, C, X, Y are the kernel's only notion of the
  buffers' sizes; attributes that disagree with the tensors would read or write out of bounds, so
  the double refuses them.
- ``kernels/op_kernel/voxel_pooling_train_grad.cpp``: grad[p] = grad_out[pos_memo[p]] (grad_out
  permuted to B, H, W, C by the host code) where pos_memo[p][0] != -1, else 0.

It also enforces the documented limits of ``docs/api/context/npu_voxel_pooling_train.md`` (B <=
128, N <= 100000, C <= 256, X, Y <= 1000, Z <= 10, B*Y*X*C <= 1e8, B*N*C <= 1e8, backward alike),
which nothing in DrivingSDK checks and which the port promises to respect: a call over them raises
``LimitViolation``.

Fused pooling (``bev_pool_v3``, depth x feature without their product; the with-depth branch,
the only one the port calls):

- ``mx_driving/csrc/BEVPoolV3.cpp`` and ``BEVPoolV3Backward.cpp`` (host code): feat and ranks_bev
  must be NPU tensors; C = feat.size(4) must be a multiple of 8 ("The channel of feature must be
  multiple of 8."); the output is ``zeros({b, d, h, w, c}, feat.options())`` (feat's dtype), the
  gradients ``zeros_like`` depth and feat; no dtype conversion, no size check.
- ``kernels/op_host/bev_pool_v3.cpp`` (OpDefs BEVPoolV3 and BEVPoolV3Grad, and the tiling):
  depth, feat, out, grad_out and both gradients float32 only, the three ranks int32 only; the
  tiling takes min(1024, number of ranks) ranks per task and fails on zero ranks.
- ``kernels/op_kernel/bev_pool_v3.cpp`` / ``bev_pool_v3_grad.cpp``: rank i adds
  depth.flat[ranks_depth[i]] * feat.rows[ranks_feat[i]] to out.rows[ranks_bev[i]] (rows of C, an
  fp32 atomic add), and backward adds grad_out.rows[ranks_bev[i]] * depth to grad_feat's row and
  <grad_out row, feat row> to grad_depth. Row offsets are rank * C computed in int32 (``Muls`` on
  the int32 rank buffers), so a rank * C beyond int32 or beyond its tensor reads or writes out of
  bounds: the double refuses such calls.

and enforces the limits DrivingSDK documents for it (``docs/api/context/bev_pool_v3.md``: C a
multiple of 8, B*D*H*W*C <= 2^31, forward and backward; C <= 360 from the docs of later
releases, whose rewritten backward needs it) with ``LimitViolation``.

NPU placement is emulated by a device tag: ``to_npu(t)`` returns an ``NpuTensor``, torch
operations on NpuTensors return NpuTensors, ``.cpu()`` returns a plain tensor, and mixing an
NpuTensor with a plain tensor of more than one element raises as torch does for two devices.
Gradients are made by autograd's C++ engine, which drops the tag; the backward's placement check
therefore covers pos_memo (saved by the forward) and not grad_out.

    mx = install(monkeypatch)            # layout "v7": mx_driving.npu_voxel_pooling_train and
                                         # mx_driving.bev_pool_v3 (and both in mx_driving.point)
    mx = install(monkeypatch, "v6")      # branch_v6.0.0: only mx_driving.point.npu_voxel_pooling_train
    mx.calls                             # [("forward" | "backward", B, N, C), ...,
                                         #  ("bev_pool_v3" | "bev_pool_v3_backward", B, D, H, W, C,
                                         #   number of ranks), ...]
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Callable, List, Tuple

import pytest
import torch

from tests.conftest import require_source

WRAPPER = "mx_driving/ops/voxel_pooling_train.py"
FUSED_WRAPPER = "mx_driving/ops/bev_pool_v3.py"
DOCUMENTED_LIMITS = dict(batch=128, points=100_000, channels=256, grid_xy=1000, grid_z=10,
                         elements=100_000_000)
FUSED_LIMITS = dict(channel_multiple=8, channels=360, elements=2 ** 31)
# Ranks per task of the with-depth tiling (kernels/op_host/bev_pool_v3.cpp, RANK_NUM_PER_TASK)
FUSED_RANKS_PER_TASK = 1024
INT32_MAX = 2 ** 31 - 1


class LimitViolation(AssertionError):
    """A call outside the op's documented limits (which the op itself does not check)."""


class NpuTensor(torch.Tensor):
    """A CPU tensor tagged as living on the NPU."""

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        tagged, plain = _tensors(args, kwargs)
        if tagged and plain:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two "
                f"devices, npu:0 and cpu! ({getattr(func, '__name__', func)})")
        return super().__torch_function__(func, types_, args, kwargs)


def _tensors(args, kwargs) -> Tuple[int, int]:
    """How many NpuTensors and how many plain tensors of more than one element ``args`` hold
    (a 0-dim CPU tensor mixes with any device in torch)."""
    tagged = plain = 0
    stack = list(args) + list(kwargs.values())
    while stack:
        item = stack.pop()
        if isinstance(item, NpuTensor):
            tagged += 1
        elif isinstance(item, torch.Tensor):
            plain += item.dim() > 0 and item.numel() > 1
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return tagged, plain


def to_npu(tensor: torch.Tensor) -> NpuTensor:
    """``tensor.npu()`` of the double: the same values, tagged as on the NPU."""
    return tensor.detach().clone().as_subclass(NpuTensor).requires_grad_(tensor.requires_grad)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(torch.Tensor)


def _check_npu(tensor: torch.Tensor, name: str) -> None:
    # TORCH_CHECK_NPU (mx_driving/csrc/OpApiCommon.h)
    if not isinstance(tensor, NpuTensor):
        raise RuntimeError(f"{name} must be an NPU tensor, but got a tensor on cpu")


def _check_dim(tensor: torch.Tensor, dims: int, name: str) -> None:
    if tensor.dim() != dims:
        raise RuntimeError(f"{name}.dim() must be {dims}, but got: {tensor.dim()}")


def _check_opdef(op: str, **tensors) -> None:
    """The OpDef's DataType lists; aclnn refuses any other dtype before the kernel runs."""
    allowed = {"geom": torch.int32, "pos_memo": torch.int32, "input_features": torch.float32,
               "output_features": torch.float32, "grad_out": torch.float32,
               "grad_features": torch.float32,
               # BEVPoolV3 / BEVPoolV3Grad
               "depth": torch.float32, "feat": torch.float32, "out": torch.float32,
               "grad_depth": torch.float32, "grad_feat": torch.float32,
               "ranks_depth": torch.int32, "ranks_feat": torch.int32, "ranks_bev": torch.int32}
    for name, tensor in tensors.items():
        if tensor.dtype != allowed[name]:
            raise RuntimeError(
                f"{op}: {name} has dtype {tensor.dtype}, which the OpDef does not list "
                f"(DataType {{{allowed[name]}}} only); aclnn GetWorkspaceSize failed")


def _check_limits(direction: str, batch: int, points: int, channels: int, grid_x: int,
                  grid_y: int, grid_z: int) -> None:
    lim = DOCUMENTED_LIMITS
    problems = []
    if batch > lim["batch"]:
        problems.append(f"B={batch} > {lim['batch']}")
    if points > lim["points"]:
        problems.append(f"N={points} > {lim['points']}")
    if channels > lim["channels"]:
        problems.append(f"C={channels} > {lim['channels']}")
    if grid_x > lim["grid_xy"] or grid_y > lim["grid_xy"]:
        problems.append(f"X, Y = {grid_x}, {grid_y} > {lim['grid_xy']}")
    if grid_z > lim["grid_z"]:
        problems.append(f"Z={grid_z} > {lim['grid_z']}")
    if batch * grid_y * grid_x * channels > lim["elements"]:
        problems.append(f"B*Y*X*C={batch * grid_y * grid_x * channels} > 1e8")
    if batch * points * channels > lim["elements"]:
        problems.append(f"B*N*C={batch * points * channels} > 1e8")
    if problems:
        raise LimitViolation(f"npu_voxel_pooling_train {direction}: " + "; ".join(problems))


class CompiledOps(types.ModuleType):
    """``mx_driving._C``: the two functions the wrapper calls, and a record of the calls."""

    def __init__(self) -> None:
        super().__init__("mx_driving._C")
        self.calls: List[Tuple[str, int, int, int]] = []

    def voxel_pooling_train(self, input_features, geom, output_features, pos_memo, batch_size,
                            num_points, num_channels, num_voxel_x, num_voxel_y, num_voxel_z):
        _check_npu(input_features, "inputFeatures")
        _check_npu(geom, "geom")
        _check_dim(input_features, 3, "inputFeatures")
        _check_dim(geom, 3, "geom")
        origin_dtype = input_features.dtype
        features = input_features
        if origin_dtype == torch.float16:
            features = input_features.to(torch.float32)
            output_features = output_features.to(torch.float32)
        _check_opdef("aclnnVoxelPoolingTrain", geom=geom, input_features=features,
                     output_features=output_features, pos_memo=pos_memo)
        b, n, c = batch_size, num_points, num_channels
        x_cells, y_cells, z_cells = num_voxel_x, num_voxel_y, num_voxel_z
        if (geom.numel() != b * n * 3 or features.numel() != b * n * c
                or output_features.numel() != b * y_cells * x_cells * c
                or pos_memo.numel() != b * n * 3):
            raise RuntimeError(
                f"aclnnVoxelPoolingTrain: attributes B={b} N={n} C={c} X={x_cells} Y={y_cells} "
                f"disagree with the tensors (geom {tuple(geom.shape)}, features "
                f"{tuple(features.shape)}, output {tuple(output_features.shape)}): the kernel "
                f"would read or write out of bounds")
        _check_limits("forward", b, n, c, x_cells, y_cells, z_cells)
        self.calls.append(("forward", b, n, c))
        with torch._C.DisableTorchFunctionSubclass():
            cells = _plain(geom).reshape(-1, 3).long()
            inside = ((cells[:, 0] >= 0) & (cells[:, 0] < x_cells) & (cells[:, 1] >= 0)
                      & (cells[:, 1] < y_cells) & (cells[:, 2] >= 0) & (cells[:, 2] < z_cells))
            point = torch.arange(b * n)[inside]
            batch_idx, y_idx, x_idx = point // n, cells[inside, 1], cells[inside, 0]
            _plain(pos_memo).view(-1, 3)[point] = torch.stack(
                (batch_idx, y_idx, x_idx), dim=1).to(torch.int32)
            grid = _plain(output_features).view(b, y_cells, x_cells, c)
            # fp32 atomic adds on the device; here fp32 adds in index order
            grid.index_put_((batch_idx, y_idx, x_idx),
                            _plain(features).reshape(-1, c)[inside], accumulate=True)
        if origin_dtype == torch.float16:
            output_features = output_features.to(torch.float16)
        return pos_memo, output_features

    def voxel_pool_train_backward(self, grad_out, pos_memo, batch_size, num_points, num_channels,
                                  h, w):
        _check_npu(pos_memo, "posMemo")
        _check_dim(grad_out, 4, "gradOut")
        _check_dim(pos_memo, 3, "posMemo")
        origin_dtype = grad_out.dtype
        grad = grad_out.permute(0, 2, 3, 1).contiguous()
        out = torch.zeros(batch_size, num_points, num_channels, dtype=grad_out.dtype)
        if origin_dtype == torch.float16:
            out = out.to(torch.float32)
            grad = grad.to(torch.float32)
        _check_opdef("aclnnVoxelPoolingTrainGrad", grad_out=grad, pos_memo=pos_memo,
                     grad_features=out)
        _check_limits("backward", batch_size, num_points, num_channels, w, h, 1)
        self.calls.append(("backward", batch_size, num_points, num_channels))
        with torch._C.DisableTorchFunctionSubclass():
            memo = _plain(pos_memo).reshape(-1, 3).long()
            kept = memo[:, 0] != -1
            rows = _plain(grad)[memo[kept, 0], memo[kept, 1], memo[kept, 2]]
            out.view(-1, num_channels)[kept] = rows
        if origin_dtype == torch.float16:
            out = out.to(torch.float16)
        return out.as_subclass(NpuTensor)


    # ---------------------------------------------------------------- bev_pool_v3

    def npu_bev_pool_v3(self, depth, feat, ranks_depth, ranks_feat, ranks_bev, b, d, h, w):
        _check_npu(feat, "feat")
        _check_npu(ranks_bev, "ranks_bev")
        _require_depth(depth)
        if feat.dim() <= 4:
            raise RuntimeError(f"Dimension out of range (expected to be in range of "
                               f"[{-feat.dim()}, {feat.dim() - 1}], but got 4)")
        channels = feat.size(4)
        if channels % FUSED_LIMITS["channel_multiple"]:
            raise RuntimeError("The channel of feature must be multiple of 8.")
        # at::zeros({b, d, h, w, c}, feat.options()): allocated after the checks here, so that
        # a call over the limits fails without allocating it
        out = torch.empty(0, dtype=feat.dtype)
        _check_opdef("aclnnBEVPoolV3", depth=depth, feat=feat, ranks_depth=ranks_depth,
                     ranks_feat=ranks_feat, ranks_bev=ranks_bev, out=out)
        ranks = _check_fused_call("bev_pool_v3 forward", depth, feat, ranks_depth, ranks_feat,
                                  ranks_bev, channels, b * d * h * w * channels)
        out = torch.zeros(b, d, h, w, channels, dtype=feat.dtype)
        self.calls.append(("bev_pool_v3", b, d, h, w, channels, ranks))
        with torch._C.DisableTorchFunctionSubclass():
            rows = _plain(feat).reshape(-1, channels)[_plain(ranks_feat).long()]
            weights = _plain(depth).reshape(-1)[_plain(ranks_depth).long()]
            # fp32 atomic adds on the device; here fp32 adds in rank order
            out.view(-1, channels).index_add_(0, _plain(ranks_bev).long(),
                                              weights.unsqueeze(1) * rows)
        return out.as_subclass(NpuTensor)

    def npu_bev_pool_v3_backward(self, grad_out, depth, feat, ranks_depth, ranks_feat,
                                 ranks_bev):
        _check_npu(feat, "feat")
        _check_npu(ranks_bev, "ranks_bev")
        _require_depth(depth)
        grad_depth = torch.zeros(depth.shape, dtype=depth.dtype)
        grad_feat = torch.zeros(feat.shape, dtype=feat.dtype)
        _check_opdef("aclnnBEVPoolV3Grad", grad_out=grad_out, depth=depth, feat=feat,
                     ranks_depth=ranks_depth, ranks_feat=ranks_feat, ranks_bev=ranks_bev,
                     grad_depth=grad_depth, grad_feat=grad_feat)
        channels = feat.size(4)  # the tiling reads C from feat's shape
        if channels % FUSED_LIMITS["channel_multiple"]:  # documented, not checked by the host
            raise LimitViolation(f"bev_pool_v3 backward: C={channels} is not a multiple of 8")
        ranks = _check_fused_call("bev_pool_v3 backward", depth, feat, ranks_depth, ranks_feat,
                                  ranks_bev, channels, grad_out.numel())
        self.calls.append(("bev_pool_v3_backward", *grad_out.shape[:4], channels, ranks))
        with torch._C.DisableTorchFunctionSubclass():
            rank_depth = _plain(ranks_depth).long()
            rank_feat = _plain(ranks_feat).long()
            cells = _plain(grad_out).reshape(-1, channels)[_plain(ranks_bev).long()]
            weights = _plain(depth).reshape(-1)[rank_depth]
            rows = _plain(feat).reshape(-1, channels)[rank_feat]
            grad_feat.view(-1, channels).index_add_(0, rank_feat, cells * weights.unsqueeze(1))
            grad_depth.view(-1).index_add_(0, rank_depth, (cells * rows).sum(1))
        return grad_depth.as_subclass(NpuTensor), grad_feat.as_subclass(NpuTensor)


def _require_depth(depth) -> None:
    if depth is None:
        raise NotImplementedError("the double emulates bev_pool_v3 with depth only (the branch "
                                  "the port calls)")


def _check_fused_call(op: str, depth, feat, ranks_depth, ranks_feat, ranks_bev, channels: int,
                      out_elements: int) -> int:
    """The tiling's refusal of zero ranks, the documented limits, and the kernel's int32 row
    offsets and bounds; returns the number of ranks."""
    count = ranks_bev.shape[0] if ranks_bev.dim() == 1 else -1
    if count < 0 or any(r.dim() != 1 or r.shape[0] != count for r in (ranks_depth, ranks_feat)):
        raise RuntimeError(f"{op}: ranks must be three 1-D tensors of one length, got "
                           f"{[tuple(r.shape) for r in (ranks_depth, ranks_feat, ranks_bev)]}")
    if min(FUSED_RANKS_PER_TASK, count) == 0:
        raise RuntimeError(f"{op}: tiling failed (0 ranks: avgRankNum 0, GRAPH_FAILED)")
    problems = []
    if channels > FUSED_LIMITS["channels"]:
        problems.append(f"C={channels} > {FUSED_LIMITS['channels']}")
    if out_elements > FUSED_LIMITS["elements"]:
        problems.append(f"B*D*H*W*C={out_elements} > {FUSED_LIMITS['elements']}")
    if problems:
        raise LimitViolation(f"{op}: " + "; ".join(problems))
    with torch._C.DisableTorchFunctionSubclass():
        bounds = (("ranks_depth", ranks_depth, depth.numel(), 1),
                  ("ranks_feat", ranks_feat, feat.numel() // channels, channels),
                  ("ranks_bev", ranks_bev, out_elements // channels, channels))
        for name, ranks, size, scale in bounds:
            low, high = int(_plain(ranks).min()), int(_plain(ranks).max())
            if low < 0 or high >= size or high * scale > INT32_MAX:
                raise RuntimeError(f"{op}: {name} spans [{low}, {high}] for {size} rows of "
                                   f"{scale} (int32 offsets): the kernel would read or write "
                                   f"out of bounds")
    return count


def load_wrapper(compiled: CompiledOps, path: str = WRAPPER) -> types.ModuleType:
    """DrivingSDK's own wrapper module ``path``, executed against ``compiled`` as
    ``mx_driving._C``."""
    source = require_source("drivingsdk") / path
    if not source.is_file():
        pytest.fail(f"{source} is missing from the pinned DrivingSDK checkout")
    name = "mx_driving." + path[len("mx_driving/"):-len(".py")].replace("/", ".")
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(monkeypatch, layout: str = "v7") -> types.ModuleType:
    """Put an ``mx_driving`` package into ``sys.modules`` (undone by ``monkeypatch``).

    layout "v7": the ops at ``mx_driving.npu_voxel_pooling_train`` and ``mx_driving.bev_pool_v3``
    and in the deprecated alias ``mx_driving.point`` (branch_v7.0.RC1); "v6": only
    ``mx_driving.point.npu_voxel_pooling_train`` (branch_v6.0.0 has no bev_pool_v3); "none": a
    DrivingSDK with neither. The package's ``calls`` lists every kernel call.
    """
    compiled = CompiledOps()
    package = types.ModuleType("mx_driving")
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("mx_driving", None, is_package=True)
    package._C = compiled
    package.calls = compiled.calls
    ops = types.ModuleType("mx_driving.ops")
    ops.__path__ = []
    for name, module in (("mx_driving", package), ("mx_driving._C", compiled),
                         ("mx_driving.ops", ops)):
        monkeypatch.setitem(sys.modules, name, module)
    wrapper = load_wrapper(compiled)
    monkeypatch.setitem(sys.modules, "mx_driving.ops.voxel_pooling_train", wrapper)
    fused = load_wrapper(compiled, FUSED_WRAPPER)
    monkeypatch.setitem(sys.modules, "mx_driving.ops.bev_pool_v3", fused)
    op: Callable = wrapper.npu_voxel_pooling_train
    if layout == "v7":
        package.npu_voxel_pooling_train = op
        package.bev_pool_v3 = fused.bev_pool_v3
    if layout in ("v7", "v6"):
        point = types.ModuleType("mx_driving.point")
        point.npu_voxel_pooling_train = op
        if layout == "v7":
            point.bev_pool_v3 = fused.bev_pool_v3
        package.point = point
        monkeypatch.setitem(sys.modules, "mx_driving.point", point)
    elif layout != "none":
        raise ValueError(f"layout {layout!r}: use v7, v6 or none")
    return package
