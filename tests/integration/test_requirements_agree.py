"""The patched BEVDepth tree's requirements.txt agrees with this repository's: every package both
name carries the same version constraint (ignoring environment markers), and the tree's torch and
torchvision are the ones `bevdepth-npu env` installs.

Run: python -m pytest tests/integration/test_requirements_agree.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bevdepth_npu import envbuild, paths

packaging = pytest.importorskip("packaging.requirements",
                                reason="needs the environment: bevdepth-npu env")


def parse(path: Path) -> dict:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = packaging.Requirement(line)
            reqs.setdefault(req.name.lower(), set()).add(str(req.specifier))
    return reqs


def tree_requirements() -> Path:
    path = paths.tree_dir("bevdepth") / "requirements.txt"
    if not path.is_file():
        pytest.skip(f"no patched BEVDepth tree at {path.parent}; run `bevdepth-npu apply bevdepth`")
    return path


def test_tree_and_top_level_requirements_agree():
    tree = parse(tree_requirements())
    top = parse(paths.REPO_ROOT / "requirements.txt")
    for name, specs in tree.items():
        if name in ("torch", "torchvision"):
            continue
        assert name in top, f"{name} is required by the BEVDepth tree but not by requirements.txt"
        if specs != {""}:
            assert specs <= top[name], (name, specs, top[name])


def test_tree_torch_is_the_environment_torch():
    tree = parse(tree_requirements())
    assert tree["torch"] == {envbuild.TORCH.split("torch")[1]}
    assert tree["torchvision"] == {envbuild.TORCHVISION.split("torchvision")[1]}
