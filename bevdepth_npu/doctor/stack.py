"""Stack checks of ``bevdepth-npu doctor``: every package against the pins, without training.

Versions come from the installed distributions' metadata (nothing is imported just to read a
version); imports are tried where "installed" is not enough (mmcv's compiled ops, the Ascend
packages).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

from bevdepth_npu import paths, pins
from bevdepth_npu.doctor.report import Fail

SUPPORTED_PYTHON = ((3, 8), (3, 11))
TORCH_VERSION = pins.TORCH_VERSION
TORCHVISION_VERSION = pins.TORCHVISION_VERSION
REBUILD = "rebuild the environment with `bevdepth-npu env --device {device}`"


def installed_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pinned_requirements() -> Dict[str, str]:
    """name -> version of the ``==`` pins of requirements.txt that apply to this Python."""
    from packaging.requirements import Requirement
    pinned = {}
    for line in (paths.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        specs = [s for s in req.specifier if s.operator == "=="]
        if specs:
            pinned[req.name.lower()] = specs[0].version
    return pinned


def _same_release(found: str, wanted: str) -> bool:
    # a local label (+cpu, +cu121) or a post release of the same code counts as the pin
    return found.split("+")[0] == wanted or found.split("+")[0] == wanted.split(".post")[0]


def check_python() -> str:
    version = sys.version_info[:2]
    text = f"{platform.python_version()} ({sys.executable})"
    if not SUPPORTED_PYTHON[0] <= version <= SUPPORTED_PYTHON[1]:
        raise Fail(f"Python {text}; the pinned stack supports 3.8 to 3.11",
                   "build the environment with a Python 3.8-3.11 interpreter: "
                   "`bevdepth-npu env --python python3.11`")
    return text


def check_pinned(dist: str, wanted: str, device: str, module: Optional[str] = None) -> str:
    """``dist`` is installed at ``wanted`` (and ``module`` imports, when given)."""
    found = installed_version(dist)
    if found is None:
        raise Fail(f"{dist} is not installed in {sys.prefix}", REBUILD.format(device=device))
    if not _same_release(found, wanted):
        raise Fail(f"{dist} {found} is installed; the pin is {wanted}",
                   REBUILD.format(device=device))
    if module:
        importlib.import_module(module)
    return f"{found} (pin {wanted})"


def check_requirement(dist: str, device: str, module: Optional[str] = None) -> str:
    wanted = pinned_requirements().get(dist.lower())
    if wanted is None:
        raise Fail(f"{dist} has no == pin in requirements.txt", "")
    return check_pinned(dist, wanted, device, module)


def env_stamp() -> Dict[str, str]:
    """What ``bevdepth-npu env`` recorded about this environment (empty when it did not build it)."""
    stamp = Path(sys.prefix) / "bevdepth-npu-env.json"
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}


def check_mmcv(device: str) -> str:
    detail = check_pinned("mmcv-full", pins.MMCV_VERSION, device) \
        if installed_version("mmcv-full") else check_pinned("mmcv", pins.MMCV_VERSION, device)
    try:
        ext = importlib.import_module("mmcv._ext")
        importlib.import_module("mmcv.ops")
    except Exception as error:
        raise Fail(f"mmcv {detail.split()[0]} is installed but its compiled ops do not load "
                   f"({type(error).__name__}: {error})",
                   f"build mmcv-full from the pin {pins.get('mmcv').short} with MMCV_WITH_OPS=1 "
                   f"(FORCE_NPU=1 on Ascend): {REBUILD.format(device=device)}") from None
    cuda = ext.get_compiling_cuda_version() if hasattr(ext, "get_compiling_cuda_version") else ""
    built = env_stamp().get("device")
    parts = [detail, "ops load"]
    parts.append(f"compiled with CUDA {cuda}" if cuda and cuda != "not available"
                 else "compiled without CUDA")
    if built:
        parts.append(f"built by bevdepth-npu env for {built}")
        if built != device and "cpu" not in (built, device):
            raise Fail(f"mmcv ops were built for {built}, this run is on {device}",
                       REBUILD.format(device=device))
    return "; ".join(parts)


def cann_version() -> Optional[str]:
    """The CANN toolkit version from its install record, or None when no toolkit is found
    (<toolkit>/latest/<arch>-linux/ascend_toolkit_install.info, CANN's installation guide)."""
    homes = [os.environ.get("ASCEND_TOOLKIT_HOME"), os.environ.get("ASCEND_HOME_PATH"),
             "/usr/local/Ascend/ascend-toolkit/latest",
             os.path.expanduser("~/Ascend/ascend-toolkit/latest")]
    arch = platform.machine()
    for home in filter(None, homes):
        for info in (Path(home) / f"{arch}-linux" / "ascend_toolkit_install.info",
                     Path(home) / "ascend_toolkit_install.info"):
            if info.is_file():
                match = re.search(r"^version=(\S+)", info.read_text(errors="replace"), re.M)
                if match:
                    return f"{match.group(1)} ({info})"
    return None


def check_cann() -> str:
    found = cann_version()
    if found is None:
        raise Fail("no CANN toolkit found (ASCEND_TOOLKIT_HOME unset, no "
                   "/usr/local/Ascend/ascend-toolkit)",
                   "install CANN 8.1.RC1 (or 8.0) and `source <toolkit>/set_env.sh`, or "
                   "`source test/env_npu.sh`")
    return found


def check_torch_npu() -> str:
    from bevdepth.utils import device as bd_device
    found = installed_version("torch_npu") or installed_version("torch-npu")
    if found is None:
        raise Fail("torch_npu is not installed",
                   "install the torch_npu 2.1.0 wheel that matches your CANN into the base Python")
    if not found.startswith(TORCH_VERSION):
        raise Fail(f"torch_npu {found}; the stack needs torch_npu {TORCH_VERSION}.postN "
                   f"(it pairs with torch {TORCH_VERSION})",
                   "install torch_npu 2.1.0.postN for your CANN")
    importlib.import_module("torch_npu")
    mode = bd_device.torch_npu_affinity_mode()
    binding = (f"core binding by CPU_AFFINITY_CONF={mode}" if mode else
               "no CPU_AFFINITY_CONF before 2.1.0.post6: training binds cores itself")
    return f"{found}; {binding}"


def check_mx_driving() -> str:
    """mx_driving imports (after torch_npu, as training does) and has the voxel-pooling op."""
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    from bevdepth.utils import device as bd_device
    release = npu_pooling.NPU_POOLING_OP_RELEASE
    if importlib.util.find_spec("mx_driving") is None:
        raise Fail("mx_driving (Ascend DrivingSDK) is not installed", release)
    version = installed_version("mx_driving") or installed_version("mx-driving") or "unknown"
    error = bd_device.import_npu_stack()
    if error is not None:
        raise Fail(f"mx_driving {version} does not import ({error})", release)
    try:
        _, where = npu_pooling.pooling_op()
    except RuntimeError as error:
        raise Fail(str(error).split(";")[0], release) from None
    return f"{version}; voxel pooling at {where}"
