"""File-system operations a crash cannot leave half done, and the one newest-file search.

- ``atomic_write(path, data)``: readers see the old file or the new one, never a part;
- ``replace_symlink(link, target)``: point a symbolic link elsewhere in one rename; a regular
  file of that name is left alone;
- ``newest_file(roots, match)``: the newest file below some directories (run checkpoints,
  metrics summaries, step logs all go through it).

Used by the run layer (bevdepth_npu/run/, bevdepth_npu/runrecord.py), summarize, the environment
builder and the benchmarks. Tests: tests/unit/test_runrecord.py.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, data: Union[bytes, Callable[[IO[bytes]], None]]) -> None:
    """Write ``data`` (bytes, or a function that writes to a binary handle) to ``path`` through a
    temporary file in the same directory and a rename: readers see the old file or the new one.

    An existing file keeps its permission bits; a new one gets 0644 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o644 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """``atomic_write`` of UTF-8 text."""
    atomic_write(path, text.encode("utf-8"))


def replace_symlink(link: PathLike, target: str) -> bool:
    """Make ``link`` a symbolic link to ``target`` (kept as given, e.g. relative) in one rename.

    Returns False, changing nothing, when ``link`` exists and is not a symbolic link: a regular
    file there was written by someone else and is never replaced.
    """
    link = Path(link)
    if link.exists() and not link.is_symlink():
        return False
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return True


def newest_file(roots: Iterable[PathLike], match: Callable[[str], bool]) -> Optional[Path]:
    """The newest file (modification time, then path) below ``roots`` whose name ``match``es;
    None if there is none. Missing roots are skipped; links to files count, links to
    directories are not followed (a ``latest`` link would count a run twice)."""
    found = []
    for root in roots:
        for directory, dirs, files in os.walk(str(root)):
            dirs.sort()
            for name in sorted(files):
                if match(name):
                    path = os.path.join(directory, name)
                    try:
                        found.append((os.stat(path).st_mtime_ns, path))
                    except OSError:   # a dangling link, or removed meanwhile
                        continue
    # Ties on mtime (coarse clocks, copied trees) are broken by path so the choice is stable.
    return Path(max(found)[1]) if found else None
