"""The stack installs from wheels on a Kunpeng (aarch64) Ascend server: requirements.txt plus
torch 2.1.0 and torchvision 0.16.0 resolve for CPython 3.11 on aarch64 to aarch64 binary wheels
of a manylinux tag a current Kunpeng server's glibc accepts, or to pure-Python wheels; the only
package without one is trimesh 2.35.39, a pure-Python sdist. Asks the package registry (unpinned
requirements can change the answer: the result, with its date, is kept in the cache's checks/).

Run: python -m pytest tests/integration/test_wheel_resolution.py -m network  (about 2 minutes)
"""
from __future__ import annotations

import pytest

from bevdepth_npu import wheel_resolution

# the requirements that have no aarch64 wheel; each must be a pure-Python sdist
KNOWN_SOURCE_ONLY = {"trimesh"}


@pytest.mark.network
@pytest.mark.slow
def test_stack_resolves_to_wheels_on_aarch64_cpython_311():
    try:
        result = wheel_resolution.resolve("aarch64", "3.11")
    except wheel_resolution.UserError as exc:
        if "Could not fetch" in str(exc) or "connection" in str(exc).lower():
            pytest.skip(f"the package registry is unreachable: {exc}")
        raise
    where = wheel_resolution.record(result)
    print(wheel_resolution.describe(result), f"\n(kept in {where})")
    odd = [w["file"] for w in result["wheels"] if w["kind"] == "other"]
    assert odd == [], odd
    by_name = {w["name"].lower(): w for w in result["wheels"]}
    for name, version in (("torch", "2.1.0"), ("torchvision", "0.16.0"), ("numpy", "1.23.5"),
                          ("numba", "0.58.1")):
        assert by_name[name]["version"] == version and by_name[name]["kind"] == "binary", name
    assert by_name["mmdet"]["kind"] == "pure" and by_name["pytorch-lightning"]["kind"] == "pure"
    assert set(result["source_only"]) <= KNOWN_SOURCE_ONLY, result["source_only"]
    for name, facts in result["source_only"].items():
        assert facts["pure_python"], (name, facts)
