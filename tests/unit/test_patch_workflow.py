"""The patch workflow on small git repositories made by the tests: fetch (mirror, offline), apply,
revert, already applied, wrong commit, dirty and half-applied trees, export round trip, check.
Every refused operation must leave the target byte-identical; the tests hash it to prove so.

Run: python -m pytest tests/unit/test_patch_workflow.py
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevdepth_npu import patches, patchfile, upstream
from bevdepth_npu.errors import UserError
from bevdepth_npu.pins import Pin

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false", *args], cwd=cwd, env=env,
                          check=True, stdout=subprocess.PIPE).stdout.decode().strip()


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (outside .git) with its bytes' hash and mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        if ".git" in p.relative_to(root).parts or not p.is_file():
            continue
        out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mode & 0o777)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVDEPTH_NPU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def upstream_repo(tmp_path) -> Path:
    """A small upstream with two commits; the pin is the first."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "a.py").write_text("def a():\n    return 1\n\n\nX = 'cuda'\n")
    (repo / "pkg" / "b.py").write_text("".join(f"line {i}\n" for i in range(40)))
    (repo / "gone.txt").write_text("to be deleted\n")
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pin")
    pin_commit = git(repo, "rev-parse", "HEAD")
    (repo / "pkg" / "a.py").write_text("def a():\n    return 2\n")
    git(repo, "commit", "-qam", "later")
    git(repo, "checkout", "-q", pin_commit)
    return repo


@pytest.fixture
def pin(upstream_repo) -> Pin:
    commit = git(upstream_repo, "rev-parse", "HEAD")
    return Pin(name="toy", aliases=(), url="https://github.invalid/toy/toy", kind="git",
               commit=commit, ref="test pin", patch="toy.patch", applied_to="the toy root",
               how="git apply toy.patch")


def edit(tree: Path) -> None:
    """The change the toy patch carries: modify, add (one executable), delete."""
    (tree / "pkg" / "a.py").write_text("def a():\n    return 1\n\n\nX = device()\n")
    text = (tree / "pkg" / "b.py").read_text().replace("line 20\n", "line twenty\n")
    (tree / "pkg" / "b.py").write_text(text)
    (tree / "pkg" / "device.py").write_text("def device():\n    return 'cpu'\n")
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "gone.txt").unlink()
    (tree / "pkg" / "__pycache__").mkdir()
    (tree / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0compiled")
    (tree / "debug.log").write_text("ignored by upstream's .gitignore\n")


@pytest.fixture
def fetched(cache, pin, upstream_repo) -> Path:
    upstream.fetch(pin, mirror=str(upstream_repo))
    return cache / "src" / "toy"


@pytest.fixture
def patch_file(tmp_path, pin, fetched) -> Path:
    """toy.patch exported from an edited clone."""
    work = tmp_path / "edited"
    git(tmp_path, "clone", "-q", str(fetched), str(work))
    git(work, "checkout", "-q", pin.commit)
    edit(work)
    out = tmp_path / "toy.patch"
    desc = tmp_path / "desc.txt"
    desc.write_text("device port\n- pkg/a.py: ask the device module.\n")
    patches.export(pin, work, output=out, header=desc)
    return out


def fresh_clone(tmp_path: Path, fetched: Path, pin: Pin, name: str = "target") -> Path:
    target = tmp_path / name
    git(tmp_path, "clone", "-q", str(fetched), str(target))
    git(target, "checkout", "-q", pin.commit)
    return target


# ----------------------------------------------------------------------------- fetch

def test_fetch_from_mirror_checks_out_the_pin(cache, pin, fetched):
    assert git(fetched, "rev-parse", "HEAD") == pin.commit
    assert git(fetched, "status", "--porcelain") == ""
    # a second fetch reuses the cache without a mirror
    again = upstream.fetch(pin)
    assert again == fetched


def test_fetch_offline_without_mirror_names_upstream_url_and_option(cache, pin):
    with pytest.raises(UserError) as exc:
        upstream.fetch(pin)
    msg = str(exc.value)
    assert "toy" in msg and pin.url in msg and "--mirror toy=" in msg
    assert exc.value.exit_code == 2
    assert not (cache / "src" / "toy").exists()


def test_fetch_mirror_without_the_pinned_commit_is_refused(cache, tmp_path, pin):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    (other / "f").write_text("x\n")
    git(other, "add", "-A")
    git(other, "commit", "-qm", "unrelated")
    with pytest.raises(UserError, match="does not contain the pinned commit"):
        upstream.fetch(pin, mirror=str(other))


def test_mirror_entries_parse_and_reject_bad_ones(monkeypatch):
    assert upstream.parse_mirrors(["bevdepth=/x/y"])["bevdepth"] == "/x/y"
    assert upstream.parse_mirrors(["mmdet3d=https://h/r.git"])["mmdetection3d"] == "https://h/r.git"
    with pytest.raises(UserError, match="NAME=PATH_OR_URL"):
        upstream.parse_mirrors(["bevdepth"])
    with pytest.raises(UserError, match="unknown upstream"):
        upstream.parse_mirrors(["nosuch=/x"])
    monkeypatch.setenv(upstream.MIRRORS_ENV, "mmcv=/m1,bevdepth=/b1")
    assert upstream.mirrors_from(["mmcv=/m2"]) == {"mmcv": "/m2", "bevdepth": "/b1"}


# ----------------------------------------------------------------------------- apply / revert

def test_apply_then_already_applied_then_revert_is_byte_exact(tmp_path, pin, fetched, patch_file):
    target = fresh_clone(tmp_path, fetched, pin)
    before = snapshot(target)
    assert patches.apply(pin, target, patch_path=patch_file) == "applied"
    after = snapshot(target)
    assert after != before
    assert "X = device()" in (target / "pkg" / "a.py").read_text()
    assert after["run.sh"][1] == 0o755
    assert not (target / "gone.txt").exists()
    assert patches.apply(pin, target, patch_path=patch_file) == "already applied; nothing to do"
    assert snapshot(target) == after
    assert patches.apply(pin, target, revert=True, patch_path=patch_file) == "reverted"
    assert snapshot(target) == before
    assert git(target, "status", "--porcelain") == ""
    assert patches.apply(pin, target, revert=True, patch_path=patch_file).startswith("not applied")


def test_wrong_commit_is_refused_and_untouched(tmp_path, pin, fetched, patch_file):
    target = fresh_clone(tmp_path, fetched, pin)
    git(target, "commit", "-q", "--allow-empty", "-m", "not the pin")
    before = snapshot(target)
    with pytest.raises(UserError, match="is at commit .* checkout"):
        patches.apply(pin, target, patch_path=patch_file)
    assert snapshot(target) == before


def test_dirty_tree_is_refused_and_untouched(tmp_path, pin, fetched, patch_file):
    target = fresh_clone(tmp_path, fetched, pin)
    (target / "pkg" / "b.py").write_text("my local edit\n")
    (target / "notes.txt").write_text("untracked work\n")
    before = snapshot(target)
    with pytest.raises(UserError, match="nothing was modified") as exc:
        patches.apply(pin, target, patch_path=patch_file)
    assert "notes.txt" in str(exc.value)
    assert snapshot(target) == before
    with pytest.raises(UserError):
        patches.apply(pin, target, revert=True, patch_path=patch_file)
    assert snapshot(target) == before


def test_half_applied_tree_is_refused_and_untouched(tmp_path, pin, fetched, patch_file):
    target = fresh_clone(tmp_path, fetched, pin)
    patches.apply(pin, target, patch_path=patch_file)
    # undo one file of the patch by hand: neither pristine nor patched
    git(target, "checkout", "-q", "--", "pkg/a.py")
    before = snapshot(target)
    with pytest.raises(UserError, match="patched files still pristine: pkg/a.py"):
        patches.apply(pin, target, patch_path=patch_file)
    assert snapshot(target) == before
    with pytest.raises(UserError):
        patches.apply(pin, target, revert=True, patch_path=patch_file)
    assert snapshot(target) == before


def test_stale_patch_is_replaced_but_edits_never_are(tmp_path, pin, fetched, patch_file):
    target = fresh_clone(tmp_path, fetched, pin)
    patches.apply(pin, target, patch_path=patch_file)
    # a newer version of the patch: one more change
    newer_tree = fresh_clone(tmp_path, fetched, pin, "newer")
    edit(newer_tree)
    (newer_tree / "pkg" / "c.py").write_text("C = 3\n")
    newer = tmp_path / "newer.patch"
    patches.export(pin, newer_tree, output=newer)
    with pytest.raises(UserError):
        patches.apply(pin, target, patch_path=newer)
    assert patches.apply(pin, target, patch_path=newer, replace_stale=True) == "applied"
    assert (target / "pkg" / "c.py").read_text() == "C = 3\n"
    # a hand edit on top is not the recorded patch: refused even with replace_stale
    (target / "pkg" / "c.py").write_text("C = 4\n")
    before = snapshot(target)
    with pytest.raises(UserError):
        patches.apply(pin, target, patch_path=patch_file, replace_stale=True)
    assert snapshot(target) == before


# ----------------------------------------------------------------------------- export / check

def test_export_round_trip_is_deterministic_and_keeps_the_description(tmp_path, pin, fetched,
                                                                       patch_file):
    data = patch_file.read_bytes()
    header, body = patchfile.split(data)
    assert header.startswith(b"toy.patch: bevdepth-npu changes to toy\n")
    assert f"Pin: {pin.commit}".encode() in header and pin.url.encode() in header
    assert b"device port" in header
    paths_in_patch = patchfile.touched_paths(body)
    assert paths_in_patch == sorted(paths_in_patch)
    assert set(paths_in_patch) == {"gone.txt", "pkg/a.py", "pkg/b.py", "pkg/device.py", "run.sh"}
    assert b"__pycache__" not in body and b"debug.log" not in body
    # apply to a fresh clone and export again, without --header: the same bytes
    target = fresh_clone(tmp_path, fetched, pin)
    patches.apply(pin, target, patch_path=patch_file)
    assert patches.export(pin, target, output=patch_file).endswith("unchanged")
    assert patch_file.read_bytes() == data
    again = tmp_path / "again.patch"
    again.write_bytes(data)
    patches.export(pin, target, output=again)
    assert again.read_bytes() == data


def test_export_refuses_an_unchanged_tree_and_a_wrong_commit(tmp_path, pin, fetched):
    target = fresh_clone(tmp_path, fetched, pin)
    out = tmp_path / "x.patch"
    with pytest.raises(UserError, match="does not differ"):
        patches.export(pin, target, output=out)
    assert not out.exists()
    git(target, "commit", "-q", "--allow-empty", "-m", "not the pin")
    with pytest.raises(UserError, match="not the pin"):
        patches.export(pin, target, output=out)


def test_check_passes_for_an_exported_patch_and_fails_for_a_hand_edit(pin, fetched, patch_file):
    assert "re-exports identically" in patches.check(pin, patch_file)
    data = patch_file.read_bytes()
    # a hand edit that still applies: an added line changed inside the diff
    edited = data.replace(b"+    return 'cpu'", b"+    return 'npu'")
    assert edited != data
    patch_file.write_bytes(edited)
    with pytest.raises(UserError, match="different bytes"):
        patches.check(pin, patch_file)
    # a hunk that no longer applies
    patch_file.write_bytes(data.replace(b" line 19\n", b" line nineteen\n"))
    with pytest.raises(UserError, match="does not apply"):
        patches.check(pin, patch_file)


def test_a_repeated_generated_header_fails_check_and_export_writes_it_once(tmp_path, pin,
                                                                             fetched, patch_file):
    """A merge of two exports can leave the generated block twice; check names it, and the
    next export keeps the description and writes the block once."""
    data = patch_file.read_bytes()
    header, body = patchfile.split(data)
    generated = patchfile.auto_header(pin)
    assert header.startswith(generated.encode())
    doubled = generated.encode() + b"\n" + generated.encode() + b"\n" + header + body
    patch_file.write_bytes(doubled)
    with pytest.raises(UserError, match="generated block 3 times"):
        patches.check(pin, patch_file)
    assert patchfile.description(patchfile.split(doubled)[0]) == \
        "device port\n- pkg/a.py: ask the device module."
    target = fresh_clone(tmp_path, fetched, pin)
    patches.apply(pin, target, patch_path=patch_file)
    patches.export(pin, target, output=patch_file)
    assert patch_file.read_bytes() == data
    assert patchfile.generated_blocks(patchfile.split(data)[0]) == 1
    assert "re-exports identically" in patches.check(pin, patch_file)


def test_header_lines_git_would_misread_are_rejected(pin):
    with pytest.raises(UserError, match="misread"):
        patchfile.compose(pin, "--- a/evil\n", b"")


# ----------------------------------------------------------------------------- wheel targets

@pytest.fixture
def wheel_pin(tmp_path, cache, monkeypatch) -> Pin:
    """A Lightning-like upstream: a package directory from a wheel, not a git checkout."""
    import zipfile
    pkg = {"toylib/__about__.py": '__version__ = "1.6.5.post0"\n',
           "toylib/types.py": "SCHED = '_LRScheduler'\n",
           "toylib/amp.py": "DEVICE = 'cuda'\n"}
    wheel = tmp_path / "toylib-1.6.5.post0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in sorted(pkg.items()):
            zf.writestr(zipfile.ZipInfo(name, (2022, 6, 14, 0, 0, 0)), text)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return Pin(name="toylib", aliases=(), url="https://pypi.invalid/toylib", kind="wheel",
               commit="1.6.5", ref="toylib 1.6.5", patch="toylib.patch",
               applied_to="site-packages/toylib", how="bevdepth-npu apply toylib",
               wheel="toylib==1.6.5.post0", wheel_sha256=digest, package_dir="toylib"), wheel


def test_wheel_target_apply_revert_byte_for_byte(tmp_path, wheel_pin):
    pin, wheel = wheel_pin
    upstream.fetch(pin, mirror=str(wheel))
    site = tmp_path / "site" / "toylib"
    import zipfile
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    (site / "__pycache__").mkdir()
    (site / "__pycache__" / "types.cpython-311.pyc").write_bytes(b"\0")
    original = snapshot(site)
    edited = tmp_path / "edited" / "toylib"
    (edited.parent).mkdir()
    import shutil
    shutil.copytree(site, edited)
    (edited / "types.py").write_text("SCHED = 'LRScheduler'\n")
    (edited / "npu.py").write_text("def amp_device():\n    return 'npu'\n")
    out = tmp_path / "toylib.patch"
    patches.export(pin, edited, output=out)
    assert patchfile.touched_paths(patchfile.split(out.read_bytes())[1]) == ["npu.py", "types.py"]
    assert patches.apply(pin, site, patch_path=out) == "applied"
    assert (site / "npu.py").is_file()
    assert patches.apply(pin, site, patch_path=out).startswith("already applied")
    assert patches.apply(pin, site, revert=True, patch_path=out) == "reverted"
    assert snapshot(site) == original
    # wrong version: refused, untouched
    (site / "__about__.py").write_text('__version__ = "1.7.0"\n')
    before = snapshot(site)
    with pytest.raises(UserError, match="1.7.0"):
        patches.apply(pin, site, patch_path=out)
    assert snapshot(site) == before


def test_wheel_with_wrong_checksum_is_refused(tmp_path, wheel_pin):
    pin, wheel = wheel_pin
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(UserError, match="sha256"):
        upstream.fetch(pin, mirror=str(wheel))


# ----------------------------------------------------------------------------- command line

def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "bevdepth_npu", *args], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, **(env or {})))


def test_cli_help_and_clear_errors(tmp_path):
    assert run_cli("--help").returncode == 0
    for cmd in ("fetch", "apply", "export", "check", "env", "summarize", "synth"):
        assert run_cli(cmd, "--help").returncode == 0, cmd
    proc = run_cli("apply", "nosuch")
    assert proc.returncode == 2 and b"unknown upstream 'nosuch'" in proc.stderr
    proc = run_cli("apply", "bevdepth", "--into", str(tmp_path / "missing"))
    assert proc.returncode == 2 and b"is not a directory" in proc.stderr
    proc = run_cli("check", env={"BEVDEPTH_NPU_CACHE": str(tmp_path / "empty")})
    assert proc.returncode == 1 and b"bevdepth-npu fetch" in proc.stderr
