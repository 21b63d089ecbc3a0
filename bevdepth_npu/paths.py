"""Where bevdepth-npu keeps things: the cache of pinned upstream checkouts, wheels and venvs.

The cache defaults to ``~/.cache/bevdepth-npu`` and is moved with ``BEVDEPTH_NPU_CACHE``.
Layout::

    src/<name>                  pristine clone of the upstream, HEAD detached at the pin
    trees/<name>                patched working tree (what the environment installs)
    wheels/                     wheels built from pinned sources, keyed by what went into them
    downloads/                  files fetched from PyPI (the wheels of the wheel pins)
    venvs/<device>-py<X.Y>      environments built by ``bevdepth-npu env``
    checks/                     answers of checks that ask a package registry, with their date
    stand-ins/                  the end-to-end test's stand-in Ascend base Python (symbolic links)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    env = os.environ.get("BEVDEPTH_NPU_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "bevdepth-npu"


def source_dir(name: str) -> Path:
    """Pristine checkout of upstream ``name`` at its pin."""
    return cache_dir() / "src" / name


def tree_dir(name: str) -> Path:
    """Patched working tree of upstream ``name`` used by the environment."""
    return cache_dir() / "trees" / name


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def venv_dir(device: str, python_version: str = "") -> Path:
    ver = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_dir() / "venvs" / f"{device}-py{ver}"


def environment_python(device: str) -> Path:
    """The interpreter of the environment ``bevdepth-npu env --device DEVICE`` builds (it may
    not exist yet): where the run layer and the self-test look for the stack."""
    return venv_dir(device) / "bin" / "python"


def patch_file(pin) -> Path:
    return REPO_ROOT / pin.patch
