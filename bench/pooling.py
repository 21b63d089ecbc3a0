"""Benchmark of voxel pooling on CPU against a memory floor; chunked against unchunked; the
lift-and-pool stage with --pooling product against --pooling fused.

    python -m bench --only pooling [--quick] [--repeats N]

R50 recipe shapes, one sample: 6 cameras x 112 depth bins x 16x44 = 473,088 points, 80 channels,
pooled into a 128x128 BEV grid; cell coordinates from the patched get_geometry on realistic
cameras (about 77% of the points land in the grid). All variants run in one patched worker,
interleaved:

  forward
    floor      one pass reading every feature (a sum) and writing every grid cell (a fill): the
               memory traffic any pooling needs, measured on this machine in this run
    torch      bevdepth.ops.voxel_pooling.voxel_pooling on CPU (the port's torch path: one-pass
               numba kernels)
    chunked    the NPU call plan (bevdepth.ops.voxel_pooling.npu.voxel_pooling: chunks within the
               documented limits of npu_voxel_pooling_train, partial grids added) with the
               torch path standing in for the NPU kernel
    reference  index_put_ reference pooling of the parity tests, which stands in for upstream's
               CUDA kernel when upstream runs on CPU (the train benchmark)
  backward (gradient of the features, after an untimed forward)
    floor      one pass reading the grid's gradient and writing a features-sized tensor that
               already exists; "floor, fresh" writes a newly allocated one, as autograd must
    torch      the torch path's backward (a gather)
  inference (depth x context pooled without autograd)
    chunked    voxel_pooling_inference as shipped (the product built a few depth bins at a time)
    unchunked  the same with the whole product built at once
  lift (the backbone's lift-and-pool of one key frame, forward and backward: depth softmax and
  context slice of the depth net's output, BaseLSSFPN._lift_and_pool in training mode, the
  gradient of the depth net's output)
    product    --pooling product: depth x context formed, made channels last, pooled
    fused      --pooling fused: the two factors pooled without their product
Times come from one worker; peak memory (the resident set's growth during a call) from a
second worker where every allocation over 64 KiB is its own mapping, so that it counts.
Targets: forward torch / floor <= 1.5; lift fused / product: time <= 1, peak memory <= 0.25.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Dict, List, Tuple

from bench import harness
from bevdepth_npu import envvars
from bevdepth_npu.testing import relative_error

NAME = "pooling"
TITLE = "voxel pooling: torch path against a memory floor; chunked against unchunked"

FINAL_DIM = (256, 704)
DOWNSAMPLE_FACTOR = 16
D_BOUND = [2.0, 58.0, 0.5]
X_BOUND = [-51.2, 51.2, 0.8]   # 128 cells of 0.8 m
Y_BOUND = [-51.2, 51.2, 0.8]
Z_BOUND = [-5.0, 3.0, 8.0]     # one cell
CHANNELS = 80
BATCH = 1
SEED = 3
TARGET_FLOOR_RATIO = 1.5       # the one-pass kernel: forward within 1.5x of the memory floor
TARGET_LIFT_TIME = 1.0         # fused lift-and-pool no slower than the product's
TARGET_LIFT_MEMORY = 0.25      # and at most a quarter of its peak memory
REPEATS_FULL, REPEATS_QUICK = 9, 5

FORWARD = ("floor", "torch", "chunked", "reference")
BACKWARD = ("floor", "floor, fresh", "torch")
INFERENCE = ("chunked", "unchunked")
LIFT = ("product", "fused")

_inputs_cache: Dict[Any, Any] = {}
_lift_results: Dict[str, Any] = {}


def pooling_inputs(batch: int, seed: int):
    """(geom_xyz int32 (B, cams, D, H, W, 3), features (B, cams, D, H, W, C), grid (X, Y, Z)),
    built as BaseLSSFPN builds them, shared by every case of this worker."""
    key = (batch, seed)
    if key in _inputs_cache:
        return _inputs_cache[key]
    import torch
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
    helpers = harness.test_helpers()
    owner = types.SimpleNamespace(final_dim=FINAL_DIM, downsample_factor=DOWNSAMPLE_FACTOR,
                                  d_bound=D_BOUND)
    owner.frustum = BaseLSSFPN.create_frustum(owner)
    mats = helpers.camera_mats(batch, 1, FINAL_DIM, seed=seed)
    with torch.no_grad():
        geom = BaseLSSFPN.get_geometry(owner, mats["sensor2ego_mats"][:, 0],
                                       mats["intrin_mats"][:, 0], mats["ida_mats"][:, 0],
                                       mats["bda_mat"])
    bounds = (X_BOUND, Y_BOUND, Z_BOUND)
    voxel_size = torch.tensor([row[2] for row in bounds])
    voxel_coord = torch.tensor([row[0] + row[2] / 2.0 for row in bounds])
    grid = tuple(int(round((row[1] - row[0]) / row[2])) for row in bounds)
    geom_xyz = ((geom - (voxel_coord - voxel_size / 2.0)) / voxel_size).int()
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(*geom_xyz.shape[:-1], CHANNELS, generator=gen)
    _inputs_cache[key] = (geom_xyz, features, grid)
    return _inputs_cache[key]


def install_npu_stand_in() -> None:
    """An ``mx_driving`` module whose npu_voxel_pooling_train is the torch path, so that the NPU
    chunk plan of bevdepth.utils.device runs (and is timed) on CPU."""
    from bevdepth.ops.voxel_pooling import voxel_pooling_torch
    module = types.ModuleType("mx_driving")
    module.npu_voxel_pooling_train = lambda geom, feats, grid: voxel_pooling_torch(
        geom, feats, grid)
    sys.modules["mx_driving"] = module


class PoolingCase:

    def __init__(self, params: Dict[str, Any]):
        import torch
        self.torch = torch
        self.stage = params["stage"]
        self.variant = params["variant"]
        geom_xyz, features, grid = pooling_inputs(params["batch"], params["seed"])
        self.grid = grid
        batch = features.shape[0]
        self.geom = geom_xyz
        self.features = features
        self.flat_geom = geom_xyz.reshape(batch, -1, 3)
        self.flat_features = features.reshape(batch, -1, CHANNELS)
        grid_x, grid_y, _ = grid
        self.grid_buffer = features.new_empty(batch, CHANNELS, grid_y, grid_x)
        if self.stage == "forward" and self.variant == "chunked":
            install_npu_stand_in()
        if self.stage == "backward":
            self.grad_out = torch.randn(batch, CHANNELS, grid_y, grid_x,
                                        generator=torch.Generator().manual_seed(1))
            self.grad_buffer = torch.empty_like(features)
        if self.stage == "lift":
            self.owner = lift_owner(self.variant, grid)
            gen = torch.Generator().manual_seed(4)
            cams, self.depth_bins, height, width = features.shape[1:5]
            self.cams = cams
            self.depth_feature = torch.randn(batch * cams, self.depth_bins + CHANNELS, height,
                                             width, generator=gen).requires_grad_(True)
            self.grad_out = torch.randn(batch, CHANNELS, grid_y, grid_x, generator=gen)
        if self.stage == "inference":
            gen = torch.Generator().manual_seed(2)
            cams, depth_bins, height, width = features.shape[1:5]
            self.depth = torch.rand(batch * cams, depth_bins, height, width, generator=gen)
            self.context = torch.randn(batch * cams, CHANNELS, height, width, generator=gen)
            self.max_chunk = None if self.variant == "chunked" else (
                batch * cams * depth_bins * height * width * CHANNELS)

    def describe(self) -> Dict[str, Any]:
        points = int(self.flat_geom.shape[1])
        return dict(points=points, channels=CHANNELS, grid=list(self.grid),
                    feature_bytes=self.flat_geom.shape[0] * points * CHANNELS * 4)

    def lift(self):
        """The backbone's lift-and-pool of one key frame and the gradient of the depth net's
        output (what the product path materialises and what fused avoids)."""
        torch = self.torch
        from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
        depth_feature = self.depth_feature
        depth = depth_feature[:, :self.depth_bins].softmax(dim=1, dtype=depth_feature.dtype)
        context = depth_feature[:, self.depth_bins:self.depth_bins + CHANNELS]
        pooled = BaseLSSFPN._lift_and_pool(self.owner, self.geom, depth, context,
                                           self.geom.shape[0], self.cams)
        grad, = torch.autograd.grad(pooled, depth_feature, self.grad_out)
        return pooled.detach(), grad

    def run(self):
        torch = self.torch
        from bevdepth.ops.voxel_pooling import npu as npu_pooling
        from bevdepth.ops.voxel_pooling import voxel_pooling, voxel_pooling_inference
        from bevdepth.utils import device
        if self.stage == "lift":
            self.lift()
            return None
        if self.stage == "forward":
            with torch.no_grad():
                if self.variant == "floor":
                    self.features.sum()
                    self.grid_buffer.fill_(0.0)
                elif self.variant == "torch":
                    voxel_pooling(self.geom, self.features, self.grid, backend=device.CPU)
                elif self.variant == "chunked":
                    npu_pooling.voxel_pooling(self.flat_geom, self.flat_features, self.grid)
                elif self.variant == "reference":
                    harness.test_helpers().pool_reference(self.flat_geom, self.flat_features,
                                                          self.grid)
            return None
        if self.stage == "backward":
            import time
            if self.variant == "floor":
                self.grad_out.sum()
                self.grad_buffer.fill_(0.0)
                return None
            if self.variant == "floor, fresh":
                self.grad_out.sum()
                torch.empty_like(self.features).fill_(0.0)
                return None
            features = self.features.detach().requires_grad_()
            pooled = voxel_pooling(self.geom, features, self.grid, backend=device.CPU)
            started = time.perf_counter()
            pooled.backward(self.grad_out)
            return dict(time_s=time.perf_counter() - started)
        with torch.no_grad():
            kwargs = {} if self.max_chunk is None else dict(max_chunk_elements=self.max_chunk)
            voxel_pooling_inference(self.geom, self.depth, self.context, self.grid,
                                    backend=device.CPU, **kwargs)
        return None

    def lift_check(self) -> Dict[str, float]:
        """max |fused - product| / max |product| of the pooled grid and of the depth net's
        gradient (the product case of this worker runs first and leaves its result here)."""
        _lift_results[self.variant] = self.lift()
        if self.variant == "product":
            return {}
        out = {}
        for name, want, got in zip(("pooled", "grad"), _lift_results.pop("product"),
                                   _lift_results.pop(self.variant)):
            out[name] = relative_error(got, want)
        return out

    def check(self) -> float:
        """max |variant - torch forward| / max |torch forward| (forward variants)."""
        torch = self.torch
        from bevdepth.ops.voxel_pooling import npu as npu_pooling
        from bevdepth.ops.voxel_pooling import voxel_pooling_torch
        with torch.no_grad():
            expected = voxel_pooling_torch(self.flat_geom, self.flat_features, self.grid)
            if self.variant == "chunked":
                got = npu_pooling.voxel_pooling(self.flat_geom, self.flat_features, self.grid)
            elif self.variant == "reference":
                got = harness.test_helpers().pool_reference(self.flat_geom, self.flat_features,
                                                            self.grid)
            else:
                return 0.0
        return relative_error(got, expected)


def lift_owner(pooling: str, grid) -> types.SimpleNamespace:
    """What BaseLSSFPN._lift_and_pool reads of its backbone, for the R50 recipe in training."""
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
    owner = types.SimpleNamespace(pooling=pooling, training=True, use_da=False,
                                  voxel_grid=list(grid))
    owner._forward_voxel_net = types.MethodType(BaseLSSFPN._forward_voxel_net, owner)
    return owner


def make_case(params: Dict[str, Any]) -> PoolingCase:
    return PoolingCase(params)


STAGES = (("forward", FORWARD), ("backward", BACKWARD), ("inference", INFERENCE),
          ("lift", LIFT))
# Peak memory is taken in a second worker where glibc gives every allocation over 64 KiB its
# own mapping and unmaps it when freed: otherwise a freed block stays resident and a later
# allocation reuses it unseen (the fused lift's few MiB read as 0).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _stage_samples(ctx: harness.Context, worker: harness.Worker, stage: str,
                   variants, repeats: int, warmup: int):
    ctx.log(f"  {stage}")
    runners = {}
    info: Dict[str, Any] = {}
    for variant in variants:
        key = f"{stage}-{variant}"
        info = worker.setup(key, "bench.pooling:make_case", dict(
            stage=stage, variant=variant, batch=BATCH, seed=SEED))["info"]
        runners[variant] = worker.runner(key)
    return harness.interleave(runners, repeats, warmup), info


def _peaks(ctx: harness.Context) -> Dict[str, Dict[str, Any]]:
    """Peak resident-set increase of every variant (median of 3 runs after a warm-up) in the
    memory worker."""
    peaks: Dict[str, Dict[str, Any]] = {}
    worker = ctx.worker(harness.ROLE_PATCHED, "pooling-memory",
                        env={envvars.DEVICE: "cpu", **MEMORY_ENV})
    try:
        for stage, variants in STAGES:
            samples, _ = _stage_samples(ctx, worker, stage, variants, 3, 1)
            peaks[stage] = {variant: harness.median_of(samples, variant,
                                                       "peak_rss_increase_bytes")
                            for variant in variants}
            for variant in variants:
                worker.drop(f"{stage}-{variant}")
    finally:
        worker.close()
    return peaks


def _times(ctx: harness.Context, repeats: int
           ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, float]]:
    """Times of every stage's variants in the timing worker, with the forward variants'
    differences from the torch path and the lift's fused-against-product differences."""
    ctx.log("  times")
    times: Dict[str, Any] = {}
    lift_diff: Dict[str, float] = {}
    diffs: Dict[str, Any] = {}
    worker = ctx.worker(harness.ROLE_PATCHED, "pooling", env={envvars.DEVICE: "cpu"})
    try:
        for stage, variants in STAGES:
            times[stage] = _stage_samples(ctx, worker, stage, variants, repeats, ctx.warmup)
            for variant in variants:
                diffs[f"{stage}.{variant}"] = (
                    worker.call(f"{stage}-{variant}", "check") if stage == "forward" else None)
                if stage == "lift":
                    lift_diff.update(worker.call(f"{stage}-{variant}", "lift_check"))
                worker.drop(f"{stage}-{variant}")
    finally:
        worker.close()
    return times, diffs, lift_diff


def _rows(times: Dict[str, Any], diffs: Dict[str, Any], peaks: Dict[str, Dict[str, Any]],
          figures: Dict[str, Any]) -> Tuple[List[List[Any]], Dict[str, Dict[str, float]]]:
    """Table rows and median times by stage and variant; adds the figures to ``figures``."""
    rows: List[List[Any]] = []
    medians: Dict[str, Dict[str, float]] = {}
    for stage, variants in STAGES:
        samples, info = times[stage]
        medians[stage] = {}
        floor_s = harness.median_of(samples, "floor")
        for variant in variants:
            stats = harness.Stats.of(samples[variant]["time_s"])
            medians[stage][variant] = stats.median
            peak = peaks[stage][variant]
            diff = diffs[f"{stage}.{variant}"]
            rows.append([stage, variant, stats.median * 1e3, stats.minimum * 1e3,
                         stats.maximum * 1e3, harness.safe_ratio(stats.median, floor_s),
                         None if peak is None else peak / 2 ** 20, diff])
            figures[f"{stage}.{variant}"] = dict(time_s=stats.to_json(),
                                                 peak_rss_increase_bytes=peak,
                                                 max_rel_diff_vs_torch=diff)
        figures[f"{stage}.shapes"] = info
    return rows, medians


def _time_ratios(medians: Dict[str, Dict[str, float]], peaks: Dict[str, Dict[str, Any]]
                 ) -> List[harness.Ratio]:
    """The ratios of median times, and the lift's peak memory ratio."""
    fwd, bwd, inf = medians["forward"], medians["backward"], medians["inference"]
    lift = medians["lift"]
    return [
        harness.Ratio("pooling.forward.torch/floor", harness.safe_ratio(fwd["torch"],
                                                                        fwd["floor"]),
                      "torch-path forward against the memory floor", ("<=", TARGET_FLOOR_RATIO)),
        harness.Ratio("pooling.forward.chunked/unchunked",
                      harness.safe_ratio(fwd["chunked"], fwd["torch"]),
                      "cost of the NPU chunk plan (torch kernel) over one call"),
        harness.Ratio("pooling.forward.reference/torch",
                      harness.safe_ratio(fwd["reference"], fwd["torch"]),
                      "index_put_ reference (upstream on CPU) against the torch path"),
        harness.Ratio("pooling.backward.torch/floor",
                      harness.safe_ratio(bwd["torch"], bwd["floor"]),
                      "torch-path backward against the memory floor"),
        harness.Ratio("pooling.backward.torch/floor-fresh",
                      harness.safe_ratio(bwd["torch"], bwd["floor, fresh"]),
                      "backward against writing a freshly allocated gradient"),
        harness.Ratio("pooling.inference.chunked/unchunked",
                      harness.safe_ratio(inf["chunked"], inf["unchunked"]),
                      "inference time, product built in chunks against all at once"),
        harness.Ratio("pooling.lift.fused/product", harness.safe_ratio(lift["fused"],
                                                                      lift["product"]),
                      "lift-and-pool forward + backward time, fused against product",
                      ("<=", TARGET_LIFT_TIME)),
        harness.Ratio("pooling.lift.peak-memory.fused/product",
                      harness.safe_ratio(peaks["lift"]["fused"], peaks["lift"]["product"]),
                      "lift-and-pool peak memory increase, fused against product",
                      ("<=", TARGET_LIFT_MEMORY)),
    ]


def run(ctx: harness.Context) -> harness.BenchResult:
    """The pooling benchmark: times in one worker, peak memory in another, then the report."""
    result = harness.BenchResult(NAME, TITLE)
    repeats = ctx.repeats_for(REPEATS_FULL, REPEATS_QUICK)
    figures: Dict[str, Any] = {}
    times, diffs, lift_diff = _times(ctx, repeats)
    ctx.log("  peak memory")
    peaks = _peaks(ctx)
    rows, medians = _rows(times, diffs, peaks, figures)
    figures["lift.max_rel_diff_fused_vs_product"] = lift_diff
    result.tables.append(harness.Table(
        f"voxel pooling, batch {BATCH}, 473,088 points x {CHANNELS} channels -> 128x128, "
        f"median of {repeats} rounds",
        ["stage", "variant", "median ms", "min ms", "max ms", "x floor", "peak +MiB",
         "max rel diff vs torch"], rows))
    result.ratios += _time_ratios(medians, peaks)
    result.notes.append(
        f"lift-and-pool, fused against product: pooled grid differs by "
        f"{lift_diff['pooled']:.1e}, the depth net's gradient by {lift_diff['grad']:.1e} "
        f"(max abs difference / max abs value)")
    peak_chunked = figures["inference.chunked"]["peak_rss_increase_bytes"]
    peak_whole = figures["inference.unchunked"]["peak_rss_increase_bytes"]
    result.ratios.append(harness.Ratio(
        "pooling.inference.peak-memory.chunked/unchunked",
        harness.safe_ratio(peak_chunked, peak_whole),
        "inference peak memory increase, chunked against unchunked"))
    result.data = dict(repeats=repeats, warmup=ctx.warmup, batch=BATCH, figures=figures)
    return result
