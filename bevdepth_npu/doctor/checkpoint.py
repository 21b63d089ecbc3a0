"""Checkpoint checks of ``bevdepth-npu doctor --checkpoint PATH``: a checkpoint file, or every
``*.ckpt`` of a run directory and the one a rerun of its training would resume from.

The findings are those of the training and of the run layer: the file is read with the patched
tree's checker (bevdepth/utils/checkpoint_file.py; no torch.load, no model, no device), and
the resume line comes from the run layer's own choice (bevdepth_npu/checkpoints.py). Whether
the weights fit an experiment is checked when the experiment loads them.
"""
from __future__ import annotations

from pathlib import Path

from bevdepth_npu import checkpoints
from bevdepth_npu.doctor.report import Fail, Report, Skip


def _checker():
    try:
        from bevdepth.utils import checkpoint_file
    except ImportError:
        raise Skip("the patched BEVDepth (bevdepth.utils.checkpoint_file) is not importable "
                   "here", "run in the environment `bevdepth-npu env` built") from None
    return checkpoint_file


def check_file(path: Path) -> str:
    """What the file holds, or a FAIL saying what is wrong with it and what to do."""
    checkpoint_file = _checker()
    try:
        return checkpoint_file.check_weights(checkpoint_file.inspect(path)).describe()
    except checkpoint_file.CheckpointError as error:
        raise Fail(f"{error.path}: {error.problem}", error.remedy) from None


def check_resume(directory: Path) -> str:
    """The checkpoint a rerun of the run's training resumes from (nothing renamed here)."""
    checkpoint_file = _checker()
    found = checkpoints.survey(directory, checkpoint_file.run_checkpoint_problem)
    path, problem = found[-1]
    if problem is not None:
        raise Fail(f"no checkpoint in {directory} can be resumed from",
                   "a rerun stops; --fresh starts a new run")
    if path.name == checkpoints.LAST_CKPT:
        return f"a rerun resumes from {path.name}"
    return (f"a rerun sets {found[0][0].name} aside and resumes from {path.name}"
            if found[0][0].name == checkpoints.LAST_CKPT else
            f"a rerun resumes from {path.name}")


def run_checks(report: Report, path: Path) -> None:
    if not path.is_dir():
        report.run("checkpoint", lambda: check_file(path))
        return
    directory = checkpoints.checkpoint_dir(path)
    files = checkpoints.candidates(directory)
    if not files:
        report.run("checkpoint", _fail(f"{directory} holds no *.ckpt file",
                                       "name a checkpoint file or a run directory"))
        return
    for file in files:
        report.run(f"checkpoint.{file.name}", lambda f=file: check_file(f))
    report.run("checkpoint.resume", lambda: check_resume(directory))


def _fail(cause: str, hint: str):
    def check():
        raise Fail(cause, hint)
    return check
