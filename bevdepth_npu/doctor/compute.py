"""On-device checks of ``bevdepth-npu doctor``: the port's numerics on this device against a CPU
reference, and one training step of the smoke model.

Each check moves its inputs with a ``Target`` (the selected device, or in the contract tests the
tagged CPU double of an NPU), runs the code training runs, and compares with float64 on the host.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import tempfile
import time
from typing import Callable, Dict, Tuple

import torch

from bevdepth_npu.doctor.report import Fail, Skip
from bevdepth_npu.testing import relative_error

# Relative error allowed against the float64 reference (max |a - e| / max |e|): float32 sums;
# fp16 and bf16 results accumulate in fp32 and are rounded once (2^-11 and 2^-8).
POOLING_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# More points than one NPU kernel call may take (N <= 100,000): the chunked path runs.
POOLING_SHAPE = dict(batch=2, points=120_000, channels=80, grid=(128, 128, 1))
# Fused pooling: the R50 recipe's 6 cameras, 80 channels and BEV grid at a quarter of its depth
# bins and image size (a float64 reference of the whole product stays small); relative error
# allowed for the forward and both gradients against float64 (float32 sums).
FUSED_SHAPE = dict(batch=2, cams=6, bins=28, height=8, width=22, channels=80,
                   grid=(128, 128, 1))
FUSED_TOLERANCE = 1e-5


@dataclasses.dataclass
class Target:
    """Where the checks run: ``kind`` (npu, cuda, cpu), the host-to-device move, a barrier."""
    kind: str
    to: Callable[[torch.Tensor], torch.Tensor]
    synchronize: Callable[[], None] = lambda: None

    @classmethod
    def selected(cls) -> "Target":
        from bevdepth.utils import device
        kind = device.device_type()
        where = device.current()
        sync = getattr(torch, kind).synchronize if kind != device.CPU else (lambda: None)
        return cls(kind, lambda t: t.to(where), sync)


def pooling_inputs(dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cells over the grid and a margin outside it (dropped), features in ``dtype``."""
    shape = POOLING_SHAPE
    gen = torch.Generator().manual_seed(seed)
    grid_x, grid_y, _ = shape["grid"]
    geom = torch.stack([
        torch.randint(-4, grid_x + 4, (shape["batch"], shape["points"]), generator=gen),
        torch.randint(-4, grid_y + 4, (shape["batch"], shape["points"]), generator=gen),
        torch.randint(-1, 2, (shape["batch"], shape["points"]), generator=gen),
    ], dim=-1).to(torch.int32)
    features = torch.randn(shape["batch"], shape["points"], shape["channels"],
                           generator=gen).to(dtype)
    return geom, features


def check_pooling(target: Target, dtype: torch.dtype) -> str:
    """Training pooling forward and backward on the device, against float64 on the host."""
    from bevdepth.ops.voxel_pooling import voxel_pooling
    from bevdepth_npu.testing import gather_reference, pool_reference
    grid = POOLING_SHAPE["grid"]
    geom, features = pooling_inputs(dtype)
    expected = pool_reference(geom, features.double(), grid)
    device_features = target.to(features).requires_grad_(True)
    t0 = time.monotonic()
    pooled = voxel_pooling(target.to(geom), device_features, grid,
                           backend=target.kind)
    if pooled.dtype != dtype:
        raise Fail(f"pooling returned {pooled.dtype} for {dtype} features",
                   "the pooling entry point must cast back to the features' dtype")
    grad_out = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    pooled.backward(target.to(grad_out))
    target.synchronize()
    seconds = time.monotonic() - t0
    forward_error = relative_error(pooled.detach().cpu(), expected)
    if not math.isfinite(forward_error) or forward_error > POOLING_TOLERANCE[dtype]:
        raise Fail(f"forward differs from the float64 reference by {forward_error:.2e} "
                   f"(allowed {POOLING_TOLERANCE[dtype]:.0e})",
                   "report it with this output; train in fp32 (--precision 32) meanwhile")
    grad = device_features.grad.cpu()
    if not torch.equal(grad, gather_reference(geom, grad_out, grid)):
        raise Fail("backward is not the gather of the output gradient",
                   "report it with this output")
    b, n, c = features.shape
    return (f"B={b} N={n:,} C={c}: forward error {forward_error:.1e}, backward exact, "
            f"{seconds * 1e3:.0f} ms")


def check_fused_pooling(target: Target) -> str:
    """``--pooling fused`` on the device (mx_driving.bev_pool_v3 on npu): forward and the
    gradients of depth and context against the float64 product path on the host."""
    from bevdepth.ops.voxel_pooling import voxel_pooling_fused
    from bevdepth_npu.testing import lss_case, product_reference
    shape = FUSED_SHAPE
    grid = shape["grid"]
    # cells over the grid and a margin outside it (dropped), softmaxed depth, context
    geom, depth, context = lss_case(shape["batch"], shape["cams"], shape["bins"],
                                    shape["height"], shape["width"], shape["channels"], seed=0,
                                    grid=grid, margin=4)
    grad_out = torch.randn(shape["batch"], shape["channels"], grid[1], grid[0],
                           generator=torch.Generator().manual_seed(1))
    expected, *want = product_reference(geom, depth, context, grad_out, grid)
    device_depth = target.to(depth).requires_grad_(True)
    device_context = target.to(context).requires_grad_(True)
    t0 = time.monotonic()
    pooled = voxel_pooling_fused(target.to(geom), device_depth, device_context, grid,
                                 backend=target.kind)
    pooled.backward(target.to(grad_out))
    target.synchronize()
    seconds = time.monotonic() - t0
    errors = dict(forward=relative_error(pooled.detach().cpu(), expected.detach()),
                  depth_grad=relative_error(device_depth.grad.cpu(), want[0]),
                  context_grad=relative_error(device_context.grad.cpu(), want[1]))
    bad = {k: v for k, v in errors.items() if not math.isfinite(v) or v > FUSED_TOLERANCE}
    if bad:
        raise Fail(", ".join(f"{k} differs from the float64 product by {v:.2e}"
                             for k, v in bad.items()) + f" (allowed {FUSED_TOLERANCE:.0e})",
                   "report it with this output; train with --pooling product meanwhile")
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    from bevdepth.utils import device
    where = f" ({npu_pooling.fused_op()[1]})" if target.kind == device.NPU else ""
    return (f"B={shape['batch']} cams={shape['cams']} D={shape['bins']} "
            f"{shape['height']}x{shape['width']} C={shape['channels']}{where}: forward "
            f"{errors['forward']:.1e}, depth grad {errors['depth_grad']:.1e}, context grad "
            f"{errors['context_grad']:.1e}, {seconds * 1e3:.0f} ms")


def smoke_backbone():
    """The smoke experiment's LSS backbone (cheap to build, the R50 code path)."""
    from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
    return BaseLSSFPN(**copy.deepcopy(smoke.backbone_conf))


def check_geometry(target: Target) -> str:
    """get_geometry under the device's mixed precision equals float64 on the host: it must stay
    fp32 (in fp16, pixel x times depth overflows)."""
    from bevdepth.utils import device
    from bevdepth_npu.testing import camera_mats
    backbone = smoke_backbone()
    mats = camera_mats(2, 1, backbone.final_dim)
    args = [mats["sensor2ego_mats"][:, 0], mats["intrin_mats"][:, 0], mats["ida_mats"][:, 0],
            mats["bda_mat"]]
    expected = copy.deepcopy(backbone).double().get_geometry(*[a.double() for a in args])
    on_device = backbone.to(target.to(torch.zeros(1)).device)
    amp_dtype = torch.bfloat16 if target.kind == "cpu" else torch.float16
    with device.autocast(dtype=amp_dtype):
        points = on_device.get_geometry(*[target.to(a) for a in args])
    target.synchronize()
    if points.dtype != torch.float32:
        raise Fail(f"get_geometry returned {points.dtype} under {amp_dtype} autocast",
                   "it must run in fp32; report it")
    error = relative_error(points.cpu(), expected)
    if error > 1e-5:
        raise Fail(f"get_geometry under {amp_dtype} autocast differs from float64 by "
                   f"{error:.1e} (allowed 1e-5)", "report it; train in fp32 meanwhile")
    return f"{tuple(points.shape)} under {str(amp_dtype).split('.')[-1]} autocast: fp32, " \
           f"error {error:.1e}"


def check_optimizer(target: Target) -> str:
    """The device's AdamW (NpuFusedAdamW on npu) takes the steps torch's AdamW takes."""
    from bevdepth.utils import device
    gen = torch.Generator().manual_seed(2)
    shapes = [(64, 32), (32,), (3, 3, 8, 8)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    lr, weight_decay = 1e-3, 1e-2

    def run(params, optimizer, move):
        for step in grads:
            for p, g in zip(params, step):
                p.grad = move(g)
            optimizer.step()
        return [p.detach().cpu() for p in params]

    device_params = [torch.nn.Parameter(target.to(p.clone())) for p in start]
    device_optimizer = device.adamw(device_params, lr=lr, weight_decay=weight_decay)
    got = run(device_params, device_optimizer, target.to)
    host_params = [torch.nn.Parameter(p.clone()) for p in start]
    want = run(host_params, torch.optim.AdamW(host_params, lr=lr, weight_decay=weight_decay),
               lambda g: g)
    # the difference, relative to the size of the updates (float32 both)
    error = max((a - w).abs().max().item() / (w - s).abs().max().item()
                for a, w, s in zip(got, want, start))
    name = type(device_optimizer).__name__
    if error > 1e-3:
        raise Fail(f"{name}: 3 steps differ from torch AdamW by {error:.1e} of the update",
                   "report it; the optimizer is part of the training recipe")
    return f"{name}: 3 steps equal torch AdamW within {error:.1e} of the update"


def check_grad_scaler(target: Target) -> str:
    """fp16 loss scaling as the Lightning patch sets it up: a step with an inf gradient is
    skipped and the scale halves; a finite one is taken."""
    if target.kind == "cpu":
        raise Skip("precision 16 trains as 32 on CPU (Lightning 1.6.5 has no CPU fp16 AMP)")
    from pytorch_lightning.utilities.npu import grad_scaler
    scaler = grad_scaler(target.kind)
    param = torch.nn.Parameter(target.to(torch.ones(4)))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scale = scaler.get_scale()
    (param.sum() * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    if not torch.equal(param.detach().cpu(), torch.ones(4)) or scaler.get_scale() >= scale:
        raise Fail(f"{type(scaler).__name__} took a step with an inf gradient",
                   "check the torch_npu / torch installation")
    optimizer.zero_grad()
    scaler.scale(param.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    if torch.equal(param.detach().cpu(), torch.ones(4)):
        raise Fail(f"{type(scaler).__name__} skipped a finite step", "")
    return f"{type(scaler).__module__}.{type(scaler).__name__}: inf step skipped, finite taken"


def check_smoke_model(target: Target) -> str:
    """One forward and backward of the smoke experiment's model, as a training step computes
    them (fp16 autocast on npu and cuda, fp32 on CPU): finite losses and gradients."""
    from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
    from bevdepth.utils import device
    from bevdepth_npu.testing import camera_mats
    root = tempfile.mkdtemp(prefix="bevdepth-npu-doctor-")
    try:
        module = smoke.BEVDepthLightningModel(default_root_dir=root, data_root=root,
                                              batch_size_per_device=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    where = target.to(torch.zeros(1)).device
    module = module.to(where).train()
    height, width = smoke.final_dim
    sweeps = len(module.key_idxes) + 1
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(1, sweeps, 6, 3, height, width, generator=gen)
    mats = camera_mats(1, sweeps, smoke.final_dim)
    depth = torch.zeros(1, 6, height, width)
    hit = torch.rand(1, 6, height, width, generator=gen) < 0.05
    depth[hit] = 2.0 + torch.rand(int(hit.sum()), generator=gen) * 50.0
    boxes = torch.zeros(8, 9)
    boxes[:, :2] = (torch.rand(8, 2, generator=gen) - 0.5) * 80.0
    boxes[:, 3:6] = 1.0 + torch.rand(8, 3, generator=gen) * 3.0
    labels = torch.randint(0, 10, (8,), generator=gen)
    t0 = time.monotonic()
    amp = target.kind != "cpu"  # precision 16 on accelerators; CPU training runs in fp32
    with device.autocast(enabled=amp, dtype=torch.float16 if amp else None):
        preds, depth_preds = module(target.to(imgs), {k: target.to(v) for k, v in mats.items()})
        targets = module.model.get_targets([boxes], [labels], target_device=where)
        detection_loss = module.model.loss(targets, preds)
    depth_loss = module.get_depth_loss(target.to(depth), depth_preds)
    loss = detection_loss + depth_loss
    loss.backward()
    target.synchronize()
    seconds = time.monotonic() - t0
    finite({"loss": loss.detach()})
    finite({name: p.grad for name, p in module.named_parameters() if p.grad is not None})
    with_grad = sum(p.grad is not None for p in module.parameters())
    return (f"loss {loss.item():.1f} (detection {detection_loss.item():.1f}, depth "
            f"{depth_loss.item():.2f}), {with_grad} gradients finite, {seconds:.1f} s")


def finite(tensors: Dict[str, torch.Tensor]) -> None:
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise Fail(f"non-finite values in {', '.join(bad[:5])}",
                   "report it with this output; try --precision 32")
