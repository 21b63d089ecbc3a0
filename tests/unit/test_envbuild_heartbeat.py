"""The heartbeat of slow stages (bevdepth_npu/run/console.py, used by `bevdepth-npu env` and
`bevdepth-npu run`): a sign of life early, then few enough lines that building mmcv from scratch
keeps the quick start's console short; the environment builder's stages run through the run
layer's stage runner.

Run: python -m pytest tests/unit/test_envbuild_heartbeat.py -q
"""
from __future__ import annotations

import itertools

from bevdepth_npu.run.console import heartbeat_gaps


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


def test_the_environment_builder_runs_its_stages_through_the_run_layers_runner(tmp_path, capfd):
    """One stage runner: `env`'s stages log to their file, and a failure names the log and
    shows its end (stages.run_stage), on stderr so that --print-python keeps stdout clean."""
    import sys

    import pytest

    from bevdepth_npu import envbuild
    from bevdepth_npu.errors import UserError
    env = envbuild.Env(tmp_path / "venv", "cpu", sys.executable, verbose=False)
    text = env.sh([sys.executable, "-c", "print('built')"], "demo")
    assert "built" in text and (tmp_path / "venv" / "bevdepth-npu-logs" / "demo.log").is_file()
    with pytest.raises(UserError, match=r"demo: .* failed \(exit 3\); its log is"):
        env.sh([sys.executable, "-c", "import sys; print('the cause'); sys.exit(3)"], "demo")
    out, err = capfd.readouterr()
    assert out == "" and "the cause" in err and "[bevdepth-npu] demo failed (exit 3)" in err
