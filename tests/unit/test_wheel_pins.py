"""Binary wheel pins (one CPython wheel per machine architecture, as torch-npu's) on small wheels
made by the tests: offline fetch from a mirror directory or file, the sha256 of this machine's
wheel checked, the wheel kept in ``downloads/``, an unpacked pin of another architecture or
another sha256 not taken as this one, pip asked for the pinned CPython's manylinux wheel whatever
Python runs it, and an unfetchable reference pin only a warning for a bare ``fetch``.

Run: python -m pytest tests/unit/test_wheel_pins.py
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from bevdepth_npu import cli, pins, upstream
from bevdepth_npu.errors import UserError
from bevdepth_npu.pins import Pin

FILES = {
    "toynpu/__init__.py": "import toynpu._C\n",
    "toynpu/utils/cpp_extension.py": "def NpuExtension(name, sources):\n    return name\n",
    "toynpu/csrc/aten/npu_native_functions_by_codegen.yaml": "supported:\n  - add.Tensor\n",
    "toynpu/include/toynpu/x.h": "#pragma once\n",
    "toynpu-2.1.0.post12.dist-info/RECORD": "",
}


def _wheel(where: Path, arch: str, extra: str = "") -> Path:
    wheel = where / f"toynpu-2.1.0.post12-cp311-cp311-manylinux_2_17_{arch}.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in sorted(FILES.items()):
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), text)
        zf.writestr(zipfile.ZipInfo("toynpu/lib/libtoynpu.so", (2024, 1, 1, 0, 0, 0)),
                    f"ELF {arch}{extra}")
    return wheel


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVDEPTH_NPU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def mirror(tmp_path) -> Path:
    here = upstream.machine()
    other = "aarch64" if here != "aarch64" else "x86_64"
    _wheel(tmp_path / "mirror", here)
    _wheel(tmp_path / "mirror", other)
    return tmp_path / "mirror"


def _pin(mirror: Path) -> Pin:
    shas = tuple((arch, _sha(next(mirror.glob(f"*_{arch}.whl"))))
                 for arch in sorted({upstream.machine(), "aarch64", "x86_64"}))
    return Pin(name="toynpu", aliases=(), url="https://pypi.invalid/toynpu", kind="wheel",
               commit="2.1.0.post12", ref="toynpu 2.1.0.post12", patch=None,
               applied_to="not installed", how="nothing to apply", wheel="toynpu==2.1.0.post12",
               package_dir="toynpu", platform_wheels=shas, wheel_python="3.11")


def test_this_machines_wheel_is_fetched_offline_unpacked_and_kept(cache, mirror):
    pin = _pin(mirror)
    src = upstream.fetch(pin, str(mirror))
    assert src == cache / "src" / "toynpu"
    assert (src / "csrc/aten/npu_native_functions_by_codegen.yaml").read_text() == \
        FILES["toynpu/csrc/aten/npu_native_functions_by_codegen.yaml"]
    assert (src / "utils/cpp_extension.py").is_file() and (src / "include/toynpu/x.h").is_file()
    # this machine's wheel, not the other architecture's
    assert (src / "lib/libtoynpu.so").read_text() == f"ELF {upstream.machine()}"
    assert not (src / "toynpu-2.1.0.post12.dist-info").exists()
    assert upstream.source_ready(pin)
    kept = sorted(p.name for p in (cache / "downloads").glob("toynpu-*.whl"))
    assert kept == [f"toynpu-2.1.0.post12-cp311-cp311-manylinux_2_17_{upstream.machine()}.whl"]
    # a second fetch needs no mirror
    assert upstream.fetch(pin) == src


def test_unpacked_wheel_of_another_sha256_is_not_this_pin(cache, mirror):
    pin = _pin(mirror)
    upstream.fetch(pin, str(mirror))
    moved = dataclasses.replace(pin, platform_wheels=tuple(
        (arch, "0" * 64 if arch == upstream.machine() else sha)
        for arch, sha in pin.platform_wheels))
    assert not upstream.source_ready(moved)
    with pytest.raises(UserError, match="holds no toynpu-2.1.0.post12-\\*.whl with sha256 0000"):
        upstream.fetch(moved, str(mirror))
    # the earlier unpacked directory is untouched by the refused fetch
    assert upstream.source_ready(pin)


def test_wheel_file_with_other_bytes_is_refused_naming_both_digests(cache, tmp_path, mirror):
    pin = _pin(mirror)
    bad = _wheel(tmp_path / "bad", upstream.machine(), extra=" rebuilt")
    with pytest.raises(UserError) as exc:
        upstream.fetch(pin, str(bad))
    assert str(bad) in str(exc.value) and _sha(bad) in str(exc.value)
    assert pin.wheel_sha256_for(upstream.machine()) in str(exc.value)
    assert not (cache / "src" / "toynpu").exists()


def test_machine_without_a_pinned_wheel_is_named(cache, mirror):
    pin = dataclasses.replace(_pin(mirror), platform_wheels=(("riscv64", "1" * 64),))
    with pytest.raises(UserError, match=f"no wheel for {upstream.machine()}.*riscv64"):
        upstream.fetch(pin, str(mirror))


def test_pip_is_asked_for_the_pinned_cpython_manylinux_wheel(cache, mirror, monkeypatch):
    pin = _pin(mirror)
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, b"ERROR: No matching distribution found\n")

    monkeypatch.setattr(upstream.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="--mirror toynpu=PATH"):
        upstream.download_wheel(pin, arch="aarch64")
    cmd = seen[0]
    assert cmd[cmd.index("--platform") + 1] == "manylinux2014_aarch64"
    assert cmd[cmd.index("--python-version") + 1] == "3.11"
    assert cmd[-1] == "toynpu==2.1.0.post12" and "--only-binary" in cmd


def test_bare_fetch_warns_for_an_unfetchable_reference_wheel_and_fails_when_named(
        cache, mirror, monkeypatch, capsys, tmp_path):
    pin = _pin(mirror)
    monkeypatch.setattr(pins, "PINS", (pin,))
    monkeypatch.setitem(pins.BY_NAME, "toynpu", pin)
    monkeypatch.setenv(upstream.MIRRORS_ENV, f"toynpu={tmp_path / 'empty'}")
    (tmp_path / "empty").mkdir()
    assert upstream.run(argparse.Namespace(names=[], mirror=None)) == 0
    assert "warning: cannot fetch toynpu" in capsys.readouterr().err
    assert upstream.run(argparse.Namespace(names=["toynpu"], mirror=None)) == 2
    assert "error: cannot fetch toynpu" in capsys.readouterr().err


def test_pins_table_and_label_carry_every_architectures_sha256():
    pin = pins.get("torch_npu")
    assert pin.name == "torch-npu" and not pin.patched and pin.kind == "wheel"
    assert {arch for arch, _ in pin.platform_wheels} == {"x86_64", "aarch64"}
    row = [r for r in cli.pins_markdown().splitlines() if r.startswith("| torch-npu |")][0]
    for arch, sha in pin.platform_wheels:
        assert f"{arch} `{sha}`" in row and sha in pin.wheel_label
    assert pin.wheel_sha256_for("x86_64") != pin.wheel_sha256_for("aarch64")
    assert pin.wheel_sha256_for("ppc64le") is None
    lightning = pins.get("lightning")
    assert lightning.wheel_sha256_for("aarch64") == lightning.wheel_sha256
