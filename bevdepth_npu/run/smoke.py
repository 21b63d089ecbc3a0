"""What only the smoke run does: build (or reuse) the environment before anything else, and
prepare its dataset: the synthetic nuScenes, its info files and depth ground truth.

The default dataset lives in the cache under a name keyed by what determines its bytes (the
generator's settings and code, BEVDepth's gen_info.py and gen_depth_gt.py); it is built beside
that name and renamed when complete, so an interrupted preparation is never taken for a dataset,
and reused afterwards. A dataset given with --data-dir is completed in place: generated if it
has no v1.0-mini, info files written if missing, depth_gt filled in (existing files are kept).

Part of ``bevdepth-npu run`` (bevdepth_npu/run/). Tests: tests/integration/test_smoke.py.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, List, Sequence

from bevdepth_npu import paths
from bevdepth_npu.errors import UserError
from bevdepth_npu.run.settings import Settings

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
