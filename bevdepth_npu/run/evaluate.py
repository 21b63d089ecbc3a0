"""``bevdepth-npu run eval``: score a checkpoint (--ckpt, else the newest) on the val split in
a run directory of its own, and summarize.

Tests: tests/unit/test_scripts.py, tests/integration/test_scripts_e2e.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from bevdepth_npu.run.core import Stop
from bevdepth_npu.run.train import RecipeRun
from bevdepth_npu.runrecord import describe_settings, last_checkpoint, newest_checkpoint


class EvalRun(RecipeRun):
    checkpoint: Optional[Path] = None

    def plan(self) -> List[Callable[[], None]]:
        return [self.locate, self.choose_checkpoint, self.npu_environment, self.resolve_device,
                self.open_eval_run, self.evaluate_checkpoint, self.finish, self.summarize,
                self.report]

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

    def open_eval_run(self) -> None:
        s = self.s
        self.case_name = f"{s.network}_bs{s.batch_size}_{s.cards}p_eval"
        identity = describe_settings([
            ("exp", self.exp), ("data_root", self.data_root), ("cards", s.cards),
            ("batch", s.batch_size), ("ckpt", self.checkpoint), ("precision", s.precision),
            ("device", self.device), ("pooling", s.pooling),
            ("extra", " ".join(s.experiment_args))])
        self.open_run(self.case_name, None, dict(
            network=s.network, case_name=self.case_name, rank_size=s.cards,
            batch_size_per_device=s.batch_size, mode="eval", settings=identity))

    def evaluate_checkpoint(self) -> None:
        assert self.checkpoint is not None
        self.evaluate(self.checkpoint, self.s.cards, self.s.batch_size, "")
