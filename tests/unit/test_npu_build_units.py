"""The parts of the mmcv NPU build check and of the environment's npu mmcv stage that need no
build: ninja's log read into failing sources with their first error, the ninja shim (keep going,
only the named sources' objects, no link after a partial build), torch_npu told apart from the
check's stand-in without importing it, and the npu mmcv key and wheel stamp that keep a wheel
built over the stand-in away from a real server (while the cpu key stays what it was).

Run: python -m pytest tests/unit/test_npu_build_units.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from bevdepth_npu import envbuild, mmcv_npu_build, pins
from bevdepth_npu.errors import UserError

LOG = """\
[1/3] c++ -MMD -c /w/mmcv/mmcv/ops/csrc/pytorch/nms.cpp -o /w/mmcv/build/t/nms.o
[2/3] c++ -MMD -c /w/mmcv/mmcv/ops/csrc/pytorch/npu/nms_npu.cpp -o /w/mmcv/build/t/nms_npu.o
FAILED: /w/mmcv/build/t/nms_npu.o 
c++ -MMD -c /w/mmcv/mmcv/ops/csrc/pytorch/npu/nms_npu.cpp -o /w/mmcv/build/t/nms_npu.o
In file included from /w/mmcv/mmcv/ops/csrc/pytorch/npu/nms_npu.cpp:1:
/w/mmcv/mmcv/ops/csrc/pytorch/npu/nms_npu.cpp:7:3: error: 'broken' was not declared in this scope
/w/mmcv/mmcv/ops/csrc/pytorch/npu/nms_npu.cpp:9:3: error: second error
[3/3] c++ -MMD -c /w/mmcv/mmcv/ops/csrc/common/npu/x.cpp -o /w/mmcv/build/t/x.o
FAILED: /w/mmcv/build/t/x.o 
/w/mmcv/mmcv/ops/csrc/common/npu/x.cpp:2:10: fatal error: acl/acl_rt_only.h: No such file or directory
compilation terminated.
ninja: build stopped: cannot make progress due to previous errors.
"""


def test_every_failing_source_is_named_with_its_first_error():
    objects = {"/w/mmcv/build/t/nms.o": "mmcv/ops/csrc/pytorch/nms.cpp",
               "/w/mmcv/build/t/nms_npu.o": "mmcv/ops/csrc/pytorch/npu/nms_npu.cpp",
               "/w/mmcv/build/t/x.o": "mmcv/ops/csrc/common/npu/x.cpp"}
    failed = mmcv_npu_build.parse_failures(LOG, objects)
    assert [f["source"] for f in failed] == ["mmcv/ops/csrc/pytorch/npu/nms_npu.cpp",
                                             "mmcv/ops/csrc/common/npu/x.cpp"]
    assert failed[0]["first_error"].endswith("error: 'broken' was not declared in this scope")
    assert failed[0]["missing_header"] == ""
    assert failed[1]["missing_header"] == "acl/acl_rt_only.h"
    text = mmcv_npu_build.describe({
        "only": [], "compiled": 1, "sources": 3, "npu_sources": 2, "seconds": 1.0,
        "failed": failed, "linked": False, "passed": False, "log": "/w/build.log"})
    assert "FAILED mmcv/ops/csrc/common/npu/x.cpp" in text and "only CANN ships it" in text
    assert text.splitlines()[-1].startswith("FAIL")


def test_ninja_shim_keeps_going_and_builds_only_the_named_sources(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (real_dir / "ninja").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"json.dump(sys.argv[1:], open({str(tmp_path / 'args')!r}, 'w'))\n")
    (real_dir / "ninja").chmod(0o755)
    mmcv_npu_build._shim(tmp_path / "bin", sys.executable)
    build = tmp_path / "build"
    build.mkdir()
    (build / "build.ninja").write_text(
        "rule compile\n"
        "build /w/b/a.o: compile /w/mmcv/ops/csrc/pytorch/a.cpp\n"
        "build /w/b/npu/b.o: compile /w/mmcv/ops/csrc/pytorch/npu/b.cpp\n")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{real_dir}",
               **{mmcv_npu_build.STATUS_FILE_ENV: str(tmp_path / "status.json")})
    full = subprocess.run(["ninja", "-v", "-j", "2"], cwd=build, env=env)
    assert full.returncode == 0
    assert json.loads((tmp_path / "args").read_text()) == ["-k", "0", "-v", "-j", "2"]
    env[mmcv_npu_build.ONLY_ENV] = "mmcv/ops/csrc/pytorch/npu/b.cpp"
    partial = subprocess.run(["ninja", "-v"], cwd=build, env=env)
    # a partial build stops setup.py before it links
    assert partial.returncode == 3
    assert json.loads((tmp_path / "args").read_text()) == ["-k", "0", "-v", "/w/b/npu/b.o"]
    assert json.loads((tmp_path / "status.json").read_text())["targets"] == ["/w/b/npu/b.o"]


def _python_seeing(tmp_path: Path, site_dir: Path) -> str:
    """A venv (no pip) whose site-packages has ``site_dir`` on its path, as a base Python with
    torch_npu installed has it."""
    where = tmp_path / "venv"
    venv.create(where, with_pip=False)
    site = next(where.glob("lib/python*/site-packages"))
    (site / "torch_npu_here.pth").write_text(str(site_dir) + "\n")
    return str(where / "bin" / "python")


def _fake_torch_npu(root: Path) -> Path:
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text("raise ImportError('libhccl.so')\n")
    (root / "torch_npu" / "version.py").write_text("__version__ = '2.1.0.post12'\n")
    return root


def test_torch_npu_is_told_from_the_stand_in_without_importing_it(tmp_path):
    real = _fake_torch_npu(tmp_path / "real")
    python = _python_seeing(tmp_path / "a", real)
    assert envbuild.torch_npu_identity(python) == "torch_npu 2.1.0.post12"
    (real / "torch_npu" / mmcv_npu_build.STAND_IN_MARKER).write_text("stand-in 1 over x\n")
    assert envbuild.torch_npu_identity(python) == "torch_npu 2.1.0.post12 stand-in (stand-in 1 over x)"
    empty = _python_seeing(tmp_path / "b", tmp_path / "nothing")
    assert envbuild.torch_npu_identity(empty) == "torch_npu none"


def test_npu_mmcv_key_and_stamp_keep_a_stand_in_wheel_off_a_real_server(tmp_path, monkeypatch):
    real = _fake_torch_npu(tmp_path / "real")
    python = _python_seeing(tmp_path / "a", real)
    env = envbuild.Env(tmp_path / "venv", "npu", python, verbose=False)
    real_key = envbuild.mmcv_stage_key(env)
    (real / "torch_npu" / mmcv_npu_build.STAND_IN_MARKER).write_text("stand-in 1 over x\n")
    stand_in_key = envbuild.mmcv_stage_key(env)
    assert real_key != stand_in_key
    # the cpu key is the one it always was: a cached cpu mmcv wheel is still found
    cpu = envbuild.Env(tmp_path / "venv", "cpu", python, verbose=False)
    mmcv = pins.get("mmcv")
    assert envbuild.mmcv_stage_key(cpu) == envbuild.sha(
        mmcv.commit, envbuild.patch_body_hash(mmcv), "cpu")
    wheel_dir = tmp_path / "wheels" / "mmcv" / "k"
    wheel_dir.mkdir(parents=True)
    envbuild.write_wheel_stamp(wheel_dir, "torch_npu 2.1.0.post12 stand-in (stand-in 1 over x)")
    envbuild.check_built_over(wheel_dir, "torch_npu 2.1.0.post12 stand-in (stand-in 1 over x)")
    with pytest.raises(UserError, match="built over torch_npu 2.1.0.post12 stand-in"):
        envbuild.check_built_over(wheel_dir, "torch_npu 2.1.0.post12")
