"""Thin wrappers around the git command line, with settings that make output reproducible.

Every call pins the options that user configuration could otherwise change (diff algorithm,
prefixes, quoting, line-ending conversion), so the same tree gives the same patch everywhere.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

from bevdepth_npu.errors import UserError

# Options that make git's output independent of the user's and the system's configuration.
_FIXED_CONFIG = (
    "-c", "core.autocrlf=false",
    "-c", "core.safecrlf=false",
    "-c", "core.quotepath=true",
    "-c", "core.fileMode=true",
    "-c", "diff.noprefix=false",
    "-c", "diff.mnemonicPrefix=false",
    "-c", "diff.relative=false",
    "-c", "diff.renames=false",
    "-c", "diff.algorithm=myers",
    "-c", "diff.indentHeuristic=true",
    "-c", "diff.suppressBlankEmpty=false",
    "-c", "advice.detachedHead=false",
    "-c", "init.defaultBranch=main",
    "-c", "user.name=bevdepth-npu",
    "-c", "user.email=bevdepth-npu@localhost",
    "-c", "safe.directory=*",
)


def git_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",    # never wait for a password on a cluster without access
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ASKPASS": "true",
    })
    # A parent repository's variables (e.g. when called from a git hook) must not leak in.
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_PREFIX"):
        env.pop(key, None)
    if extra:
        env.update(extra)
    return env


def run(args: Sequence[str], cwd: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
        check: bool = True, input_bytes: Optional[bytes] = None,
        timeout_s: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run ``git ARGS`` and return the completed process (stdout/stderr as bytes)."""
    cmd = ["git", *_FIXED_CONFIG, *args]
    try:
        proc = subprocess.run(cmd, cwd=str(cwd) if cwd else None, env=git_env(env),
                              input=input_bytes, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout_s)
    except FileNotFoundError:
        raise UserError("git is not installed or not on PATH; bevdepth-npu needs it") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"git {' '.join(args[:2])} did not finish in {timeout_s:.0f} s "
                        f"(in {cwd})") from None
    if check and proc.returncode != 0:
        raise GitError(args, proc)
    return proc


def out(args: Sequence[str], cwd: Optional[Path] = None, **kw) -> str:
    return run(args, cwd=cwd, **kw).stdout.decode("utf-8", "replace").strip()


class GitError(UserError):
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess):
        err = proc.stderr.decode("utf-8", "replace").strip()
        super().__init__(f"git {' '.join(args)} failed ({proc.returncode}): {err}")
        self.stderr = err


def is_work_tree(path: Path) -> bool:
    if not path.is_dir():
        return False
    proc = run(["rev-parse", "--is-inside-work-tree"], cwd=path, check=False)
    if proc.returncode != 0:
        return False
    top = out(["rev-parse", "--show-toplevel"], cwd=path)
    return Path(top).resolve() == path.resolve()


def head(path: Path) -> str:
    return out(["rev-parse", "HEAD"], cwd=path)


def has_commit(git_dir_or_tree: Path, commit: str) -> bool:
    proc = run(["cat-file", "-e", f"{commit}^{{commit}}"], cwd=git_dir_or_tree, check=False)
    return proc.returncode == 0
