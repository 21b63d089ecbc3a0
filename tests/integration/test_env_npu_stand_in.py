"""`bevdepth-npu env --device npu` end to end on a CPU machine, over stand-ins for what only an
Ascend server has: a base Python that carries torch 2.1.0, torch_npu and mx_driving, as a
server's does after its CANN setup, runs every stage as on the server up to the final checks.

- torch (and pytest, which the mx_driving double imports) come from the Python running this test
  (the CPU environment's) through a ``.pth`` file and a directory of symbolic links, not a second
  install of about 4.6 GB;
- torch_npu is the mmcv NPU build check's stand-in over the torch-npu wheel pin
  (``bevdepth_npu/mmcv_npu_build.py`` says which two files of the wheel it replaces and why);
- mx_driving is the NPU contract tests' double (``tests/integration/mx_driving_double.py``:
  DrivingSDK's own Python wrappers over a CPU double of their kernels).

The venv sees the base torch, torchvision goes in without its requirements, mmcv is the
``FORCE_NPU=1`` wheel of the build check (built once, about 11 to 23 minutes on 2 cores, then
cached). ``import mmcv.ops`` cannot succeed here: ``_ext`` needs ``libtorch_npu.so``, which needs
CANN's libraries; the test asserts that the verify stage stops there, saying so, and that the
mx_driving check run on its own reports the pooling op the double provides. A user without CANN
is stopped earlier, at the torch stage (the second test). Cost, measured on 2 cores with pip's
cache warm: the first run took 1.5 minutes (requirements.txt 51 s) and 1.1 GB under
``<cache>/venvs/npu-stand-in-py3.11``, plus the mmcv build check when its result is not cached
yet; a later run finds the stages up to date and takes well under a minute.

Run: python -m pytest tests/integration/test_env_npu_stand_in.py  (with the CPU environment's
python, after `bevdepth-npu fetch torch-npu drivingsdk`)
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bevdepth_npu import envbuild, mmcv_npu_build, paths
from tests.conftest import REPO_ROOT, require_source

MX_DRIVING_STAND_IN = '''"""Stand-in for DrivingSDK's mx_driving package, written by the end-to-end test of
`bevdepth-npu env --device npu`: the NPU contract tests' double (DrivingSDK's own wrappers over a
CPU double of their kernels) replaces this module on import."""
import sys
sys.path.insert(0, {repo!r})
from tests.integration import mx_driving_double


class _Keep:
    def setitem(self, mapping, name, value):
        mapping[name] = value


sys.modules[__name__] = mx_driving_double.install(_Keep(), "v7")
'''


def _closure(roots) -> set:
    """The installed distributions ``roots`` need, by their metadata's requirements."""
    from packaging.requirements import Requirement
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return seen


def _links(target: Path, roots) -> None:
    """Symbolic links in ``target`` to every top-level entry of the distributions ``roots``
    need, as they are installed for this Python."""
    target.mkdir(parents=True, exist_ok=True)
    for name in _closure(roots):
        dist = importlib.metadata.distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            link = target / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)


def _installation(prefix: Path) -> Path:
    """A Python installation of its own at ``prefix`` (not a venv: a venv made from a venv has the
    first one's base as its system site-packages): a copy of this Python's base executable and
    links to its standard library, with an empty site-packages. Returns its python."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    python = prefix / "bin" / version
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lib = prefix / "lib" / version
    (lib / "site-packages").mkdir(parents=True, exist_ok=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages" and not (lib / entry.name).exists():
            (lib / entry.name).symlink_to(entry)
    if not python.exists():
        python.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sys._base_executable, python)
    return python


def _base_python(root: Path, wheel: Path) -> str:
    """A base Python as an Ascend server's: torch, torch_npu and mx_driving importable."""
    python = _installation(root / "python")
    _links(root / "site", ["torch", "pytest"])
    stand_in = mmcv_npu_build.stand_in(root / "torch-npu-stand-in", wheel)
    (root / "mx-driving-stand-in" / "mx_driving").mkdir(parents=True, exist_ok=True)
    (root / "mx-driving-stand-in" / "mx_driving" / "__init__.py").write_text(
        MX_DRIVING_STAND_IN.format(repo=str(REPO_ROOT)))
    site = next((root / "python").glob("lib/python*/site-packages"))
    (site / "server_stack.pth").write_text(
        "\n".join(str(p) for p in (root / "site", stand_in, root / "mx-driving-stand-in")) + "\n")
    return str(python)


@pytest.mark.slow
@pytest.mark.network
def test_env_npu_over_stand_ins_runs_every_stage_and_stops_at_mmcv_ops():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("run with the CPU environment's python: the stand-in base reuses its torch")
    wheel = require_source("torch-npu")
    require_source("drivingsdk")
    # the FORCE_NPU=1 mmcv wheel: the build check's (cached by its inputs), where env looks
    check = mmcv_npu_build.check()
    assert check["passed"], mmcv_npu_build.describe(check)
    stored = mmcv_npu_build.result_dir(check["key"])
    mmcv_npu_build.publish_for_env(check, stored / check["wheel"])

    root = paths.cache_dir() / "stand-ins" / "npu-server"
    base = _base_python(root, wheel)
    target = paths.cache_dir() / "venvs" / "npu-stand-in-py3.11"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "env", "--device", "npu",
                           "--python", base, "--venv", str(target)], cwd=str(REPO_ROOT),
                          env=env, capture_output=True, text=True, timeout=3000)
    err = proc.stderr
    print(err[-6000:])
    # every stage before the final checks ran (or was up to date from an earlier run)
    for i, stage in enumerate(envbuild.STAGES[:-1], 1):
        assert re.search(rf"\[{i}/{len(envbuild.STAGES)}\] {stage}: (done|up to date)", err), stage
    assert proc.returncode == 2, err[-3000:]
    # verify stops at the import of mmcv's ops: _ext needs libtorch_npu.so (and that CANN)
    assert "fails in" in err and "import mmcv.ops" in err and "libtorch_npu.so" in err

    python = str(target / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, env=clean,
                              cwd=str(target))

    # the venv sees the base's torch, its own torchvision (no second torch)
    where = json.loads(run("import json, torch, torchvision, mmcv, pathlib; print(json.dumps("
                           "[str(pathlib.Path(torch.__file__).resolve()), torchvision.__file__, "
                           "mmcv.__file__]))").stdout.strip().splitlines()[-1])
    assert Path(where[0]) == Path(importlib.util.find_spec("torch").origin).resolve()
    assert where[1].startswith(str(target)) and where[2].startswith(str(target))
    assert not list(target.glob("lib/python*/site-packages/torch/__init__.py"))
    # mmcv is the FORCE_NPU wheel, recorded as built over the stand-in
    stamp = json.loads((target / envbuild.STAMP).read_text())
    assert "stand-in" in stamp["mmcv_built_over"]
    ext = run("import pathlib, mmcv; print(sorted(p.name for p in "
              "pathlib.Path(mmcv.__file__).parent.glob('_ext*.so')))")
    assert "_ext" in ext.stdout
    # the mx_driving check, run on its own, finds the pooling op the double provides
    op = run(envbuild.NPU_OP_CHECK)
    assert op.returncode == 0, op.stdout + op.stderr
    assert "npu_voxel_pooling_train" in op.stdout.strip().splitlines()[-1]


@pytest.mark.network
def test_env_npu_without_torch_npu_stops_at_the_torch_stage_saying_install_cann(tmp_path):
    """A base Python without torch and torch_npu (no CANN setup): the torch stage stops, and
    says what to install; nothing after it runs."""
    base = _installation(tmp_path / "python")
    target = tmp_path / "venv"
    proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "env", "--device", "npu",
                           "--python", str(base), "--venv", str(target)], cwd=str(REPO_ROOT),
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[1/9] venv: done" in proc.stderr and "[2/9] torch: done" not in proc.stderr
    assert "No module named 'torch'" in proc.stderr and "Install CANN" in proc.stderr
    assert "[3/9]" not in proc.stderr
