"""Apply, revert, export and check the four patches.

State is decided by content, never by marker files: a target is *clean* when it equals the pin,
*applied* when its diff against the pin is exactly the patch, and anything else is refused with
the list of files that differ, before a single byte is written. Writes go file by file through
``atomic_write``; a revert writes the pristine bytes from the pinned commit, so it is exact.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bevdepth_npu import gitutil, paths, pins, upstream
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.patchfile import (body_hash, compose, description, generated_blocks, split,
                                    touched_paths)
from bevdepth_npu.pins import Pin

# Build products and caches that are never part of a patch (taken out of the scratch index after
# `git add -A`: naming them in an add pathspec makes git refuse when upstream ignores them too).
EXCLUDES = (
    ":(glob)**/__pycache__/**", ":(glob)**/*.pyc", ":(glob)**/*.so", ":(glob)**/*.egg-info/**",
    ":(glob)build/**", ":(glob)dist/**", ":(glob)**/.pytest_cache/**",
)
# The versions an installed Lightning may report: the pin and its PyPI release
LIGHTNING_VERSIONS = (pins.get("lightning").commit,
                      pins.get("lightning").wheel.split("==")[1])
log = upstream.log


# ----------------------------------------------------------------------------- diffs

def git_dir_for(pin: Pin, target: Path) -> Path:
    """A git directory that holds the pin: the target's own, or the cached pristine clone's."""
    if pin.kind == "git" and gitutil.is_work_tree(target):
        gd = Path(gitutil.out(["rev-parse", "--absolute-git-dir"], cwd=target))
        if gitutil.has_commit(target, pin.commit):
            return gd
    if not upstream.source_ready(pin):
        raise upstream.missing_source(pin)
    return Path(gitutil.out(["rev-parse", "--absolute-git-dir"], cwd=paths.source_dir(pin.name)))


def diff_tree(pin: Pin, target: Path, git_dir: Path,
              only: Optional[Sequence[str]] = None) -> bytes:
    """The diff from the pin to the files in ``target`` (new files included), reproducibly.

    ``only`` restricts the comparison to those paths (then ``target`` may hold just them).
    """
    commit = upstream.pristine_commit(pin) if pin.kind != "git" else pin.commit
    with tempfile.TemporaryDirectory(prefix="bevdepth-npu-index-") as tmp:
        env = {"GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(target),
               "GIT_INDEX_FILE": os.path.join(tmp, "index")}
        mode = ["-c", f"core.fileMode={'true' if pin.kind == 'git' else 'false'}"]
        gitutil.run(["read-tree", commit], cwd=target, env=env)
        spec = list(only) if only is not None else ["."]
        if only is not None and spec:
            # git add refuses a path that is neither in the work tree nor in the index
            in_pin = set(gitutil.out(["ls-tree", "-r", "--name-only", commit, "--", *spec],
                                     cwd=target, env=env).splitlines())
            spec = [rel for rel in spec if rel in in_pin or os.path.lexists(target / rel)]
        if not spec:
            return b""
        gitutil.run(mode + ["add", "-A", "--", *spec], cwd=target, env=env)
        gitutil.run(["rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", *EXCLUDES],
                    cwd=target, env=env)
        proc = gitutil.run(mode + ["diff", "--cached", "--full-index", "--binary", "--no-color",
                                   "--no-ext-diff", "--no-textconv", "--no-renames",
                                   "--diff-algorithm=myers", "--src-prefix=a/",
                                   "--dst-prefix=b/", commit, "--", *spec],
                           cwd=target, env=env)
    return proc.stdout


FileSet = Dict[str, Optional[Tuple[bytes, bool]]]  # path -> (bytes, executable), None: absent


def pristine_files(pin: Pin, git_dir: Path, rels: Sequence[str]) -> FileSet:
    """The pinned versions of ``rels`` (None for a path the pin does not have)."""
    commit = pin.commit if pin.kind == "git" else upstream.pristine_commit(pin)
    result: FileSet = {}
    for rel in rels:
        proc = gitutil.run(["ls-tree", commit, "--", rel], env={"GIT_DIR": str(git_dir)})
        if not proc.stdout:
            result[rel] = None
            continue
        data = gitutil.run(["cat-file", "blob", f"{commit}:{rel}"],
                           env={"GIT_DIR": str(git_dir)}).stdout
        result[rel] = (data, proc.stdout.startswith(b"100755"))
    return result


def patched_files(pin: Pin, git_dir: Path, body: bytes) -> FileSet:
    """Apply ``body`` to the pristine versions of the files it touches, in a scratch directory;
    raises if it does not apply."""
    touched = touched_paths(body)
    with tempfile.TemporaryDirectory(prefix="bevdepth-npu-apply-") as tmp:
        work = Path(tmp) / "w"
        write_files(work, pristine_files(pin, git_dir, touched))
        gitutil.run(["init", "--quiet"], cwd=work)
        proc = gitutil.run(["apply", "--whitespace=nowarn", "-"], cwd=work, input_bytes=body,
                           check=False)
        if proc.returncode != 0:
            raise UserError(f"{pin.patch} does not apply to the pristine {pin.name} at "
                            f"{pin.short}: {proc.stderr.decode('utf-8', 'replace').strip()}")
        return {rel: ((work / rel).read_bytes(), os.access(work / rel, os.X_OK))
                if (work / rel).is_file() else None for rel in touched}


def write_files(target: Path, files: FileSet) -> None:
    for rel, entry in files.items():
        dest = target / rel
        if entry is None:
            if dest.is_file():
                dest.unlink()
            continue
        atomic_write(dest, entry[0])
        dest.chmod(0o755 if entry[1] else 0o644)
    _prune_empty_dirs(target, [rel for rel, entry in files.items() if entry is None])


# ----------------------------------------------------------------------------- patch files

def read_patch(pin: Pin, patch_path: Optional[Path] = None) -> bytes:
    path = patch_path or paths.patch_file(pin)
    if not path.is_file():
        raise UserError(f"patch file {path} not found")
    return path.read_bytes()


def patch_body(pin: Pin, patch_path: Optional[Path] = None) -> bytes:
    """The diff of a patch file; empty for a header-only patch (one that records why the pin
    needs no change)."""
    return split(read_patch(pin, patch_path))[1]


# ----------------------------------------------------------------------------- targets

def default_target(pin: Pin, installed: bool = True) -> Path:
    if pin.kind == "wheel" and installed:
        spec = importlib.util.find_spec(pin.package_dir)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{pin.package_dir} is not installed for this Python; install "
                            f"{pin.wheel} or pass --into DIR")
        return Path(list(spec.submodule_search_locations)[0])
    return ensure_tree(pin)


def ensure_tree(pin: Pin) -> Path:
    """The patched working tree ``trees/<name>``: a local clone at the pin, created if missing."""
    tree = paths.tree_dir(pin.name)
    if gitutil.is_work_tree(tree):
        return tree
    if tree.exists() and any(tree.iterdir()):
        raise UserError(f"{tree} exists but is not a git checkout; move it away")
    if not upstream.source_ready(pin):
        raise upstream.missing_source(pin)
    tree.parent.mkdir(parents=True, exist_ok=True)
    gitutil.run(["clone", "--quiet", "--no-checkout", str(paths.source_dir(pin.name)), str(tree)])
    gitutil.run(["checkout", "--quiet", "--detach", upstream.pristine_commit(pin)], cwd=tree)
    log(f"{pin.name}: created the working tree {tree}")
    return tree


def check_target(pin: Pin, target: Path) -> None:
    if not target.is_dir():
        raise UserError(f"{target} is not a directory")
    if pin.kind == "git":
        if not gitutil.is_work_tree(target):
            raise UserError(f"{target} is not the top of a git checkout of {pin.name}")
        head = gitutil.head(target)
        if head != pin.commit:
            raise UserError(f"{target} is at commit {head[:12]}, but {pin.patch} is for "
                            f"{pin.commit[:12]} ({pin.ref}); check out the pin first: "
                            f"git -C {target} checkout {pin.commit}")
        return
    about = target / "__about__.py"
    version = None
    if about.is_file():
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)', about.read_text("utf-8"), re.M)
        version = m.group(1) if m else None
    if version not in LIGHTNING_VERSIONS:
        raise UserError(f"{target} holds pytorch_lightning {version or 'of unknown version'}; "
                        f"{pin.patch} is for {' or '.join(LIGHTNING_VERSIONS)} "
                        f"(pip install {pin.wheel})")


class State:
    CLEAN, APPLIED, OTHER = "clean", "applied", "other"


def target_state(pin: Pin, target: Path, body: bytes, git_dir: Path):
    """(state, current diff) of ``target`` relative to the pin and the patch body."""
    only = touched_paths(body) if pin.kind == "wheel" else None
    current = diff_tree(pin, target, git_dir, only=only)
    if current == body:
        return State.APPLIED, current
    if not current:
        return State.CLEAN, current
    return State.OTHER, current


def describe_other(current: bytes, body: bytes) -> str:
    cur, want = set(touched_paths(current)), set(touched_paths(body))
    extra = sorted(cur - want)
    missing = sorted(want - cur)
    differ = sorted(p for p in cur & want)
    parts = []
    if extra:
        parts.append(f"changed but not in the patch: {', '.join(extra[:8])}")
    if missing:
        parts.append(f"patched files still pristine: {', '.join(missing[:8])}")
    if differ and not extra and not missing:
        parts.append(f"files whose changes differ from the patch: {', '.join(differ[:8])}")
    return "; ".join(parts) or "the changes differ from the patch"


def _applied_marker(pin: Pin, target: Path) -> Optional[Path]:
    """Where a git checkout remembers the patch last applied to it (inside its .git)."""
    if pin.kind != "git":
        return None
    return Path(gitutil.out(["rev-parse", "--absolute-git-dir"], cwd=target)) \
        / "bevdepth-npu-applied.patch"


def apply(pin: Pin, target: Path, revert: bool = False,
          patch_path: Optional[Path] = None, replace_stale: bool = False) -> str:
    """Apply (or revert) the patch in ``target``; returns what happened. Refuses, unchanged,
    anything that is neither the pin nor the pin plus exactly this patch.

    ``replace_stale``: a checkout that holds exactly the patch applied to it last time (an older
    version of the repository's patch) is reset to the pin first; edits are never discarded.
    """
    check_target(pin, target)
    body = patch_body(pin, patch_path)
    if not body:
        return f"{pin.patch} changes nothing (header only); nothing to do"
    git_dir = git_dir_for(pin, target)
    state, current = target_state(pin, target, body, git_dir)
    marker = _applied_marker(pin, target)
    if state == State.OTHER and replace_stale and marker is not None and marker.is_file() \
            and marker.read_bytes() == current:
        write_files(target, pristine_files(pin, git_dir, touched_paths(current)))
        log(f"{pin.name}: removed the older version of {pin.patch} from {target}")
        state, current = target_state(pin, target, body, git_dir)
    if state == State.OTHER:
        raise UserError(
            f"{target} has changes that are neither the pristine {pin.name} nor exactly "
            f"{pin.patch} ({describe_other(current, body)}); nothing was modified. Save your "
            f"edits with `bevdepth-npu export {pin.name} --from {target}` or undo them")
    if revert:
        if state == State.CLEAN:
            return "not applied; nothing to revert"
        write_files(target, pristine_files(pin, git_dir, touched_paths(body)))
        state_after, _ = target_state(pin, target, body, git_dir)
        if state_after != State.CLEAN:
            raise UserError(f"revert of {pin.patch} in {target} did not restore the pin exactly")
        if marker is not None and marker.is_file():
            marker.unlink()
        return "reverted"
    if state == State.APPLIED:
        return "already applied; nothing to do"
    files = patched_files(pin, git_dir, body)
    write_files(target, files)
    state_after, _ = target_state(pin, target, body, git_dir)
    if state_after != State.APPLIED:
        raise UserError(f"{pin.patch} was written to {target} but the result differs from the "
                        f"patch; revert with `bevdepth-npu apply {pin.name} --revert`")
    if marker is not None:
        atomic_write(marker, body)
    return "applied"


def _prune_empty_dirs(target: Path, rels: List[str]) -> None:
    for rel in rels:
        d = (target / rel).parent
        while d != target and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def export(pin: Pin, source: Path, output: Optional[Path] = None,
           header: Optional[Path] = None, allow_empty: bool = False) -> str:
    """Regenerate the patch from an edited tree; keeps the hand-written description."""
    output = output or paths.patch_file(pin)
    if pin.kind == "git" and gitutil.is_work_tree(source):
        head = gitutil.head(source)
        if head != pin.commit:
            raise UserError(f"{source} is at {head[:12]}, not the pin {pin.commit[:12]}; "
                            f"commits on top are not supported, keep changes uncommitted")
    elif pin.kind == "wheel":
        check_target(pin, source)
    git_dir = git_dir_for(pin, source)
    body = diff_tree(pin, source, git_dir)
    if not body and not allow_empty:
        raise UserError(f"{source} does not differ from the pin of {pin.name}; refusing to "
                        f"write an empty {output.name} (--allow-empty writes a header-only patch)")
    if header is not None:
        desc = header.read_text("utf-8")
    elif output.is_file():
        desc = description(split(output.read_bytes())[0])
    else:
        desc = ""
    data = compose(pin, desc, body)
    if output.is_file() and output.read_bytes() == data:
        return f"{output} unchanged"
    atomic_write(output, data)
    return f"wrote {output} ({len(touched_paths(body))} files, body sha256 {body_hash(body)[:12]})"


def check(pin: Pin, patch_path: Optional[Path] = None) -> str:
    """The patch applies cleanly to its pin and re-exports to the same bytes."""
    data = read_patch(pin, patch_path)
    header, body = split(data)
    if compose(pin, description(header), body) != data:
        blocks = generated_blocks(header)
        what = (f"its header holds the generated block {blocks} times" if blocks > 1
                else "its header is not the generated one for the pin table")
        raise UserError(f"{pin.patch}: {what}; re-export it with `bevdepth-npu export "
                        f"{pin.name} --from DIR` (the export writes the block once)")
    if not body:
        return f"{pin.patch}: header only, the pin needs no change"
    git_dir = git_dir_for(pin, paths.source_dir(pin.name))
    files = patched_files(pin, git_dir, body)
    with tempfile.TemporaryDirectory(prefix="bevdepth-npu-check-") as tmp:
        work = Path(tmp)
        write_files(work, files)
        again = diff_tree(pin, work, git_dir, only=touched_paths(body))
    if again != body:
        raise UserError(f"{pin.patch}: applying it to the pin and exporting again gives "
                        f"different bytes; regenerate it with `bevdepth-npu export {pin.name} "
                        f"--from DIR` (was it edited by hand?)")
    return f"{pin.patch}: applies to {pin.short} and re-exports identically " \
           f"({len(touched_paths(body))} files)"


# ----------------------------------------------------------------------------- command line

def patched_pin(name: str) -> Pin:
    """The pin ``name``, refusing a reference pin (it has no patch)."""
    pin = pins.get(name)
    if not pin.patched:
        raise UserError(f"{pin.name} is a reference upstream without a patch ({pin.applied_to}); "
                        f"patched upstreams: {', '.join(p.name for p in pins.patched_pins())}")
    return pin


def add_apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME|all",
                   help="upstream to patch: " + ", ".join(x.name for x in pins.patched_pins())
                        + " or all")
    p.add_argument("--into", type=Path, metavar="DIR",
                   help="target directory (default: the cached working tree trees/NAME; for "
                        "lightning the installed pytorch_lightning of this Python)")
    p.add_argument("--revert", action="store_true", help="undo the patch instead")
    p.add_argument("--patch", type=Path, metavar="FILE",
                   help="use this patch file instead of the repository's")


def run_apply(args: argparse.Namespace) -> int:
    selected = list(pins.patched_pins()) if args.name == "all" else [patched_pin(args.name)]
    if args.into and len(selected) > 1:
        raise UserError("--into needs a single NAME, not all")
    for pin in selected:
        target = args.into.resolve() if args.into else default_target(pin)
        result = apply(pin, target, revert=args.revert, patch_path=args.patch)
        log(f"{pin.name}: {result} ({target})")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME",
                   help="upstream: " + ", ".join(x.name for x in pins.patched_pins()))
    p.add_argument("--from", dest="source", type=Path, metavar="DIR",
                   help="edited tree to export (default: the cached working tree trees/NAME)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="patch file to write (default: the repository's)")
    p.add_argument("--header", type=Path, metavar="FILE",
                   help="replace the patch's description with this file's text")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a header-only patch when DIR equals the pin")


def run_export(args: argparse.Namespace) -> int:
    pin = patched_pin(args.name)
    source = (args.source or paths.tree_dir(pin.name)).resolve()
    if not source.is_dir():
        raise UserError(f"{source} is not a directory")
    log(export(pin, source, output=args.output, header=args.header,
               allow_empty=args.allow_empty))
    return 0


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="patches to check (default: all)")


def run_check(args: argparse.Namespace) -> int:
    selected = [patched_pin(n) for n in args.names] if args.names else list(pins.patched_pins())
    failed = 0
    for pin in selected:
        try:
            log(check(pin))
        except UserError as exc:
            failed += 1
            log(f"error: {exc}")
    return 1 if failed else 0
