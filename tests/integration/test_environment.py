"""The environment built by `bevdepth-npu env`: the stack imports, requirements.txt is exactly
what is installed (so `pip install -r requirements.txt` changes nothing, torch included), and a
second `env` run reuses every stage.

Run: python -m pytest tests/integration/test_environment.py  (with the env's python)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bevdepth_npu import envbuild, paths

IN_ENV = (Path(sys.prefix) / envbuild.STAMP).is_file()
pytestmark = pytest.mark.skipif(not IN_ENV, reason="run with the python of the environment "
                                "that `bevdepth-npu env` builds (bash tests/run.sh does)")


def _requirements():
    from packaging.requirements import Requirement
    for line in (paths.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                yield req


def test_the_stack_imports():
    proc = subprocess.run([sys.executable, "-c", envbuild.IMPORT_CHECK], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]


def test_requirements_name_no_torch_and_are_all_installed_as_pinned():
    from importlib.metadata import PackageNotFoundError, version
    names = set()
    for req in _requirements():
        names.add(req.name.lower())
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req} is in requirements.txt but not installed")
        assert req.specifier.contains(installed, prereleases=True), (str(req), installed)
    assert not names & {"torch", "torchvision", "torch-npu"}
    import torch
    assert torch.__version__.split("+")[0] == "2.1.0"


def test_a_second_env_run_reuses_every_stage():
    stamp = json.loads((Path(sys.prefix) / envbuild.STAMP).read_text())
    proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "env", "--device", "cpu",
                           "--venv", sys.prefix], cwd=str(paths.REPO_ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out[-3000:]
    for stage in envbuild.STAGES[:-1]:
        assert f"{stage}: up to date" in out, (stage, out[-3000:])
    assert json.loads((Path(sys.prefix) / envbuild.STAMP).read_text()) == stamp
