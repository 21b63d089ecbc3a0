"""The torch-npu reference pin as fetched: the unpacked wheel holds what the mmcv NPU build check
and the op inventory read (the generated op list, the headers with ACL's and HCCL's, the real
``NpuExtension``, the NPU autocast and GradScaler sources) at the release the pin names; and the
x86_64 and aarch64 wheels of the pin carry the same op list, headers and Python sources, so what is
read here on x86_64 holds for a Kunpeng (aarch64) server.

Run: python -m pytest tests/integration/test_torch_npu_wheel.py  (after `bevdepth-npu fetch
torch-npu`; the comparison asks the package registry for the other architecture's wheel unless
`downloads/` holds it)
"""
from __future__ import annotations

import ast
import re
import zipfile
from pathlib import Path

import pytest

from bevdepth_npu import pins, upstream
from bevdepth_npu.errors import UserError
from tests.conftest import require_source

OP_LIST = "csrc/aten/npu_native_functions_by_codegen.yaml"
# Ascend/pytorch tag v7.0.0-pytorch2.1.0, the release of FrameworkPTAdapter 7.0.0
RELEASE_COMMIT = "881a2763aca6b9469a72b3f8706de32ec4973788"


def _section_sizes(text: str) -> dict:
    sizes, key = {}, None
    for line in text.splitlines():
        top = re.match(r"^([a-z_]+):", line)
        if top:
            key = top.group(1)
            sizes[key] = 0
        elif key and line.startswith("- "):
            sizes[key] += 1
    return sizes


def test_unpacked_wheel_holds_what_the_build_check_and_the_op_inventory_read():
    src = require_source("torch-npu")
    version = (src / "version.py").read_text()
    assert "__version__ = '2.1.0.post12'" in version and RELEASE_COMMIT in version
    sizes = _section_sizes((src / OP_LIST).read_text())
    assert (sizes["supported"], sizes["custom"], sizes["symint"]) == (1085, 255, 17)
    ops = (src / OP_LIST).read_text()
    for func in ("nonzero(Tensor self) -> Tensor", "inverse(Tensor self) -> Tensor",
                 "index_put(Tensor self, Tensor?[] indices, Tensor values, bool accumulate="):
        assert f"\n- func: {func}" in ops, func
    assert "linalg_inv_ex" not in ops
    for rel in ("include/third_party/acl/inc", "include/third_party/hccl/inc",
                "include/torch_npu/csrc/core/npu/NPUException.h", "lib/libtorch_npu.so",
                "npu/amp/grad_scaler.py", "npu/amp/autocast_mode.py"):
        assert (src / rel).exists(), rel
    assert "def NpuExtension(" in (src / "utils/cpp_extension.py").read_text()


def _files(wheel: Path) -> dict:
    """Every file of a torch_npu wheel, the architecture's name taken out of the paths."""
    with zipfile.ZipFile(wheel) as zf:
        return {re.sub(r"x86_64|aarch64", "ARCH", n): zf.read(n) for n in zf.namelist()
                if not n.endswith("/")}


def _without_build_paths(header: bytes) -> bytes:
    # generated headers name the build agent's template path in their first lines
    return b"\n".join(line for line in header.split(b"\n")
                      if b"@generated from" not in line and b"@ generated from" not in line)


@pytest.mark.network
def test_x86_64_and_aarch64_wheels_carry_the_same_op_list_headers_and_python():
    pin = pins.get("torch-npu")
    try:
        wheels = {arch: upstream.download_wheel(pin, arch=arch) for arch, _ in
                  pin.platform_wheels}
    except UserError as exc:
        pytest.skip(f"the torch-npu wheels are not in the cache and the registry did not "
                    f"serve them: {exc}")
    x86, arm = _files(wheels["x86_64"]), _files(wheels["aarch64"])
    assert sorted(x86) == sorted(arm)
    prefix = pin.package_dir + "/"
    assert x86[prefix + OP_LIST] == arm[prefix + OP_LIST]
    differ = sorted(n for n in x86 if x86[n] != arm[n])
    for name in differ:
        if name.startswith(prefix + "include/"):
            assert _without_build_paths(x86[name]) == _without_build_paths(arm[name]), name
        elif name == prefix + "utils/exposed_api.py":
            listed = [ast.literal_eval(text.decode().split("=", 1)[1]) for text in
                      (x86[name], arm[name])]
            assert set(listed[0]) == set(listed[1]) and len(listed[0]) == len(listed[1])
        elif name == prefix + "utils/custom_ops.py":
            assert sorted(x86[name].splitlines()) == sorted(arm[name].splitlines())
        else:
            # compiled code and the wheel's own metadata differ by architecture, nothing else
            assert name.endswith((".so", ".a")) or ".dist-info/" in name, name
    for name in x86:
        if name.endswith(".py") and name not in (prefix + "utils/exposed_api.py",
                                                 prefix + "utils/custom_ops.py"):
            assert x86[name] == arm[name], name
