"""One device rule and one table of variables (bevdepth_npu/devices.py, envvars.py).

Checked: every chooser of a device (the environment builder, the self-test, the run settings,
the learning check) offers the names of ``devices.DEVICES`` and nothing else; ``choose`` takes
the flag, then BEVDEPTH_NPU_DEVICE (then its old name), then what is installed; the README's
tables of variables are the ones ``python -m bevdepth_npu.envvars`` prints.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bevdepth_npu import devices, envvars
from bevdepth_npu.errors import UserError

README = Path(__file__).resolve().parents[2] / "README.md"


def _device_choices(add_arguments) -> tuple:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (action,) = [a for a in parser._actions if "--device" in a.option_strings]
    return tuple(action.choices)


def test_every_device_chooser_offers_the_one_list_of_names():
    from bench import learning_check
    from bevdepth_npu import doctor, envbuild
    from bevdepth_npu.run import settings
    assert _device_choices(envbuild.add_arguments) == devices.CHOICES
    assert _device_choices(doctor.add_arguments) == devices.CHOICES
    (action,) = [a for a in learning_check.build_parser()._actions
                 if "--device" in a.option_strings]
    assert tuple(action.choices) == devices.CHOICES
    for name in devices.CHOICES:
        assert settings.OPTION_BY_NAME["device"].parse(name) == name
        assert settings.SMOKE_OPTIONS["device"].parse(name) == name
    with pytest.raises(argparse.ArgumentTypeError):
        settings.OPTION_BY_NAME["device"].parse("tpu")


def test_choose_takes_the_flag_then_the_variable_then_what_is_installed(monkeypatch):
    monkeypatch.setattr(devices, "detect", lambda: "cuda")
    assert devices.choose("cpu", {"BEVDEPTH_NPU_DEVICE": "npu"}) == "cpu"
    assert devices.choose("auto", {"BEVDEPTH_NPU_DEVICE": "npu"}) == "npu"
    assert devices.choose(None, {"BEVDEPTH_DEVICE": "cpu"}) == "cpu"      # the old name
    assert devices.choose(None, {"BEVDEPTH_NPU_DEVICE": "npu", "BEVDEPTH_DEVICE": "cpu"}) == "npu"
    assert devices.choose(None, {}) == "cuda"
    assert devices.choose(None, {"BEVDEPTH_NPU_DEVICE": "auto"}) == "cuda"
    with pytest.raises(UserError, match="BEVDEPTH_NPU_DEVICE=tpu: use one of auto, npu"):
        devices.choose(None, {"BEVDEPTH_NPU_DEVICE": "tpu"})
    with pytest.raises(UserError, match="--device=tpu"):
        devices.choose("tpu", {})


def test_detection_follows_the_ascend_toolkit_then_the_nvidia_driver(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    assert devices.detect() == "cpu"
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    assert devices.detect() == "npu"


def test_settings_carry_the_prefix_except_the_tools_own_variables():
    from bevdepth_npu.run import settings
    for option in settings.OPTIONS:
        if option.name in envvars.CONVENTIONAL:
            assert not option.env.startswith(envvars.PREFIX)
        else:
            assert option.env == envvars.PREFIX + option.name.upper()
    assert settings.OPTION_BY_NAME["device"].env == envvars.DEVICE
    assert settings.OPTION_BY_NAME["bind_cores"].env == envvars.BIND_CORES


def test_the_readme_lists_the_variables_of_the_one_table():
    tables = envvars.markdown_tables()
    assert tables in README.read_text(encoding="utf-8"), \
        "README's tables of variables differ from `python -m bevdepth_npu.envvars`"
    for variable in envvars.VARIABLES:
        assert f"`{variable.name}`" in tables
