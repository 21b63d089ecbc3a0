"""Pinned upstream sources in the cache: fetching them and making patched working trees.

``bevdepth-npu fetch [NAME...]`` clones each git upstream into ``<cache>/src/<name>`` at its pin
and verifies the commit. GitHub is unreachable from many Ascend clusters, so every upstream can
come from a local mirror, a bare repository or an earlier clone (``--mirror NAME=PATH_OR_URL`` or
``BEVDEPTH_NPU_MIRRORS``). Lightning and torch_npu are not git upstreams: the pinned PyPI wheel
is downloaded (torch_npu's for this machine's architecture and the pinned CPython), checked
against its sha256 and unpacked into a one-commit repository, so that every upstream can be
diffed, patched and reverted the same way. Offline, the mirror of a wheel pin is the wheel file,
a directory holding it, or a package index URL.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from bevdepth_npu import gitutil, paths, pins
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.pins import Pin

MIRRORS_ENV = "BEVDEPTH_NPU_MIRRORS"
# Fixed identity and dates make the Lightning repository's commit the same on every machine.
_FIXED_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "bevdepth-npu", "GIT_AUTHOR_EMAIL": "bevdepth-npu@localhost",
    "GIT_COMMITTER_NAME": "bevdepth-npu", "GIT_COMMITTER_EMAIL": "bevdepth-npu@localhost",
    "GIT_AUTHOR_DATE": "2022-06-14T00:00:00+0000", "GIT_COMMITTER_DATE": "2022-06-14T00:00:00+0000",
}
PIN_REF = "refs/tags/bevdepth-npu-pin"


def log(msg: str) -> None:
    print(f"[bevdepth-npu] {msg}", file=sys.stderr, flush=True)


def parse_mirrors(entries: Iterable[str]) -> Dict[str, str]:
    """``NAME=PATH_OR_URL`` entries (from flags or the comma-separated variable) to a dict."""
    mirrors: Dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        name, sep, where = entry.partition("=")
        if not sep or not where:
            raise UserError(f"mirror entry {entry!r} is not NAME=PATH_OR_URL "
                            f"(names: {', '.join(p.name for p in pins.PINS)})")
        try:
            pin = pins.get(name)
        except KeyError as exc:
            raise UserError(f"mirror entry {entry!r}: {exc.args[0]}") from None
        if "://" not in where and not where.startswith("git@"):
            where = str(Path(where).expanduser().resolve())
        mirrors[pin.name] = where
    return mirrors


def mirrors_from(flag_entries: Optional[List[str]]) -> Dict[str, str]:
    env_entries = os.environ.get(MIRRORS_ENV, "").split(",")
    mirrors = parse_mirrors(env_entries)
    mirrors.update(parse_mirrors(flag_entries or []))
    return mirrors


def pristine_commit(pin: Pin) -> str:
    """The commit of the pin inside ``src/<name>`` (the Lightning repository's own commit)."""
    if pin.kind == "git":
        return pin.commit
    src = paths.source_dir(pin.name)
    if not src.is_dir():
        raise missing_source(pin)
    return gitutil.out(["rev-parse", f"{PIN_REF}^{{commit}}"], cwd=src)


def missing_source(pin: Pin) -> UserError:
    return UserError(f"no pinned checkout of {pin.name} in {paths.source_dir(pin.name)}; "
                     f"run `bevdepth-npu fetch {pin.name}` (add --mirror {pin.name}=PATH "
                     f"where {pin.url} is unreachable)")


def source_ready(pin: Pin) -> bool:
    src = paths.source_dir(pin.name)
    if not gitutil.is_work_tree(src):
        return False
    if pin.kind == "git":
        return gitutil.has_commit(src, pin.commit)
    # the unpacked wheel's commit names the wheel's sha256: a cache copied from another
    # architecture, or unpacked before the pin moved, is not this pin
    proc = gitutil.run(["log", "-1", "--format=%s", PIN_REF], cwd=src, check=False)
    sha = expected_wheel_sha256(pin)
    return proc.returncode == 0 and sha is not None and sha in proc.stdout.decode()


def machine() -> str:
    """This machine's architecture as wheel pins name it (``platform.machine()``)."""
    return platform.machine()


def expected_wheel_sha256(pin: Pin, arch: Optional[str] = None) -> Optional[str]:
    return pin.wheel_sha256_for(arch or machine())


def wheel_filename_prefix(pin: Pin) -> str:
    """``name-version`` as wheel files of the pin begin (PEP 427 escapes ``-`` to ``_``)."""
    name, version = pin.wheel.split("==")
    return name.replace("-", "_") + "-" + version


def fetch(pin: Pin, mirror: Optional[str] = None) -> Path:
    """Make ``src/<name>`` a clean checkout at the pin; return its path."""
    if pin.kind == "wheel":
        return _fetch_wheel(pin, mirror)
    dest = paths.source_dir(pin.name)
    if gitutil.is_work_tree(dest):
        if gitutil.has_commit(dest, pin.commit):
            _checkout_pin(dest, pin)
            log(f"{pin.name}: cached at {pin.short} ({dest})")
            return dest
        if not mirror and not pin.url:
            raise missing_source(pin)
    source = mirror or pin.url
    log(f"{pin.name}: cloning {source} ...")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f".{pin.name}.part"
    shutil.rmtree(part, ignore_errors=True)
    t0 = time.monotonic()
    proc = gitutil.run(["clone", "--quiet", "--no-checkout", source, str(part)], check=False,
                       env={"GIT_HTTP_LOW_SPEED_LIMIT": "1000", "GIT_HTTP_LOW_SPEED_TIME": "60"})
    if proc.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UserError(
            f"cannot fetch {pin.name}: cloning {source} failed"
            f" ({err[-1] if err else 'no message'}). Where that host is unreachable, point at a "
            f"local mirror, bare repository or earlier clone: `bevdepth-npu fetch {pin.name} "
            f"--mirror {pin.name}=PATH_OR_URL` or {MIRRORS_ENV}={pin.name}=PATH_OR_URL")
    if not gitutil.has_commit(part, pin.commit):
        shutil.rmtree(part, ignore_errors=True)
        raise UserError(f"{source} does not contain the pinned commit {pin.commit} of {pin.name}; "
                        f"use a mirror of {pin.url} that has it")
    _checkout_pin(part, pin, fresh=True)
    if dest.exists():
        # an unusable leftover (not a repository, or without the pin): keep it aside, never delete
        aside = dest.parent / f"{pin.name}.old-{int(time.time())}"
        dest.rename(aside)
        log(f"{pin.name}: kept the unusable earlier directory as {aside}")
    part.rename(dest)
    log(f"{pin.name}: checked out {pin.short} in {time.monotonic() - t0:.0f} s ({dest})")
    return dest


def _checkout_pin(tree: Path, pin: Pin, fresh: bool = False) -> None:
    status = "" if fresh else gitutil.out(["status", "--porcelain", "--untracked-files=no"],
                                          cwd=tree)
    if status:
        raise UserError(f"the cached checkout {tree} has local changes; it must stay pristine "
                        f"(edit a patched tree instead: {paths.tree_dir(pin.name)})")
    gitutil.run(["checkout", "--quiet", "--detach", pin.commit], cwd=tree)
    if gitutil.head(tree) != pin.commit:
        raise UserError(f"{tree} is not at {pin.commit} after checkout")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheel(pin: Pin, mirror: Optional[str]) -> Path:
    dest = paths.source_dir(pin.name)
    if source_ready(pin):
        log(f"{pin.name}: cached ({dest})")
        return dest
    wheel = download_wheel(pin, mirror)
    expected = expected_wheel_sha256(pin)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f".{pin.name}.part"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    prefix = pin.package_dir + "/"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                target = part / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
    gitutil.run(["init", "--quiet"], cwd=part)
    gitutil.run(["add", "-A"], cwd=part)
    gitutil.run(["commit", "--quiet", "--no-gpg-sign", "-m", f"{pin.wheel} ({expected})"],
                cwd=part, env=_FIXED_COMMIT_ENV)
    gitutil.run(["update-ref", PIN_REF, "HEAD"], cwd=part)
    gitutil.run(["checkout", "--quiet", "--detach", "HEAD"], cwd=part)
    if dest.exists():
        aside = dest.parent / f"{pin.name}.old-{int(time.time())}"
        dest.rename(aside)
        log(f"{pin.name}: kept the earlier directory, not this pin, as {aside}")
    part.rename(dest)
    log(f"{pin.name}: unpacked {wheel.name} into {dest}")
    return dest


def _keep_in_downloads(wheel: Path) -> Path:
    """A verified wheel from a mirror, copied into ``downloads/`` so that the cache holds every
    pinned file (the tests that compare wheels read them there)."""
    dl = paths.downloads_dir()
    final = dl / wheel.name
    if wheel.resolve().parent == dl.resolve() or (final.exists() and
                                                   sha256_file(final) == sha256_file(wheel)):
        return final
    dl.mkdir(parents=True, exist_ok=True)
    if final.exists():
        final.rename(dl / f"{final.name}.old-{int(time.time())}")
    atomic_write(final, wheel.read_bytes())
    return final


def download_wheel(pin: Pin, mirror: Optional[str] = None, arch: Optional[str] = None) -> Path:
    """The pinned wheel (for ``arch``, default this machine) in ``downloads/``, from the mirror
    (a wheel file, a directory holding it, or a package index URL) or PyPI; sha256 checked."""
    arch = arch or machine()
    expected = expected_wheel_sha256(pin, arch)
    if expected is None:
        raise UserError(f"{pin.name}: the pin has no wheel for {arch} (pinned: "
                        f"{', '.join(m for m, _ in pin.platform_wheels)})")
    if mirror and Path(mirror).is_file():
        digest = sha256_file(Path(mirror))
        if digest != expected:
            raise UserError(f"{mirror} has sha256 {digest}, expected {expected} ({pin.wheel} "
                            f"for {arch}); pass the pinned wheel")
        return _keep_in_downloads(Path(mirror))
    pattern = f"{wheel_filename_prefix(pin)}-*.whl"
    dl = paths.downloads_dir()
    dl.mkdir(parents=True, exist_ok=True)
    search_dirs = [dl] + ([Path(mirror)] if mirror and Path(mirror).is_dir() else [])
    for d in search_dirs:
        for cand in sorted(d.glob(pattern)):
            if sha256_file(cand) == expected:
                return _keep_in_downloads(cand)
    if mirror and "://" not in mirror:
        raise UserError(f"cannot fetch {pin.name}: {mirror} holds no {pattern} with sha256 "
                        f"{expected} ({pin.wheel} for {arch})")
    with tempfile.TemporaryDirectory(prefix=f".{pin.name}-", dir=str(dl)) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, pin.wheel]
        if pin.platform_wheels:
            # the pinned CPython's manylinux wheel, whatever Python runs this
            cmd[-1:-1] = ["--platform", f"manylinux2014_{arch}", "--python-version",
                          pin.wheel_python, "--implementation", "cp"]
        if mirror and "://" in mirror:
            cmd[-1:-1] = ["--index-url", mirror]
        log(f"{pin.name}: downloading {pin.wheel} ({arch}) with pip ...")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        got = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not got:
            tail = proc.stdout.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            raise UserError(f"cannot fetch {pin.name}: `pip download {pin.wheel}` failed "
                            f"({tail[0]}). Offline, pass the wheel file or a directory holding "
                            f"it: --mirror {pin.name}=PATH")
        digest = sha256_file(got[0])
        if digest != expected:
            raise UserError(f"{got[0].name} from the package index has sha256 {digest}, "
                            f"expected {expected} ({pin.wheel} for {arch}); the index serves "
                            f"another file than the pinned one")
        final = dl / got[0].name
        if final.exists():
            # an earlier file of that name with other bytes: keep it aside, never delete
            final.rename(dl / f"{final.name}.old-{int(time.time())}")
        os.replace(got[0], final)
    return final


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="upstreams to fetch (default: all; a reference upstream that cannot be "
                        "fetched is then only a warning): "
                        + ", ".join(pin.name for pin in pins.PINS))
    p.add_argument("--mirror", action="append", metavar="NAME=PATH_OR_URL",
                   help="where to clone NAME from instead of its official URL: a local mirror, "
                        "bare repository, earlier clone or URL; for a wheel pin (lightning, "
                        "torch-npu) a wheel file, a directory holding it or a package index URL "
                        f"(repeatable; also "
                        f"{MIRRORS_ENV}, comma separated)")


def run(args: argparse.Namespace) -> int:
    selected = [pins.get(n) for n in args.names] if args.names else list(pins.PINS)
    mirrors = mirrors_from(args.mirror)
    failures = []
    for pin in selected:
        try:
            fetch(pin, mirrors.get(pin.name))
        except UserError as exc:
            if not args.names and not pin.patched:
                # a reference upstream serves tests only: without it they skip, nothing breaks
                log(f"warning: {exc}; the tests that read {pin.name}'s sources will skip")
                continue
            failures.append(str(exc))
            log(f"error: {exc}")
    if failures:
        return 2
    return 0
