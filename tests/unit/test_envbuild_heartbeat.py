"""The heartbeat of `bevdepth-npu env`'s slow stages (bevdepth_npu/envbuild.py): a sign of life
early, then few enough lines that building mmcv from scratch keeps the quick start's console
short.

Run: python -m pytest tests/unit/test_envbuild_heartbeat.py -q
"""
from __future__ import annotations

import itertools

from bevdepth_npu.envbuild import heartbeat_gaps


def beats_within(seconds: float) -> int:
    elapsed, count = 0.0, 0
    for gap in heartbeat_gaps():
        elapsed += gap
        if elapsed > seconds:
            return count
        count += 1
    raise AssertionError("unreachable")


def test_two_lines_in_the_first_minute_then_one_every_two_minutes():
    assert list(itertools.islice(heartbeat_gaps(), 5)) == [30.0, 30.0, 120.0, 120.0, 120.0]
    assert beats_within(29) == 0 and beats_within(61) == 2
    # mmcv's 73 C++ files: about 10 minutes on an idle 2-core machine, 20 on a busy one
    assert beats_within(612) == 6
    assert beats_within(20 * 60) == 11
