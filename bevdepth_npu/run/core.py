"""The shared core of the runs behind test/*.sh: what every mode does the same way.

A run is a plan, a list of steps run in order (``Run.plan``, given by each mode's class); a
step that fails raises ``Stop`` with the exit status the command ends with (a failed stage's own
status), the run record says what happened, and nothing after it runs: evaluation never
follows a failed training. The core holds what the modes share: the run directory and its lock,
the record, the links to the newest run's files, the environment of a stage, the training and
evaluation stages, the summary and the final report. The modes:

  bevdepth_npu/run/train.py     full, performance (train, evaluate, summarize)
  bevdepth_npu/run/evaluate.py  eval (evaluate a checkpoint, summarize)
  bevdepth_npu/run/smoke.py     smoke (environment, dataset, train, evaluate, picture)

Every run gets a fresh directory (bevdepth_npu/runrecord.py has the layout), except that a
training command continues the newest unfinished identical run (--fresh: a new one).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bevdepth_npu import devices, envvars, paths
from bevdepth_npu.errors import UserError
from bevdepth_npu.run.console import Console, Heartbeat, TrainProgress, duration
from bevdepth_npu.run.report import metrics_table, summary_lines
from bevdepth_npu.run.settings import Settings
from bevdepth_npu.run.stages import run_stage, stage_error
from bevdepth_npu.runrecord import (CHECKPOINTS, LAST_CKPT, RUN_JSON, STEPS_JSONL, RunRecord,
                                    link_latest, new_run_dir, now_s)


class Stop(Exception):
    """End the run: ``message`` for the console, ``status`` for the exit, ``record`` the status
    run.json gets (None: leave it)."""

    def __init__(self, message: str, status: int = 1, record: Optional[str] = "failed"):
        super().__init__(message)
        self.status = status
        self.record = record


def is_checkout(path: Optional[Path]) -> bool:
    return path is not None and (path / "bevdepth" / "exps").is_dir()


def installed_bevdepth() -> Optional[Path]:
    """The checkout of the ``bevdepth`` this interpreter imports (found, not imported)."""
    spec = importlib.util.find_spec("bevdepth")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def in_root(root: Path, path: str) -> Path:
    """A setting's path, relative to ``root`` unless absolute."""
    return Path(path) if os.path.isabs(path) else root / path


class Run:
    """One command: its settings, where things are, its record, its console."""

    metrics_label = ""    # what the metrics table says it scored (smoke: mini_val)

    def __init__(self, settings: Settings, console: Console, start_s: float, python: str):
        self.s = settings
        self.console = console
        self.start_s = start_s
        self.python = python
        self.env: Dict[str, str] = dict(os.environ)
        launcher = Path(settings.launcher).absolute() if settings.launcher else None
        self.script_dir = launcher.parent if launcher else paths.REPO_ROOT / "test"
        self.bevdepth_root = Path(".")
        self.exp = Path(".")
        self.data_root = Path(".")
        self.device = ""
        self.device_dir = Path(".")
        self.run_dir: Optional[Path] = None
        self.record = RunRecord()
        self.case_name = ""
        self.log_id = str(settings.ascend_device_id)
        self.summary: Dict = {}
        self._lock = None

    def plan(self) -> List[Callable[[], None]]:
        raise NotImplementedError

    def execute(self) -> int:
        try:
            for step in self.plan():
                step()
            return 0
        except Stop as stop:
            if stop.record and self.run_dir is not None:
                self.mark(stop.record, error=" ".join(str(stop).split()))
            self.console.error(str(stop))
            return stop.status
        finally:
            if self.run_dir is not None and self.record.get("status") == "running":
                # Stopped by a signal or an error of this program: the next identical command
                # continues the run.
                self.mark("interrupted")

    # ------------------------------------------------------------------ where things are
    def resolve_device(self) -> None:
        """The device by the one rule (bevdepth_npu/devices.py); the experiment is told it."""
        try:
            self.device = devices.choose(self.s.device)
        except UserError as err:
            raise Stop(str(err)) from None

    def output_dir(self) -> Path:
        output_root = Path(self.s.output_root) if self.s.output_root else \
            self.script_dir / "output"
        return output_root.absolute() / str(self.s.ascend_device_id)

    # ------------------------------------------------------------------ run directories
    def open_run(self, prefix: str, continued: Optional[Path], fields: Dict) -> None:
        try:
            self.device_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Stop(f"cannot create {self.device_dir} (--output-root): {err}")
        if continued is not None:
            self.run_dir = continued
            self.console.note(f"continuing the unfinished run {continued} from its last "
                              "checkpoint (--fresh starts a new run)")
        else:
            self.run_dir = new_run_dir(self.device_dir, prefix)
            self.console.note(f"new run directory {self.run_dir}")
        self._lock_run_dir()
        self.record = RunRecord.load(self.run_dir / RUN_JSON)
        self.record.update(status="running", device=self.device, python=self.python,
                           bevdepth_root=str(self.bevdepth_root),
                           device_type=self.s.device_type or platform.machine(), **fields)
        self.record.new_attempt(start_time_s=self.start_s, node_rank=self.s.node_rank)
        self.record.save(self.run_dir)
        self.link("latest", "")

    def _lock_run_dir(self) -> None:
        try:
            import filelock
        except ImportError:
            raise Stop(f"{self.python} has no filelock module: run in the bevdepth-npu "
                       "environment (bevdepth-npu env), or pip install filelock") from None
        assert self.run_dir is not None
        self._lock = filelock.FileLock(str(self.run_dir / ".lock"))
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            busy, self.run_dir = self.run_dir, None   # another command's run: not ours to mark
            raise Stop(f"{busy} is in use by another running command; wait for it, or pass "
                       "--fresh") from None

    def link(self, name: str, file_name: str) -> None:
        assert self.run_dir is not None
        target = self.run_dir.name + (f"/{file_name}" if file_name else "")
        note = link_latest(self.device_dir, name, target)
        if note:
            self.console.note(note)

    # ------------------------------------------------------------------ record
    def save(self, **fields) -> None:
        assert self.run_dir is not None
        self.record.update(**fields)
        self.record.save(self.run_dir)

    def mark(self, status: str, error: Optional[str] = None) -> None:
        self.record.attempt(end_time_s=now_s())
        self.save(status=status, error=error or None)

    def finish(self) -> None:
        self.mark("completed")

    # ------------------------------------------------------------------ stages
    def stage_env(self, bind_cores: str = "0") -> Dict[str, str]:
        """The environment of a stage. Core binding reaches the experiment as a variable of
        its environment: its process binds itself at start-up, before torch_npu first
        initialises a device (bevdepth/utils/device.py), which no flag parsed later could do."""
        env = dict(self.env, **{envvars.BIND_CORES: bind_cores})
        # The helper of this checkout for any `python -m bevdepth_npu` a stage runs.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(paths.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def train_command(self, resume: str) -> List[str]:
        raise NotImplementedError

    def eval_command(self, checkpoint: Path, cards: int, batch: int) -> List[str]:
        raise NotImplementedError

    def run_training(self, resume: str, bind: str, hint: str) -> None:
        """The training stage, with the progress line from steps.jsonl."""
        assert self.run_dir is not None
        log = self.run_dir / f"train_{self.log_id}.log"
        self.record.attempt(train_start_s=now_s(), resume=resume, bind_cores=int(bind))
        self.save()
        self.console.note(f"train: {self.exp.name} on {self.device}"
                          + (f", resuming from {resume}" if resume != "none" else "")
                          + f"; log {log}")
        status = run_stage(self.console, "training", self.train_command(resume), log,
                           self.bevdepth_root, self.stage_env(bind),
                           TrainProgress(self.console, self.run_dir / STEPS_JSONL),
                           header=f"{envvars.BIND_CORES}={bind} ")
        self.record.attempt(train_end_s=now_s(), train_exit_code=status)
        self.save()
        if status != 0:
            raise Stop(failure_line(log, f"training failed (exit {status}); evaluation skipped. "
                                    f"Log: {log}.{hint}"), status)

    def last_checkpoint(self) -> Path:
        """checkpoints/last.ckpt of this run, which the training must have written."""
        assert self.run_dir is not None
        last = self.run_dir / CHECKPOINTS / LAST_CKPT
        if not last.is_file():
            raise Stop(f"training ended without {last}; nothing to evaluate (see "
                       f"{self.run_dir / f'train_{self.log_id}.log'})")
        return last

    def evaluate(self, checkpoint: Path, cards: int, batch: int, hint: str) -> None:
        assert self.run_dir is not None
        log = self.run_dir / f"eval_{self.log_id}.log"
        self.link(f"eval_{self.log_id}.log", f"eval_{self.log_id}.log")
        self.record.attempt(bind_cores_eval=0)
        self.save(checkpoint=str(checkpoint))
        self.console.note(f"eval: {checkpoint} on {cards} process(es); log {log}")
        status = run_stage(self.console, "evaluation", self.eval_command(checkpoint, cards, batch),
                           log, self.bevdepth_root, self.stage_env("0"),
                           Heartbeat(self.console, "eval"), header=f"{envvars.BIND_CORES}=0 ")
        self.record.attempt(eval_exit_code=status)
        self.save()
        if status != 0:
            raise Stop(failure_line(log, f"evaluation failed (exit {status}). Log: {log}.{hint}"),
                       status)

    # ------------------------------------------------------------------ results
    def summarize(self) -> None:
        from bevdepth_npu import summarize
        assert self.run_dir is not None
        if self.s.node_rank != 0:
            self.console.note("done; node 0 writes the summary (global rank 0 logs the steps)")
            return
        try:
            self.summary = summarize.summarize(str(self.run_dir), warmup_steps=self.s.warmup_steps)
        except (summarize.SummarizeInputError, OSError) as err:
            raise Stop(f"cannot summarize {self.run_dir}: {err}", record=None)
        self.link(f"{self.case_name}.log", f"{self.case_name}.log")
        self.console.note(f"summary: {self.case_name}.log, summary.json")
        self.console.lines(summary_lines(self.summary))
        for warning in self.summary["warnings"]:
            self.console.warning(warning)

    def report(self) -> None:
        assert self.run_dir is not None
        if self.s.node_rank != 0:
            return
        metrics = summarize_metrics_path(self.summary, self.run_dir)
        if metrics is not None:
            try:
                self.console.lines(metrics_table(metrics, self.metrics_label))
            except (OSError, ValueError, KeyError) as err:
                self.console.warning(f"cannot print the metrics table of {metrics}: {err}")
            self.console.note(f"metrics JSON: {metrics}")
        curves = self.run_dir / "curves.png"
        if curves.is_file():
            self.console.note(f"loss curve: {curves}")
        self.console.note(f"run directory: {self.run_dir} (wall time "
                          f"{duration(time.time() - self.start_s)})")
        if not self.summary.get("complete"):
            raise Stop(f"the summary of {self.run_dir} is incomplete (see the warnings above)",
                       record=None)


def failure_line(log: Path, message: str) -> str:
    """``message`` for a failed stage, or the one line a bad checkpoint stopped it with."""
    line = stage_error(log)
    return f"{line} (log: {log})" if line else message


def summarize_metrics_path(summary: Dict, run_dir: Path) -> Optional[Path]:
    name = summary.get("sources", {}).get("metrics")
    if not name:
        return None
    path = Path(name)
    return path if path.is_absolute() else run_dir / path
