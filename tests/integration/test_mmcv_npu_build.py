"""The pinned mmcv built with FORCE_NPU=1 through its own setup.py against the real NpuExtension,
headers and libtorch_npu.so of the torch-npu wheel pin, over a stand-in for the two files of the
wheel that need CANN to import (bevdepth_npu/mmcv_npu_build.py says which and why).

- the stand-in is the wheel's files but for ``__init__.py`` and ``utils/__init__.py``, and its
  NpuExtension is the wheel's, pointing into the wheel's include/ and lib/;
- a broken NPU source and one that includes a header only CANN ships make the check fail, naming
  each file with its first error (just those two files are compiled: seconds);
- slow: the full build (about 11 minutes on 2 cores, cached by the hash of its inputs under
  ``<cache>/wheels/mmcv-npu-stand-in/``) compiles every source and links ``_ext`` against
  libtorch_npu.so.

Run: python -m pytest tests/integration/test_mmcv_npu_build.py  (needs `bevdepth-npu fetch
torch-npu mmcv` and a Python with torch 2.1.0, such as the CPU environment's)
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bevdepth_npu import envbuild, mmcv_npu_build, pins, upstream
from tests.conftest import require_source

NPU_SOURCE = "mmcv/ops/csrc/pytorch/npu/nms_npu.cpp"
SECOND_NPU_SOURCE = "mmcv/ops/csrc/pytorch/npu/roi_align_npu.cpp"


@pytest.fixture(scope="module")
def wheel() -> Path:
    return require_source("torch-npu")


def _need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not importable by this Python; run the suite with the CPU "
                    "environment's python (`bevdepth-npu env --device cpu`)")


def test_stand_in_is_the_wheels_files_but_the_two_that_need_cann(tmp_path, wheel):
    _need_torch()
    root = mmcv_npu_build.stand_in(tmp_path, wheel)
    pkg = root / "torch_npu"
    for rel in ("utils/cpp_extension.py", "version.py"):
        assert (pkg / rel).read_bytes() == (wheel / rel).read_bytes(), rel
    assert (pkg / "include").resolve() == (wheel / "include").resolve()
    assert (pkg / "lib" / "libtorch_npu.so").resolve() == (wheel / "lib/libtorch_npu.so").resolve()
    # the wheel's own __init__.py and utils/__init__.py load _C (CANN); the stand-in's do not
    assert "import torch_npu._C" in (wheel / "__init__.py").read_text()
    assert "from torch_npu import _C" in (wheel / "utils/__init__.py").read_text()
    assert "_C" not in (pkg / "__init__.py").read_text().split('"""')[-1]
    assert "stand-in" in (pkg / mmcv_npu_build.STAND_IN_MARKER).read_text()
    code = ("import json, torch_npu\n"
            "from torch_npu.utils.cpp_extension import NpuExtension\n"
            "e = NpuExtension('mmcv._ext', ['x.cpp'])\n"
            "print(json.dumps([torch_npu.__version__, e.include_dirs, e.library_dirs, "
            "e.libraries]))\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, includes, libdirs, libs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert version == "2.1.0.post12"
    assert includes[:3] == [str(pkg / "include"), str(pkg / "include/third_party/acl/inc"),
                            str(pkg / "include/third_party/hccl/inc")]
    assert libdirs[0] == str(pkg / "lib") and libs[-1] == "torch_npu"


@pytest.mark.slow
def test_broken_npu_sources_fail_the_check_naming_each_file(tmp_path, wheel):
    _need_torch()
    require_source("mmcv")
    tree = tmp_path / "mmcv"
    shutil.copytree(envbuild.sync_tree(pins.get("mmcv")), tree, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "*.so"))
    broken = tree / NPU_SOURCE
    broken.write_text(broken.read_text() + "\nvoid bevdepth_npu_broken() { undeclared_name(); }\n")
    cann_only = tree / SECOND_NPU_SOURCE
    cann_only.write_text('#include "acl/acl_only_in_cann.h"\n' + cann_only.read_text())
    result = mmcv_npu_build.build(only=[NPU_SOURCE, SECOND_NPU_SOURCE], tree=tree,
                                  work=tmp_path / "work")
    assert not result["passed"]
    assert result["ninja_ran"] and result["sources"] == 2
    by_source = {f["source"]: f for f in result["failed"]}
    assert set(by_source) == {NPU_SOURCE, SECOND_NPU_SOURCE}
    assert "'undeclared_name' was not declared" in by_source[NPU_SOURCE]["first_error"]
    assert by_source[SECOND_NPU_SOURCE]["missing_header"] == "acl/acl_only_in_cann.h"
    text = mmcv_npu_build.describe(result)
    assert f"FAILED {NPU_SOURCE}: " in text and "only CANN ships it" in text
    # nothing of a failed or partial build is cached
    assert not result.get("key")


@pytest.mark.slow
def test_pinned_mmcv_builds_with_force_npu_over_the_wheel(wheel):
    """Every source compiles and _ext links against libtorch_npu.so (cached by the inputs' hash:
    a second run of the suite reads the result)."""
    _need_torch()
    require_source("mmcv")
    result = mmcv_npu_build.check()
    assert result["passed"], mmcv_npu_build.describe(result)
    assert result["failed"] == []
    assert result["compiled"] == result["sources"] == envbuild.NPU_MMCV_SOURCES
    assert result["npu_sources"] >= 28
    assert result["linked"] and "libtorch_npu.so" in result["ext_needed"]
    assert result["inputs"]["torch_npu_wheel_sha256"] == \
        upstream.expected_wheel_sha256(pins.get("torch-npu"))
    assert result["inputs"]["torch_npu"].startswith("stand-in")
    stored = mmcv_npu_build.result_dir(result["key"])
    assert (stored / mmcv_npu_build.RESULT).is_file() and (stored / result["wheel"]).is_file()


def test_env_over_the_stand_in_names_it_as_the_check_publishes_it(tmp_path, wheel):
    """`env --device npu` over the stand-in computes the key the check's wheel is published
    under (so it reuses the build); the real package, without the marker, gets another."""
    import venv
    root = mmcv_npu_build.stand_in(tmp_path / "stand-in", wheel)
    where = tmp_path / "venv"
    venv.create(where, with_pip=False)
    site = next(where.glob("lib/python*/site-packages"))
    (site / "stand_in.pth").write_text(str(root) + "\n")
    seen = envbuild.torch_npu_identity(str(where / "bin" / "python"))
    expected = envbuild.torch_npu_label("2.1.0.post12", mmcv_npu_build.stand_in_marker_text())
    assert seen == expected and "stand-in" in seen
    (root / "torch_npu" / mmcv_npu_build.STAND_IN_MARKER).unlink()
    assert envbuild.torch_npu_identity(str(where / "bin" / "python")) == "torch_npu 2.1.0.post12"
