"""The test/*.sh scripts without training: usage, validation, core binding, env_npu.sh, resume
selection and links. Seconds; needs bash, python and nothing of the model stack.

Run: python -m pytest tests/integration/test_scripts_units.py -q
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DIR = REPO_ROOT / "test"
SCRIPTS = ("train_full_8p.sh", "train_performance_8p.sh", "eval_bevdepth.sh")


def bash(code: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run bash code in strict mode with common.sh sourced (its functions only)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND", "CANN"))}
    full.update(env or {})
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {TEST_DIR / 'common.sh'}; {code}"],
        env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)


def run(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable)
    full.update(env or {})
    return subprocess.run(["bash", str(TEST_DIR / script), *args], env=full,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS + ("env_npu.sh", "common.sh"))
def test_strict_bash_with_a_header(script):
    text = (TEST_DIR / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ")
    assert "\r" not in text and text.endswith("\n")
    if script in SCRIPTS:
        assert "set -euo pipefail" in text
    # Nothing an earlier run produced is deleted: no rm anywhere in the scripts.
    assert not re.search(r"(^|[;&|]\s*|\s)rm\s", text, re.M), script
    assert "nohup" not in text and "grep" not in text   # no background runs, no log scraping


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_header_and_exits_0(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:  bash test/" + script in proc.stdout
    assert "--cards=N" in proc.stdout and "after --" in proc.stdout
    assert "set -euo" not in proc.stdout   # the header only


@pytest.mark.parametrize("script,args,message", [
    ("train_full_8p.sh", ["--cards=0"], "CARDS=0 must be at least 1"),
    ("train_full_8p.sh", ["--batch-size=eight"], "BATCH_SIZE='eight' is not a whole number"),
    ("train_full_8p.sh", ["--learning-rate=0"], "LEARNING_RATE=0 must be above 0"),
    ("train_full_8p.sh", ["--learning-rate=-1"], "LEARNING_RATE='-1' is not a positive number"),
    ("train_full_8p.sh", ["--precision=8"], "PRECISION='8' must be one of: 16 32 bf16"),
    ("train_full_8p.sh", ["--nnodes=2"], "NNODES=2 needs MASTER_ADDR"),
    ("train_full_8p.sh", ["--nnodes=2", "--node-rank=2"], "NODE_RANK=2 must be below NNODES=2"),
    ("train_full_8p.sh", ["--bind-cores=yes"], "BIND_CORES='yes' must be one of: auto 0 1"),
    ("train_full_8p.sh", ["--epochs"], "option --epochs needs a value: --epochs=VALUE"),
    ("train_full_8p.sh", ["--max_epochs=3"], "unknown option --max_epochs"),
    ("train_full_8p.sh", ["extra"], "unexpected argument 'extra'"),
    ("train_performance_8p.sh", ["--fresh=1"], "unknown option --fresh"),
    ("eval_bevdepth.sh", ["--cards=two"], "CARDS='two' is not a whole number"),
    ("eval_bevdepth.sh", ["--fresh"], "unknown option --fresh"),
])
def test_bad_settings_exit_1_naming_the_setting(script, args, message):
    proc = run(script, *args)
    assert proc.returncode == 1
    assert f"{script}: error: {message}" in proc.stderr


def test_environment_variables_are_settings_and_flags_win(tmp_path):
    proc = run("train_full_8p.sh", env={"CARDS": "0"})
    assert proc.returncode == 1 and "CARDS=0 must be at least 1" in proc.stderr
    proc = run("train_full_8p.sh", "--cards=0", env={"CARDS": "4"})
    assert "CARDS=0 must be at least 1" in proc.stderr


def test_missing_inputs_are_named(tmp_path):
    checkout = tmp_path / "BEVDepth"
    (checkout / "bevdepth" / "exps").mkdir(parents=True)
    env = {"BEVDEPTH_ROOT": str(checkout), "OUTPUT_ROOT": str(tmp_path / "out")}
    proc = run("train_full_8p.sh", "--exp=nope.py", env=env)
    assert proc.returncode == 1
    assert f"EXP={checkout}/nope.py: no such experiment file" in proc.stderr
    (checkout / "exp.py").write_text("")
    proc = run("train_full_8p.sh", "--exp=exp.py", "--data-root=/no/such/dir", env=env)
    assert "DATA_ROOT=/no/such/dir: no such directory" in proc.stderr
    proc = run("eval_bevdepth.sh", "--exp=exp.py", f"--data-root={tmp_path}",
               f"--ckpt={tmp_path}/missing.ckpt", env=env)
    assert f"CKPT={tmp_path}/missing.ckpt: no such checkpoint file" in proc.stderr
    proc = run("train_full_8p.sh", env={"BEVDEPTH_ROOT": str(tmp_path)})
    assert "is not a BEVDepth checkout" in proc.stderr
    assert not (tmp_path / "out").exists()   # nothing created before the inputs are valid


@pytest.mark.parametrize("stage,device,override,expected", [
    ("train", "npu", "auto", "1"),
    ("train", "cuda", "auto", "0"),
    ("train", "cpu", "auto", "0"),
    ("train", "npu", "0", "0"),
    ("train", "cpu", "1", "1"),
    ("eval", "npu", "auto", "0"),
    ("eval", "npu", "1", "0"),
])
def test_core_binding_on_for_npu_training_off_for_evaluation(stage, device, override, expected):
    proc = bash(f"bd_bind_cores_value {stage} {device}", env={"BIND_CORES": override})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_each_stage_runs_with_its_binding_value():
    """bd_train and bd_eval hand the value to the process as BEVDEPTH_BIND_CORES."""
    text = (TEST_DIR / "common.sh").read_text()
    train = text[text.index("bd_train() {"):text.index("bd_eval() {")]
    evaluate = text[text.index("bd_eval() {"):text.index("bd_summarize() {")]
    assert 'bind=$(bd_bind_cores_value train "$DEVICE")' in train
    assert 'bind=$(bd_bind_cores_value eval "$DEVICE")' in evaluate
    for body in (train, evaluate):
        assert 'BEVDEPTH_BIND_CORES=$bind "${cmd[@]}"' in body


def test_env_npu_is_a_noop_without_cann(tmp_path):
    probe = ("before=$(env | sort); source test/env_npu.sh; after=$(env | sort); "
             "[[ $before == \"$after\" ]] && echo same; [[ $- == *u* ]] && echo strict")
    proc = bash(probe, env={"HOME": str(tmp_path)}, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "no CANN toolkit found" in proc.stdout
    assert "same" in proc.stdout and "strict" in proc.stdout
    # Sourced by a plain interactive-style shell, it leaves strict mode off.
    plain = subprocess.run(["bash", "-c", "source test/env_npu.sh >/dev/null; echo \"$-\""],
                           cwd=REPO_ROOT, env=dict(os.environ, HOME=str(tmp_path)),
                           stdout=subprocess.PIPE, universal_newlines=True)
    assert plain.returncode == 0 and "u" not in plain.stdout and "e" not in plain.stdout


def test_env_npu_sources_cann_under_strict_mode_and_keeps_user_values(tmp_path):
    set_env = tmp_path / "set_env.sh"
    # Like CANN's script: reads variables that may be unset.
    set_env.write_text('export ASCEND_TOOLKIT_HOME=/opt/cann/latest\n'
                       'export LD_LIBRARY_PATH=/opt/cann/lib64:$LD_LIBRARY_PATH\n')
    env = {"CANN_SET_ENV": str(set_env), "HOME": str(tmp_path), "TASK_QUEUE_ENABLE": "1"}
    env.pop("LD_LIBRARY_PATH", None)
    probe = ("unset LD_LIBRARY_PATH; source test/env_npu.sh; "
             "echo \"home=$ASCEND_TOOLKIT_HOME tq=$TASK_QUEUE_ENABLE log=$ASCEND_GLOBAL_LOG_LEVEL "
             "hccl=$HCCL_CONNECT_TIMEOUT wl=$HCCL_WHITELIST_DISABLE comb=$COMBINED_ENABLE\"; "
             "[[ $- == *u* ]] && echo strict")
    proc = bash(probe, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"CANN environment from {set_env}" in proc.stdout
    assert ("home=/opt/cann/latest tq=1 log=3 hccl=1200 wl=1 comb=1") in proc.stdout
    assert "strict" in proc.stdout
    assert "CPU_AFFINITY_CONF" not in (TEST_DIR / "env_npu.sh").read_text().split("\n\n", 1)[1]


def _fake_run(device_dir: Path, name: str, status: str, settings: str, ckpt: bool) -> Path:
    run_dir = device_dir / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": status, "settings": settings}))
    if ckpt:
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run_dir


def test_resume_picks_the_newest_unfinished_identical_run(tmp_path):
    device_dir = tmp_path / "0"
    case = "BEVDepth_for_PyTorch_bs8_8p_acc"
    find = (f"BD_DEVICE_DIR={device_dir}; PYTHON={sys.executable}; "
            f"bd_find_resumable_run {case} 'S'")
    assert bash(find).stdout == ""                                        # no runs at all
    _fake_run(device_dir, f"{case}_20240101-000000", "failed", "S", ckpt=True)
    assert bash(find).stdout.strip().endswith(f"{case}_20240101-000000")   # failed with a ckpt
    _fake_run(device_dir, f"{case}_20240102-000000", "interrupted", "OTHER", ckpt=True)
    _fake_run(device_dir, f"{case}_20240103-000000", "failed", "S", ckpt=False)
    # Other settings and runs without a checkpoint are passed over.
    assert bash(find).stdout.strip().endswith(f"{case}_20240101-000000")
    _fake_run(device_dir, f"{case}_20240104-000000", "completed", "S", ckpt=True)
    assert bash(find).stdout == ""   # a completed run after it: start afresh
    _fake_run(device_dir, f"{case}_20240105-000000", "running", "S", ckpt=True)
    assert bash(find).stdout.strip().endswith(f"{case}_20240105-000000")
    # Another case name with the same prefix is not this case.
    _fake_run(device_dir, f"{case}x_20240106-000000", "failed", "S", ckpt=True)
    assert bash(find).stdout.strip().endswith(f"{case}_20240105-000000")


def test_new_run_dirs_never_reuse_a_name(tmp_path):
    code = (f"BD_DEVICE_DIR={tmp_path}; bd_timestamp() {{ echo 20240101-000000; }}; "
            "bd_new_run_dir C; echo $RUN_DIR; bd_new_run_dir C; echo $RUN_DIR; "
            "bd_new_run_dir C; echo $RUN_DIR")
    proc = bash(code)
    assert proc.stdout.split() == [f"{tmp_path}/C_20240101-000000",
                                   f"{tmp_path}/C_20240101-000000-2",
                                   f"{tmp_path}/C_20240101-000000-3"]


def test_links_replace_links_but_never_files(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "train_0.log").write_text("from an older script\n")
    code = (f"BD_DEVICE_DIR={tmp_path}; bd_link latest run1; bd_link latest run2; "
            "bd_link train_0.log run2/train_0.log")
    proc = bash(code)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(tmp_path / "latest") == "run2"
    assert (tmp_path / "train_0.log").read_text() == "from an older script\n"
    assert "is a regular file from an earlier tool; leaving it" in proc.stdout


def test_run_json_attempts_and_times(tmp_path):
    code = (f"RUN_DIR={tmp_path}; PYTHON={sys.executable}; "
            "bd_run_json str:mode=full new_attempt num:attempt.start_time_s=10.5 "
            "num:attempt.train_start_s=11 num:attempt.train_end_s=20 num:attempt.end_time_s=21; ")
    assert bash(code).returncode == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert (data["start_time_s"], data["train_start_s"], data["train_end_s"],
            data["end_time_s"]) == (10.5, 11, 20, 21)
    # A resumed run: E2E spans both attempts; TrainingTime falls back to the step times.
    code = (f"RUN_DIR={tmp_path}; PYTHON={sys.executable}; "
            "bd_run_json new_attempt num:attempt.start_time_s=100 num:attempt.train_start_s=101 "
            "num:attempt.train_end_s=150 num:attempt.end_time_s=151")
    assert bash(code).returncode == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert (data["start_time_s"], data["end_time_s"]) == (10.5, 151)
    assert "train_start_s" not in data and "train_end_s" not in data
    assert len(data["attempts"]) == 2 and data["mode"] == "full"


def test_the_newest_checkpoint_is_found_below_runs_and_the_checkout_outputs(tmp_path):
    device_dir, checkout = tmp_path / "out" / "0", tmp_path / "BEVDepth"
    older = device_dir / "run_a" / "checkpoints" / "last.ckpt"
    newer = checkout / "outputs" / "exp" / "lightning_logs" / "version_2" / "checkpoints" / "e.ckpt"
    newest = device_dir / "run_b" / "checkpoints" / "epoch=1-step=4.ckpt"
    code = (f"BD_DEVICE_DIR={device_dir}; BEVDEPTH_ROOT={checkout}; PYTHON={sys.executable}; "
            "bd_newest_checkpoint")
    assert bash(code).stdout == ""
    for age_s, path in ((300, older), (200, newer), (100, newest)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000 - age_s, 1_700_000_000 - age_s))
    (device_dir / "run_b" / "notes.txt").write_text("not a checkpoint")
    assert bash(code).stdout.strip() == str(newest)
    newest.unlink()
    assert bash(code).stdout.strip() == str(newer)


def test_setting_lists_may_span_lines():
    code = ('bd_parse_args x "cards batch-size\n    data-dir\n    steps" "fresh" '
            '--data-dir=/d --steps=3 --fresh -- --num_workers 0; '
            'echo "$DATA_DIR $STEPS $FRESH ${BD_EXTRA_ARGS[*]}"')
    proc = bash(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "/d 3 1 --num_workers 0\n"
