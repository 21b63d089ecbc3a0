"""Learning check: the smoke experiment memorises a few synthetic samples, and (--held-out) finds
objects in synthetic scenes it never trained on.

    python -m bench.learning_check                       # from the repository root, in the env
    python -m bench.learning_check --held-out            # the held-out check: bench/held_out.py
    python -m bench.learning_check --steps 200 --eval-every 50 --samples 4 --learning-rate 1e-3
    python -m bench.learning_check --python ~/.cache/bevdepth-npu/venvs/cpu-py3.11/bin/python

It generates a synthetic nuScenes whose mini_val scene holds ``--samples`` key frames, trains
bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py on exactly those samples through its
own command line (the path test/train_smoke.sh takes), and every ``--eval-every`` steps evaluates
the checkpoint on the same samples with the nuScenes devkit. It prints loss and mAP against steps
and training time, and writes learning_check.json and learning_check.png into a fresh run
directory. Target: mAP >= 0.3 at the end. A benchmark, not a test: the exit status is 0 when every
stage ran, whether or not the target was met (the verdict is printed and in the JSON); 1 when a
stage failed; 2 for bad arguments.

How the run is set up, and why:
  - the training info file holds the evaluated samples repeated ``R`` times, each copy with its
    own scene token (so the previous key frame of the two-key-frame input is always the true one),
    with R chosen so that one epoch is ``--eval-every`` steps: the recipe's MultiStepLR milestones
    (epochs 19 and 23) then fall beyond the run, as they fall beyond any short run;
  - training runs in segments of ``--eval-every`` steps, each continuing from the previous
    segment's checkpoint (``--resume PATH``: weights, optimizer, schedule, step and random state),
    so each evaluation sees the model of that step and the run is the one an uninterrupted
    training would make;
  - the learning rate per sample defaults to 1e-3 (2e-3 for the batch of 2), not the recipe's
    2e-4/64: the recipe's rate is meant for 10,000 steps, this check has a few hundred (at 5e-4
    the check ends at mAP 0.296, at 1e-3 at 0.377);
  - loss per step comes from each segment's steps.jsonl (read by bevdepth_npu.steplog, the one
    reader of that file); training time is the sum of their step times (process start-up and
    checkpoint loading left out), or the wall time of the training processes when a segment
    wrote no step records.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.ablation import BREAKS
from bench.harness import machine_info
from bevdepth_npu import devices
from bevdepth_npu.synth import taxonomy as tx
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.argtypes import positive_float, positive_int
from bevdepth_npu.steplog import STEPS_FILE, read_steps

EXP_RELATIVE = Path("bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py")
TARGET_MAP = 0.3
DEFAULT_STEPS = 200          # mAP passes 0.3 between steps 150 and 200 on 4 samples
DEFAULT_EVAL_EVERY = 50      # four points on the mAP curve; each evaluation costs ~25 s on CPU
DEFAULT_SAMPLES = 4          # one scene of 4 key frames: "a few samples"
DEFAULT_BATCH = 2
DEFAULT_LR_PER_SAMPLE = 1e-3
DEFAULT_SYNTH_SEED = 0
# The held-out check (--held-out, bench/held_out.py).
# Many short scenes: neighbouring key frames of one scene show nearly the same world, so scenes,
# not frames, are what training generalises from; 8 held-out scenes give a steadier score than 4.
DEFAULT_TRAIN_SCENES = 48
DEFAULT_VAL_SCENES = 8
DEFAULT_SAMPLES_PER_SCENE = 3
DEFAULT_EPOCHS = 24          # the recipe's: its MultiStepLR drops the rate at epochs 19 and 23
DEFAULT_EVAL_EVERY_EPOCHS = 4
LOSS_WINDOW = 10             # steps averaged into the loss printed at each evaluation
REPO_ROOT = Path(__file__).resolve().parent.parent


class CheckError(RuntimeError):
    """A stage failed; the message names it and its log."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.learning_check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"training steps in all (default {DEFAULT_STEPS}; --held-out: "
                        f"--epochs epochs)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help=f"evaluate every N steps and at the end (default {DEFAULT_EVAL_EVERY}; "
                        f"--held-out: every --eval-every-epochs epochs)")
    p.add_argument("--samples", type=int, choices=range(2, 41), default=DEFAULT_SAMPLES,
                   metavar="N", help="samples trained and evaluated on, 2-40 (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH,
                   help="samples per step (default %(default)s)")
    p.add_argument("--learning-rate", type=positive_float, default=DEFAULT_LR_PER_SAMPLE,
                   help="learning rate per sample; times the batch size (default %(default)s)")
    p.add_argument("--synth-seed", type=int, default=DEFAULT_SYNTH_SEED,
                   help="seed of the synthetic dataset (default %(default)s)")
    p.add_argument("--device", choices=devices.CHOICES, default=devices.AUTO,
                   help="training device (default: auto, the rule of bevdepth_npu/devices.py)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader processes (default: 1 on cpu, 4 otherwise)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="cpu only: torch threads (default: OMP_NUM_THREADS, else cores minus "
                        "loader processes, at least 1)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the bevdepth-npu environment (default: this one)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="run directory to create (default: bench-results/learning_check_<time>)")
    held = p.add_argument_group(
        "held-out check", "train on synthetic scenes of the train split, score on scenes of the "
        "val split never trained on (bench/held_out.py)")
    held.add_argument("--held-out", action="store_true", help="run the held-out check")
    held.add_argument("--train-scenes", type=int, choices=range(1, len(tx.TRAINVAL_TRAIN) + 1),
                      default=DEFAULT_TRAIN_SCENES, metavar="N",
                      help=f"training scenes, 1-{len(tx.TRAINVAL_TRAIN)} (default %(default)s)")
    held.add_argument("--val-scenes", type=int, choices=range(1, len(tx.TRAINVAL_VAL) + 1),
                      default=DEFAULT_VAL_SCENES, metavar="N",
                      help=f"held-out scenes, 1-{len(tx.TRAINVAL_VAL)} (default %(default)s)")
    held.add_argument("--samples-per-scene", type=int, choices=range(2, 41),
                      default=DEFAULT_SAMPLES_PER_SCENE, metavar="N",
                      help="key frames per scene, 2-40 (default %(default)s)")
    held.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                      help="training epochs over the training scenes when --steps is not given; "
                           "the recipe's schedule drops the rate at epochs 19 and 23 "
                           "(default %(default)s)")
    held.add_argument("--eval-every-epochs", type=positive_int, default=DEFAULT_EVAL_EVERY_EPOCHS,
                      help="evaluate every N epochs and at the end (default %(default)s)")
    held.add_argument("--ablation", choices=("none",) + BREAKS, default="none",
                      help="train with a piece of the geometry or the depth labels broken on "
                           "purpose (bench/ablation.py; default %(default)s)")
    held.add_argument("--depth-shift-m", type=float, default=1.0,
                      help="--ablation depth-shift: metres added to every depth label "
                           "(default %(default)s)")
    return p


# ------------------------------------------------------------------------------------------ steps

def _run(cmd: Sequence[str], log: Path, env: Dict[str, str], cwd: Path, what: str) -> float:
    """Run ``cmd`` with its output in ``log``; return its wall time; raise CheckError on failure."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        handle.write(" ".join(str(c) for c in cmd) + "\n")
        handle.flush()
        rc = subprocess.call([str(c) for c in cmd], stdout=handle, stderr=subprocess.STDOUT,
                             env=env, cwd=str(cwd))
    wall_s = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise CheckError(f"{what} failed (exit {rc}); log {log}:\n  " + "\n  ".join(tail))
    return wall_s


def _query(python: str, code: str, env: Dict[str, str]) -> str:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise CheckError(f"{python} -c {code!r} failed:\n{out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def repeat_infos(infos: List[Dict[str, Any]], copies: int) -> List[Dict[str, Any]]:
    """``copies`` copies of ``infos``, each with scene tokens of its own."""
    repeated = []
    for copy_index in range(copies):
        for info in infos:
            item = dict(info)
            item["scene_token"] = f"{info['scene_token']}-copy{copy_index}"
            repeated.append(item)
    return repeated


def newest_checkpoint(root: Path) -> Optional[Path]:
    last = root / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    found = list(root.rglob("*.ckpt"))
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p))) if found else None


def plot(path: Path, points: List[Dict[str, Any]], steps: List[Dict[str, float]],
         title: str, target: float = TARGET_MAP, scored_on: str = "on the training samples") -> None:
    # Figure + Agg canvas: no global backend, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 9), constrained_layout=True)
    FigureCanvasAgg(figure)
    loss_ax, map_ax, time_ax = figure.subplots(3, 1)
    if steps:
        loss_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], linewidth=1)
        loss_ax.set_yscale("log")
    else:
        loss_ax.text(0.5, 0.5, f"no {STEPS_FILE} records from the training",
                     ha="center", va="center", transform=loss_ax.transAxes)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    map_ax.plot([p["step"] for p in points], [p["mAP"] for p in points], marker="o", label="mAP")
    map_ax.plot([p["step"] for p in points], [p["NDS"] for p in points], marker="s", label="NDS")
    map_ax.axhline(target, color="grey", linestyle="--", label=f"target mAP {target}")
    map_ax.set_xlabel("step")
    map_ax.set_ylabel(scored_on)
    map_ax.legend(loc="lower right")
    time_ax.plot([p["train_time_s"] for p in points], [p["mAP"] for p in points], marker="o")
    time_ax.axhline(target, color="grey", linestyle="--")
    time_ax.set_xlabel("training time (s)")
    time_ax.set_ylabel("mAP")
    figure.suptitle(title)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100,
                                                     metadata={"Software": None}))


class Check:
    """One run of the check: the environment, the run directory and the points so far."""

    version = "v1.0-mini"
    repo_root = REPO_ROOT
    target = TARGET_MAP
    scored_on = "on the training samples"
    title = "smoke experiment on {samples} synthetic samples"

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stage_times: Dict[str, float] = {}
        self.started_s = time.time()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), self.env.get("PYTHONPATH")]))
        self.python = args.python
        self.bevdepth_root = Path(_query(
            self.python,
            "import os, bevdepth; print(os.path.dirname(os.path.dirname(bevdepth.__file__)))",
            self.env))
        self.exp = self.bevdepth_root / EXP_RELATIVE
        if not self.exp.is_file():
            raise CheckError(f"{self.exp} is missing: {self.bevdepth_root} is not the patched "
                             "BEVDepth tree")
        self.device = devices.choose(args.device)
        self.workers = (args.num_workers if args.num_workers is not None
                        else (1 if self.device == "cpu" else 4))
        if self.device == "cpu":
            # More torch threads than free cores make every step wait for the slowest thread.
            self.env["OMP_NUM_THREADS"] = str(
                args.threads or (int(self.env["OMP_NUM_THREADS"])
                                 if self.env.get("OMP_NUM_THREADS")
                                 else max(1, len(os.sched_getaffinity(0)) - self.workers)))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = (args.out_dir or Path("bench-results") / f"learning_check_{stamp}").resolve()
        self.data = self.run_dir / "data"
        self.copies = 0
        self.samples = 0
        self.step_records: Dict[int, Dict[str, float]] = {}
        self.train_time_s = 0.0

    def run(self, cmd: Sequence[Any], log: Path, what: str, cwd: Optional[Path] = None) -> float:
        wall_s = _run(cmd, log, self.env, cwd or self.bevdepth_root, what)
        self.stage_times[log.stem if log.parent == self.run_dir else
                         f"{log.parent.name}/{log.stem}"] = round(wall_s, 1)
        return wall_s

    def make_data(self) -> None:
        """The mini_val scene holds the samples; the training infos repeat them so that one
        epoch is ``--eval-every`` steps."""
        args = self.args
        self.run([self.python, "-m", "bevdepth_npu", "synth", "--out", self.data, "--scenes", "2",
                  "--samples-per-scene", args.samples, "--seed", args.synth_seed, "--quiet"],
                 self.run_dir / "synth.log", "bevdepth-npu synth", cwd=REPO_ROOT)
        self.write_infos()
        with open(self.data / "nuscenes_infos_val.pkl", "rb") as handle:
            val_infos = pickle.load(handle)
        self.samples = len(val_infos)
        self.copies = max(1, math.ceil(self.eval_every * args.batch_size / len(val_infos)))
        atomic_write(self.data / "nuscenes_infos_train.pkl",
                     pickle.dumps(repeat_infos(val_infos, self.copies)))
        print(f"learning_check: {len(val_infos)} samples (scene "
              f"{val_infos[0]['scene_token'][:8]}), training infos repeat them {self.copies}x; "
              f"device {self.device}" + (f", {self.env['OMP_NUM_THREADS']} torch threads"
                                         if self.device == "cpu" else ""), flush=True)

    def write_infos(self) -> None:
        """BEVDepth's info files and precomputed depth labels for the generated dataset."""
        self.run([self.python, "scripts/gen_info.py", "--data-root", self.data, "--version",
                  self.version], self.run_dir / "gen_info.log", "scripts/gen_info.py")
        self.run([self.python, "scripts/gen_depth_gt.py", "--data-root", self.data],
                 self.run_dir / "gen_depth_gt.log", "scripts/gen_depth_gt.py")

    @property
    def eval_every(self) -> int:
        return self.args.eval_every or DEFAULT_EVAL_EVERY

    def plan(self) -> List[int]:
        """The steps at which the model is evaluated; the last one ends training."""
        steps, every = self.args.steps or DEFAULT_STEPS, self.eval_every
        return list(range(every, steps, every)) + [steps]

    def training_command(self, milestone: int, segment: Path,
                         checkpoint: Optional[Path]) -> List[Any]:
        return [self.python, self.exp, *self.common(), "--learning_rate",
                self.args.learning_rate, "--max_steps", milestone, "--max_epochs", "-1",
                "--default_root_dir", segment,
                "--resume", checkpoint if checkpoint is not None else "none"]

    def finish(self, points: List[Dict[str, Any]], result: Dict[str, Any]) -> None:
        """What a check adds to its result after the last evaluation."""

    def common(self) -> List[Any]:
        return ["--data_root", self.data, "--nusc_version", self.version,
                "--device", self.device, "--seed", "0",
                "--batch_size_per_device", self.args.batch_size, "--num_workers", self.workers,
                "--enable_progress_bar", "false"]

    def train_to(self, milestone: int, checkpoint: Optional[Path]) -> Tuple[Path, str]:
        """Train from ``checkpoint`` (None: from scratch) to step ``milestone``; return the new
        checkpoint and where the training time came from."""
        segment = self.run_dir / f"train_{milestone:05d}"
        segment.mkdir()
        wall_s = self.run(self.training_command(milestone, segment, checkpoint),
                          segment / "train.log", f"training to step {milestone}")
        newest = newest_checkpoint(segment)
        if newest is None:
            raise CheckError(f"training to step {milestone} wrote no checkpoint below {segment}")
        steps_file = segment / STEPS_FILE
        records = read_steps(steps_file).records if steps_file.is_file() else []
        for record in records:
            self.step_records[record.step] = dict(step=record.step, loss=record.loss,
                                                  step_time_s=record.step_time_s)
        # Steps' own times leave out process start-up; without step records, the process's.
        self.train_time_s += sum(r.step_time_s for r in records) if records else wall_s
        return newest, "step log" if records else "process wall time"

    def evaluate(self, milestone: int, checkpoint: Path, split: str = "val") -> Dict[str, Any]:
        evaluation = self.run_dir / (f"eval_{milestone:05d}" if split == "val"
                                     else f"eval_{split}_{milestone:05d}")
        evaluation.mkdir()
        self.run([self.python, self.exp, "-e", "--ckpt_path", checkpoint, *self.common(),
                  "--eval_split", split, "--default_root_dir", evaluation],
                 evaluation / "eval.log", f"evaluation of the {split} split at step {milestone}")
        metrics_path = evaluation / "metrics_summary.json"
        if not metrics_path.is_file():
            raise CheckError(f"evaluation at step {milestone} wrote no {metrics_path}")
        with open(metrics_path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        logged = [self.step_records[s] for s in sorted(self.step_records) if s <= milestone]
        recent = [r["loss"] for r in logged[-LOSS_WINDOW:]]
        return dict(step=milestone, train_time_s=round(self.train_time_s, 3),
                    loss=(sum(recent) / len(recent)) if recent else None,
                    mAP=metrics["mean_ap"], NDS=metrics["nd_score"],
                    checkpoint=str(checkpoint), metrics=str(metrics_path))

    def result(self, points: List[Dict[str, Any]]) -> Dict[str, Any]:
        args, final = self.args, points[-1]
        steps = [self.step_records[s] for s in sorted(self.step_records)]
        return dict(
            check="learning", target_mAP=self.target, passed=final["mAP"] >= self.target,
            final_mAP=final["mAP"], final_NDS=final["NDS"], points=points, steps=steps,
            settings=dict(steps=points[-1]["step"], eval_every=points[0]["step"],
                          samples=self.samples,
                          batch_size=args.batch_size,
                          learning_rate_per_sample=args.learning_rate,
                          synth_seed=args.synth_seed, device=self.device,
                          num_workers=self.workers, torch_threads=self.env.get("OMP_NUM_THREADS"),
                          experiment=str(EXP_RELATIVE), info_copies=self.copies),
            wall_time_s=round(time.time() - self.started_s, 1),
            # the CPU and torch's kernel set on it: runs on machines with different sets may differ
            machine=machine_info(("torch", "numpy")),
            notes=([] if steps else [f"no {STEPS_FILE} records from the training: no loss per "
                                     "step; training time is the wall time of the training "
                                     "processes"]))


def run_check(args: argparse.Namespace) -> Dict[str, Any]:
    if args.held_out:
        from bench.held_out import HeldOutCheck
        check: Check = HeldOutCheck(args)
    else:
        check = Check(args)
    check.run_dir.mkdir(parents=True, exist_ok=False)
    print(f"learning_check: run directory {check.run_dir}", flush=True)
    check.make_data()
    milestones = check.plan()
    points: List[Dict[str, Any]] = []
    checkpoint: Optional[Path] = None
    print(f"{'step':>6} {'train time s':>13} {'loss':>10} {'mAP':>7} {'NDS':>7}", flush=True)
    for milestone in milestones:
        checkpoint, time_source = check.train_to(milestone, checkpoint)
        point = dict(check.evaluate(milestone, checkpoint), train_time_source=time_source)
        points.append(point)
        loss_text = f"{point['loss']:.4g}" if point["loss"] is not None else "n/a"
        print(f"{milestone:>6} {point['train_time_s']:>13.1f} {loss_text:>10} "
              f"{point['mAP']:>7.4f} {point['NDS']:>7.4f}", flush=True)
    result = check.result(points)
    check.finish(points, result)
    run_dir, final = check.run_dir, points[-1]
    atomic_write(run_dir / "learning_check.json",
                 (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    plot(run_dir / "learning_check.png", points, result["steps"],
         check.title.format(samples=check.samples) + f", batch {args.batch_size}, "
         f"lr {args.learning_rate:g}/sample, {check.device}", check.target, check.scored_on)
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"learning_check: final mAP {final['mAP']:.4f} (target >= {check.target}: {verdict}), "
          f"NDS {final['NDS']:.4f}, wall time {result['wall_time_s']:.0f} s", flush=True)
    print(f"learning_check: wrote {run_dir / 'learning_check.json'} and "
          f"{run_dir / 'learning_check.png'}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_check(args)
    except CheckError as err:
        print(f"learning_check: error: {err}", file=sys.stderr)
        return 1
    except FileExistsError as err:
        print(f"learning_check: error: {err.filename} exists; choose another --out-dir",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
