"""Benchmark of one training step on CPU: patched tree (--pooling product and fused) against
upstream.

    python -m bench --only train [--quick] [--repeats N]

One step = training_step (forward, head targets, detection and depth losses), backward and
the AdamW step, on a fixed realistic batch (bevdepth_npu/testing.py training_batch:
batch 1, all cameras and key frames of the experiment, boxes, sparse depth labels), from the
same random initialisation (no pretrained download). Patched and upstream each run in their own
worker (upstream: pristine checkout, its CUDA pooling replaced by the parity tests' index_put_
reference, ``.cuda()`` mapped to the CPU); rounds interleave them. Figures: median step time
and peak resident memory of the worker during the step.

Experiments (sides: upstream, patched with --pooling product, patched with --pooling fused):
  smoke          the patched tree's smoke experiment (bevdepth/exps/nuscenes/smoke/), when it
                 exists; upstream has none, so upstream's base model class is built with the
                 smoke experiment's final backbone and head settings and key frames (product)
  r50            bev_depth_lss_r50_256x704_128x128_24e_2key (256x704, 2 key frames)
  r50-512x1408   bev_depth_lss_r50_512x1408_128x128_24e_2key (4x the pixels; fewer rounds)
Targets: patched (product) / upstream step time <= 1.05 (smoke, r50); r50 with fused against
upstream: step time <= 1.0, peak memory <= 0.85.
"""
from __future__ import annotations

import copy
import os
import pickle
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench import harness
from bevdepth_npu import envvars

NAME = "train"
TITLE = "training step on CPU: patched (product, fused) against upstream (smoke, R50, 512x1408)"

R50_MODULE = "bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key"
R50_512_MODULE = "bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_512x1408_128x128_24e_2key"
SMOKE_PACKAGE_DIR = Path("bevdepth") / "exps" / "nuscenes" / "smoke"
MODEL_SEED = 7
BATCH_SEED = 5
NUM_BOXES = 12
TARGET_RATIO = 1.05            # patched step at most 1.05x upstream's time on CPU
TARGET_FUSED_TIME = 1.0        # fused pooling: the R50 step no slower than upstream's
TARGET_FUSED_MEMORY = 0.85     # and at most 0.85x its peak memory
REPEATS_FULL, REPEATS_QUICK = 3, 2
REPEATS_512_FULL, REPEATS_512_QUICK = 2, 1  # a 512x1408 step takes about 4x an R50 step


def find_smoke_module(bevdepth_root: Path) -> Optional[str]:
    """Module name of the patched tree's smoke experiment, or None when there is none."""
    folder = bevdepth_root / SMOKE_PACKAGE_DIR
    if not folder.is_dir():
        return None
    stems = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    return f"bevdepth.exps.nuscenes.smoke.{stems[0]}" if stems else None


def _confs(exp_module) -> Dict[str, Any]:
    """Backbone and head settings of an experiment module (its own, else base_exp's), with the
    image backbone left randomly initialised: no pretrained weights are downloaded."""
    from bevdepth.exps.nuscenes import base_exp
    backbone_conf = copy.deepcopy(getattr(exp_module, "backbone_conf", base_exp.backbone_conf))
    head_conf = copy.deepcopy(getattr(exp_module, "head_conf", base_exp.head_conf))
    backbone_conf["img_backbone_conf"]["init_cfg"] = None
    return dict(backbone_conf=backbone_conf, head_conf=head_conf)


class TrainStepCase:
    """A Lightning module of one experiment, its optimizer and one fixed batch."""

    def __init__(self, params: Dict[str, Any]):
        import importlib

        import torch
        self.torch = torch
        root_dir = params["root_dir"]
        torch.manual_seed(params["model_seed"])
        if params.get("spec_path"):
            # upstream without this experiment: its base model class with the patched
            # experiment's final settings (what that experiment's own __init__ produced)
            from bevdepth.exps.nuscenes import base_exp
            with open(params["spec_path"], "rb") as fh:
                spec = pickle.load(fh)
            module = base_exp.BEVDepthLightningModel(backbone_conf=spec["backbone_conf"],
                                                     head_conf=spec["head_conf"],
                                                     default_root_dir=root_dir)
            module.key_idxes = list(spec["key_idxes"])
        else:
            exp = importlib.import_module(params["exp_module"])
            # upstream has no pooling option: only the patched sides are given one
            pooling = {"pooling": params["pooling"]} if params.get("pooling") else {}
            module = exp.BEVDepthLightningModel(default_root_dir=root_dir, **pooling,
                                                **_confs(exp))
        self.module = module
        self.key_idxes = list(module.key_idxes)
        self.final_dim = tuple(module.backbone_conf["final_dim"])
        helpers = harness.test_helpers()
        self.batch = helpers.training_batch(self.final_dim, num_sweeps=len(self.key_idxes) + 1,
                                            num_boxes=NUM_BOXES, seed=params["batch_seed"])
        module.log = lambda *args, **kwargs: None  # no Trainer here to log to
        module.train()
        self.optimizer = module.configure_optimizers()[0][0]
        if params.get("write_spec"):
            spec = dict(backbone_conf=module.backbone_conf, head_conf=module.head_conf,
                        key_idxes=self.key_idxes)
            harness.atomic_write(params["write_spec"], pickle.dumps(spec))

    def describe(self) -> Dict[str, Any]:
        params = sum(p.numel() for p in self.module.parameters())
        backbone = self.module.model.backbone
        return dict(final_dim=list(self.final_dim), key_idxes=self.key_idxes,
                    parameters=params, model_class=type(self.module).__module__,
                    pooling=getattr(backbone, "pooling", "upstream"))

    def run(self) -> Dict[str, float]:
        batch = copy.deepcopy(self.batch)  # training_step moves and may modify it
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.module.training_step(batch)
        loss.backward()
        self.optimizer.step()
        return dict(time_s=time.perf_counter() - started, loss=float(loss.detach()))


def make_case(params: Dict[str, Any]) -> TrainStepCase:
    return TrainStepCase(params)


SIDES = ("upstream", "product", "fused")


def run(ctx: harness.Context) -> harness.BenchResult:
    from bench.data import patched_root
    result = harness.BenchResult(NAME, TITLE)
    scratch = ctx.work_dir / "train"
    scratch.mkdir(parents=True, exist_ok=True)
    experiments = []
    smoke = find_smoke_module(patched_root())
    if smoke:
        experiments.append(("smoke", smoke, ("upstream", "product")))
    else:
        result.notes.append(f"no smoke experiment in the patched tree ({SMOKE_PACKAGE_DIR}/): "
                            "only R50 measured")
    experiments.append(("r50", R50_MODULE, SIDES))
    experiments.append(("r50-512x1408", R50_512_MODULE, SIDES))
    rows: List[List[Any]] = []
    figures: Dict[str, Any] = {}
    for name, module_name, sides in experiments:
        repeats = (ctx.repeats_for(REPEATS_512_FULL, REPEATS_512_QUICK) if "512" in name
                   else ctx.repeats_for(REPEATS_FULL, REPEATS_QUICK))
        ctx.log(f"  {name}: {module_name}, {repeats} rounds")
        spec_path = scratch / f"{name}-spec.pkl"
        common = dict(model_seed=MODEL_SEED, batch_seed=BATCH_SEED)
        workers: Dict[str, harness.Worker] = {}
        infos: Dict[str, Dict[str, Any]] = {}
        try:
            for side in sides:
                if side == "upstream":
                    continue
                workers[side] = ctx.worker(harness.ROLE_PATCHED, f"train-{name}-{side}",
                                           env={envvars.DEVICE: "cpu"})
                write_spec = name == "smoke" and side == "product"
                infos[side] = workers[side].setup(name, "bench.train_step:make_case", dict(
                    common, exp_module=module_name, root_dir=str(scratch / f"patched-{side}"),
                    pooling=side, write_spec=str(spec_path) if write_spec else None))["info"]
                if infos[side]["pooling"] != side:
                    raise harness.BenchError(f"{name}: the {side} worker built a model with "
                                             f"pooling={infos[side]['pooling']}")
            workers["upstream"] = ctx.worker(harness.ROLE_UPSTREAM_CPU,
                                             f"train-{name}-upstream")
            upstream_params = dict(common, root_dir=str(scratch / "upstream"))
            if name == "smoke":
                upstream_params["spec_path"] = str(spec_path)
            else:
                upstream_params["exp_module"] = module_name
            infos["upstream"] = workers["upstream"].setup(name, "bench.train_step:make_case",
                                                          upstream_params)["info"]
            for side in sides:
                if infos[side]["parameters"] != infos["upstream"]["parameters"]:
                    raise harness.BenchError(
                        f"{name}: {side} model has {infos[side]['parameters']} parameters, "
                        f"upstream {infos['upstream']['parameters']}: not the same network")
            samples = harness.interleave({side: workers[side].runner(name) for side in sides},
                                         repeats, ctx.warmup, log=ctx.log)
        finally:
            for worker in workers.values():
                worker.close()
            if spec_path.exists():
                os.unlink(spec_path)
        step = {side: harness.Stats.of(samples[side]["time_s"]) for side in sides}
        peak = {side: harness.median_of(samples, side, "peak_rss_bytes") for side in sides}
        peak_increase = {side: harness.median_of(samples, side, "peak_rss_increase_bytes")
                         for side in sides}
        for side in sides:
            rows.append([name, side, step[side].median, step[side].minimum, step[side].maximum,
                         None if peak[side] is None else peak[side] / 2 ** 30,
                         None if peak_increase[side] is None else peak_increase[side] / 2 ** 30,
                         harness.median_of(samples, side, "loss")])
        figures[name] = dict(module=module_name, repeats=repeats, info=infos,
                             step_time_s={s: step[s].to_json() for s in step},
                             peak_rss_bytes=peak, peak_rss_increase_bytes=peak_increase)
        result.ratios += _ratios(name, step, peak)
    result.tables.append(harness.Table(
        f"training step on CPU, batch 1, medians after {ctx.warmup} warm-up (rounds per "
        f"experiment in the JSON); product and fused: the patched tree's --pooling",
        ["experiment", "side", "step s", "min s", "max s", "peak RSS GiB", "step +GiB",
         "loss"], rows))
    result.data = dict(warmup=ctx.warmup, figures=figures)
    return result


def _ratios(name: str, step: Dict[str, harness.Stats], peak: Dict[str, Any]
            ) -> List[harness.Ratio]:
    """The ratios of one experiment: product against upstream (the port's cost), and where
    fused ran, fused against upstream and against product (its gain)."""
    gate = name in ("smoke", "r50")
    ratios = [
        harness.Ratio(f"train.{name}.patched/upstream",
                      harness.safe_ratio(step["product"].median, step["upstream"].median),
                      f"step time, patched (product) against upstream, {name}",
                      ("<=", TARGET_RATIO) if gate else None),
        # Interference from other processes only ever adds time: the fastest rounds show
        # what the noise hides when the medians disagree with them.
        harness.Ratio(f"train.{name}.best.patched/upstream",
                      harness.safe_ratio(step["product"].minimum, step["upstream"].minimum),
                      f"fastest step, patched (product) against upstream, {name}"),
        harness.Ratio(f"train.{name}.peak-memory.patched/upstream",
                      harness.safe_ratio(peak["product"], peak["upstream"]),
                      f"peak resident memory during the step, patched (product) against "
                      f"upstream, {name}"),
    ]
    if "fused" not in step:
        return ratios
    gate = name == "r50"
    return ratios + [
        harness.Ratio(f"train.{name}.fused/upstream",
                      harness.safe_ratio(step["fused"].median, step["upstream"].median),
                      f"step time, patched with --pooling fused against upstream, {name}",
                      ("<=", TARGET_FUSED_TIME) if gate else None),
        harness.Ratio(f"train.{name}.peak-memory.fused/upstream",
                      harness.safe_ratio(peak["fused"], peak["upstream"]),
                      f"peak resident memory during the step, fused against upstream, {name}",
                      ("<=", TARGET_FUSED_MEMORY) if gate else None),
        harness.Ratio(f"train.{name}.fused/product",
                      harness.safe_ratio(step["fused"].median, step["product"].median),
                      f"step time, fused against product, {name}"),
        harness.Ratio(f"train.{name}.peak-memory.fused/product",
                      harness.safe_ratio(peak["fused"], peak["product"]),
                      f"peak resident memory during the step, fused against product, {name}"),
    ]
