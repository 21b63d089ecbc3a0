"""Checkpoints are input: every way a checkpoint file can be wrong gives one line naming the file
and what to do (bevdepth/utils/checkpoint_file.py and checkpoint_io.py of the patched tree,
bevdepth/exps/base_cli.py), and a rerun passes over an unreadable last.ckpt
(bevdepth_npu/checkpoints.py, the runner).

- The reader, in this process: files cut short at several points, empty, text, missing, a
  directory, damaged (a CRC mismatch torch.load would not notice), an optimizer-only file, a
  plain state dict, torch's legacy format; nothing in a file runs while it is inspected; the
  weight-shape comparison; the run layer and the tree agree on the error line's prefix.
- The test-sized smoke experiment (tests/integration/_scripts_helpers/tiny_exp.py and its EMA
  variant) trains two steps once; its checkpoint, cut and changed, is given to -e --ckpt_path
  and to --resume: each bad file exits 2 with that one line last, no traceback, no usage text,
  no results; another experiment's checkpoint (the tiny one given to the shipped smoke
  experiment) names the first mismatched weights and the experiment it comes from; the EMA
  checkpoint evaluates with --weights ema and model, a Lightning checkpoint without an average
  says --weights model, upstream's weights-only .pth format evaluates and cannot be resumed.
- test/eval_bevdepth.sh with a truncated checkpoint: the console shows the one line (no
  traceback tail), exit 2, run.json failed with that line.
- A rerun of a training command whose last.ckpt was cut short resumes from the newest
  readable checkpoint, keeps the bad file as last.ckpt.unreadable-<time>, and ends with the
  weights, optimizer and schedule of a clean resume from that checkpoint.

Run: python -m pytest tests/integration/test_checkpoint_errors.py -q  (in the environment; the
slow tests train and evaluate the tiny experiment, ~6 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bevdepth_npu.testing import assert_same
from tests.integration import _ema_helpers as ema_helpers
from tests.integration import _scripts_helpers as helpers

torch = pytest.importorskip("torch")

TINY_EXP = helpers.TINY_EXP
SMOKE_EXP = "bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py"
PREFIX = "checkpoint error: "


def _reader():
    helpers.require_stack()
    from bevdepth.utils import checkpoint_file, checkpoint_io
    return checkpoint_file, checkpoint_io


def _lightning_like(path: Path, **extra) -> Path:
    """A small file shaped like a Lightning checkpoint of this port."""
    weights = {"model.w": torch.arange(12.0).reshape(3, 4), "model.b": torch.zeros(4)}
    torch.save({"epoch": 0, "global_step": 2, "pytorch-lightning_version": "1.6.5",
                "state_dict": weights, "optimizer_states": [{"state": {}}],
                "lr_schedulers": [], "callbacks": {}, **extra}, path)
    return path


def _cut(source: Path, dest: Path, size: int) -> Path:
    dest.write_bytes(source.read_bytes()[:size])
    return dest


# ---------------------------------------------------------------------- the reader

def test_every_kind_of_bad_file_is_one_line_naming_it(tmp_path):
    checkpoint_file, checkpoint_io = _reader()
    good = _lightning_like(tmp_path / "good.ckpt", bevdepth_experiment="tiny_exp")
    summary = checkpoint_file.check_trainable(checkpoint_file.inspect(good))
    assert summary.tensors == {"model.w": (3, 4), "model.b": (4,)}
    assert (summary.epoch, summary.global_step, summary.experiment) == (0, 2, "tiny_exp")
    assert checkpoint_io.read_checkpoint(good)["global_step"] == 2
    size = good.stat().st_size

    cases = {"cut short": [_cut(good, tmp_path / f"cut{n}.ckpt", n)
                           for n in (2, 100, size // 2, size - 1)],
             "empty (0 bytes)": [_cut(good, tmp_path / "empty.ckpt", 0)],
             "not a torch file (it begins with text": [tmp_path / "notes.txt"],
             "no such file": [tmp_path / "absent.ckpt"],
             "a directory": [tmp_path]}
    (tmp_path / "notes.txt").write_text("scp: write failed: disk full\n")
    damaged = bytearray(good.read_bytes())
    at = damaged.index(b"\x00\x00\x80\x3f")          # 1.0 in the tensor bytes
    damaged[at + 2] ^= 0xFF
    (tmp_path / "damaged.ckpt").write_bytes(bytes(damaged))
    torch.load(tmp_path / "damaged.ckpt")            # torch.load does not notice...
    cases["damaged: record"] = [tmp_path / "damaged.ckpt"]   # ...the CRC does
    for words, paths in cases.items():
        for path in paths:
            with pytest.raises(checkpoint_file.CheckpointError) as error:
                checkpoint_io.read_checkpoint(path)
            line = str(error.value)
            assert "\n" not in line and line.startswith(f"{path}: ") and words in line, line
            assert error.value.remedy and line.endswith(error.value.remedy)

    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer.pt")
    torch.save({"conv.weight": torch.ones(2, 2)}, tmp_path / "plain.pt")
    for name in ("optimizer.pt", "plain.pt"):
        with pytest.raises(checkpoint_file.CheckpointError, match="not a checkpoint"):
            checkpoint_io.read_checkpoint(tmp_path / name)

    # torch's legacy format is left to torch.load, which reads it as before.
    torch.save({"state_dict": {"model.w": torch.ones(1)}}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert checkpoint_file.inspect(tmp_path / "legacy.pth").legacy
    assert list(checkpoint_io.read_checkpoint(tmp_path / "legacy.pth")["state_dict"]) == \
        ["model.w"]


def test_lightnings_resume_reads_through_the_same_reader(tmp_path):
    checkpoint_file, checkpoint_io = _reader()
    good = _lightning_like(tmp_path / "last.ckpt")
    seen = []
    io = checkpoint_io.AtomicCheckpointIO("mine", lambda ckpt, path: seen.append(path))
    assert io.load_checkpoint(good)["global_step"] == 2 and seen == [str(good)]
    cut = _cut(good, tmp_path / "cut.ckpt", good.stat().st_size // 2)
    weights_only = tmp_path / "0.pth"
    torch.save({"epoch": 0, "global_step": 2, "state_dict": {}}, weights_only)
    for path, words in ((cut, "cut short"), (weights_only, "holds weights only")):
        with pytest.raises(checkpoint_file.CheckpointError) as error:
            io.load_checkpoint(path)
        assert words in str(error.value) and str(error.value).endswith("(--resume none)")
        with pytest.raises(checkpoint_file.CheckpointError, match=words):
            checkpoint_io.check_resume_file(path)
    # What it writes records the experiment, and reads back.
    io.save_checkpoint(torch.load(good), tmp_path / "again.ckpt")
    assert checkpoint_file.inspect(tmp_path / "again.ckpt").experiment == "mine"


class _Planted:
    """An object whose unpickling would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_inspecting_a_file_runs_nothing_in_it(tmp_path):
    checkpoint_file, _ = _reader()
    marker = tmp_path / "ran"
    path = _lightning_like(tmp_path / "planted.ckpt", hyper_parameters=_Planted(marker))
    summary = checkpoint_file.inspect(path)
    assert summary.trainable and not marker.exists()


def test_mismatched_weights_are_named_with_their_shapes():
    checkpoint_file, checkpoint_io = _reader()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    theirs = {"0.weight": torch.ones(5, 4), "0.bias": torch.ones(5), "2.weight": torch.ones(1)}
    with pytest.raises(checkpoint_file.CheckpointError) as error:
        checkpoint_io.check_model_weights(model, theirs, "x.ckpt", "mine", "theirs", "fix it")
    line = str(error.value)
    assert line.startswith("x.ckpt: not a checkpoint of mine: 2 of another shape, 2 missing, "
                           "1 extra (the model has 4 weights): ")
    assert "0.weight (5, 4) in the file, (3, 4) here" in line and "it comes from theirs" in line
    checkpoint_io.check_model_weights(model, model.state_dict(), "x.ckpt", "mine", None, "")


def test_the_run_layer_and_the_tree_agree_on_the_error_line():
    checkpoint_file, _ = _reader()
    from bevdepth_npu import checkpoints
    assert checkpoints.ERROR_PREFIX == checkpoint_file.ERROR_PREFIX == PREFIX
    assert checkpoints.load_check() is checkpoint_file.run_checkpoint_problem
    # The run layer checks a rerun's checkpoint without torch in its own process.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from bevdepth_npu import checkpoints; "
         "from bevdepth_npu.run import runner; checkpoints.load_check(); "
         "print('torch' in sys.modules)"],
        cwd=str(helpers.REPO_ROOT), stdout=subprocess.PIPE, universal_newlines=True, check=True)
    assert probe.stdout.strip() == "False"


# ---------------------------------------------------------------------- the experiments

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the test-sized smoke EMA experiment: its run directory and the data."""
    helpers.require_stack()
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("checkpoint_errors")
    run = out / "run"
    ema_helpers.run_exp(ema_helpers.TINY_EMA_EXP,
                        ["--data_root", data, "--learning_rate", "0.001", "--max_epochs", "1",
                         "--limit_train_batches", "2", "--default_root_dir", run],
                        out / "train.log", ema_helpers.exp_env(threads=2))
    return {"run": run, "data": data, "out": out,
            "ckpt": run / "checkpoints" / "last.ckpt"}


def _experiment(trained, exp, args, name):
    root = trained["out"] / name
    proc = ema_helpers.run_exp(exp, ["--data_root", trained["data"], *args,
                                     "--default_root_dir", root],
                               trained["out"] / f"{name}.log", ema_helpers.exp_env(threads=2),
                               check=False)
    return proc, root


def _assert_one_line(proc, root, path, *words):
    """Exit 2, the checkpoint line last, naming ``path``; no traceback, usage or results."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert lines[-1].startswith(f"{PREFIX}{path}: "), lines[-5:]
    for word in words:
        assert word in lines[-1], lines[-1]
    assert "Traceback" not in proc.stdout and "usage:" not in proc.stdout
    assert not list(root.rglob("results_nusc.json")) and not list(root.rglob("*.ckpt"))
    return lines[-1]


@pytest.mark.slow
def test_bad_checkpoints_named_by_the_user_stop_with_one_line(trained):
    ckpt, out = trained["ckpt"], trained["out"]
    size = ckpt.stat().st_size
    bad = {}
    for n in (100, size // 2, size - 22):
        bad[_cut(ckpt, out / f"cut_{n}.ckpt", n)] = "cut short"
    bad[_cut(ckpt, out / "zero.ckpt", 0)] = "empty"
    (out / "README.txt").write_text("weights are on the shared drive\n")
    bad[out / "README.txt"] = "not a torch file"
    bad[out / "missing.ckpt"] = "no such file"
    for index, (path, words) in enumerate(bad.items()):
        proc, root = _experiment(trained, TINY_EXP, ["-e", "--ckpt_path", path], f"bad{index}")
        _assert_one_line(proc, root, path, words)

    # --resume of training: the same line with the resume remedy, nothing trained.
    path = next(iter(bad))
    proc, root = _experiment(trained, TINY_EXP, ["--resume", path, "--max_epochs", "1",
                                                 "--limit_train_batches", "1"], "bad_resume")
    _assert_one_line(proc, root, path, "cut short", "--resume none")


@pytest.mark.slow
def test_another_experiments_checkpoint_names_the_weights_and_the_experiment(trained):
    ckpt = trained["ckpt"]
    proc, root = _experiment(trained, SMOKE_EXP, ["-e", "--ckpt_path", ckpt], "other_exp")
    line = _assert_one_line(proc, root, ckpt, "not a checkpoint of bev_depth_lss_r18_smoke_2key",
                            "in the file", "here", "it comes from tiny_ema_exp",
                            "evaluate it with the experiment tiny_ema_exp")
    assert line.count(" in the file, ") == 3        # the first three, not all of them


@pytest.mark.slow
def test_ema_and_weights_only_files_load_as_before_and_say_what_they_lack(trained):
    ckpt, out = trained["ckpt"], trained["out"]
    saved = torch.load(ckpt, map_location="cpu")
    assert saved["bevdepth_experiment"] == "tiny_ema_exp"
    for weights in ("ema", "model"):
        proc, root = _experiment(trained, ema_helpers.TINY_EMA_EXP,
                                 ["-e", "--ckpt_path", ckpt, "--weights", weights],
                                 f"eval_{weights}")
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert json.loads((root / "metrics_summary.json").read_text())["evaluated"][
            "weights"] == weights

    # A Lightning checkpoint without the average, asked for it.
    plain = out / "no_average.ckpt"
    torch.save(dict(saved, callbacks={}), plain)
    proc, root = _experiment(trained, TINY_EXP, ["-e", "--ckpt_path", plain, "--weights", "ema"],
                             "no_average")
    _assert_one_line(proc, root, plain, "holds no EMA weights", "--weights model")

    # Upstream's weights-only format (its EMACallback wrote epoch, global_step, state_dict):
    # evaluates as before; training cannot resume from it, and says so.
    pth = out / "0.pth"
    torch.save({"epoch": saved["epoch"], "global_step": saved["global_step"],
                "state_dict": saved["state_dict"]}, pth)
    proc, root = _experiment(trained, TINY_EXP, ["-e", "--ckpt_path", pth], "upstream_pth")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((root / "metrics_summary.json").read_text())["evaluated"][
        "weights"] == "state_dict"
    proc, root = _experiment(trained, TINY_EXP, ["--resume", pth, "--max_epochs", "1",
                                                 "--limit_train_batches", "1"], "resume_pth")
    _assert_one_line(proc, root, pth, "holds weights only", "--resume none")


@pytest.mark.slow
def test_eval_script_shows_the_line_and_records_it(trained, tmp_path):
    cut = _cut(trained["ckpt"], tmp_path / "copied.ckpt", trained["ckpt"].stat().st_size // 3)
    env = helpers.script_env(tmp_path / "out", trained["data"])
    proc = helpers.run_script("eval_bevdepth.sh", env, [f"--ckpt={cut}", "--", *helpers.EXP_ARGS],
                              check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"error: {cut}: cut short" in errors[0], proc.stdout
    assert "Traceback" not in proc.stdout and "last lines of" not in proc.stdout
    (run_dir,) = helpers.run_dirs(tmp_path / "out")
    record = helpers.read_json(run_dir / "run.json")
    assert record["status"] == "failed"
    assert record["error"] == errors[0].split(": error: ", 1)[1]


@pytest.mark.slow
def test_doctor_reports_a_run_directory(tmp_path):
    checkpoint_file, _ = _reader()
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    good = _lightning_like(directory / "epoch=0-step=2.ckpt")
    _cut(good, directory / "last.ckpt", 50)
    proc = subprocess.run([sys.executable, "-m", "bevdepth_npu", "doctor", "--quick",
                           "--device", "cpu", "--checkpoint", str(tmp_path / "run")],
                          cwd=str(helpers.REPO_ROOT), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stdout
    assert any(line.startswith("FAIL  checkpoint.last.ckpt") and "cut short" in line
               for line in lines), proc.stdout
    assert any(line.startswith("PASS  checkpoint.epoch=0-step=2.ckpt")
               and "training checkpoint" in line for line in lines), proc.stdout
    assert any(line.startswith("PASS  checkpoint.resume") and "sets last.ckpt aside" in line
               and "epoch=0-step=2.ckpt" in line for line in lines), proc.stdout
    assert (directory / "last.ckpt").is_file()          # the doctor renames nothing


# ---------------------------------------------------------------------- a rerun

SETTINGS = dict(CARDS=1, EPOCHS=2, CKPT_EVERY_N_STEPS=1, OMP_NUM_THREADS=2)
ARGS = ["--", *helpers.EXP_ARGS, "--limit_train_batches", "2", "--deterministic", "true"]


def _final(path):
    saved = torch.load(path, map_location="cpu")
    return {key: saved[key] for key in ("epoch", "global_step", "state_dict",
                                        "optimizer_states", "lr_schedulers")}


@pytest.mark.slow
def test_a_rerun_over_a_truncated_last_ckpt_resumes_from_the_previous_checkpoint(
        tmp_path_factory):
    helpers.require_stack()
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("rerun_truncated")
    markers = out / "kill_markers"
    markers.mkdir()
    env = helpers.script_env(out / "runs", data, BEVDEPTH_TEST_KILL_AT_STEPS="3",
                             BEVDEPTH_TEST_KILL_MARKERS=str(markers), **SETTINGS)
    proc = helpers.run_script("train_performance_8p.sh", env, ARGS, check=False)
    assert proc.returncode == 137, proc.stdout[-4000:]
    (run_dir,) = helpers.run_dirs(out / "runs")
    checkpoints = run_dir / "checkpoints"
    last, previous = checkpoints / "last.ckpt", checkpoints / "epoch=0-step=2.ckpt"
    assert torch.load(last, map_location="cpu")["global_step"] == 3
    clean_source = out / "epoch=0-step=2.ckpt"
    shutil.copy2(previous, clean_source)
    cut = last.read_bytes()[: last.stat().st_size // 2]   # a copy interrupted halfway
    last.write_bytes(cut)

    proc = helpers.run_script("train_performance_8p.sh", env, ARGS)
    notes = [line for line in proc.stdout.splitlines() if "kept as last.ckpt.unreadable-" in line]
    assert len(notes) == 1 and "cut short" in notes[0] and previous.name in notes[0], proc.stdout
    (kept,) = checkpoints.glob("last.ckpt.unreadable-*")
    assert kept.read_bytes() == cut                        # kept, not deleted
    record = helpers.read_json(run_dir / "run.json")
    assert record["status"] == "completed" and "error" not in record
    assert [a["resume"] for a in record["attempts"]] == ["none", str(previous)]

    # A clean resume from the same checkpoint, in a run of its own.
    clean_env = helpers.script_env(out / "clean", data, RESUME=str(clean_source), **SETTINGS)
    helpers.run_script("train_performance_8p.sh", clean_env, ARGS)
    (clean_dir,) = helpers.run_dirs(out / "clean")
    ours = _final(last)
    assert ours["global_step"] == 4
    assert_same(ours, _final(clean_dir / "checkpoints" / "last.ckpt"))
