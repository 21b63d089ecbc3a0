"""Upstream's own model tests, made device-agnostic by bevdepth.patch, pass on CPU.

Runs pytest in a subprocess on test/test_layers/test_backbone.py, test_head.py,
test_matrixvt.py and test/test_ops/test_voxel_pooling.py of the patched checkout the
bevdepth-npu env imports bevdepth from, and asserts that every test ran and passed: upstream
skipped them all without CUDA. (test/test_dataset is covered by test_bevdepth_data.py.)
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_upstream_tests.py -q
"""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()

UPSTREAM_TESTS = {
    "test/test_layers/test_backbone.py": 1,
    "test/test_layers/test_head.py": 3,
    "test/test_layers/test_matrixvt.py": 1,
    "test/test_ops/test_voxel_pooling.py": 2,   # upstream's, and fused against the product
}


def test_upstream_model_tests_pass_on_cpu(tmp_path: Path) -> None:
    root = helpers.patched_root()
    for rel in UPSTREAM_TESTS:
        assert (root / rel).is_file(), f"{root / rel} is missing"
    report = tmp_path / "junit.xml"
    env = helpers.subprocess_env()
    env["BEVDEPTH_NPU_DEVICE"] = "cpu"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the checkout
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         *UPSTREAM_TESTS],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": sum(UPSTREAM_TESTS.values()), "failures": 0, "errors": 0,
                      "skipped": 0}, proc.stdout[-3000:]
