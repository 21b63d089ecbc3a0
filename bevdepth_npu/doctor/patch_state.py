"""Patch checks of ``bevdepth-npu doctor``: is each patch in force, unmodified, in this environment?

Each patched file as installed here is compared with the pin plus the repository's patch (the
pristine sources come from the cache, ``bevdepth-npu fetch``): the BEVDepth checkout Python
imports, mmdet3d and pytorch_lightning in site-packages. mmcv's patch is header only; its version
and ops are the stack check's business.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

from bevdepth_npu import gitutil, paths, patches, pins, upstream
from bevdepth_npu.doctor.report import Fail, Skip
from bevdepth_npu.patchfile import touched_paths


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise Fail(f"{module} is not installed", "build the environment: `bevdepth-npu env`")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _differences(pin: pins.Pin, root: Path, rels: List[str], body: bytes) -> List[str]:
    """Touched files under ``root`` that are not what the patch makes of the pin."""
    expected = patches.patched_files(pin, patches.git_dir_for(pin, paths.source_dir(pin.name)),
                                     body)
    pristine = patches.pristine_files(
        pin, patches.git_dir_for(pin, paths.source_dir(pin.name)), rels)
    problems = []
    for rel in rels:
        path = root / rel
        want = expected.get(rel)
        have = path.read_bytes() if path.is_file() else None
        if (want[0] if want else None) == have:
            continue
        if have is not None and pristine.get(rel) is not None and pristine[rel][0] == have:
            problems.append(f"{rel} (pristine: the patch is not applied)")
        elif have is None:
            problems.append(f"{rel} (missing)")
        else:
            problems.append(f"{rel} (modified)")
    return problems


def check(name: str) -> str:
    pin = pins.get(name)
    if not upstream.source_ready(pin):
        raise Skip(f"no pinned {pin.name} sources in {paths.source_dir(pin.name)} to compare with",
                   f"`bevdepth-npu fetch {pin.name}`")
    body = patches.patch_body(pin)
    if not body:
        return f"{pin.patch} is header only: the pin is used unchanged"
    rels = touched_paths(body)
    if name == "bevdepth":
        root = _package_dir("bevdepth").parent
        where = root
    elif name == "lightning":
        root = _package_dir(pin.package_dir)
        where = root
    elif name == "mmdetection3d":
        # installed from a wheel: only the package's files are in site-packages
        root = _package_dir("mmdet3d").parent
        rels = [rel for rel in rels if rel.startswith("mmdet3d/")]
        where = root / "mmdet3d"
    else:
        raise ValueError(name)
    if name == "bevdepth" and gitutil.is_work_tree(root) and gitutil.head(root) == pin.commit:
        state, current = patches.target_state(pin, root, body, patches.git_dir_for(pin, root))
        if state == patches.State.APPLIED:
            return f"applied and unmodified ({len(rels)} files, {where})"
        if state == patches.State.CLEAN:
            raise Fail(f"{where} is the pristine pin: {pin.patch} is not applied",
                       f"`bevdepth-npu env` (or `bevdepth-npu apply {name}`)")
        raise Fail(f"{where} differs from {pin.patch}: "
                   f"{patches.describe_other(current, body)}",
                   f"export your edits (`bevdepth-npu export {name}`) or `bevdepth-npu env` "
                   f"after undoing them")
    problems = _differences(pin, root, rels, body)
    if problems:
        raise Fail(f"{where}: {', '.join(problems[:4])}"
                   + (f" and {len(problems) - 4} more" if len(problems) > 4 else ""),
                   f"`bevdepth-npu apply {name}` (or rebuild: `bevdepth-npu env`)")
    return f"applied and unmodified ({len(rels)} files, {where})"
