"""The one table of pinned upstreams.

Everything else (the README, ``bevdepth-npu fetch/apply/export/check``, the environment builder and
the tests) reads this table; nobody repeats a pin by hand.

Two kinds of pins: the patched upstreams that make up the environment (``patched_pins()``), and
reference upstreams that are fetched and mirrored the same way but never patched or installed
(``reference_pins()``): DrivingSDK, whose own Python wrapper of the NPU voxel-pooling op the NPU
contract tests run over a CPU double of its compiled part, and the torch_npu wheel of the release
the Ascend stack pairs with, whose headers, ``NpuExtension``, op tables and Python sources are read
off the hardware (it needs CANN to import, but a wheel is a zip).

A "wheel" pin is either one pure-Python wheel (``wheel_sha256``) or one CPython wheel per machine
architecture (``platform_wheels``: ``platform.machine()`` to sha256, for ``wheel_python``); the cache
holds the one of the machine it runs on.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple


# The stack the pins are built on, said once: the torch that torch_npu 2.1.0 pairs with, its
# torchvision, and the numpy of requirements.txt (the environment builder installs exactly these;
# the self-test checks them).
TORCH_VERSION = "2.1.0"
TORCHVISION_VERSION = "0.16.0"
NUMPY_VERSION = "1.23.5"
MMCV_VERSION = "1.7.2"    # what mmcv at its pin reports (v1.7.2 plus 11 commits)


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str            # short name used on the command line
    aliases: Tuple[str, ...]
    url: str             # official source
    kind: str            # "git": a repository at a commit; "wheel": a PyPI wheel's package dir
    commit: str          # full SHA ("git"), or the version (wheel)
    ref: str             # the human label of the pin (branch/tag/version)
    patch: Optional[str]  # patch file at the top of this repository; None: a reference pin
    applied_to: str      # what the patch paths are relative to (reference pins: what it is for)
    how: str             # how a user applies it by hand
    wheel: Optional[str] = None       # PyPI requirement of the wheel ("wheel" kind)
    wheel_sha256: Optional[str] = None
    package_dir: Optional[str] = None  # directory inside the wheel / site-packages
    # binary wheels: (platform.machine(), sha256) of the manylinux wheel for ``wheel_python``
    platform_wheels: Tuple[Tuple[str, str], ...] = ()
    wheel_python: Optional[str] = None  # "3.11": the CPython of the pinned binary wheels

    @property
    def patched(self) -> bool:
        return self.patch is not None

    @property
    def short(self) -> str:
        return self.commit[:8] if self.kind == "git" else self.commit

    def wheel_sha256_for(self, machine: str) -> Optional[str]:
        """The sha256 of the pinned wheel for a machine architecture (``platform.machine()``);
        None where the pin has no wheel for it."""
        if not self.platform_wheels:
            return self.wheel_sha256
        return dict(self.platform_wheels).get(machine)

    @property
    def wheel_label(self) -> str:
        """The wheel requirement with every pinned sha256, for tables and patch headers."""
        if not self.platform_wheels:
            return f"{self.wheel} (sha256 {self.wheel_sha256})"
        shas = ", ".join(f"{m} {sha}" for m, sha in self.platform_wheels)
        return f"{self.wheel}, CPython {self.wheel_python} (sha256 {shas})"


PINS: Tuple[Pin, ...] = (
    Pin(
        name="bevdepth",
        aliases=("BEVDepth",),
        url="https://github.com/Megvii-BaseDetection/BEVDepth",
        kind="git",
        commit="d78c7b58b10b9ada940462ba83ab24d99cae5833",
        ref="master (d78c7b5)",
        patch="bevdepth.patch",
        applied_to="the root of a BEVDepth checkout",
        how="git apply bevdepth.patch",
    ),
    Pin(
        name="mmcv",
        aliases=(),
        url="https://github.com/open-mmlab/mmcv",
        kind="git",
        commit="5e2b9a7b837d903bca00daf929ca5a461a8c7f50",
        ref="1.x (v1.7.2 + 11 commits)",
        patch="mmcv.patch",
        applied_to="the root of an mmcv checkout",
        how="git apply mmcv.patch; MMCV_WITH_OPS=1 pip install . (FORCE_NPU=1 on Ascend)",
    ),
    Pin(
        name="mmdetection3d",
        aliases=("mmdet3d",),
        url="https://github.com/open-mmlab/mmdetection3d",
        kind="git",
        commit="c9541b0db89498fdea5cafd05b7b17f7b625b858",
        ref="v1.0.0rc4",
        patch="mmdetection3d.patch",
        applied_to="the root of an mmdetection3d checkout (or the PyPI sdist mmdet3d==1.0.0rc4)",
        how="git apply mmdetection3d.patch; pip install .",
    ),
    Pin(
        name="lightning",
        aliases=("pytorch_lightning", "pytorch-lightning"),
        url="https://pypi.org/project/pytorch-lightning/1.6.5.post0/",
        kind="wheel",
        commit="1.6.5",
        ref="pytorch-lightning 1.6.5 (PyPI 1.6.5.post0, same code)",
        patch="lightning.patch",
        applied_to="the installed site-packages/pytorch_lightning directory",
        how="bevdepth-npu apply lightning (or: cd site-packages/pytorch_lightning && git apply)",
        wheel="pytorch-lightning==1.6.5.post0",
        wheel_sha256="b28b176d189065c8ba84c6ec50876436fa3d15f9f22c76c47d67d86c3e20311a",
        package_dir="pytorch_lightning",
    ),
    Pin(
        name="drivingsdk",
        aliases=("DrivingSDK", "mx_driving"),
        url="https://github.com/Ascend/DrivingSDK",
        kind="git",
        # branch_v7.0.RC1: the release paired with FrameworkPTAdapter 7.0.0 / CANN 8.1.RC1
        commit="7291b8a28c33be40b1a12013c638fe5e3c3fe090",
        ref="branch_v7.0.RC1 (7291b8a)",
        patch=None,
        applied_to="not patched or installed; the NPU contract tests run its Python wrapper "
                   "mx_driving/ops/voxel_pooling_train.py",
        how="nothing to apply",
    ),
    Pin(
        name="torch-npu",
        aliases=("torch_npu",),
        url="https://pypi.org/project/torch-npu/2.1.0.post12/",
        kind="wheel",
        commit="2.1.0.post12",
        # the release the README's Ascend stack pairs with (git tag v7.0.0-pytorch2.1.0 of
        # Ascend/pytorch, commit 881a2763, the wheel's torch_npu/version.py git_version)
        ref="torch-npu 2.1.0.post12 (FrameworkPTAdapter 7.0.0, CANN 8.1.RC1)",
        patch=None,
        applied_to="not patched or installed; its headers, lib/, utils/cpp_extension.py "
                   "(NpuExtension) and op tables serve the mmcv NPU build check and the op "
                   "inventory",
        how="nothing to apply",
        wheel="torch-npu==2.1.0.post12",
        package_dir="torch_npu",
        platform_wheels=(
            ("x86_64", "7fee5c7d24b2990ee694367666a24683c3c1b6f80bc55109eb19e0c1b6e01ac3"),
            ("aarch64", "d37f105bb9b37ad4042dffbb2e3c304de50722f7e8961d78b6a09e3e2fa14958"),
        ),
        wheel_python="3.11",
    ),
)

BY_NAME: Dict[str, Pin] = {}
for _pin in PINS:
    for _key in (_pin.name,) + _pin.aliases:
        BY_NAME[_key.lower()] = _pin


def get(name: str) -> Pin:
    """Look a pin up by name or alias (case-insensitive); unknown names list the valid ones."""
    try:
        return BY_NAME[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown upstream {name!r}; known: {', '.join(p.name for p in PINS)}") from None


def git_pins() -> Tuple[Pin, ...]:
    return tuple(p for p in PINS if p.kind == "git")


def patched_pins() -> Tuple[Pin, ...]:
    """The upstreams the environment is built from, each with its patch file."""
    return tuple(p for p in PINS if p.patched)


def reference_pins() -> Tuple[Pin, ...]:
    """Upstreams fetched for the tests only: never patched, never installed."""
    return tuple(p for p in PINS if not p.patched)
