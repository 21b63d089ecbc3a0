"""File writes that a crash cannot leave half done."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union


def atomic_write(path: Union[str, Path], data: Union[bytes, Callable[[IO[bytes]], None]]) -> None:
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
