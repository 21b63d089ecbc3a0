"""The one rule that decides the device type, on the helper's side.

``choose(flag)``: the ``--device`` flag (anything but ``auto``), else ``BEVDEPTH_NPU_DEVICE``
(its old name ``BEVDEPTH_DEVICE`` too), else what is installed (``detect``): npu where the Ascend
toolkit is set up, cuda where an NVIDIA driver answers, else cpu. The environment builder, the
run layer (and so the scripts in test/), the self-test and the benchmarks ask it; none decides
on its own. ``DEVICES`` is the list every chooser offers.

The patched BEVDepth has the same rule in bevdepth/utils/device.py (``device_type``), where
"installed" means torch_npu or torch.cuda sees a device; the run layer passes the device it
chose to the experiment as ``--device``, so both sides agree on a run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Mapping, Optional, Tuple

from bevdepth_npu import envvars
from bevdepth_npu.errors import UserError

NPU, CUDA, CPU = "npu", "cuda", "cpu"
DEVICES: Tuple[str, ...] = (NPU, CUDA, CPU)
AUTO = "auto"
CHOICES: Tuple[str, ...] = (AUTO,) + DEVICES


def detect() -> str:
    """npu where the Ascend toolkit is set up, cuda where an NVIDIA driver answers, else cpu."""
    if os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH") \
            or shutil.which("npu-smi"):
        return NPU
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0:
        return CUDA
    return CPU


def choose(flag: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """The device type: ``flag``, else the environment variable, else ``detect()``."""
    if flag and flag != AUTO:
        if flag not in DEVICES:
            raise UserError(f"--device={flag}: use one of {', '.join(CHOICES)}")
        return flag
    environ = os.environ if environ is None else environ
    value = envvars.get(envvars.DEVICE, environ).strip().lower()
    if value and value != AUTO:
        if value not in DEVICES:
            raise UserError(f"{envvars.DEVICE}={value}: use one of {', '.join(CHOICES)}")
        return value
    return detect()
