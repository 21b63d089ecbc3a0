"""``bevdepth-npu doctor``: says in under a minute whether training will work on this machine.

Run it on the machine you will train on, in the environment ``bevdepth-npu env`` built (it
re-runs itself there when the current Python has no torch):

    bevdepth-npu doctor [--device auto|npu|cuda|cpu] [--quick] [--pooling product|fused]
                        [--data-root DIR [--full]] [--checkpoint PATH] [--json FILE]
                        [--verbose]

One line per check (PASS, FAIL or SKIP, the cause, and on a FAIL what to do):
  stack      Python, torch, torchvision, numpy, mmcv (and whether its compiled ops load),
             mmdet, mmdet3d, Lightning, nuscenes-devkit against the pins; on npu also CANN,
             torch_npu and mx_driving with the place its voxel-pooling op lives
  patch      each patch as installed here: applied and unmodified, or what differs
  device     start-up as training does it, count, names, memory, runtime settings in force
  compute    on the device against float64 on the host: voxel pooling forward and backward in
             fp32, fp16 and bf16 at a size that needs chunking on the NPU, get_geometry under
             autocast, the optimizer's steps against torch AdamW, fp16 loss scaling; with
             --pooling fused also fused pooling (mx_driving.bev_pool_v3 on npu) forward and both
             gradients against the float64 depth x context product; then one forward and
             backward of the smoke model with its time (not with --quick)
  dist       an all_reduce across two processes over the device's DDP backend (not --quick)
  data       with --data-root: info files, one sample, depth_gt coverage; --full: every file
             the info files name exists and decodes (bad ones listed)
  checkpoint with --checkpoint: a checkpoint file, or each *.ckpt of a run directory and the
             one a rerun resumes from: missing, empty, cut short, damaged, not a torch file,
             not a checkpoint, or what it holds (no model is built, nothing goes to a device)
Exit status 0 when nothing failed, 1 otherwise, 2 for bad arguments. Nothing is left behind but
the --json file.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from bevdepth_npu import devices, paths
from bevdepth_npu.doctor.report import Report, Skip



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=devices.CHOICES, default="auto",
                   help="device to check: auto (npu, then cuda, then cpu, as training picks), "
                        "or one of them (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="stack, patches, device and the op checks only (what the training "
                        "scripts run before training; a few seconds)")
    p.add_argument("--pooling", choices=("product", "fused"), default="product",
                   help="the experiments' --pooling you will train with; fused adds the check "
                        "of fused pooling on the device (default: %(default)s)")
    p.add_argument("--data-root", type=Path, metavar="DIR",
                   help="also check the dataset under DIR (info files, one sample, depth_gt)")
    p.add_argument("--full", action="store_true",
                   help="with --data-root: read every file the info files name, in parallel")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="also check a checkpoint file, or the checkpoints of a run directory "
                        "and the one a rerun of its training resumes from")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write the results as JSON to FILE (atomically)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")


def run(args: argparse.Namespace) -> int:
    if args.full and not args.data_root:
        print("bevdepth-npu doctor: error: --full needs --data-root DIR", file=sys.stderr)
        return 2
    if importlib.util.find_spec("torch") is None:
        python = paths.environment_python(devices.choose(args.device))
        if python.exists() and Path(sys.executable).resolve() != python.resolve():
            print(f"doctor: no torch in {sys.executable}; running in the environment {python}",
                  flush=True)
            sys.stdout.flush()
            os.execv(str(python), [str(python), "-m", "bevdepth_npu", "doctor", *sys.argv[2:]])
    report = Report(verbose=args.verbose)
    _quiet_libraries(args.verbose)
    kind = checks(report, args)
    print(report.summary(), flush=True)
    if args.json:
        report.write_json(args.json, device=kind, python=sys.executable,
                          data_root=str(args.data_root) if args.data_root else None)
    return 1 if report.failed else 0


def checks(report: Report, args: argparse.Namespace) -> str:
    """Run every check in order; returns the device type checked."""
    from bevdepth_npu import pins
    from bevdepth_npu.doctor import stack
    requested = None if args.device == "auto" else args.device
    device = requested or "auto"
    report.run("stack.python", stack.check_python)
    report.run("stack.torch", lambda: stack.check_pinned(
        "torch", stack.TORCH_VERSION, device, "torch"))
    if importlib.util.find_spec("torch") is None:
        report.run("device.start", _skip("no torch in this Python: nothing else can run",
                                         "build the environment: `bevdepth-npu env`"))
        return device
    report.run("stack.torchvision", lambda: stack.check_pinned(
        "torchvision", stack.TORCHVISION_VERSION, device, "torchvision"))
    report.run("stack.numpy", lambda: stack.check_requirement("numpy", device, "numpy"))
    if requested == "npu" or (requested is None
                              and importlib.util.find_spec("torch_npu") is not None):
        report.run("stack.cann", stack.check_cann)
        report.run("stack.torch_npu", stack.check_torch_npu)
        report.run("stack.mx_driving", stack.check_mx_driving)
    report.run("stack.mmcv", lambda: stack.check_mmcv(device))
    report.run("stack.mmdet", lambda: stack.check_requirement("mmdet", device, "mmdet"))
    report.run("stack.mmdet3d", lambda: stack.check_pinned(
        "mmdet3d", pins.get("mmdetection3d").ref.lstrip("v"), device, "mmdet3d"))
    report.run("stack.lightning", lambda: stack.check_requirement(
        "pytorch-lightning", device, "pytorch_lightning"))
    report.run("stack.nuscenes_devkit", lambda: stack.check_requirement(
        "nuscenes-devkit", device, "nuscenes"))

    from bevdepth_npu.doctor import patch_state
    for pin in pins.patched_pins():
        report.run(f"patch.{pin.name}", lambda n=pin.name: patch_state.check(n))

    if args.checkpoint:
        from bevdepth_npu.doctor import checkpoint
        checkpoint.run_checks(report, args.checkpoint.expanduser().absolute())

    kind = _start(report, requested)
    if kind is None:
        report.run("compute", _skip("the device did not start (see device.start)"))
        return device
    from bevdepth_npu.doctor import compute, machine
    report.run("device.list", lambda: machine.check_devices(kind))
    report.run("device.settings", lambda: machine.check_runtime_settings(kind))
    import torch
    target = compute.Target.selected()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = f"compute.pooling.{str(dtype).split('.')[-1]}"
        report.run(name, lambda d=dtype: compute.check_pooling(target, d))
    if args.pooling == "fused":
        report.run("compute.pooling.fused", lambda: compute.check_fused_pooling(target))
    report.run("compute.geometry", lambda: compute.check_geometry(target))
    report.run("compute.optimizer", lambda: compute.check_optimizer(target))
    report.run("compute.grad_scaler", lambda: compute.check_grad_scaler(target))
    if not args.quick:
        report.run("compute.smoke_step", lambda: compute.check_smoke_model(target))
        count = 1 if kind == "cpu" else getattr(torch, kind).device_count()
        report.run("dist.collective", lambda: machine.check_collective(kind, count))
    if args.data_root:
        _data_checks(report, args.data_root.expanduser().resolve(), args.full)
    return kind


def _start(report: Report, requested):
    """Start the device as training does; its type, or None when it cannot start."""
    started = {}

    def start() -> str:
        from bevdepth.utils import device
        started["kind"] = device.start(requested)
        return f"{started['kind']} (bevdepth.utils.device.start, as training starts)"

    report.run("device.start", start)
    return started.get("kind")


def _data_checks(report: Report, root: Path, full: bool) -> None:
    from bevdepth_npu.doctor import data
    if report.run("data.root", lambda: data.check_root(root)).status == "FAIL":
        return
    if report.run("data.info_files", lambda: data.check_info_files(root)).status == "FAIL":
        return
    report.run("data.sample", lambda: data.check_sample(root))
    report.run("data.depth_gt", lambda: data.check_depth_gt(root))
    if full:
        report.run("data.every_file", lambda: data.check_every_file(root)[0])


def _quiet_libraries(verbose: bool) -> None:
    """mmcv logs every parameter's initialisation when a model is built; keep errors only."""
    if verbose or importlib.util.find_spec("mmcv") is None:
        return
    import logging
    try:
        from mmcv.utils import get_logger
    except Exception:  # a broken mmcv is the stack check's finding
        return
    get_logger("mmcv").setLevel(logging.ERROR)


def _skip(cause: str, hint: str = ""):
    def check():
        raise Skip(cause, hint)
    return check
