"""``bevdepth-npu ops``: the op inventory of one training step and one evaluation step of an
experiment, classified against the op table of the pinned torch_npu release.

    bevdepth-npu ops [--exp smoke|r50] [--pooling product|fused] [--no-eval] [--json FILE]
                     [--all] [--memory] [--roofline] [--batch N]
    bevdepth-npu ops --on-device [--exp ...] [--pooling ...]     (on an Ascend server)

Records step 2 of training (forward, backward, optimizer) and one evaluation step with real CPU
tensors at batch 1, placed and typed as the NPU run places and types them (``recorder`` and
``recipe`` say how and where the recording differs from the run), classifies each (op, dtypes)
by ``tables`` (NPU kernel, composite, host-synchronising, AI CPU suspect, CPU fallback, host), and
prints every entry that is not a plain NPU kernel (``--all``: every entry) and the counts by class;
``--json`` writes every entry (atomically). Exit status 1 when the training step has a CPU
fallback outside the composite parts the NPU does not run.

``--memory`` and ``--roofline`` record the training step at ``--recorded-batches`` samples (1
and 2 by default) with both pooling modes (``memory``: peak device memory, checked against torch.profiler on the CPU; ``roofline``:
FLOPs and bytes per module and the step's lower bound on one card) and report them at ``--batch``
samples per card. ``--on-device`` (``on_device``) runs two real steps on the NPU and fails on
every CPU-fallback warning it prints.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

from bevdepth_npu import devices

PHASES = ("forward", "backward", "optimizer", "eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exp", default="smoke",
                   help="experiment: smoke (the R50 code path at toy sizes, about a minute), r50 "
                        "(bev_depth_lss_r50_256x704_128x128_24e_2key) or a module path "
                        "(default: smoke)")
    p.add_argument("--pooling", choices=("product", "fused"), default="product",
                   help="voxel pooling mode of the experiment (default: product)")
    p.add_argument("--no-eval", action="store_true", help="record the training step only")
    p.add_argument("--all", action="store_true",
                   help="print every entry, plain NPU kernels included")
    p.add_argument("--json", metavar="FILE", help="write every entry as JSON to FILE")
    p.add_argument("--memory", action="store_true",
                   help="estimate the step's peak device memory at --batch samples per card for "
                        "both pooling modes (recorded at --recorded-batches, checked against "
                        "torch.profiler on the CPU) and the largest batch that fits a 64 GB "
                        "card with 10%% headroom")
    p.add_argument("--roofline", action="store_true",
                   help="FLOPs and bytes per module and the step's roofline lower bound on one "
                        "Atlas 800T A2 card at --batch samples per card, both pooling modes")
    p.add_argument("--batch", type=int, default=8,
                   help="samples per card for --memory and --roofline (default: 8, the "
                        "recipe's)")
    p.add_argument("--recorded-batches", default="1,2",
                   help="the batches --memory and --roofline record, comma-separated: two are "
                        "extrapolated linearly, one is scaled proportionally (R50 at 2 samples "
                        "needs more than 9 GiB of host memory; default: %(default)s)")
    p.add_argument("--on-device", action="store_true",
                   help="on an Ascend NPU: run two real training steps in a fresh process, FAIL "
                        "on every CPU-fallback warning torch_npu prints, report step 2's device "
                        "syncs (see the README's \"Ops on the NPU\")")


def _environment_python(on_device: bool = False) -> Path:
    from bevdepth_npu import paths
    return paths.venv_dir(devices.choose(None if on_device else "cpu")) / "bin" / "python"


def summary(entries) -> Dict[str, Dict[str, int]]:
    """Calls per phase and class; parts under a composite the NPU runs itself apart."""
    counts: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
    for e in entries:
        counts[e.phase]["(decomposed parts the NPU does not run)" if e.under else e.klass] += \
            e.calls
    return {phase: dict(c) for phase, c in counts.items()}


def training_fallbacks(entries) -> List:
    return [e for e in entries if e.phase != "eval" and not e.under
            and e.klass == "CPU fallback"]


def format_table(entries, show_all: bool) -> str:
    rows = [f"{'phase':9s} {'class':19s} {'calls':>5s}  {'op':38s} {'dtypes':28s} caller"]
    for e in sorted(entries, key=lambda e: (PHASES.index(e.phase), e.klass, e.op)):
        if not show_all and (e.klass in ("NPU kernel", "host") or e.under):
            continue
        rows.append(f"{e.phase:9s} {e.klass:19s} {e.calls:5d}  {e.namespace + '::' + e.op:38s} "
                    f"{','.join(e.dtypes)[:28]:28s} {e.caller}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        python = _environment_python(getattr(args, "on_device", False))
        if python.exists() and Path(sys.executable).resolve() != python.resolve():
            print(f"ops: no torch in {sys.executable}; running in the environment {python}",
                  flush=True)
            os.execv(str(python), [str(python), "-m", "bevdepth_npu", "ops", *sys.argv[2:]])
    if args.on_device:   # the step runs in a child process; this one imports no torch
        from bevdepth_npu.ops import on_device
        return on_device.run(args)
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.getLogger("mmcv").setLevel(logging.WARNING)  # the model's init report
    from bevdepth_npu.fsutil import atomic_write_text
    from bevdepth_npu.ops import recipe
    report: Dict = {}
    tables_text = ""
    if args.memory or args.roofline:
        recorder, report, tables_text = physical(args)
    else:
        recorder = recipe.record(args.exp, args.pooling, eval_step=not args.no_eval)
    entries = list(recorder.entries.values())
    print(format_table(entries, args.all))
    counts = summary(entries)
    for phase in PHASES:
        if phase in counts:
            print(f"{phase}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts[phase].items())))
    print("not recorded, from the sources:")
    for line in recipe.KNOWN_DIFFERENCES:
        print(f"  - {line}")
    for where, what in recipe.GRAD_SCALER_SYNCS + recipe.DCN_SYNCS:
        print(f"  - device sync {where}: {what}")
    if tables_text:
        print(tables_text)
    bad = training_fallbacks(entries)
    if args.json:
        atomic_write_text(args.json, json.dumps(dict(
            experiment=args.exp, pooling=args.pooling, table=recorder.table.source,
            counts=counts, known_differences=list(recipe.KNOWN_DIFFERENCES),
            grad_scaler_syncs=[dict(caller=w, what=t) for w, t in recipe.GRAD_SCALER_SYNCS],
            dcn_syncs=[dict(caller=w, what=t) for w, t in recipe.DCN_SYNCS],
            entries=[dict(vars(e), on_device=e.on_device) for e in entries], **report),
            indent=1) + "\n")
    for e in bad:
        print(f"FAIL: CPU fallback in the training step: {e.namespace}::{e.op} "
              f"({','.join(e.dtypes)}) at {e.caller}", file=sys.stderr)
    return 1 if bad else 0


def physical(args: argparse.Namespace):
    """The recordings at ``--recorded-batches`` samples per pooling mode with the memory and
    roofline taps. Returns (the first batch's recording of ``--pooling`` with its evaluation
    step, for the inventory; the JSON report; the tables as text)."""
    from bevdepth_npu.ops import memory, recipe, roofline
    if args.batch < 1:
        from bevdepth_npu.errors import UserError
        raise UserError(f"--batch {args.batch}: must be at least 1")
    try:
        recorded = sorted({int(b) for b in args.recorded_batches.split(",") if b.strip()})
    except ValueError:
        recorded = []
    if not recorded or recorded[0] < 1 or len(recorded) > 2:
        from bevdepth_npu.errors import UserError
        raise UserError(f"--recorded-batches {args.recorded_batches}: one or two batch sizes "
                        f"of at least 1, such as 1,2")
    checks, estimates, report = [], [], {}
    inventory = None
    roofs, recorded_counts = {}, {}
    for pooling in ("product", "fused"):
        lifetimes, flops = {}, {}
        for batch in recorded:
            lt, fl, prof = memory.Lifetimes(), roofline.Flops(), memory.ProfiledPeak()
            rec = recipe.record(args.exp, pooling, batch_size=batch, taps=[lt, fl],
                                step_context=prof, eval_step=(batch == recorded[0] and pooling
                                                              == args.pooling and not
                                                              args.no_eval))
            lt.finish()
            fl.finish()
            if batch == recorded[0] and pooling == args.pooling:
                inventory = rec
            estimate = memory.cpu_peak(lt)
            checks.append(dict(pooling=pooling, batch=batch, estimate_bytes=estimate,
                               profiler_bytes=prof.peak_bytes,
                               error=memory.error(estimate, prof.peak_bytes)))
            lifetimes[batch], flops[batch] = lt, dict(fl.counts)
            print(f"ops: recorded {pooling} pooling at {batch} sample(s): estimate "
                  f"{estimate / 2**20:.1f} MiB, profiler {prof.peak_bytes / 2**20:.1f} MiB",
                  flush=True)
        estimates.append(memory.npu_estimate(pooling, lifetimes))
        roofs[pooling] = roofline.table_rows(roofline.at_batch(flops, args.batch))
        recorded_counts[pooling] = flops
    texts = []
    if args.memory:
        texts.append(memory.format_tables(checks, estimates, args.batch))
        report["memory"] = dict(cpu_check=checks,
                                npu=[e.to_json(args.batch) for e in estimates])
    if args.roofline:
        for pooling, rows in roofs.items():
            texts.append(roofline.format_table(pooling, args.batch, rows))
        report["roofline"] = dict(chip=roofline.CHIP, batch=args.batch,
                                  recorded={p: {str(b): {k: vars(c) for k, c in counts.items()}
                                                for b, counts in per_batch.items()}
                                            for p, per_batch in recorded_counts.items()},
                                  earlier_example_step_s=roofline.EARLIER_EXAMPLE_STEP_S,
                                  modules=roofs)
    return inventory, report, "\n".join(texts)


def guard(entries, listed_syncs: Dict[str, int], known_fallbacks: Dict[str, str]) -> List[str]:
    """What the regression guard fails on, in the training phases: a CPU-fallback op not in
    ``known_fallbacks`` (``namespace::op`` -> reason), and device syncs at a caller more often per
    step than ``listed_syncs`` (caller file:line -> count) allows. Each message names op and
    caller."""
    problems = []
    syncs: Dict[str, int] = collections.Counter()
    for e in entries:
        if e.phase == "eval" or e.under:
            continue
        name = f"{e.namespace}::{e.op}"
        if e.klass == "CPU fallback" and name not in known_fallbacks:
            problems.append(f"CPU fallback {name} ({','.join(e.dtypes)}) in {e.phase} at "
                            f"{e.caller}")
        if e.klass == "host-synchronising":
            syncs[(e.caller, name)] += e.calls
    per_caller: Dict[str, int] = collections.Counter()
    for (caller, _), calls in syncs.items():
        per_caller[caller] += calls
    for (caller, name), calls in sorted(syncs.items()):
        allowed = listed_syncs.get(caller, 0)
        if per_caller[caller] > allowed:
            problems.append(f"device sync {name} at {caller}: {per_caller[caller]} per step, "
                            f"{allowed} listed")
    return problems
