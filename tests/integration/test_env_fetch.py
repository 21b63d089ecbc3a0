"""`bevdepth-npu env` on a cache without the pinned sources fetches them first, from the mirrors
of BEVDEPTH_NPU_MIRRORS or --mirror, so that the quick start's first command works alone; with
an unusable mirror it stops before building anything, with fetch's error.

The mirrors are $BEVDEPTH_NPU_MIRRORS where set, else the pristine checkouts of the current
cache (an earlier clone is a mirror like any other) and the cached wheels of the wheel pins; the empty
cache is a temporary directory. Seconds: local clones.

Run: python -m pytest tests/integration/test_env_fetch.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevdepth_npu import paths, pins, upstream
from tests.conftest import REPO_ROOT, require_source


def _mirrors() -> str:
    given = os.environ.get(upstream.MIRRORS_ENV, "")
    entries = dict(e.split("=", 1) for e in given.split(",") if "=" in e)
    for pin in pins.PINS:
        if pin.name in entries:
            continue
        if pin.kind == "git":
            entries[pin.name] = str(require_source(pin.name))
        else:
            wheels = sorted(paths.downloads_dir().glob(
                f"{upstream.wheel_filename_prefix(pin)}-*.whl"))
            if not wheels:
                pytest.skip(f"no {pin.wheel} wheel in {paths.downloads_dir()} to use as a "
                            f"mirror; run `bevdepth-npu fetch {pin.name}`")
            entries[pin.name] = str(paths.downloads_dir())
    return ",".join(f"{name}={where}" for name, where in entries.items())


def _env(cache: Path, mirrors: str) -> dict:
    env = dict(os.environ, BEVDEPTH_NPU_CACHE=str(cache), PYTHONPATH=str(REPO_ROOT))
    env[upstream.MIRRORS_ENV] = mirrors
    return env


def test_missing_pins_are_fetched_from_the_mirrors(tmp_path):
    cache = tmp_path / "cache"
    code = ("from bevdepth_npu import envbuild, pins, upstream\n"
            "assert not any(upstream.source_ready(p) for p in pins.PINS)\n"
            "envbuild.fetch_missing()\n"
            "print([p.name for p in pins.PINS if upstream.source_ready(p)])\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(cache, _mirrors()),
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str([p.name for p in pins.PINS])
    assert "fetching the pinned sources" in proc.stderr
    for pin in pins.PINS:
        assert (cache / "src" / pin.name / ".git").exists(), pin.name


def test_env_without_a_usable_mirror_stops_with_fetchs_error_before_building(tmp_path):
    cache = tmp_path / "cache"
    mirrors = ",".join(f"{p.name}={tmp_path / 'no-such-mirror'}" for p in pins.PINS)
    proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "env", "--device", "cpu",
                           "--venv", str(tmp_path / "venv")], env=_env(cache, mirrors),
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "fetching them failed" in proc.stderr
    assert f"cannot fetch bevdepth: cloning {tmp_path / 'no-such-mirror'} failed" in proc.stderr
    assert "--mirror bevdepth=PATH_OR_URL" in proc.stderr
    assert not (tmp_path / "venv").exists()
