"""The real pins from the cache: each patch applies to its pinned upstream and re-exports to the
same bytes; the Lightning patch applies to the files of the 1.6.5 wheel and reverts byte for byte;
the mmdetection3d patch applies to the PyPI sdist too; the pins table is what the README says.

Run: python -m pytest tests/integration/test_pins.py  (after `bevdepth-npu fetch`)
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bevdepth_npu import gitutil, paths, patches, patchfile, pins
from tests.conftest import require_source


@pytest.mark.parametrize("name", [p.name for p in pins.patched_pins()])
def test_patch_applies_to_its_pin_and_reexports_identically(name):
    require_source(name)
    pin = pins.get(name)
    if not paths.patch_file(pin).is_file():
        pytest.fail(f"{pin.patch} is missing from the repository")
    body = patchfile.split(paths.patch_file(pin).read_bytes())[1]
    expected = "re-exports identically" if body else "header only"
    assert expected in patches.check(pin)


def test_header_only_patch_is_a_noop_for_apply(tmp_path):
    src = require_source("mmcv")
    pin = pins.get("mmcv")
    if patchfile.split(paths.patch_file(pin).read_bytes())[1]:
        pytest.skip("mmcv.patch carries changes now")
    assert "nothing to do" in patches.apply(pin, src)
    assert gitutil.out(["status", "--porcelain"], cwd=src) == ""


@pytest.mark.parametrize("name", [p.name for p in pins.git_pins()])
def test_cached_checkout_is_at_the_pin(name):
    src = require_source(name)
    assert gitutil.head(src) == pins.get(name).commit


def test_every_patch_header_names_its_upstream_and_full_pin():
    for pin in pins.patched_pins():
        header = patchfile.split(paths.patch_file(pin).read_bytes())[0].decode()
        assert pin.url in header
        assert (pin.commit if pin.kind == "git" else pin.wheel_sha256) in header
        # a description with reasons follows the generated block
        assert len(patchfile.description(header.encode()).splitlines()) >= 3, pin.patch


def _wheel_files(wheel: Path, package_dir: str) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        return {n[len(package_dir) + 1:]: zf.read(n) for n in zf.namelist()
                if n.startswith(package_dir + "/") and not n.endswith("/")}


def test_lightning_patch_applies_to_the_wheel_files_and_reverts_byte_for_byte(tmp_path):
    require_source("lightning")
    pin = pins.get("lightning")
    wheels = sorted(paths.downloads_dir().glob("pytorch_lightning-1.6.5*.whl"))
    if not wheels:
        pytest.skip(f"the Lightning wheel is not in {paths.downloads_dir()}; "
                    f"run `bevdepth-npu fetch lightning`")
    files = _wheel_files(wheels[0], pin.package_dir)
    site = tmp_path / "site-packages" / pin.package_dir
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
    assert patches.apply(pin, site) == "applied"
    body = patchfile.split(paths.patch_file(pin).read_bytes())[1]
    for rel in patchfile.touched_paths(body):
        assert (site / rel).is_file()
    assert patches.apply(pin, site) == "already applied; nothing to do"
    assert patches.apply(pin, site, revert=True) == "reverted"
    after = {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert after == files


@pytest.mark.network   # downloads the sdist once, then reads it from the cache
def test_mmdetection3d_patch_applies_to_the_pypi_sdist(tmp_path):
    require_source("mmdetection3d")
    pin = pins.get("mmdetection3d")
    sdists = sorted(paths.downloads_dir().glob("mmdet3d-1.0.0rc4.tar.gz"))
    if not sdists:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-binary", ":all:", "--no-build-isolation", "-d",
                               str(paths.downloads_dir()), "mmdet3d==1.0.0rc4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sdists = sorted(paths.downloads_dir().glob("mmdet3d-1.0.0rc4.tar.gz"))
        if not sdists:
            pytest.skip("the sdist mmdet3d==1.0.0rc4 could not be downloaded from PyPI: "
                        + proc.stdout.decode(errors="replace").strip().splitlines()[-1])
    with tarfile.open(sdists[0]) as tf:
        tf.extractall(tmp_path)
    root = tmp_path / "mmdet3d-1.0.0rc4"
    body = patchfile.split(paths.patch_file(pin).read_bytes())[1]
    gitutil.run(["init", "--quiet"], cwd=root)
    proc = gitutil.run(["apply", "--check", "-"], cwd=root, input_bytes=body, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    gitutil.run(["apply", "-"], cwd=root, input_bytes=body)
    tree = paths.source_dir(pin.name)
    patched = patches.patched_files(pin, patches.git_dir_for(pin, tree), body)
    for rel, entry in patched.items():
        assert (root / rel).read_bytes() == entry[0], rel


def test_reference_pins_have_no_patch_and_are_refused_by_the_patch_commands(repo_root):
    for pin in pins.reference_pins():
        assert not (repo_root / f"{pin.name}.patch").exists()
        proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "export", pin.name],
                              cwd=repo_root, capture_output=True, text=True)
        assert proc.returncode == 2
        assert "reference upstream without a patch" in proc.stderr
    assert "drivingsdk" in [p.name for p in pins.reference_pins()]


def test_readme_pins_table_is_generated_from_the_pins(repo_root):
    readme = (repo_root / "README.md").read_text()
    from bevdepth_npu.cli import pins_markdown
    assert pins_markdown() in readme
