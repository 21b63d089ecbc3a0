"""The runs behind test/*.sh: ``bevdepth-npu run full|performance|eval|smoke``.

Each mode is a list of steps (``Run.plan``), run in order; a step that fails raises ``Stop``
with the exit status the command ends with (a failed stage's own status), the run record says
what happened, and nothing after it runs: evaluation never follows a failed training. To add a
step (a preflight check before training, say), put a method in the plan; to pass one more flag
to evaluation, add it in ``eval_command``.

  full         train, evaluate checkpoints/last.ckpt (node 0), summarize
  performance  train, summarize
  eval         evaluate a checkpoint (--ckpt, else the newest), summarize
  smoke        environment, dataset, train, evaluate, summarize, metrics table

Every run gets a fresh directory (bevdepth_npu/runrecord.py has the layout), except that a
training command continues the newest unfinished identical run (--fresh: a new one); a lock on
the directory keeps a second command out while one runs. Stage output goes to the stage's log
in the run directory; the console shows stage lines, the training progress line and the
results (bevdepth_npu/run/console.py).

Tests: tests/integration/test_scripts_units.py (no training), test_scripts_e2e.py,
test_resume_e2e.py, test_ddp_multinode.py, test_smoke.py.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from bevdepth_npu import checkpoints, paths
from bevdepth_npu.run import settings as settings_module
from bevdepth_npu.run import smoke
from bevdepth_npu.run.console import Console, Heartbeat, TrainProgress, duration
from bevdepth_npu.run.report import metrics_table, summary_lines
from bevdepth_npu.run.settings import Settings, SettingsError
from bevdepth_npu.run.stages import install_signal_handlers, run_stage, stage_error
from bevdepth_npu.runrecord import (CHECKPOINTS, LAST_CKPT, RUN_JSON, STEPS_JSONL, RunRecord,
                                    describe_settings, find_resumable_run, last_checkpoint,
                                    link_latest, new_run_dir, newest_checkpoint, now_s)

# Set when the runner starts itself again under the stack's interpreter (--python, or the
# environment the smoke run built): the start time of the command, for E2ETrainingTime.
START_ENV = "BEVDEPTH_NPU_RUN_START_S"


class Stop(Exception):
    """End the run: ``message`` for the console, ``status`` for the exit, ``record`` the status
    run.json gets (None: leave it)."""

    def __init__(self, message: str, status: int = 1, record: Optional[str] = "failed"):
        super().__init__(message)
        self.status = status
        self.record = record


def _is_checkout(path: Optional[Path]) -> bool:
    return path is not None and (path / "bevdepth" / "exps").is_dir()


def _installed_bevdepth() -> Optional[Path]:
    """The checkout of the ``bevdepth`` this interpreter imports (found, not imported)."""
    spec = importlib.util.find_spec("bevdepth")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _in(root: Path, path: str) -> Path:
    """A setting's path, relative to ``root`` unless absolute."""
    return Path(path) if os.path.isabs(path) else root / path


class Run:
    """One command: its settings, where things are, its record, its console."""

    def __init__(self, settings: Settings, console: Console, start_s: float):
        self.s = settings
        self.console = console
        self.start_s = start_s
        self.python = sys.executable
        self.env: Dict[str, str] = dict(os.environ)
        launcher = Path(settings.launcher).absolute() if settings.launcher else None
        self.script_dir = launcher.parent if launcher else paths.REPO_ROOT / "test"
        self.bevdepth_root = Path(".")
        self.exp = Path(".")
        self.data_root = Path(".")
        self.device = settings.device or ""
        self.device_dir = Path(".")
        self.run_dir: Optional[Path] = None
        self.record = RunRecord()
        self.case_name = ""
        self.log_id = str(settings.ascend_device_id)
        self.checkpoint: Optional[Path] = None
        self.num_workers = settings.num_workers
        self.summary: Dict = {}
        self._lock = None

    # ------------------------------------------------------------------ the plans
    def plan(self) -> List[Callable[[], None]]:
        mode = self.s.mode
        if mode in ("full", "performance"):
            return [self.locate, self.npu_environment, self.resolve_device,
                    self.open_training_run, self.self_test, self.train, self.evaluate_training,
                    self.finish, self.summarize, self.report]
        if mode == "eval":
            return [self.locate, self.choose_checkpoint, self.npu_environment,
                    self.resolve_device, self.open_eval_run, self.evaluate_checkpoint,
                    self.finish, self.summarize, self.report]
        return [self.locate_installed, self.resolve_device, self.smoke_resources,
                self.open_smoke_run, self.prepare_data, self.train, self.evaluate_training,
                self.finish, self.summarize, self.show, self.report]

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
    def locate(self) -> None:
        """The BEVDepth checkout, the experiment and the data of full/performance/eval."""
        s = self.s
        parent = self.script_dir.parent
        if s.bevdepth_root:
            root = Path(s.bevdepth_root)
            if not _is_checkout(root):
                raise Stop(f"BEVDEPTH_ROOT={s.bevdepth_root} is not a BEVDepth checkout "
                           "(no bevdepth/exps there)")
        elif _is_checkout(parent):
            root = parent                       # classic flow: cp -r test/* BEVDepth/test/
        elif _is_checkout(parent / "BEVDepth"):
            root = parent / "BEVDepth"
        else:
            root = _installed_bevdepth()
            if not _is_checkout(root):
                raise Stop(f"no BEVDepth checkout found: set BEVDEPTH_ROOT, or clone it into "
                           f"{parent}/BEVDepth, or install it in {self.python}'s environment "
                           "(pip install -e BEVDepth)")
        self.bevdepth_root = root.absolute()
        self.exp = _in(self.bevdepth_root, s.exp)
        if not self.exp.is_file():
            raise Stop(f"--exp={self.exp}: no such experiment file")
        self.data_root = _in(self.bevdepth_root, s.data_root)
        if not self.data_root.is_dir():
            raise Stop(f"--data-root={self.data_root}: no such directory (prepare nuScenes "
                       "there, or set DATA_ROOT)")
        output_root = Path(s.output_root) if s.output_root else self.script_dir / "output"
        self.device_dir = output_root.absolute() / str(s.ascend_device_id)

    def locate_installed(self) -> None:
        """The smoke run uses the BEVDepth its environment has installed."""
        root = _installed_bevdepth()
        if not _is_checkout(root):
            raise Stop(f"{self.python} cannot import bevdepth: not a bevdepth-npu environment "
                       "(run bevdepth-npu env)")
        self.bevdepth_root = root
        self.exp = _in(root, self.s.exp)
        if not self.exp.is_file():
            raise Stop(f"--exp={self.exp}: no such experiment file (is {root} the patched "
                       "BEVDepth tree? bevdepth-npu apply bevdepth)")
        output_root = Path(self.s.output_root) if self.s.output_root else \
            self.script_dir / "output"
        self.device_dir = output_root.absolute() / str(self.s.ascend_device_id)

    def choose_checkpoint(self) -> None:
        if self.s.ckpt:
            given = Path(self.s.ckpt)
            found = last_checkpoint(given)
            if found is None:
                if given.is_dir():
                    raise Stop(f"--ckpt={given} is a directory without last.ckpt or "
                               "checkpoints/last.ckpt")
                raise Stop(f"--ckpt={given}: no such checkpoint file")
        else:
            found = newest_checkpoint(self.device_dir, self.bevdepth_root / "outputs")
            if found is None:
                raise Stop(f"no checkpoint found below {self.device_dir} or "
                           f"{self.bevdepth_root / 'outputs'}; train first (bash "
                           "test/train_full_8p.sh) or pass --ckpt=PATH")
            self.console.note(f"evaluating the newest checkpoint, {found} (--ckpt=PATH "
                              "chooses another)")
        self.checkpoint = found.absolute()

    def npu_environment(self) -> None:
        """CANN's and the NPU runtime's settings from env_npu.sh next to the scripts, unless
        the platform (etp) sets them itself. Without CANN the script changes nothing."""
        script = self.script_dir / "env_npu.sh"
        if self.env.get("etp_running_flag") == "true" or not script.is_file():
            return
        proc = subprocess.run(["bash", "-c", 'source "$1" >&2 && env -0', "env_npu", str(script)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        messages = proc.stderr.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0:
            raise Stop(f"sourcing {script} failed: {' '.join(messages[-3:])}")
        self.console.lines(messages)
        sourced = dict(entry.split("=", 1) for entry in
                       proc.stdout.decode(errors="replace").split("\0") if "=" in entry)
        shell_own = ("_", "SHLVL", "PWD", "OLDPWD")
        self.env.update({key: value for key, value in sourced.items()
                         if key not in shell_own and not key.startswith("BASH_FUNC_")})

    def resolve_device(self) -> None:
        """DEVICE as given, else what BEVDepth's device module picks on this machine."""
        if self.device and self.device != "auto":
            return
        proc = subprocess.run(
            [self.python, "-c", "from bevdepth.utils import device; print(device.device_type())"],
            cwd=str(self.bevdepth_root), env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        lines = proc.stdout.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise Stop(f"could not determine the device with {self.python} in "
                       f"{self.bevdepth_root} ({lines[-1] if lines else 'no output'}); set "
                       "DEVICE=npu|cuda|cpu, or fix the environment")
        self.device = lines[-1].strip()

    def smoke_resources(self) -> None:
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

    # ------------------------------------------------------------------ run directories
    def _open(self, prefix: str, continued: Optional[Path], fields: Dict) -> None:
        try:
            self.device_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise Stop(f"cannot create {self.device_dir} (set OUTPUT_ROOT): {err}")
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

    def open_training_run(self) -> None:
        s = self.s
        ranks = s.cards * s.nnodes
        self.case_name = f"{s.network}_bs{s.batch_size}_{ranks}p_" + \
            ("acc" if s.mode == "full" else "perf")
        prefix = self.case_name + (f"_node{s.node_rank}" if s.nnodes > 1 else "")
        identity = describe_settings([
            ("exp", self.exp), ("data_root", self.data_root), ("cards", s.cards),
            ("nnodes", s.nnodes), ("batch", s.batch_size), ("epochs", s.epochs),
            ("lr", s.learning_rate), ("seed", s.seed), ("precision", s.precision),
            ("device", self.device), ("ckpt_every_n_steps", s.ckpt_every_n_steps),
            ("extra", " ".join(s.experiment_args))])
        continued = None
        if s.resume == "auto":
            continued = find_resumable_run(self.device_dir, prefix, identity)
        self._open(prefix, continued, dict(
            network=s.network, case_name=self.case_name, rank_size=ranks,
            batch_size_per_device=s.batch_size, mode=s.mode, settings=identity))
        self.link(f"train_{self.log_id}.log", f"train_{self.log_id}.log")
        if s.nnodes > 1:
            self.env.update(MASTER_ADDR=str(s.master_addr), MASTER_PORT=str(s.master_port),
                            NODE_RANK=str(s.node_rank))

    def open_eval_run(self) -> None:
        s = self.s
        self.case_name = f"{s.network}_bs{s.batch_size}_{s.cards}p_eval"
        identity = describe_settings([
            ("exp", self.exp), ("data_root", self.data_root), ("cards", s.cards),
            ("batch", s.batch_size), ("ckpt", self.checkpoint), ("precision", s.precision),
            ("device", self.device), ("extra", " ".join(s.experiment_args))])
        self._open(self.case_name, None, dict(
            network=s.network, case_name=self.case_name, rank_size=s.cards,
            batch_size_per_device=s.batch_size, mode="eval", settings=identity))

    def open_smoke_run(self) -> None:
        s = self.s
        self.case_name = f"BEVDepth_smoke_bs{s.batch_size}_1p_acc"
        self._open(self.case_name, None, dict(
            network="BEVDepth_smoke", case_name=self.case_name, rank_size=1,
            batch_size_per_device=s.batch_size, mode="full", steps=s.steps,
            settings=describe_settings([("exp", self.exp), ("steps", s.steps),
                                        ("batch", s.batch_size), ("lr", s.learning_rate),
                                        ("extra", " ".join(s.experiment_args))])))
        self.link(f"train_{self.log_id}.log", f"train_{self.log_id}.log")

    def prepare_data(self) -> None:
        assert self.run_dir is not None
        log = self.run_dir / "data.log"

        def stage(name: str, command: Sequence[str], cwd: Optional[Path]) -> int:
            return run_stage(self.console, name, command, log, cwd or self.bevdepth_root,
                             self.stage_env(), Heartbeat(self.console, f"data: {name}"))

        try:
            self.data_root = smoke.prepare_data(self.s, self.python, self.bevdepth_root, stage,
                                                self.console.note)
        except smoke.DataError as err:
            raise Stop(f"{err}; log: {log}")
        self.save(data_root=str(self.data_root))

    # ------------------------------------------------------------------ record
    def save(self, **fields) -> None:
        assert self.run_dir is not None
        self.record.update(**fields)
        self.record.save(self.run_dir)

    def mark(self, status: str, error: Optional[str] = None) -> None:
        self.record.attempt(end_time_s=now_s())
        self.save(status=status, error=error or None)

    # ------------------------------------------------------------------ stages
    def stage_env(self, bind_cores: str = "0") -> Dict[str, str]:
        env = dict(self.env, BEVDEPTH_BIND_CORES=bind_cores)
        # The helper of this checkout for any `python -m bevdepth_npu` a stage runs.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(paths.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def bind_cores(self) -> str:
        """BEVDEPTH_BIND_CORES of training: worth it for NPU training (eight ranks and their loader
        workers on one host); --bind-cores=0|1 decides otherwise. Evaluation never binds."""
        if self.s.bind_cores == "auto":
            return "1" if self.device == "npu" else "0"
        return self.s.bind_cores

    def common_flags(self) -> List[str]:
        s = self.s
        if s.mode == "smoke":
            return ["--data_root", str(self.data_root), "--device", self.device, "--seed",
                    str(s.seed), "--batch_size_per_device", str(s.batch_size), "--num_workers",
                    str(self.num_workers)]
        return ["--seed", str(s.seed), "--learning_rate", str(s.learning_rate), "--max_epoch",
                str(s.epochs), "--amp_backend", "native", "--precision", s.precision,
                "--device", self.device, "--data_root", str(self.data_root)]

    def train_command(self, resume: str) -> List[str]:
        s = self.s
        assert self.run_dir is not None
        command = [self.python, str(self.exp), *self.common_flags()]
        if s.mode == "smoke":
            # --max_epochs -1: the step count alone ends the run, whatever the dataset size.
            command += ["--learning_rate", str(s.learning_rate), "--max_steps", str(s.steps),
                        "--max_epochs", "-1"]
        else:
            command += ["--gpus", str(s.cards), "--num_nodes", str(s.nnodes),
                        "--batch_size_per_device", str(s.batch_size), "--resume", resume]
            if s.ckpt_every_n_steps > 0:
                command += ["--ckpt_every_n_steps", str(s.ckpt_every_n_steps)]
        return command + ["--default_root_dir", str(self.run_dir), *s.experiment_args]

    def eval_command(self, checkpoint: Path, cards: int, batch: int) -> List[str]:
        assert self.run_dir is not None
        command = [self.python, str(self.exp), "-e", "--ckpt_path", str(checkpoint),
                   *self.common_flags()]
        if self.s.mode != "smoke":
            command += ["--gpus", str(cards), "--batch_size_per_device", str(batch)]
        if self.s.weights:
            command += ["--weights", self.s.weights]
        return command + ["--default_root_dir", str(self.run_dir / "eval"),
                          *self.s.experiment_args]

    def self_test(self) -> None:
        """`bevdepth-npu doctor --quick` on this machine, in the run's environment: a broken
        stack or device stops the run in seconds instead of hours into it."""
        assert self.run_dir is not None
        if not self.s.doctor:
            return
        log = self.run_dir / f"doctor_{self.log_id}.log"
        command = [self.python, "-m", "bevdepth_npu", "doctor", "--quick", "--device",
                   self.device, "--json", str(self.run_dir / "doctor.json")]
        shown = "bevdepth-npu doctor --quick"
        pooling = experiment_pooling(self.s.experiment_args)
        if pooling != "product":   # check on the device the pooling the run will train with
            command += ["--pooling", pooling]
            shown += f" --pooling {pooling}"
        self.console.note(f"self-test: {shown}; log {log}")
        status = run_stage(self.console, "self-test", command, log, self.bevdepth_root,
                           self.stage_env(), Heartbeat(self.console, "self-test"))
        if status != 0:
            raise Stop(f"the self-test failed (exit {status}): training would not work on "
                       f"this machine; the FAIL lines above say why and what to do (log: "
                       f"{log}). DOCTOR=0 skips the self-test.", status)

    def train(self) -> None:
        assert self.run_dir is not None
        resume = self.rerun_checkpoint()
        if resume == "none" and self.s.resume not in ("auto", "none"):
            resume = str(Path(self.s.resume).absolute())
        bind = self.bind_cores()
        log = self.run_dir / f"train_{self.log_id}.log"
        self.record.attempt(train_start_s=now_s(), resume=resume, bind_cores=int(bind))
        self.save()
        self.console.note(f"train: {self.exp.name} on {self.device}"
                          + (f", resuming from {resume}" if resume != "none" else "")
                          + f"; log {log}")
        status = run_stage(self.console, "training", self.train_command(resume), log,
                           self.bevdepth_root, self.stage_env(bind),
                           TrainProgress(self.console, self.run_dir / STEPS_JSONL),
                           header=f"BEVDEPTH_BIND_CORES={bind} ")
        self.record.attempt(train_end_s=now_s(), train_exit_code=status)
        self.save()
        if status != 0:
            hint = "" if self.s.mode == "smoke" else (
                " The same command continues from the last checkpoint, if one was written.")
            raise Stop(failure_line(log, f"training failed (exit {status}); evaluation skipped. "
                                    f"Log: {log}.{hint}"), status)

    def rerun_checkpoint(self) -> str:
        """The checkpoint this run continues from ("none": it has none), checked first: a
        rerun passes over an unreadable last.ckpt to the newest readable checkpoint
        (bevdepth_npu/checkpoints.py). Without the check here the training's own speaks."""
        assert self.run_dir is not None
        if not checkpoints.has_checkpoint(self.run_dir):
            return "none"
        directory = self.run_dir / CHECKPOINTS
        check = checkpoints.load_check()
        if check is None:
            last = directory / LAST_CKPT
            return str(last) if last.is_file() else "none"
        try:
            return str(checkpoints.resume_point(directory, check, self.console.note))
        except checkpoints.NoReadableCheckpoint as err:
            raise Stop(str(err)) from None

    def evaluate_training(self) -> None:
        """full (node 0) and smoke: evaluate the checkpoint the training wrote."""
        s = self.s
        if s.mode == "performance" or s.node_rank != 0:
            return
        assert self.run_dir is not None
        last = self.run_dir / CHECKPOINTS / LAST_CKPT
        if not last.is_file():
            raise Stop(f"training ended without {last}; nothing to evaluate (see "
                       f"{self.run_dir / f'train_{self.log_id}.log'})")
        if s.mode == "smoke":
            self.evaluate(last, 1, s.batch_size, "")
        else:
            self.evaluate(last, s.eval_cards, s.eval_batch,
                          " The same command evaluates again without retraining.")

    def evaluate_checkpoint(self) -> None:
        assert self.checkpoint is not None
        self.evaluate(self.checkpoint, self.s.cards, self.s.batch_size, "")

    def evaluate(self, checkpoint: Path, cards: int, batch: int, hint: str) -> None:
        assert self.run_dir is not None
        log = self.run_dir / f"eval_{self.log_id}.log"
        self.link(f"eval_{self.log_id}.log", f"eval_{self.log_id}.log")
        self.record.attempt(bind_cores_eval=0)
        self.save(checkpoint=str(checkpoint))
        self.console.note(f"eval: {checkpoint} on {cards} process(es); log {log}")
        status = run_stage(self.console, "evaluation", self.eval_command(checkpoint, cards, batch),
                           log, self.bevdepth_root, self.stage_env("0"),
                           Heartbeat(self.console, "eval"), header="BEVDEPTH_BIND_CORES=0 ")
        self.record.attempt(eval_exit_code=status)
        self.save()
        if status != 0:
            raise Stop(failure_line(log, f"evaluation failed (exit {status}). Log: {log}.{hint}"),
                       status)
        if self.s.mode == "smoke" and not (self.run_dir / "eval" / "metrics_summary.json"
                                           ).is_file():
            raise Stop(f"evaluation wrote no {self.run_dir / 'eval' / 'metrics_summary.json'} "
                       f"(see {log})")

    def finish(self) -> None:
        self.mark("completed")

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

    def show(self) -> None:
        """smoke: draw the first validation sample's predictions against the ground truth."""
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
        assert self.run_dir is not None
        if self.s.node_rank != 0:
            return
        metrics = summarize_metrics_path(self.summary, self.run_dir)
        if metrics is not None:
            try:
                self.console.lines(metrics_table(metrics, "mini_val" if self.s.mode == "smoke"
                                                 else ""))
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
        if self.s.mode == "smoke" and not curves.is_file():
            raise Stop(f"no loss curve: {curves} was not written (is matplotlib installed in "
                       f"{self.python}'s environment?)", record=None)


def experiment_pooling(args: Sequence[str]) -> str:
    """The ``--pooling`` the experiment arguments ask for (the last one wins, as with argparse);
    ``product``, the experiments' default, when none does."""
    pooling = "product"
    for i, arg in enumerate(args):
        if arg == "--pooling" and i + 1 < len(args):
            pooling = args[i + 1]
        elif arg.startswith("--pooling="):
            pooling = arg.split("=", 1)[1]
    return pooling


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


# ---------------------------------------------------------------------- entry point

def _prog(argv: Sequence[str]) -> str:
    """The launcher's name when a test/*.sh script started the run (it passes --launcher)."""
    head = list(argv[:argv.index("--")] if "--" in argv else argv)
    for index, arg in enumerate(head):
        if arg.startswith("--launcher="):
            return os.path.basename(arg.split("=", 1)[1])
        if arg == "--launcher" and index + 1 < len(head):
            return os.path.basename(head[index + 1])
    return ""


def _with_python(argv: Sequence[str], python: str) -> List[str]:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut] + [f"--python={python}"] + argv[cut:]


def _switch_interpreter(mode: str, argv: Sequence[str], python: str, start_s: float,
                        console: Console) -> None:
    """Continue this command under ``python`` (the stack's interpreter) unless it is this one.
    ``argv`` must name ``python`` (the second start then finds itself there)."""
    found = shutil.which(python) or python
    if not (os.path.isfile(found) and os.access(found, os.X_OK)):
        raise Stop(f"--python={python} is not an executable")
    if os.path.abspath(found) == os.path.abspath(sys.executable):
        return
    env = dict(os.environ, **{START_ENV: repr(start_s)})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(paths.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    console.note(f"using the environment of {found}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(found, [found, "-m", "bevdepth_npu", "run", mode, *_with_python(argv, found)], env)


def main(mode: str, argv: Sequence[str]) -> int:
    """``bevdepth-npu run MODE ARGV``; the exit status."""
    launcher = _prog(argv)
    console = Console(launcher or f"bevdepth-npu run {mode}")
    restarted = START_ENV in os.environ
    start_s = float(os.environ.pop(START_ENV)) if restarted else now_s()
    try:
        settings = settings_module.parse(mode, argv, prog=f"bash test/{launcher}" if launcher
                                         else None)
    except SettingsError as err:
        console.error(str(err))
        return 1
    console.verbose = settings.verbose
    install_signal_handlers()
    try:
        python = settings.python
        if mode == "smoke" and python is None:
            python = smoke.prepare_environment(settings.device or "auto", console.note)
            settings.python = python
            argv = _with_python(argv, python)
        if python and not restarted:
            _switch_interpreter(mode, argv, python, start_s, console)
    except (Stop, smoke.DataError) as err:
        console.error(str(err))
        return getattr(err, "status", 1)
    try:
        return Run(settings, console, start_s).execute()
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130
