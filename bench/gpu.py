"""Benchmark on a CUDA GPU: the patched tree against upstream with its own CUDA kernels.

    python -m bench --only gpu                 # skips, saying why, where torch sees no GPU
    python -m bench --only gpu --gpu-dry-run   # without a GPU: the same code path on CPU,
                                               # batch 1, fp32 (checks it runs; no figures)

R50 2key recipe (256x704, 6 cameras x 2 key frames), batch 8, fp16 mixed precision as
Lightning's native AMP runs it (autocast float16 + GradScaler), AdamW: samples/s of a full
training step (forward, losses, backward, optimizer) and peak CUDA memory, median over rounds
after warm-up. Upstream runs from a copy of the pristine checkout whose two CUDA extensions
(voxel_pooling_train_ext, voxel_pooling_inference_ext) are built here once with
``python setup.py build_ext --inplace`` (needs nvcc); the patched tree runs as installed, with
whichever pooling its device layer picks on CUDA (reported). Target: patched samples/s >=
upstream's.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench import harness
from bevdepth_npu import envvars

NAME = "gpu"
TITLE = "CUDA: patched against upstream with its own kernels, batch 8, fp16"

BATCH = 8
DRY_RUN_BATCH = 1
MODEL_SEED = 7
BATCH_SEED = 5
NUM_BOXES = 12
TARGET_RATIO = 1.0        # on a GPU, patched at least as fast as upstream
REPEATS_FULL, REPEATS_QUICK = 10, 5
UPSTREAM_COPY = "upstream-cuda"   # under the work dir: pristine checkout + built extensions
EXTENSIONS = ("bevdepth/ops/voxel_pooling_train/voxel_pooling_train_ext",
              "bevdepth/ops/voxel_pooling_inference/voxel_pooling_inference_ext")


def training_batch(final_dim, num_sweeps: int, batch_size: int, seed: int) -> tuple:
    """``batch_size`` samples of the parity tests' training batch, collated."""
    import torch
    helpers = harness.test_helpers()
    samples = [helpers.training_batch(final_dim, num_sweeps=num_sweeps, num_boxes=NUM_BOXES,
                                      seed=seed + i) for i in range(batch_size)]
    imgs = torch.cat([s[0] for s in samples])
    mats = {key: torch.cat([s[1][key] for s in samples]) for key in samples[0][1]}
    timestamps = torch.cat([s[2] for s in samples])
    metas = [m for s in samples for m in s[3]]
    boxes = [b for s in samples for b in s[4]]
    labels = [lab for s in samples for lab in s[5]]
    depth = torch.cat([s[6] for s in samples])
    return imgs, mats, timestamps, metas, boxes, labels, depth


class GpuStepCase:
    """The R50 2key Lightning module on ``device`` with AMP (fp16) and AdamW."""

    def __init__(self, params: Dict[str, Any]):
        import importlib

        import torch

        from bench.train_step import R50_MODULE, _confs
        self.torch = torch
        self.device = params["device"]
        self.amp = params["amp"]
        torch.manual_seed(MODEL_SEED)
        exp = importlib.import_module(R50_MODULE)
        module = exp.BEVDepthLightningModel(default_root_dir=params["root_dir"], **_confs(exp))
        module.log = lambda *args, **kwargs: None
        self.module = module.to(torch.device(self.device)).train()
        self.optimizer = module.configure_optimizers()[0][0]
        self.scaler = torch.cuda.amp.GradScaler(enabled=self.amp)
        final_dim = tuple(module.backbone_conf["final_dim"])
        self.batch_size = params["batch"]
        self.batch = training_batch(final_dim, len(module.key_idxes) + 1, self.batch_size,
                                    BATCH_SEED)
        self.pooling = params.get("pooling_label", "")
        if not self.pooling:  # the patched tree: ask its voxel pooling which kernel serves
            from bevdepth.ops.voxel_pooling import pooling
            self.pooling = ("upstream's CUDA extension" if pooling._cuda_extensions() and
                            self.device == "cuda" else "torch path")

    def describe(self) -> Dict[str, Any]:
        return dict(pooling=self.pooling, batch=self.batch_size, amp=self.amp,
                    device=self.device)

    def run(self) -> Dict[str, float]:
        torch = self.torch
        batch = copy.deepcopy(self.batch)
        if self.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # torch.autocast rejects float16 on CPU even when disabled: no context at all then
        amp = (torch.autocast(device_type=self.device, dtype=torch.float16) if self.amp else
               contextlib.nullcontext())
        with amp:
            loss = self.module.training_step(batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        return dict(time_s=elapsed, samples_per_s=self.batch_size / elapsed)


def make_case(params: Dict[str, Any]) -> GpuStepCase:
    return GpuStepCase(params)


def extensions_built(source: Path) -> bool:
    return all(list(source.glob(f"{stem}*.so")) for stem in EXTENSIONS)


def upstream_with_extensions(ctx: harness.Context) -> Path:
    """A copy of the pristine checkout with upstream's CUDA extensions built in place."""
    source = Path(ctx.upstream_source)
    if extensions_built(source):
        return source
    copy_dir = ctx.work_dir / UPSTREAM_COPY
    if not extensions_built(copy_dir):
        if not copy_dir.exists():
            shutil.copytree(source, copy_dir, ignore=shutil.ignore_patterns(".git"))
        log_path = ctx.work_dir / "logs" / "upstream-cuda-build.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ctx.log(f"  building upstream's CUDA extensions in {copy_dir} (log: {log_path})")
        with open(log_path, "wb") as log:
            proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                                  cwd=str(copy_dir), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not extensions_built(copy_dir):
            raise harness.BenchError(f"building upstream's CUDA extensions failed "
                                     f"({proc.returncode}); see {log_path}")
    return copy_dir


def _cuda_unavailable_reason() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if torch.cuda.is_available():
        return None
    built = torch.version.cuda
    return (f"torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"{'built with CUDA ' + built if built else 'a CPU-only build'}): no GPU here; run "
            "`python -m bench --only gpu` on a machine with an NVIDIA GPU")


def run(ctx: harness.Context) -> harness.BenchResult:
    result = harness.BenchResult(NAME, TITLE)
    ratio_name = "gpu.r50.patched/upstream"
    meaning = f"samples/s on CUDA, batch {BATCH}, fp16, patched against upstream"
    reason = _cuda_unavailable_reason()
    dry_run = reason is not None and ctx.gpu_dry_run
    if reason and not dry_run:
        result.skipped = reason
        result.ratios.append(harness.Ratio(ratio_name, None, meaning, (">=", TARGET_RATIO),
                                           note="no GPU"))
        return result
    device = "cpu" if dry_run else "cuda"
    batch = DRY_RUN_BATCH if dry_run else BATCH
    repeats = 1 if dry_run else ctx.repeats_for(REPEATS_FULL, REPEATS_QUICK)
    if dry_run:
        result.notes.append(f"dry run ({reason}): batch {batch}, fp32, on CPU; the figures "
                            "only show that the code path works")
        upstream_role, upstream_source = harness.ROLE_UPSTREAM_CPU, None
    else:
        upstream_role, upstream_source = harness.ROLE_UPSTREAM_CUDA, upstream_with_extensions(ctx)
    scratch = ctx.work_dir / "gpu"
    params = dict(device=device, amp=not dry_run, batch=batch)
    patched = ctx.worker(harness.ROLE_PATCHED, "gpu-patched", env={envvars.DEVICE: device})
    upstream = ctx.worker(upstream_role, "gpu-upstream", upstream_source=upstream_source)
    try:
        info = {"patched": patched.setup("r50", "bench.gpu:make_case", dict(
                    params, root_dir=str(scratch / "patched")))["info"],
                "upstream": upstream.setup("r50", "bench.gpu:make_case", dict(
                    params, root_dir=str(scratch / "upstream"),
                    pooling_label=("index_put_ reference (dry run)" if dry_run else
                                   "its own CUDA extension")))["info"]}
        samples = harness.interleave({"patched": patched.runner("r50"),
                                      "upstream": upstream.runner("r50")}, repeats,
                                     ctx.warmup, log=ctx.log)
    finally:
        patched.close()
        upstream.close()
    rows: List[List[Any]] = []
    rate = {}
    memory = {}
    for side in ("upstream", "patched"):
        stats = harness.Stats.of(samples[side]["samples_per_s"])
        rate[side] = stats.median
        memory_figure = "peak_rss_bytes" if dry_run else "cuda_peak_bytes"
        memory[side] = harness.median_of(samples, side, memory_figure)
        rows.append([side, info[side]["pooling"], stats.median, stats.minimum, stats.maximum,
                     None if memory[side] is None else memory[side] / 2 ** 30])
    result.tables.append(harness.Table(
        f"R50 2key training step on {device}, batch {batch}, "
        f"{'fp32' if dry_run else 'fp16 (autocast + GradScaler)'}, median of {repeats} rounds",
        ["side", "pooling", "samples/s", "min", "max",
         "peak RSS GiB" if dry_run else "peak CUDA GiB"], rows))
    result.ratios.append(harness.Ratio(ratio_name, harness.safe_ratio(rate["patched"],
                                                                      rate["upstream"]),
                                       meaning, None if dry_run else (">=", TARGET_RATIO),
                                       note="dry run on CPU" if dry_run else ""))
    result.ratios.append(harness.Ratio(
        "gpu.r50.peak-memory.patched/upstream", harness.safe_ratio(memory["patched"],
                                                                   memory["upstream"]),
        "peak memory during the step, patched against upstream"))
    result.data = dict(repeats=repeats, warmup=ctx.warmup, batch=batch, device=device,
                       dry_run=dry_run, info=info,
                       figures={s: dict(samples_per_s=harness.Stats.of(
                           samples[s]["samples_per_s"]).to_json(), peak_memory_bytes=memory[s])
                           for s in samples})
    return result
