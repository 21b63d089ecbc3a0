"""CPU stand-ins of DrivingSDK's two pooling ops, registered with ``torch.library`` under the
names of their compiled parts in ``mx_driving._C`` so that a recording lists each call as one op,
as the NPU run dispatches it (``mx_driving::voxel_pooling_train`` and its backward, the product
path; ``mx_driving::npu_bev_pool_v3`` and its backward, ``--pooling fused``).

Their arithmetic is plain torch (the port's contract tests check the real wrappers' arithmetic
against DrivingSDK's sources; here only the calls matter); their arguments are the ones the port's
``bevdepth/ops/voxel_pooling/npu.py`` hands DrivingSDK's Python wrappers, ``op(geom, features,
grid)`` and ``op(depth, feat, ranks_depth, ranks_feat, ranks_bev, [b, 1, Y, X, C])``.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

NAMESPACE = "mx_driving"
_library = None


def _pool(geom: torch.Tensor, features: torch.Tensor, grid: List[int]) -> torch.Tensor:
    grid_x, grid_y, grid_z = grid
    batch, points, channels = features.shape
    g = geom.long()
    keep = ((g >= 0) & (g < torch.tensor([grid_x, grid_y, grid_z]))).all(-1)
    cell = torch.arange(batch).view(batch, 1) * (grid_y * grid_x) + g[..., 1] * grid_x + g[..., 0]
    cell = torch.where(keep, cell, torch.full_like(cell, batch * grid_y * grid_x))
    out = features.new_zeros(batch * grid_y * grid_x + 1, channels)
    out.index_add_(0, cell.view(-1), features.reshape(-1, channels))
    return out[:-1].view(batch, grid_y, grid_x, channels).permute(0, 3, 1, 2).contiguous()


def _pool_backward(grad_out: torch.Tensor, geom: torch.Tensor, grid: List[int]) -> torch.Tensor:
    grid_x, grid_y, grid_z = grid
    batch, points, _ = geom.shape
    channels = grad_out.shape[1]
    g = geom.long()
    keep = ((g >= 0) & (g < torch.tensor([grid_x, grid_y, grid_z]))).all(-1)
    cell = torch.arange(batch).view(batch, 1) * (grid_y * grid_x) + g[..., 1] * grid_x + g[..., 0]
    rows = torch.cat((grad_out.permute(0, 2, 3, 1).reshape(-1, channels),
                      grad_out.new_zeros(1, channels)))
    cell = torch.where(keep, cell, torch.full_like(cell, batch * grid_y * grid_x))
    return rows.index_select(0, cell.view(-1)).view(batch, points, channels)


def _bev_pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape: List[int]):
    b, d, grid_y, grid_x, channels = shape
    rows = feat.reshape(-1, channels).index_select(0, ranks_feat.long())
    values = depth.reshape(-1).index_select(0, ranks_depth.long()).unsqueeze(1) * rows
    out = feat.new_zeros(b * d * grid_y * grid_x, channels).index_add_(0, ranks_bev.long(), values)
    return out.view(b, d, grid_y, grid_x, channels).permute(0, 4, 1, 2, 3).contiguous()


def _bev_pool_backward(grad_out, depth, feat, ranks_depth, ranks_feat,
                       ranks_bev) -> Tuple[torch.Tensor, torch.Tensor]:
    channels = feat.shape[-1]
    grad_rows = grad_out.permute(0, 2, 3, 4, 1).reshape(-1, channels).index_select(
        0, ranks_bev.long())
    feat_rows = feat.reshape(-1, channels).index_select(0, ranks_feat.long())
    depth_values = depth.reshape(-1).index_select(0, ranks_depth.long())
    grad_depth = torch.zeros_like(depth).view(-1).index_add_(
        0, ranks_depth.long(), (grad_rows * feat_rows).sum(1)).view_as(depth)
    grad_feat = torch.zeros_like(feat).view(-1, channels).index_add_(
        0, ranks_feat.long(), grad_rows * depth_values.unsqueeze(1)).view_as(feat)
    return grad_depth, grad_feat


def register() -> None:
    """Define the four ops once per process."""
    global _library
    if _library is not None:
        return
    lib = torch.library.Library(NAMESPACE, "DEF")
    lib.define("voxel_pooling_train(Tensor geom, Tensor features, int[] grid) -> Tensor")
    lib.define("voxel_pool_train_backward(Tensor grad_out, Tensor geom, int[] grid) -> Tensor")
    lib.define("npu_bev_pool_v3(Tensor depth, Tensor feat, Tensor ranks_depth, "
               "Tensor ranks_feat, Tensor ranks_bev, int[] shape) -> Tensor")
    lib.define("npu_bev_pool_v3_backward(Tensor grad_out, Tensor depth, Tensor feat, "
               "Tensor ranks_depth, Tensor ranks_feat, Tensor ranks_bev) -> (Tensor, Tensor)")
    lib.impl("voxel_pooling_train", _pool, "CPU")
    lib.impl("voxel_pool_train_backward", _pool_backward, "CPU")
    lib.impl("npu_bev_pool_v3", _bev_pool, "CPU")
    lib.impl("npu_bev_pool_v3_backward", _bev_pool_backward, "CPU")
    _library = lib


class _Pooling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, geom, features, grid):
        ctx.save_for_backward(geom)
        ctx.grid = list(grid)
        return torch.ops.mx_driving.voxel_pooling_train(geom, features, list(grid))

    @staticmethod
    def backward(ctx, grad_out):
        geom, = ctx.saved_tensors
        return None, torch.ops.mx_driving.voxel_pool_train_backward(
            grad_out.contiguous(), geom, ctx.grid), None


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, depth, feat, ranks_depth, ranks_feat, ranks_bev, shape):
        ctx.save_for_backward(depth, feat, ranks_depth, ranks_feat, ranks_bev)
        return torch.ops.mx_driving.npu_bev_pool_v3(depth, feat, ranks_depth, ranks_feat,
                                                    ranks_bev, list(shape))

    @staticmethod
    def backward(ctx, grad_out):
        grad_depth, grad_feat = torch.ops.mx_driving.npu_bev_pool_v3_backward(
            grad_out.contiguous(), *ctx.saved_tensors)
        return grad_depth, grad_feat, None, None, None, None


def pooling_op() -> Tuple[Callable, str]:
    register()
    return _Pooling.apply, "mx_driving.npu_voxel_pooling_train (stand-in)"


def fused_op() -> Tuple[Callable, str]:
    register()
    return _Fused.apply, "mx_driving.bev_pool_v3 (stand-in)"
