"""Shared fixtures. Layers: tests/unit need only this package; tests/integration need the pinned
upstream checkouts (``bevdepth-npu fetch``) and most of them the environment (``bevdepth-npu env``);
they skip with a reason naming what is missing and the command that provides it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bevdepth_npu import paths, pins, upstream  # noqa: E402


def require_source(name: str) -> Path:
    """The pristine cached checkout of ``name``, or a skip that says how to get it."""
    pin = pins.get(name)
    if not upstream.source_ready(pin):
        pytest.skip(f"no pinned checkout of {pin.name} in {paths.source_dir(pin.name)}; "
                    f"run `bevdepth-npu fetch {pin.name}` (--mirror {pin.name}=PATH offline)")
    return paths.source_dir(pin.name)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


# Modules whose every test trains, builds or runs upstream (a minute or more each on 2 cores);
# single slow tests elsewhere carry @pytest.mark.slow themselves.
SLOW_MODULES = frozenset({
    "test_smoke", "test_scripts_e2e", "test_resume_e2e", "test_ddp_multinode", "test_ema",
    "test_environment", "test_upstream_tests", "test_parity", "test_show",
    "test_lightning_patch", "test_scripts_steplog", "test_learning_check",
})


def pytest_collection_modifyitems(config, items):
    """The layer marker comes from the directory, so no test can sit in one layer and claim
    another; ``slow`` from SLOW_MODULES."""
    for item in items:
        path = Path(str(item.fspath))
        parts = path.relative_to(REPO_ROOT / "tests").parts
        if parts[0] in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))
        if path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
