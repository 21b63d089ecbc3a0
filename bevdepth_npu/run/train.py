"""``bevdepth-npu run full|performance``: the recipe's training, then (full) its evaluation.

  full         train, evaluate checkpoints/last.ckpt (node 0), summarize
  performance  train, summarize

``RecipeRun`` is what these share with ``eval`` (bevdepth_npu/run/evaluate.py): the BEVDepth
checkout, experiment and data found beside the scripts, CANN's settings from env_npu.sh, the
flags every command of the recipe gets. A training command continues the newest unfinished
identical run; the self-test (`bevdepth-npu doctor --quick`) runs before training.

Tests: tests/unit/test_scripts.py (no training); tests/integration/test_scripts_e2e.py,
test_resume_e2e.py, test_ddp_multinode.py.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, List

from bevdepth_npu import checkpoints
from bevdepth_npu.run.console import Heartbeat
from bevdepth_npu.run.core import Run, Stop, in_root, installed_bevdepth, is_checkout
from bevdepth_npu.run.stages import run_stage
from bevdepth_npu.runrecord import CHECKPOINTS, LAST_CKPT, describe_settings, find_resumable_run


class RecipeRun(Run):
    """full, performance and eval: the R50 recipe (or another experiment) on a BEVDepth
    checkout and a prepared nuScenes."""

    def locate(self) -> None:
        """The BEVDepth checkout, the experiment and the data."""
        s = self.s
        parent = self.script_dir.parent
        if s.bevdepth_root:
            root = Path(s.bevdepth_root)
            if not is_checkout(root):
                raise Stop(f"--bevdepth-root={s.bevdepth_root} is not a BEVDepth checkout "
                           "(no bevdepth/exps there)")
        elif is_checkout(parent):
            root = parent                       # classic flow: cp -r test/* BEVDepth/test/
        elif is_checkout(parent / "BEVDepth"):
            root = parent / "BEVDepth"
        else:
            root = installed_bevdepth()
            if not is_checkout(root):
                raise Stop(f"no BEVDepth checkout found: pass --bevdepth-root=DIR, or clone it "
                           f"into {parent}/BEVDepth, or install it in {self.python}'s "
                           "environment (pip install -e BEVDepth)")
        self.bevdepth_root = root.absolute()
        self.exp = in_root(self.bevdepth_root, s.exp)
        if not self.exp.is_file():
            raise Stop(f"--exp={self.exp}: no such experiment file")
        self.data_root = in_root(self.bevdepth_root, s.data_root)
        if not self.data_root.is_dir():
            raise Stop(f"--data-root={self.data_root}: no such directory (prepare nuScenes "
                       "there, or pass --data-root=DIR)")
        self.device_dir = self.output_dir()

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

    def common_flags(self) -> List[str]:
        s = self.s
        return ["--seed", str(s.seed), "--learning_rate", str(s.learning_rate), "--max_epoch",
                str(s.epochs), "--amp_backend", "native", "--precision", s.precision,
                "--device", self.device, "--pooling", s.pooling, "--data_root",
                str(self.data_root)]

    def eval_command(self, checkpoint: Path, cards: int, batch: int) -> List[str]:
        assert self.run_dir is not None
        command = [self.python, str(self.exp), "-e", "--ckpt_path", str(checkpoint),
                   *self.common_flags(), "--gpus", str(cards), "--batch_size_per_device",
                   str(batch)]
        if self.s.weights:
            command += ["--weights", self.s.weights]
        return command + ["--default_root_dir", str(self.run_dir / "eval"),
                          *self.s.experiment_args]


class TrainRun(RecipeRun):
    """full and performance."""

    def plan(self) -> List[Callable[[], None]]:
        return [self.locate, self.npu_environment, self.resolve_device, self.open_training_run,
                self.self_test, self.train, self.evaluate_training, self.finish,
                self.summarize, self.report]

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
            ("device", self.device), ("pooling", s.pooling),
            ("ckpt_every_n_steps", s.ckpt_every_n_steps),
            ("extra", " ".join(s.experiment_args))])
        continued = None
        if s.resume == "auto":
            continued = find_resumable_run(self.device_dir, prefix, identity)
        self.open_run(prefix, continued, dict(
            network=s.network, case_name=self.case_name, rank_size=ranks,
            batch_size_per_device=s.batch_size, mode=s.mode, settings=identity))
        self.link(f"train_{self.log_id}.log", f"train_{self.log_id}.log")
        if s.nnodes > 1:
            self.env.update(MASTER_ADDR=str(s.master_addr), MASTER_PORT=str(s.master_port),
                            NODE_RANK=str(s.node_rank))

    def self_test(self) -> None:
        """`bevdepth-npu doctor --quick` on this machine, in the run's environment, for the
        device and pooling the run trains with: a broken stack or device stops the run in
        seconds instead of hours into it."""
        assert self.run_dir is not None
        if not self.s.doctor:
            return
        log = self.run_dir / f"doctor_{self.log_id}.log"
        shown = f"bevdepth-npu doctor --quick --pooling {self.s.pooling}"
        command = [self.python, "-m", "bevdepth_npu", "doctor", "--quick", "--device",
                   self.device, "--pooling", self.s.pooling, "--json",
                   str(self.run_dir / "doctor.json")]
        self.console.note(f"self-test: {shown}; log {log}")
        status = run_stage(self.console, "self-test", command, log, self.bevdepth_root,
                           self.stage_env(), Heartbeat(self.console, "self-test"))
        if status != 0:
            raise Stop(f"the self-test failed (exit {status}): training would not work on "
                       f"this machine; the FAIL lines above say why and what to do (log: "
                       f"{log}). --doctor=0 skips the self-test.", status)

    def bind_cores(self) -> str:
        """Core binding of training: worth it for NPU training (eight ranks and their loader
        workers on one host); --bind-cores=0|1 decides otherwise. Evaluation never binds."""
        if self.s.bind_cores == "auto":
            return "1" if self.device == "npu" else "0"
        return self.s.bind_cores

    def train_command(self, resume: str) -> List[str]:
        s = self.s
        assert self.run_dir is not None
        command = [self.python, str(self.exp), *self.common_flags(), "--gpus", str(s.cards),
                   "--num_nodes", str(s.nnodes), "--batch_size_per_device", str(s.batch_size),
                   "--resume", resume]
        if s.ckpt_every_n_steps > 0:
            command += ["--ckpt_every_n_steps", str(s.ckpt_every_n_steps)]
        return command + ["--default_root_dir", str(self.run_dir), *s.experiment_args]

    def train(self) -> None:
        resume = self.rerun_checkpoint()
        if resume == "none" and self.s.resume not in ("auto", "none"):
            resume = str(Path(self.s.resume).absolute())
        self.run_training(resume, self.bind_cores(), " The same command continues from the "
                          "last checkpoint, if one was written.")

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
        """full, on node 0: evaluate the checkpoint the training wrote."""
        if self.s.mode == "performance" or self.s.node_rank != 0:
            return
        self.evaluate(self.last_checkpoint(), self.s.eval_cards, self.s.eval_batch,
                      " The same command evaluates again without retraining.")
