"""Benchmark of BaseLSSFPN.get_geometry: upstream, the earlier Ascend approach, and the port.

    python -m bench --only geometry [--quick] [--repeats N]

Three ways to map the 6 x 112 x 16 x 44 frustum of each camera to ego coordinates (R50 recipe,
256x704 input), at 1 and 8 samples, on CPU (and CUDA when torch sees a GPU):
  upstream     upstream's own get_geometry (pristine checkout, its worker): 7-D broadcast matmuls
  ascend-loop  a re-implementation, written for this benchmark, of the approach of the earlier
               Ascend example (DrivingSDK model_examples/BEVDepth): each 4x4 transform applied
               as four broadcast multiply-and-sum passes, one per output row, with bda folded
               into the camera matrix first. It is not that example's code.
  port         the patched tree's get_geometry
Each variant runs in its own worker; rounds interleave the variants. The outputs are compared
with upstream's (max |a - b| / max |b|). Target: upstream / port >= 3 on CPU at every batch.
"""
from __future__ import annotations

import os
import tempfile
import types
from typing import Any, Dict, List

from bench import harness
from bevdepth_npu import envvars

NAME = "geometry"
TITLE = "get_geometry: upstream 7-D matmul, Ascend-style loop, port"

FINAL_DIM = (256, 704)       # R50 recipe input
DOWNSAMPLE_FACTOR = 16       # 16x44 feature map
D_BOUND = [2.0, 58.0, 0.5]   # 112 depth bins
BATCHES = (1, 8)
SEED = 11
TARGET_SPEEDUP = 3.0         # at least 3x faster than upstream's on CPU
REPEATS_FULL, REPEATS_QUICK = 9, 5

VARIANTS = ("upstream", "ascend-loop", "port")


def ascend_style_get_geometry(frustum, sensor2ego_mat, intrin_mat, ida_mat, bda_mat):
    """Re-implementation (for comparison only) of the earlier Ascend example's approach.

    Its point was to avoid the 7-D matmul, which the NPU cannot run: every 4x4 matrix is
    applied to the (D*H*W, 4) points as four broadcast products summed over the last axis,
    one per output row; the bda matrix is multiplied into the camera matrix first.
    frustum (D, H, W, 4); matrices (B, cams, 4, 4) and bda (B, 4, 4) or None.
    Returns (B, cams, D, H, W, 3).
    """
    import torch
    batch, cams = sensor2ego_mat.shape[:2]
    depth, height, width, _ = frustum.shape
    points = frustum.reshape(1, 1, -1, 4)

    def transform(matrix, pts):
        out = pts.new_empty(batch, cams, pts.shape[-2], 4)
        for row in range(4):
            out[..., row] = (matrix[:, :, row].unsqueeze(2) * pts).sum(-1)
        return out

    points = transform(ida_mat.inverse(), points)
    points = torch.cat((points[..., :2] * points[..., 2:3], points[..., 2:]), -1)
    combine = sensor2ego_mat.matmul(intrin_mat.inverse())
    if bda_mat is not None:
        combine = bda_mat.unsqueeze(1).matmul(combine)
    points = transform(combine, points)
    return points.view(batch, cams, depth, height, width, 4)[..., :3]


class GeometryCase:
    """One variant at one batch size and device; ``run`` computes the geometry once."""

    def __init__(self, params: Dict[str, Any]):
        import torch
        from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
        helpers = harness.test_helpers()
        self.variant = params["variant"]
        self.device = params["device"]
        owner = types.SimpleNamespace(final_dim=tuple(params["final_dim"]),
                                      downsample_factor=params["downsample_factor"],
                                      d_bound=params["d_bound"])
        owner.frustum = BaseLSSFPN.create_frustum(owner).to(self.device)
        mats = helpers.camera_mats(params["batch"], 1, tuple(params["final_dim"]),
                                   seed=params["seed"])
        self.args = tuple(mats[k][:, 0].to(self.device) if k != "bda_mat" else
                          mats[k].to(self.device)
                          for k in ("sensor2ego_mats", "intrin_mats", "ida_mats", "bda_mat"))
        if self.variant == "ascend-loop":
            self.fn = lambda *args: ascend_style_get_geometry(owner.frustum, *args)
        else:  # upstream or port: whichever bevdepth this worker imports
            self.fn = lambda *args: BaseLSSFPN.get_geometry(owner, *args)
        self.torch = torch

    def run(self) -> None:
        with self.torch.no_grad():
            self.fn(*self.args)

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def save(self, path: str) -> List[int]:
        with self.torch.no_grad():
            out = self.fn(*self.args).cpu()
        self.torch.save(out, path)
        return list(out.shape)


def make_case(params: Dict[str, Any]) -> GeometryCase:
    return GeometryCase(params)


def _devices() -> List[str]:
    import torch
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(ctx: harness.Context) -> harness.BenchResult:
    import torch
    result = harness.BenchResult(NAME, TITLE)
    repeats = ctx.repeats_for(REPEATS_FULL, REPEATS_QUICK)
    rows: List[List[Any]] = []
    figures: Dict[str, Any] = {}
    scratch = tempfile.mkdtemp(prefix="geometry-", dir=str(ctx.work_dir))
    devices = _devices()
    if "cuda" not in devices:
        result.notes.append("torch sees no CUDA device: CPU rows only")
    upstream = ctx.worker(harness.ROLE_UPSTREAM_CPU, "geometry-upstream")
    patched = ctx.worker(harness.ROLE_PATCHED, "geometry-patched",
                         env={envvars.DEVICE: "cpu"})
    try:
        for device in devices:
            for batch in BATCHES:
                ctx.log(f"  {device}, batch {batch}")
                workers = {"upstream": upstream, "ascend-loop": patched, "port": patched}
                runners = {}
                for variant in VARIANTS:
                    key = f"{device}-b{batch}-{variant}"
                    workers[variant].setup(key, "bench.geometry:make_case", dict(
                        variant=variant, device=device, batch=batch, final_dim=FINAL_DIM,
                        downsample_factor=DOWNSAMPLE_FACTOR, d_bound=D_BOUND, seed=SEED))
                    runners[variant] = workers[variant].runner(key)
                samples = harness.interleave(runners, repeats, ctx.warmup)
                outputs = {}
                for variant in VARIANTS:
                    path = os.path.join(scratch, f"{device}-b{batch}-{variant}.pt")
                    workers[variant].call(f"{device}-b{batch}-{variant}", "save", path=path)
                    outputs[variant] = torch.load(path)
                    os.unlink(path)
                reference = outputs["upstream"].double()
                scale = reference.abs().max().item()
                port_s = harness.median_of(samples, "port")
                for variant in VARIANTS:
                    stats = harness.Stats.of(samples[variant]["time_s"])
                    diff = (outputs[variant].double() - reference).abs().max().item() / scale
                    rows.append([device, batch, variant, stats.median * 1e3, stats.minimum * 1e3,
                                 stats.maximum * 1e3, harness.safe_ratio(stats.median, port_s),
                                 diff])
                    figures[f"{device}.b{batch}.{variant}"] = dict(
                        time_s=stats.to_json(), max_rel_diff_vs_upstream=diff,
                        peak_rss_increase_bytes=harness.median_of(
                            samples, variant, "peak_rss_increase_bytes"))
                    workers[variant].drop(f"{device}-b{batch}-{variant}")
                up_s = harness.median_of(samples, "upstream")
                loop_s = harness.median_of(samples, "ascend-loop")
                on_cpu = device == "cpu"
                result.ratios.append(harness.Ratio(
                    f"geometry.{device}.b{batch}.upstream/port",
                    harness.safe_ratio(up_s, port_s),
                    f"port's speed-up over upstream, {device}, batch {batch}",
                    (">=", TARGET_SPEEDUP) if on_cpu else None))
                result.ratios.append(harness.Ratio(
                    f"geometry.{device}.b{batch}.ascend-loop/port",
                    harness.safe_ratio(loop_s, port_s),
                    f"port's speed-up over the Ascend-style loop, {device}, batch {batch}"))
    finally:
        upstream.close()
        patched.close()
        try:
            os.rmdir(scratch)
        except OSError:
            pass
    result.tables.append(harness.Table(
        f"get_geometry, R50 shapes (6 cams x 112 x 16 x 44), median of {repeats} rounds "
        "(ascend-loop: this benchmark's re-implementation of that example's approach)",
        ["device", "batch", "variant", "median ms", "min ms", "max ms", "x port",
         "max rel diff vs upstream"], rows))
    result.data = dict(repeats=repeats, warmup=ctx.warmup, figures=figures,
                       shapes=dict(final_dim=FINAL_DIM, downsample_factor=DOWNSAMPLE_FACTOR,
                                   d_bound=D_BOUND, cameras=6))
    return result
