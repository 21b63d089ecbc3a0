"""Tests of the settings of ``bevdepth-npu run`` (bevdepth_npu/run/settings.py): defaults per
mode, flags against environment variables, validation messages, experiment arguments.

Run: python -m pytest tests/unit/test_run_settings.py -q
"""
from __future__ import annotations

import dataclasses

import pytest

from bevdepth_npu.run import settings
from bevdepth_npu.run.settings import SettingsError, parse


def test_defaults_of_each_mode():
    full = parse("full", [], environ={})
    assert (full.cards, full.batch_size, full.epochs, full.learning_rate, full.precision) == \
        (8, 8, 24, 0.000003125, "16")
    assert full.resume == "auto" and full.eval_batch == 8 and full.device is None
    assert parse("performance", [], environ={}).epochs == 1
    evaluation = parse("eval", [], environ={})
    assert (evaluation.cards, evaluation.batch_size) == (1, 32)
    smoke = parse("smoke", [], environ={})
    assert (smoke.steps, smoke.batch_size, smoke.learning_rate, smoke.device) == \
        (60, 2, 0.001, "auto")
    assert smoke.exp == settings.SMOKE_EXP and smoke.samples_per_scene == 10


def test_flags_environment_and_experiment_arguments():
    environ = {"BEVDEPTH_NPU_CARDS": "4", "BEVDEPTH_NPU_BATCH_SIZE": "2",
               "BEVDEPTH_NPU_EVAL_BATCH_SIZE": "", "BEVDEPTH_NPU_FRESH": "1"}
    s = parse("full", ["--cards=2", "--epochs", "3", "--", "--num_workers", "0", "--cards=9"],
              environ=environ)
    assert s.cards == 2               # the flag wins over BEVDEPTH_NPU_CARDS
    assert s.batch_size == 2 and s.epochs == 3
    assert s.eval_batch == 2          # an empty variable is unset
    assert s.fresh and s.resume == "none"
    assert s.experiment_args == ["--num_workers", "0", "--cards=9"]


@pytest.mark.parametrize("mode, argv, environ, message", [
    ("full", ["--cards=0"], {}, "argument --cards: must be at least 1, got 0"),
    ("full", ["--batch-size=eight"], {}, "argument --batch-size: expected an integer, got 'eight'"),
    ("full", ["--learning-rate=0"], {}, "must be a positive number, got 0"),
    ("full", ["--learning-rate=-1"], {}, "must be a positive number, got -1"),
    ("full", ["--precision=8"], {}, "must be one of: 16 32 bf16, got '8'"),
    ("full", ["--nnodes=2"], {}, "--nnodes=2 needs --master-addr"),
    ("full", ["--nnodes=2", "--master-addr=h"], {}, "--nnodes=2 needs --master-port"),
    ("full", ["--nnodes=2", "--node-rank=2"], {}, "--node-rank=2 must be below --nnodes=2"),
    ("full", ["--master-port=70000"], {}, "must be between 1 and 65535, got 70000"),
    ("full", ["--bind-cores=yes"], {}, "must be one of: auto 0 1, got 'yes'"),
    ("full", ["--network=a/b"], {}, "may hold only letters, digits and ._+-"),
    ("full", ["--resume=/no/such.ckpt"], {}, "no such checkpoint file: '/no/such.ckpt'"),
    ("full", ["--epochs"], {}, "argument --epochs: expected one argument"),
    ("full", ["--max_epochs=3"], {}, "unknown option --max_epochs=3"),
    ("full", ["--car=3"], {}, "unknown option --car=3"),   # no abbreviations
    ("full", ["extra"], {}, "unexpected argument 'extra'"),
    ("performance", ["--eval-cards=1"], {}, "unknown option --eval-cards=1"),
    ("eval", ["--fresh"], {}, "unknown option --fresh"),
    ("eval", ["--cards=two"], {}, "expected an integer, got 'two'"),
    ("full", [], {"BEVDEPTH_NPU_CARDS": "0"},
     "BEVDEPTH_NPU_CARDS=0 (environment): must be at least 1, got 0"),
    ("full", [], {"BEVDEPTH_NPU_FRESH": "yes"},
     "BEVDEPTH_NPU_FRESH=yes (environment): must be 0 or 1"),
    ("full", [], {"BEVDEPTH_NPU_DEVICE": "tpu"},
     "BEVDEPTH_NPU_DEVICE=tpu (environment): must be one of: auto npu cuda cpu"),
    ("full", ["--", "--pooling", "fused"], {}, "--pooling is a setting of the run"),
    ("full", ["--pooling=sum"], {}, "must be one of: product fused, got 'sum'"),
    ("smoke", ["--steps=0"], {}, "argument --steps: must be at least 1, got 0"),
    ("smoke", ["--device=tpu"], {}, "must be one of: auto npu cuda cpu, got 'tpu'"),
    ("smoke", ["--steps=5"], {}, "--warmup-steps=5 must be below --steps=5"),
    ("smoke", ["--scenes=1"], {}, "argument --scenes: must be at least 2, got 1"),
])
def test_bad_settings_name_the_setting(mode, argv, environ, message):
    with pytest.raises(SettingsError) as info:
        parse(mode, argv, environ=environ)
    assert message in str(info.value)


def test_help_lists_every_setting_with_its_variable(capsys):
    with pytest.raises(SystemExit) as info:
        parse("full", ["--help"], prog="bash test/train_full_8p.sh", environ={})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bash test/train_full_8p.sh [--name=value ...] [--fresh]")
    for option in settings.options("full"):
        assert option.flag in out and f"[{option.env}" in out
    assert "--cards=N" in out and "after --" in out and "[BEVDEPTH_NPU_CARDS, default 8]" in out
    assert "[MASTER_ADDR]" in out and "[NODE_RANK" in out   # the names torch reads
    assert "--launcher" not in out


def test_every_option_is_a_settings_field_and_every_mode_lists_known_options():
    fields = {f.name for f in dataclasses.fields(settings.Settings)}
    assert {o.name for o in settings.OPTIONS} <= fields
    for names in settings.MODE_OPTIONS.values():
        assert set(names) <= set(settings.OPTION_BY_NAME)
        assert len(names) == len(set(names))


def test_the_launcher_is_remembered():
    s = parse("eval", ["--launcher", "test/eval_bevdepth.sh", "--ckpt=x"], environ={})
    assert s.launcher == "test/eval_bevdepth.sh" and s.ckpt == "x"


def test_bare_old_names_are_ignored_with_one_line_each_and_old_prefixed_names_noted():
    lines = []
    s = parse("full", [], environ={"SEED": "abc", "CARDS": "x", "PYTHON": "/nonexistent",
                                   "BEVDEPTH_NPU_SEED": "3", "BEVDEPTH_DEVICE": "cpu",
                                   "HOME": "/root"}, notice=lines.append)
    assert (s.seed, s.cards, s.python) == (3, 8, None)   # SEED, CARDS, PYTHON not read
    assert sorted(line.split()[0] for line in lines) == \
        ["BEVDEPTH_DEVICE", "CARDS", "PYTHON", "SEED"]
    assert any(line.startswith("SEED is set but not read") and "--seed= or BEVDEPTH_NPU_SEED"
               in line for line in lines)
    assert any("old name of BEVDEPTH_NPU_DEVICE" in line for line in lines)
    quiet = []
    parse("full", [], environ={"BEVDEPTH_NPU_SEED": "3", "MASTER_ADDR": "h"}, notice=quiet.append)
    assert quiet == []


def test_pooling_is_a_setting_of_every_mode():
    for mode in settings.MODES:
        assert parse(mode, ["--pooling=fused"], environ={}).pooling == "fused"
        assert parse(mode, [], environ={"BEVDEPTH_NPU_POOLING": "fused"}).pooling == "fused"
        assert parse(mode, [], environ={}).pooling == "product"
