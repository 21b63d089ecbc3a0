"""``bevdepth-npu run smoke``: build (or reuse) the environment before anything else, prepare
the dataset (the synthetic nuScenes, its info files and depth ground truth), train the smoke
experiment, evaluate it on mini_val, draw a picture, print the metrics table.

The default dataset lives in the cache under a name keyed by what determines its bytes (the
generator's settings and code, BEVDepth's gen_info.py and gen_depth_gt.py); it is built beside
that name and renamed when complete, so an interrupted preparation is never taken for a dataset,
and reused afterwards. A dataset given with --data-dir is completed in place: generated if it
has no v1.0-mini, info files written if missing, depth_gt filled in (existing files are kept).

Part of ``bevdepth-npu run`` (bevdepth_npu/run/; the shared core is core.py). Tests:
tests/integration/test_smoke.py.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from bevdepth_npu import paths
from bevdepth_npu.errors import UserError
from bevdepth_npu.run.console import Heartbeat
from bevdepth_npu.run.core import Run, Stop, in_root, installed_bevdepth, is_checkout
from bevdepth_npu.run.settings import Settings
from bevdepth_npu.run.stages import run_stage
from bevdepth_npu.runrecord import describe_settings

READY_MARK = ".bevdepth-npu-smoke-ready"

# run(stage name, command, cwd) -> exit status; the runner's run_stage into the data log.
StageRunner = Callable[[str, Sequence[str], Path], int]


class DataError(Exception):
    """Preparing the dataset failed; the message says which step and where its log is."""


def prepare_environment(device: str, log: Callable[[str], None]) -> str:
    """The interpreter of the environment ``bevdepth-npu env --device DEVICE`` builds or
    reuses (fetching the pins the cache lacks, from BEVDEPTH_NPU_MIRRORS where set)."""
    from bevdepth_npu import envbuild
    log(f"environment: bevdepth-npu env --device {device}")
    try:
        venv = envbuild.build(device)
    except UserError as err:
        raise DataError(f"bevdepth-npu env --device {device} failed: {err}\n(--python=PATH uses "
                        "an existing environment)") from None
    return str(venv / "bin" / "python")


def data_key(bevdepth_root: Path) -> str:
    """12 hex digits of the code that determines the dataset's bytes."""
    digest = hashlib.sha256()
    files: List[Path] = sorted((paths.REPO_ROOT / "bevdepth_npu" / "synth").glob("*.py"))
    files += [bevdepth_root / "scripts" / name for name in ("gen_info.py", "gen_depth_gt.py")]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def default_data_dir(settings: Settings, bevdepth_root: Path) -> Path:
    return (paths.cache_dir() / "data" /
            f"synth-v1.0-mini-s{settings.scenes}-n{settings.samples_per_scene}"
            f"-seed{settings.synth_seed}-{data_key(bevdepth_root)}")


def _complete(directory: Path, settings: Settings, python: str, run: StageRunner) -> None:
    steps = []
    if not (directory / "v1.0-mini").is_dir():
        steps.append(("synth", [python, "-m", "bevdepth_npu", "synth", "--out", str(directory),
                                "--scenes", str(settings.scenes), "--samples-per-scene",
                                str(settings.samples_per_scene), "--seed",
                                str(settings.synth_seed)], paths.REPO_ROOT))
    if not all((directory / f"nuscenes_infos_{split}.pkl").is_file()
               for split in ("train", "val")):
        steps.append(("gen_info", [python, "scripts/gen_info.py", "--data-root", str(directory),
                                   "--version", "v1.0-mini"], None))
    # gen_depth_gt.py skips the files that exist.
    steps.append(("gen_depth_gt", [python, "scripts/gen_depth_gt.py", "--data-root",
                                   str(directory)], None))
    for name, command, cwd in steps:
        status = run(name, command, cwd)
        if status != 0:
            raise DataError(f"data: {name} for {directory} failed (exit {status})")


def prepare_data(settings: Settings, python: str, bevdepth_root: Path, run: StageRunner,
                 note: Callable[[str], None]) -> Path:
    """The dataset directory, ready for training (see the module docstring)."""
    if settings.data_dir:
        directory = Path(settings.data_dir).expanduser().absolute()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"--data-dir={settings.data_dir} cannot be created: {err}") from None
        note(f"data: {directory}")
        _complete(directory, settings, python, run)
        return directory
    directory = default_data_dir(settings, bevdepth_root)
    if (directory / READY_MARK).is_file():
        note(f"data: reusing {directory}")
        return directory
    note(f"data: generating {directory}")
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    _complete(partial, settings, python, run)
    (partial / READY_MARK).write_text("ok\n")
    try:
        partial.rename(directory)
    except OSError:
        if not (directory / READY_MARK).is_file():
            raise DataError(f"cannot move {partial} to {directory}") from None
        # Another run finished the same dataset first; use it (this run's copy is its own).
        shutil.rmtree(partial)
    return directory


class SmokeRun(Run):
    """The smoke run, in the environment ``prepare_environment`` built (the runner restarts
    itself there first)."""

    metrics_label = "mini_val"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers: Optional[int] = self.s.num_workers

    def plan(self) -> List[Callable[[], None]]:
        return [self.locate_installed, self.resolve_device, self.resources, self.open_smoke_run,
                self.prepare_data, self.train, self.evaluate_training, self.finish,
                self.summarize, self.show, self.report]

    def locate_installed(self) -> None:
        """The smoke run uses the BEVDepth its environment has installed."""
        root = installed_bevdepth()
        if root is None or not is_checkout(root):
            raise Stop(f"{self.python} cannot import bevdepth: not a bevdepth-npu environment "
                       "(run bevdepth-npu env)")
        self.bevdepth_root = root
        self.exp = in_root(root, self.s.exp)
        if not self.exp.is_file():
            raise Stop(f"--exp={self.exp}: no such experiment file (is {root} the patched "
                       "BEVDepth tree? bevdepth-npu apply bevdepth)")
        self.device_dir = self.output_dir()

    def resources(self) -> None:
        """Loader processes and, on CPU, torch threads: one per core the loader leaves free
        (more threads than free cores make every step wait for the slowest one)."""
        if self.device == "cpu":
            self.num_workers = 1 if self.num_workers is None else self.num_workers
            if not self.env.get("OMP_NUM_THREADS"):
                cores = len(os.sched_getaffinity(0))
                threads = self.s.threads or max(1, cores - self.num_workers)
                self.env["OMP_NUM_THREADS"] = str(threads)
        elif self.num_workers is None:
            self.num_workers = 4
        threads = self.env.get("OMP_NUM_THREADS")
        self.console.note(f"python {self.python}, BEVDepth {self.bevdepth_root}, device "
                          f"{self.device}" + (f", torch threads: {threads}" if threads else ""))

    def open_smoke_run(self) -> None:
        s = self.s
        self.case_name = f"BEVDepth_smoke_bs{s.batch_size}_1p_acc"
        self.open_run(self.case_name, None, dict(
            network="BEVDepth_smoke", case_name=self.case_name, rank_size=1,
            batch_size_per_device=s.batch_size, mode="full", steps=s.steps,
            settings=describe_settings([("exp", self.exp), ("steps", s.steps),
                                        ("batch", s.batch_size), ("lr", s.learning_rate),
                                        ("pooling", s.pooling),
                                        ("extra", " ".join(s.experiment_args))])))
        self.link(f"train_{self.log_id}.log", f"train_{self.log_id}.log")

    def prepare_data(self) -> None:
        assert self.run_dir is not None
        log = self.run_dir / "data.log"

        def stage(name: str, command: Sequence[str], cwd: Optional[Path]) -> int:
            return run_stage(self.console, name, command, log, cwd or self.bevdepth_root,
                             self.stage_env(), Heartbeat(self.console, f"data: {name}"))

        try:
            self.data_root = prepare_data(self.s, self.python, self.bevdepth_root, stage,
                                          self.console.note)
        except DataError as err:
            raise Stop(f"{err}; log: {log}")
        self.save(data_root=str(self.data_root))

    def common_flags(self) -> List[str]:
        s = self.s
        return ["--data_root", str(self.data_root), "--device", self.device, "--pooling",
                s.pooling, "--seed", str(s.seed), "--batch_size_per_device", str(s.batch_size),
                "--num_workers", str(self.num_workers)]

    def train_command(self, resume: str) -> List[str]:
        assert self.run_dir is not None
        # --max_epochs -1: the step count alone ends the run, whatever the dataset size.
        return [self.python, str(self.exp), *self.common_flags(), "--learning_rate",
                str(self.s.learning_rate), "--max_steps", str(self.s.steps), "--max_epochs",
                "-1", "--default_root_dir", str(self.run_dir), *self.s.experiment_args]

    def eval_command(self, checkpoint: Path, cards: int, batch: int) -> List[str]:
        assert self.run_dir is not None
        command = [self.python, str(self.exp), "-e", "--ckpt_path", str(checkpoint),
                   *self.common_flags()]
        if self.s.weights:
            command += ["--weights", self.s.weights]
        return command + ["--default_root_dir", str(self.run_dir / "eval"),
                          *self.s.experiment_args]

    def train(self) -> None:
        self.run_training("none", "0", "")

    def evaluate_training(self) -> None:
        assert self.run_dir is not None
        self.evaluate(self.last_checkpoint(), 1, self.s.batch_size, "")
        metrics = self.run_dir / "eval" / "metrics_summary.json"
        if not metrics.is_file():
            raise Stop(f"evaluation wrote no {metrics} (see "
                       f"{self.run_dir / f'eval_{self.log_id}.log'})")

    def show(self) -> None:
        """Draw the first validation sample's predictions against the ground truth."""
        assert self.run_dir is not None
        log = self.run_dir / "show.log"
        command = [self.python, "-m", "bevdepth_npu", "show", str(self.run_dir), "--data-root",
                   str(self.data_root), "--version", "v1.0-mini", "--samples", "1"]
        status = run_stage(self.console, "picture", command, log, self.bevdepth_root,
                           self.stage_env(), Heartbeat(self.console, "picture"))
        pictures = sorted((self.run_dir / "eval" / "show").glob("*.png"))
        if status != 0 or not pictures:
            raise Stop(f"drawing the predictions failed (exit {status}); log: {log}",
                       record=None)
        self.console.note(f"predictions drawn: {pictures[0]}")

    def report(self) -> None:
        super().report()
        assert self.run_dir is not None
        curves = self.run_dir / "curves.png"
        if not curves.is_file():
            raise Stop(f"no loss curve: {curves} was not written (is matplotlib installed in "
                       f"{self.python}'s environment?)", record=None)
