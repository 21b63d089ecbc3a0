"""Reading and writing the four patch files: a header (ignored by ``git apply``) and a git diff.

The header's first block is generated from the pin table, so the upstream URL and commit are
never typed by hand; the description below it is kept from the previous patch (or taken from
``--header``). The body is everything from the first ``diff --git`` line.
"""
from __future__ import annotations

import hashlib
import re
from typing import List, Tuple

from bevdepth_npu.errors import UserError
from bevdepth_npu.pins import Pin

_BODY_START = re.compile(rb"^diff --git ", re.M)
_GENERATED_FIRST = re.compile(r"^\S+: bevdepth-npu changes to ")
_AUTO_KEYS = ("Upstream:", "Pin:", "Applies to:", "Apply:", "Regenerate:")


def split(data: bytes) -> Tuple[bytes, bytes]:
    """Return (header, body) of a patch file's bytes."""
    m = _BODY_START.search(data)
    if not m:
        return data, b""
    return data[:m.start()], data[m.start():]


def auto_header(pin: Pin, empty: bool = False) -> str:
    label = pin.commit if pin.kind == "git" else pin.wheel_label
    how = "nothing to apply (header only: the pin is used as it is)" if empty else pin.how
    return "\n".join([
        f"{pin.patch}: bevdepth-npu changes to {pin.name}",
        f"Upstream: {pin.url}",
        f"Pin: {label} [{pin.ref}]",
        f"Applies to: {pin.applied_to}",
        f"Apply: {how}",
        f"Regenerate: bevdepth-npu export {pin.name} --from DIR (never edit the diff by hand)",
    ]) + "\n"


def description(header: bytes) -> str:
    """The hand-written part of a header: what remains after removing every generated block.

    Every block, not just the first: a merge of two exports can leave a second one behind, and
    keeping it as "description" would make the next export write the header twice over.
    """
    lines = header.decode("utf-8").splitlines()
    kept: List[str] = []
    i = 0
    while i < len(lines):
        if _GENERATED_FIRST.match(lines[i]):
            i += 1
            while i < len(lines) and lines[i].startswith(_AUTO_KEYS):
                i += 1
            continue
        kept.append(lines[i])
        i += 1
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")


def generated_blocks(header: bytes) -> int:
    """How many generated blocks a header holds (one in a patch the export wrote)."""
    return sum(1 for line in header.decode("utf-8").splitlines() if _GENERATED_FIRST.match(line))


def compose(pin: Pin, desc: str, body: bytes) -> bytes:
    desc = desc.strip("\n")
    for line in desc.splitlines():
        # git apply would take these for the start of a diff in the header
        if line.startswith(("diff --git ", "--- ", "+++ ")):
            raise UserError(f"the description of {pin.patch} has a line git apply would "
                            f"misread as a diff: {line!r}")
    header = auto_header(pin, empty=not body) + ("\n" + desc + "\n" if desc else "") + "\n"
    return header.encode("utf-8") + body


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def touched_paths(body: bytes) -> List[str]:
    """Paths (relative to the patch root) named by the diff, in order."""
    paths = []
    for m in re.finditer(rb"^diff --git a/(.+?) b/(.+)$", body, re.M):
        path = m.group(2).decode("utf-8")
        if path not in paths:
            paths.append(path)
    return paths
