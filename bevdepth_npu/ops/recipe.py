"""Run one steady-state training step and one evaluation step of an experiment under the
recorder, on CPU tensors placed and typed as the NPU run places and types them.

What makes the recorded set the NPU run's: the step is the experiment's own ``training_step`` and
``eval_step`` (the same model class and code path as the run), with ``bevdepth.utils.device``
answering as on an NPU where the code branches on it (the pooling takes its NPU path,
``bevdepth/ops/voxel_pooling/npu.py`` with its chunking, over ``stand_ins``; autocast regions are
the recorder's; ``to_device`` marks what it moves), the loader's host boxes building the targets in
a host region, then backward, gradient clipping at the recipe's 5 (Lightning 1.6.5's
``clip_grad_norm_``) and the optimizer step. Step 1 runs unrecorded first (it creates the
optimizer state); step 2 is recorded. Where the NPU run differs and the recording cannot follow,
the difference is listed (``KNOWN_DIFFERENCES``).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from bevdepth_npu.ops import recorder as rec_module
from bevdepth_npu.ops import stand_ins, tables

SMOKE = "bevdepth.exps.nuscenes.smoke.bev_depth_lss_r18_smoke_2key"
R50 = "bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key"
EXPERIMENTS = {"smoke": SMOKE, "r50": R50}
GRADIENT_CLIP = 5.0  # the recipe's gradient_clip_val (base_cli)

KNOWN_DIFFERENCES = (
    "optimizer: torch.optim.AdamW (foreach=False) stands in for torch_npu's NpuFusedAdamW, "
    "which combines the parameters, gradients and states into one flat tensor each at step 1 and "
    "updates them with one fused call per step (torch_npu/optim/npu_fused_adamw.py); its ops are "
    "not recorded",
    "loss scaling: torch_npu's GradScaler (torch_npu/npu/amp/grad_scaler.py) is not re-enacted; "
    "its host syncs, read from the source, are listed in GRAD_SCALER_SYNCS",
    "autocast: the casts NPU autocast inserts (one _to_copy per weight per call) are not recorded",
    "index targets: int64 here; device.index_dtype() gives int32 on the NPU (CPU gather needs "
    "int64)",
    "deformable convolution: mmcv's DeformConv2d calls its compiled ops, not aten, so neither "
    "its CPU ops nor the NPU branch's are recorded; that branch's host copies, read from the "
    "source, are listed in DCN_SYNCS",
)
# torch_npu 2.1.0.post12, torch_npu/npu/amp/grad_scaler.py: the .item() calls of one step
GRAD_SCALER_SYNCS = (
    ("torch_npu/npu/amp/grad_scaler.py:230", "found_inf.item() per (device, dtype) group of "
     "gradients in _unscale_grads_ (2 groups under fp16 AMP: fp32 master gradients only, 1)"),
    ("torch_npu/npu/amp/grad_scaler.py:332", "sum(v.item() for found_inf_per_device) in "
     "_maybe_opt_step"),
    ("torch_npu/npu/amp/grad_scaler.py:500", "self._growth_tracker.item() in _npu_update_scale"),
)


# The training step's device syncs that stay, by caller (patched tree) and count per step of the
# smoke experiment, with their reason; the regression guard holds the step to them. None with
# --pooling product: the head's loss normalisers (per task .item() and new_tensor) stay device
# tensors, its code weights are a buffer, and the depth loss is a masked sum instead of
# boolean-mask indexing and max(1.0, count).
TRAINING_SYNCS: Dict[str, int] = {}
# --pooling fused adds, per fused pooling call (one per key frame, 2 in the smoke experiment):
FUSED_POOLING_SYNCS = {
    # nonzero over the points inside the grid: bev_pool_v3 takes only ranked points, and their
    # number sizes the rank vectors
    "bevdepth/ops/voxel_pooling/npu.py:241": 2,
}
# mmcv at the pin, NPU branch of DeformConv2d (the depth net's DCN, one call per key frame):
# pybind ops the recording does not see; their host-to-device copies, read from the source.
# Avoidable only in mmcv itself (mmcv.patch: build the two index vectors on the device, or
# cache them per kernel size, group count and device).
DCN_SYNCS = (
    ("mmcv/ops/modulated_deform_conv.py:46", "sort_index_fp = torch.IntTensor(...).npu(): a host "
     "list copied to the device at every DeformConv2d forward (2 per step in the 2key recipes)"),
    ("mmcv/ops/modulated_deform_conv.py:47", "sort_index_bp, the same, kept for backward"),
)
# CPU fallbacks of the training step allowed, each with its reason: none. (The one this tool
# found, _foreach_mul_.Tensor of clip_grad_norm_'s foreach path, which torch_npu 2.1.0.post12
# lacks, is gone: the patch clips through device.clip_grad_norm, per gradient on the NPU.)
KNOWN_FALLBACKS: Dict[str, str] = {}


def load_model(name: str, pooling: str, batch_size: int = 1):
    import logging

    from mmcv.utils import get_logger
    # mmcv reports every module's initialisation at INFO (hundreds of lines for R50); its logger
    # takes its level when first made, so make it now and lower it
    get_logger("mmcv").setLevel(logging.WARNING)
    module = importlib.import_module(EXPERIMENTS.get(name, name))
    root = tempfile.mkdtemp(prefix="bevdepth-npu-ops-")
    try:
        torch.manual_seed(0)
        kwargs = dict(default_root_dir=root, data_root=root, batch_size_per_device=batch_size)
        if pooling != "product":
            kwargs["pooling"] = pooling
        if name == "r50" or name == R50:
            from bevdepth.utils import pretrained  # noqa: F401  (weights are not needed)
            kwargs["backbone_conf"] = _no_pretrained(module)
        model = module.BEVDepthLightningModel(**kwargs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return module, model


def _no_pretrained(module):
    """The experiment's backbone configuration (its own, else base_exp's, which the R50
    experiments inherit) without the ImageNet initialisation: the weights do not matter here."""
    from bevdepth.exps.nuscenes import base_exp
    conf = copy.deepcopy(getattr(module, "backbone_conf", base_exp.backbone_conf))
    conf["img_backbone_conf"] = dict(conf["img_backbone_conf"], init_cfg=None)
    return conf


def batch_for(module, model, seed: int = 0, batch_size: int = 1):
    """A synthetic training batch of ``batch_size`` samples (one per seed, collated)."""
    from bevdepth_npu.testing import training_batch
    final_dim = tuple(model.backbone_conf["final_dim"])
    sweeps = 1 + len(model.key_idxes) + len(getattr(model, "sweep_idxes", []))
    samples = [training_batch(final_dim, num_sweeps=sweeps, num_boxes=12,
                              seed=seed + 1000 * i) for i in range(batch_size)]
    return samples[0] if batch_size == 1 else _collate(samples)


def _collate(samples):
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(samples)
    if isinstance(first, dict):
        return {k: _collate([s[k] for s in samples]) for k in first}
    if isinstance(first, list):
        return [item for s in samples for item in s]
    if isinstance(first, tuple):
        return tuple(_collate(list(parts)) for parts in zip(*samples))
    return first


@contextlib.contextmanager
def npu_answers(recorder: rec_module.Recorder) -> Iterator[None]:
    """``bevdepth.utils.device`` and the NPU pooling module answering as on an NPU, for the
    recording: pooling on its NPU path over the stand-ins, the recorder's autocast regions,
    ``to_device`` placing, the head's targets built in a host region."""
    from bevdepth.layers.heads import bev_depth_head
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    from bevdepth.utils import device
    saved = dict(pooling_backend=device.pooling_backend, to_device=device.to_device,
                 autocast=device.autocast, pooling_op=npu_pooling.pooling_op,
                 fused_op=npu_pooling.fused_op, get_targets=bev_depth_head.BEVDepthHead.get_targets)
    to_device = device.to_device
    get_targets = bev_depth_head.BEVDepthHead.get_targets

    class autocast:  # noqa: N801  (device.autocast's interface)
        def __init__(self, enabled: bool = True, dtype: Optional[torch.dtype] = None):
            self.enabled = enabled

        def __enter__(self):
            self._region = recorder.autocast_region(self.enabled)
            return self._region.__enter__()

        def __exit__(self, *exc_info):
            return self._region.__exit__(*exc_info)

        def __call__(self, func):
            def wrapper(*args, **kwargs):
                with autocast(self.enabled):
                    return func(*args, **kwargs)
            return wrapper

    def placed(obj, target=None):
        return recorder.place(to_device(obj, target))

    def host_targets(self, *args, **kwargs):
        with recorder.host_region():
            return get_targets(self, *args, **kwargs)

    device.pooling_backend = lambda tensor: device.NPU
    device.to_device = placed
    device.autocast = autocast
    npu_pooling.pooling_op = stand_ins.pooling_op
    npu_pooling.fused_op = stand_ins.fused_op
    bev_depth_head.BEVDepthHead.get_targets = host_targets
    try:
        yield
    finally:
        for key in ("pooling_backend", "to_device", "autocast"):
            setattr(device, key, saved[key])
        npu_pooling.pooling_op = saved["pooling_op"]
        npu_pooling.fused_op = saved["fused_op"]
        bev_depth_head.BEVDepthHead.get_targets = saved["get_targets"]


def record(experiment: str = "smoke", pooling: str = "product", eval_step: bool = True,
           table: Optional[tables.NpuTable] = None, roots: Optional[List] = None,
           batch_size: int = 1, taps: Sequence = (), step_context=None
           ) -> rec_module.Recorder:
    """The recording of step 2 of training (forward, backward, optimizer) and, if ``eval_step``,
    one evaluation step, at ``batch_size`` samples.

    ``taps`` observe every recorded op (``Recorder.taps``); a tap's ``attach(recorder, model,
    optimizer)`` runs before step 1 and its ``before_optimizer(model)`` after step 2's backward.
    ``step_context`` (a context manager factory) wraps step 2 from forward to ``zero_grad``
    (the memory estimate's profiler)."""
    from bevdepth.utils import device
    device.select("cpu")
    table = table or tables.NpuTable.from_wheel_pin()
    module, model = load_model(experiment, pooling, batch_size)
    tree = rec_module.tree_root()
    recorder = rec_module.Recorder(table, roots or [tree, rec_module.PACKAGE_ROOT])
    model.log = lambda *args, **kwargs: None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4 / 64, weight_decay=1e-7,
                                  foreach=False)
    batches = {step: batch_for(module, model, seed=step, batch_size=batch_size if step < 3
                               else 1) for step in (1, 2, 3)}
    for tap in taps:
        tap.attach(recorder, model, optimizer)
    with npu_answers(recorder), recorder.active(model):
        for step in (1, 2):
            recorder.recording = step == 2
            recorder.taps = list(taps) if step == 2 else []
            batch = batches.pop(step)
            context = step_context() if step == 2 and step_context else contextlib.nullcontext()
            with context:
                with torch.autograd.set_detect_anomaly(step == 2, check_nan=False):
                    recorder.phase = "forward"
                    with recorder.autocast_region(True):
                        loss = model.training_step(batch)
                    recorder.phase = "backward"
                    loss.backward()
                del loss, batch
                if step == 2:
                    for tap in taps:
                        tap.before_optimizer(model)
                recorder.phase = "optimizer"
                # as configure_gradient_clipping does it on the NPU
                recorder.segment = "clip"
                device.clip_grad_norm(model.parameters(), GRADIENT_CLIP, kind=device.NPU)
                recorder.segment = "update"
                optimizer.step()
                optimizer.zero_grad()
                recorder.segment = ""
        recorder.taps = []
        if eval_step:
            model.eval()
            recorder.phase = "eval"
            imgs, mats, _, metas, *_ = batches[3]
            with torch.no_grad(), recorder.autocast_region(True):
                model.eval_step((imgs, mats, None, metas, None, None), 0, "val")
    return recorder
