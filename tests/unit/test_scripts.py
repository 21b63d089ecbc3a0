"""The test/*.sh launchers and the runner behind them (bevdepth-npu run), without training:
usage, validation, env_npu.sh, and the whole run flow against a stand-in experiment (a script
that answers like bevdepth/exps/...: it writes steps.jsonl and checkpoints/last.ckpt when
training, metrics_summary.json when evaluating): stage order, exit status, core binding per
stage, resume selection, --fresh, the lock, links, nothing deleted. Seconds; needs bash and
python and nothing of the model stack (the real runs are in tests/integration/test_scripts_e2e.py).

Run: python -m pytest tests/unit/test_scripts.py -q
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bevdepth_npu.testing import settings_env

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DIR = REPO_ROOT / "test"
SCRIPTS = ("train_full_8p.sh", "train_performance_8p.sh", "eval_bevdepth.sh")
LAUNCHERS = SCRIPTS + ("train_smoke.sh",)

# The stand-in experiment: records each call, then acts like a training or an evaluation.
FAKE_EXP = textwrap.dedent('''
    import json, os, pickle, sys, zipfile
    args = sys.argv[1:]
    value = lambda flag: args[args.index(flag) + 1] if flag in args else None
    root = value("--default_root_dir")
    with open(os.environ["FAKE_CALLS"], "a") as calls:
        calls.write(json.dumps({"argv": args, "bind": os.environ.get("BEVDEPTH_NPU_BIND_CORES"),
                                "master": os.environ.get("MASTER_ADDR"),
                                "tq": os.environ.get("TASK_QUEUE_ENABLE")}) + "\\n")
    print("- backbone.conv1.weight: Initialized by user-defined `init_weights`")
    if os.environ.get("FAKE_FAIL") == ("eval" if "-e" in args else "train"):
        print("Traceback (most recent call last):\\nRuntimeError: the stand-in fails")
        sys.exit(3)
    os.makedirs(root, exist_ok=True)
    if "-e" in args:
        metrics = {"mean_ap": 0.25, "nd_score": 0.3125, "mean_dist_aps": {"car": 0.25},
                   "tp_errors": {k: 0.5 for k in ("trans_err", "scale_err", "orient_err",
                                                  "vel_err", "attr_err")}}
        metrics["label_tp_errors"] = {"car": metrics["tp_errors"]}
        json.dump(metrics, open(os.path.join(root, "metrics_summary.json"), "w"))
        sys.exit(0)
    batch = int(value("--batch_size_per_device")) * int(value("--gpus") or 1)
    with open(os.path.join(root, "steps.jsonl"), "a") as steps:
        for step in range(1, 4):
            steps.write(json.dumps({"step": step, "epoch": 0, "step_time_s": 0.5,
                                    "data_time_s": 0.125, "loss": 4.0 / step, "lr": 1e-3,
                                    "global_batch": batch, "images_per_sample": 12,
                                    "total_steps": 3, "process_step": step}) + "\\n")
    os.makedirs(os.path.join(root, "checkpoints"), exist_ok=True)
    # The layout torch.save writes (a zip archive with data.pkl) and the keys Lightning resumes
    # from, so that the runner's check of a checkpoint (bevdepth_npu/checkpoints.py) passes it.
    with zipfile.ZipFile(os.path.join(root, "checkpoints", "last.ckpt"), "w") as ckpt:
        ckpt.writestr("last/data.pkl", pickle.dumps(
            {"state_dict": {}, "optimizer_states": [], "epoch": 0, "global_step": 3}))
''')


def run(script: str, *args: str, env=None, cwd=None, raw_env=None) -> subprocess.CompletedProcess:
    """``bash test/SCRIPT ARGS``; ``env`` names settings as the tests did before the prefix
    (``CARDS``: the variable of --cards), ``raw_env`` is passed as it is."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("ASCEND", "CANN"))}
    full.update(settings_env(PYTHON=sys.executable))
    full.update(settings_env(**(env or {})))
    full.update(raw_env or {})
    return subprocess.run(["bash", str(TEST_DIR / script), *args], env=full, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)


@pytest.mark.parametrize("script", LAUNCHERS + ("env_npu.sh",))
def test_strict_bash_with_a_header(script):
    text = (TEST_DIR / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n# ")
    assert "\r" not in text and text.endswith("\n")
    if script in LAUNCHERS:
        assert "set -euo pipefail" in text and "Usage:  bash test/" + script in text
        # A launcher: a few lines that forward every argument to `bevdepth-npu run MODE`.
        assert len(text.splitlines()) < 20
        assert re.search(r'^(exec .* -m bevdepth_npu run \w+|launch \w+) .*"\$@"$', text, re.M)
    # Nothing an earlier run produced is deleted: no rm anywhere in the scripts.
    assert not re.search(r"(^|[;&|]\s*|\s)rm\s", text, re.M), script
    assert "nohup" not in text and "grep" not in text   # no background runs, no log scraping
    assert not (TEST_DIR / "common.sh").exists()


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_prints_the_settings_and_exits_0(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash test/" + script)
    assert "after --" in proc.stdout and "--batch-size=N" in proc.stdout
    if script != "train_smoke.sh":
        assert "--cards=N" in proc.stdout and "[BEVDEPTH_NPU_CARDS" in proc.stdout


@pytest.mark.parametrize("script", LAUNCHERS)
def test_bare_old_variables_are_ignored_with_one_line_each(script):
    """A shell's SEED, CARDS or PYTHON (names this common often mean something else) changes
    nothing: the same help, and one line each on stderr naming what to use."""
    clean = {k: "" for k in ("SEED", "CARDS", "PYTHON")}
    plain = run(script, "--help", raw_env=clean)
    proc = run(script, "--help", raw_env={"SEED": "abc", "CARDS": "x",
                                          "PYTHON": "/nonexistent"})
    assert proc.returncode == 0 and plain.returncode == 0, proc.stderr
    assert proc.stdout == plain.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    for name, variable in (("SEED", "BEVDEPTH_NPU_SEED"), ("CARDS", "BEVDEPTH_NPU_CARDS"),
                           ("PYTHON", "BEVDEPTH_NPU_PYTHON")):
        assert any(line.startswith(f"{script}: warning: {name} is set but not read")
                   and variable in line for line in lines), proc.stderr


@pytest.mark.parametrize("script,args,message", [
    ("train_full_8p.sh", ["--cards=0"], "argument --cards: must be at least 1, got 0"),
    ("train_full_8p.sh", ["--batch-size=eight"],
     "argument --batch-size: expected an integer, got 'eight'"),
    ("train_full_8p.sh", ["--learning-rate=0"],
     "argument --learning-rate: must be a positive number, got 0"),
    ("train_full_8p.sh", ["--precision=8"],
     "argument --precision: must be one of: 16 32 bf16, got '8'"),
    ("train_full_8p.sh", ["--nnodes=2"], "--nnodes=2 needs --master-addr"),
    ("train_full_8p.sh", ["--nnodes=2", "--node-rank=2"], "--node-rank=2 must be below"),
    ("train_full_8p.sh", ["--bind-cores=yes"],
     "argument --bind-cores: must be one of: auto 0 1, got 'yes'"),
    ("train_full_8p.sh", ["--epochs"], "argument --epochs: expected one argument"),
    ("train_full_8p.sh", ["--max_epochs=3"], "unknown option --max_epochs=3"),
    ("train_full_8p.sh", ["extra"], "unexpected argument 'extra'"),
    ("train_performance_8p.sh", ["--eval-cards=2"], "unknown option --eval-cards=2"),
    ("eval_bevdepth.sh", ["--cards=two"], "argument --cards: expected an integer, got 'two'"),
    ("eval_bevdepth.sh", ["--fresh"], "unknown option --fresh"),
    ("train_smoke.sh", ["--steps=0"], "argument --steps: must be at least 1, got 0"),
])
def test_bad_settings_exit_1_naming_the_setting(script, args, message):
    proc = run(script, *args)
    assert proc.returncode == 1
    assert f"{script}: error: {message}" in proc.stderr


def test_environment_variables_are_settings_and_flags_win():
    proc = run("train_full_8p.sh", env={"CARDS": "0"})
    assert proc.returncode == 1
    assert "BEVDEPTH_NPU_CARDS=0 (environment): must be at least 1, got 0" in proc.stderr
    proc = run("train_full_8p.sh", "--cards=0", env={"CARDS": "4"})
    assert "argument --cards: must be at least 1, got 0" in proc.stderr


def test_missing_inputs_are_named(tmp_path):
    checkout = tmp_path / "BEVDepth"
    (checkout / "bevdepth" / "exps").mkdir(parents=True)
    env = {"BEVDEPTH_ROOT": str(checkout), "OUTPUT_ROOT": str(tmp_path / "out")}
    proc = run("train_full_8p.sh", "--exp=nope.py", env=env)
    assert proc.returncode == 1
    assert f"--exp={checkout}/nope.py: no such experiment file" in proc.stderr
    (checkout / "exp.py").write_text("")
    proc = run("train_full_8p.sh", "--exp=exp.py", "--data-root=/no/such/dir", env=env)
    assert "--data-root=/no/such/dir: no such directory" in proc.stderr
    proc = run("eval_bevdepth.sh", "--exp=exp.py", f"--data-root={tmp_path}",
               f"--ckpt={tmp_path}/missing.ckpt", env=env)
    assert f"--ckpt={tmp_path}/missing.ckpt: no such checkpoint file" in proc.stderr
    proc = run("train_full_8p.sh", env={"BEVDEPTH_ROOT": str(tmp_path)})
    assert "is not a BEVDepth checkout" in proc.stderr
    proc = run("train_full_8p.sh", env={"PYTHON": str(tmp_path / "python")})
    assert proc.returncode == 1 and "cannot import bevdepth_npu" in proc.stderr
    assert not (tmp_path / "out").exists()   # nothing created before the inputs are valid


# ------------------------------------------------------------------ the run flow, stand-in exp

@pytest.fixture
def fake(tmp_path):
    checkout = tmp_path / "BEVDepth"
    (checkout / "bevdepth" / "exps").mkdir(parents=True)
    (checkout / "exp.py").write_text(FAKE_EXP)
    (tmp_path / "data").mkdir()
    env = {"BEVDEPTH_ROOT": str(checkout), "OUTPUT_ROOT": str(tmp_path / "out"),
           "EXP": "exp.py", "DATA_ROOT": str(tmp_path / "data"), "DEVICE": "cpu",
           "FAKE_CALLS": str(tmp_path / "calls.jsonl"), "WARMUP_STEPS": "1", "CARDS": "2",
           "BATCH_SIZE": "4", "DOCTOR": "0"}

    class Fake:
        out = tmp_path / "out" / "0"

        @staticmethod
        def run(script, *args, **extra):
            return run(script, *args, env=dict(env, **extra))

        @staticmethod
        def calls():
            path = tmp_path / "calls.jsonl"
            calls = [json.loads(line) for line in path.read_text().splitlines()]
            path.unlink()
            return calls

        @staticmethod
        def runs():
            return sorted(p for p in Fake.out.iterdir() if p.is_dir() and not p.is_symlink())
    return Fake


def test_a_full_run_trains_evaluates_and_summarizes_quietly(fake):
    proc = fake.run("train_full_8p.sh", "--", "--num_workers", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = fake.runs()
    train, evaluate = fake.calls()
    assert "-e" not in train["argv"] and train["bind"] == "0"
    assert train["argv"][-2:] == ["--num_workers", "0"]
    assert evaluate["argv"][:3] == ["-e", "--ckpt_path", str(run_dir / "checkpoints/last.ckpt")]
    assert evaluate["bind"] == "0" and evaluate["argv"][-2:] == ["--num_workers", "0"]
    # The stages' own output is in their logs, not on the console.
    assert "Initialized by" not in proc.stdout
    assert "Initialized by" in (run_dir / "train_0.log").read_text()
    assert "Initialized by" in (run_dir / "eval_0.log").read_text()
    assert "train: step 3/3" in proc.stdout and "nuScenes detection metrics" in proc.stdout
    assert f"run directory: {run_dir}" in proc.stdout
    case = "BEVDepth_for_PyTorch_bs4_2p_acc"
    values = dict(line.split(" = ") for line in (run_dir / f"{case}.log").read_text().splitlines())
    assert values["ActualFPS"] == "16.0" and values["mAP"] == "0.25"   # 2 x 8 / 1 s
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["attempts"][0]["train_exit_code"] == 0
    assert record["attempts"][0]["bind_cores"] == 0
    assert record["attempts"][0]["bind_cores_eval"] == 0
    for name in ("latest", "train_0.log", "eval_0.log", f"{case}.log"):
        assert (fake.out / name).is_symlink()
    assert (fake.out / "latest").resolve() == run_dir


@pytest.mark.parametrize("device, override, train_bind", [
    ("npu", "auto", "1"), ("cuda", "auto", "0"), ("cpu", "auto", "0"), ("npu", "0", "0"),
    ("cpu", "1", "1"),
])
def test_core_binding_on_for_npu_training_off_for_evaluation(fake, device, override, train_bind):
    proc = fake.run("train_full_8p.sh", DEVICE=device, BIND_CORES=override)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train, evaluate = fake.calls()
    assert (train["bind"], evaluate["bind"]) == (train_bind, "0")


def test_a_failed_training_exits_with_its_status_and_the_next_command_continues(fake):
    proc = fake.run("train_full_8p.sh", FAKE_FAIL="train")
    assert proc.returncode == 3
    assert "training failed (exit 3); evaluation skipped" in proc.stderr
    assert "RuntimeError: the stand-in fails" in proc.stdout   # the end of the failed log
    assert len(fake.calls()) == 1                              # no evaluation
    (failed,) = fake.runs()
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    # It wrote no checkpoint: the same command starts a new run...
    proc = fake.run("train_full_8p.sh", FAKE_FAIL="eval")
    assert proc.returncode == 3 and "evaluation failed (exit 3)" in proc.stderr
    first, second = fake.runs()
    assert first == failed and (second / "checkpoints" / "last.ckpt").is_file()
    fake.calls()
    # ...which has a checkpoint now, so the same command continues it and evaluates again.
    proc = fake.run("train_full_8p.sh")
    assert proc.returncode == 0 and f"continuing the unfinished run {second}" in proc.stdout
    assert fake.runs() == [first, second]
    train, _ = fake.calls()
    assert train["argv"][train["argv"].index("--resume") + 1] == str(
        second / "checkpoints" / "last.ckpt")
    record = json.loads((second / "run.json").read_text())
    assert [a.get("eval_exit_code") for a in record["attempts"]] == [3, 0]
    assert record["status"] == "completed"
    # A completed run is not continued; --fresh never continues.
    fake.run("train_full_8p.sh")
    fake.run("train_full_8p.sh", "--fresh", FAKE_FAIL="eval")
    fake.run("train_full_8p.sh", "--fresh")
    assert len(fake.runs()) == 5


def test_a_run_in_use_is_not_continued(fake):
    fake.run("train_performance_8p.sh", FAKE_FAIL="train")
    (run_dir,) = fake.runs()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_text("weights")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); "
         "lock.acquire(); print('locked', flush=True); time.sleep(60)",
         str(run_dir / ".lock")], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        proc = fake.run("train_performance_8p.sh")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stdout
    assert f"{run_dir} is in use by another running command" in proc.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def test_evaluation_picks_the_newest_checkpoint(fake):
    assert fake.run("train_performance_8p.sh").returncode == 0
    fake.calls()
    proc = fake.run("eval_bevdepth.sh", CARDS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    eval_run, train_run = fake.runs()   # by name: ..._1p_eval_<time>, ..._2p_perf_<time>
    ckpt = train_run / "checkpoints" / "last.ckpt"
    assert f"evaluating the newest checkpoint, {ckpt}" in proc.stdout
    (evaluate,) = fake.calls()
    assert evaluate["argv"][:3] == ["-e", "--ckpt_path", str(ckpt)]
    assert evaluate["argv"][evaluate["argv"].index("--batch_size_per_device") + 1] == "4"
    assert json.loads((eval_run / "run.json").read_text())["checkpoint"] == str(ckpt)


def test_several_nodes_get_the_rendezvous_and_node_1_leaves_the_summary_to_node_0(fake):
    proc = fake.run("train_performance_8p.sh", NNODES="2", NODE_RANK="1",
                    MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = fake.runs()
    assert run_dir.name.startswith("BEVDepth_for_PyTorch_bs4_4p_perf_node1_")
    (train,) = fake.calls()
    assert train["master"] == "10.0.0.1" and "--num_nodes" in train["argv"]
    assert "node 0 writes the summary" in proc.stdout
    assert not list(run_dir.glob("*_perf.log"))


@pytest.mark.slow
def test_a_failing_self_test_stops_the_run_before_training(fake, tmp_path):
    """--doctor=1 (the default): `bevdepth-npu doctor --quick` runs first; a FAIL (here a foreign
    torch, its metadata first on the path) stops the run and nothing trains."""
    shadow = tmp_path / "shadow" / "torch-2.2.0.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.2.0\n")
    proc = fake.run("train_performance_8p.sh", "--pooling=fused", DOCTOR="1",
                    PYTHONPATH=str(shadow.parent))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the self-test failed" in proc.stderr and "--doctor=0 skips" in proc.stderr
    # the self-test checks the pooling the run asked for
    assert "self-test: bevdepth-npu doctor --quick --pooling fused;" in proc.stdout
    assert "torch 2.2.0 is installed; the pin is 2.1.0" in proc.stdout + proc.stderr
    assert not (tmp_path / "calls.jsonl").exists()   # no training
    (run_dir,) = fake.runs()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert json.loads((run_dir / "doctor.json").read_text())["ok"] is False


def test_weights_reach_the_evaluation(fake):
    assert fake.run("train_full_8p.sh", "--weights=model").returncode == 0
    _, evaluate = fake.calls()
    assert evaluate["argv"][evaluate["argv"].index("--weights") + 1] == "model"
    assert fake.run("eval_bevdepth.sh", WEIGHTS="ema", CARDS="1").returncode == 0
    (evaluate,) = fake.calls()
    assert evaluate["argv"][evaluate["argv"].index("--weights") + 1] == "ema"
    assert fake.run("eval_bevdepth.sh", CARDS="1").returncode == 0
    (evaluate,) = fake.calls()
    assert "--weights" not in evaluate["argv"]   # the experiment decides


def test_verbose_shows_the_stages_output(fake):
    proc = fake.run("train_performance_8p.sh", "--verbose")
    assert proc.returncode == 0 and "Initialized by" in proc.stdout


# ------------------------------------------------------------------ env_npu.sh

def bash(code: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("ASCEND", "CANN")) and k != "CPU_AFFINITY_CONF"}
    full.update(env or {})
    return subprocess.run(["bash", "-c", f"set -euo pipefail; {code}"], env=full, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


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
    probe = ("unset LD_LIBRARY_PATH; source test/env_npu.sh; "
             "echo \"home=$ASCEND_TOOLKIT_HOME tq=$TASK_QUEUE_ENABLE log=$ASCEND_GLOBAL_LOG_LEVEL "
             "hccl=$HCCL_CONNECT_TIMEOUT wl=$HCCL_WHITELIST_DISABLE comb=$COMBINED_ENABLE "
             "aff=${CPU_AFFINITY_CONF-unset}\"; [[ $- == *u* ]] && echo strict")
    proc = bash(probe, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"CANN environment from {set_env}" in proc.stdout
    # CPU_AFFINITY_CONF is the training processes' own business (bevdepth/utils/core_binding.py)
    assert ("home=/opt/cann/latest tq=1 log=3 hccl=1200 wl=1 comb=1 aff=unset") in proc.stdout
    assert "strict" in proc.stdout


def test_the_runs_get_the_settings_env_npu_sh_exports(fake, tmp_path):
    set_env = tmp_path / "set_env.sh"
    set_env.write_text("export ASCEND_TOOLKIT_HOME=/opt/cann/latest\n")
    proc = fake.run("train_performance_8p.sh", CANN_SET_ENV=str(set_env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"env_npu.sh: CANN environment from {set_env}" in proc.stdout
    (train,) = fake.calls()
    assert train["tq"] == "2"   # env_npu.sh's task queue setting reached the training
