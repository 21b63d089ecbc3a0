"""EMA runs that resume and evaluate what they trained (bevdepth/callbacks/ema.py, --weights).

- Resume: the test-sized smoke experiment with the EMA callback trains 2 epochs of 2 steps,
  checkpointing every step, on CPU with no loader workers, fp32, deterministic algorithms; the
  same command is killed with SIGKILL after step 1 (mid-epoch checkpoint) and after step 2
  (end-of-epoch checkpoint) and rerun. Losses, learning rates, final weights, optimizer,
  scheduler and the moving average with its update count equal those of an uninterrupted run
  bit for bit (upstream rebuilt the average from the current weights at every start).
- DDP: two CPU processes over gloo; each rank's average equals the other's and the
  checkpoint's, bit for bit, while the ranks' own BatchNorm statistics differ (so an average of
  each rank's own buffers would not agree).
- Evaluation: the smoke EMA experiment trains 2 steps with evaluation at the end of the epoch;
  evaluating its checkpoint afterwards (default --weights ema) reproduces the in-training
  results file and metrics exactly, --weights model scores other weights, and upstream's
  ``<epoch>.pth`` written by upstream's own EMACallback code from the same average loads with
  --ckpt_path and gives the same results again.
- Units: what a checkpoint without EMA weights, or no checkpoint at all, says.

Run: python -m pytest tests/integration/test_ema.py -q   (in the bevdepth-npu env; ~9 min, 2 cores)
"""
from __future__ import annotations

import importlib.util
import json
import types

import pytest

from tests.conftest import require_source
from bevdepth_npu.testing import assert_same
from tests.integration import _ema_helpers as ema_helpers
from tests.integration import _scripts_helpers as helpers

torch = pytest.importorskip("torch")

TRAIN_ARGS = ["--learning_rate", "0.001", "--max_epochs", "2", "--limit_train_batches", "2",
              "--ckpt_every_n_steps", "1", "--deterministic", "true"]
NON_METRICS = ("eval_time", "evaluated")


def _differing(a, b):
    """Names of the floating-point tensors that differ between two state dicts."""
    return [k for k, v in a.items() if v.dtype.is_floating_point and not torch.equal(v, b[k])]


def _train_samples(data):
    import mmcv
    return len(mmcv.load(str(data / "nuscenes_infos_train.pkl")))


def test_killed_ema_training_resumes_to_the_uninterrupted_result(tmp_path_factory):
    helpers.require_stack()
    from bevdepth_npu.steplog import read_steps
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("ema_resume")
    args = ["--data_root", data, *TRAIN_ARGS]

    reference = out / "reference"
    ema_helpers.run_exp(ema_helpers.TINY_EMA_EXP, [*args, "--default_root_dir", reference],
                        out / "reference.log", ema_helpers.exp_env(threads=2))

    markers = out / "kill_markers"
    markers.mkdir()
    killed = out / "killed"
    env = ema_helpers.exp_env(threads=2, BEVDEPTH_TEST_KILL_AT_STEPS="1,2",
                              BEVDEPTH_TEST_KILL_MARKERS=str(markers))
    last = killed / "checkpoints" / "last.ckpt"
    start = _train_samples(data) * 2      # upstream's starting count: samples x epochs
    for killed_at in (1, 2):
        proc = ema_helpers.run_exp(ema_helpers.TINY_EMA_EXP, [*args, "--default_root_dir", killed],
                                   out / "killed.log", env, check=False)
        assert proc.returncode == -9, proc.stdout[-4000:]
        assert (markers / f"killed_at_step_{killed_at}").is_file()
        # The checkpoint the next attempt resumes from holds the average of its step.
        checkpoint = torch.load(last, map_location="cpu")
        assert checkpoint["global_step"] == killed_at
        assert checkpoint["callbacks"]["EMACallback"]["updates"] == start + killed_at
    proc = ema_helpers.run_exp(ema_helpers.TINY_EMA_EXP, [*args, "--default_root_dir", killed],
                               out / "killed.log", env)
    assert (out / "killed.log").read_text().count(f"resuming from {last}") == 2

    ours = read_steps(killed / "steps.jsonl")
    theirs = read_steps(reference / "steps.jsonl")
    assert [r.step for r in theirs.records] == [1, 2, 3, 4]
    # three processes (two killed), each step logged once
    assert ours.restarts == 2 and ours.duplicates_dropped == 0 and not ours.malformed
    assert [(r.step, r.epoch, r.loss, r.lr) for r in ours.records] == \
        [(r.step, r.epoch, r.loss, r.lr) for r in theirs.records]

    final = torch.load(last, map_location="cpu")
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu")
    assert (final["epoch"], final["global_step"]) == (expected["epoch"], expected["global_step"])
    assert_same(final["state_dict"], expected["state_dict"], "state_dict")
    assert_same(final["optimizer_states"], expected["optimizer_states"], "optimizer_states")
    assert_same(final["lr_schedulers"], expected["lr_schedulers"], "lr_schedulers")
    ema, expected_ema = final["callbacks"]["EMACallback"], expected["callbacks"]["EMACallback"]
    assert expected_ema["updates"] == start + 4
    assert_same(ema, expected_ema, "EMA state")
    # The average is not the weights themselves: the comparison above is not of copies.
    weights = {k[len("model."):]: v for k, v in final["state_dict"].items()}
    assert _differing(ema["ema_state_dict"], weights)
    # Upstream's <epoch>.pth side files are gone: the average lives in the checkpoints.
    assert not list(killed.rglob("*.pth"))


def test_two_ddp_processes_keep_the_same_average(tmp_path_factory):
    helpers.require_stack()
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("ema_ddp")
    dumps = out / "dumps"
    dumps.mkdir()
    env = ema_helpers.exp_env(threads=1, BEVDEPTH_TEST_EMA_DUMP=str(dumps))
    ema_helpers.run_exp(ema_helpers.TINY_EMA_EXP,
                        ["--data_root", data, "--gpus", "2", "--learning_rate", "0.001",
                         "--max_epochs", "1", "--limit_train_batches", "2",
                         "--default_root_dir", out / "run"], out / "ddp.log", env)
    rank0 = torch.load(dumps / "rank0.pt", map_location="cpu")
    rank1 = torch.load(dumps / "rank1.pt", map_location="cpu")
    assert rank0["global_step"] == rank1["global_step"] == 2
    start = _train_samples(data) * 1
    assert rank0["updates"] == rank1["updates"] == start + 2   # once per step on each rank
    assert_same(rank0["ema_state_dict"], rank1["ema_state_dict"], "EMA of rank 1 vs rank 0")
    saved = ema_helpers.ema_state(out / "run" / "checkpoints" / "last.ckpt")
    assert_same(saved["ema_state_dict"], rank0["ema_state_dict"], "checkpoint vs rank 0")
    # Control: the ranks' own weights agree, their BatchNorm statistics (from each rank's own
    # batch) do not; only averaging rank 0's statistics everywhere keeps the ranks together.
    differing = _differing(rank0["model_state_dict"], rank1["model_state_dict"])
    assert differing and all("running_" in name for name in differing), differing


def _upstream_epoch_pth(source, checkpoint, log_dir):
    """Upstream's <epoch>.pth of the checkpoint's average, written by upstream's own
    EMACallback.on_train_epoch_end (loaded from the pristine checkout) from a stand-in trainer
    holding that average."""
    spec = importlib.util.spec_from_file_location("upstream_ema",
                                                  source / "bevdepth" / "callbacks" / "ema.py")
    upstream = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upstream)
    saved = torch.load(checkpoint, map_location="cpu")
    average = saved["callbacks"]["EMACallback"]["ema_state_dict"]
    ema_model = types.SimpleNamespace(ema=types.SimpleNamespace(state_dict=lambda: dict(average)))
    trainer = types.SimpleNamespace(ema_model=ema_model, current_epoch=saved["epoch"],
                                    global_step=saved["global_step"], log_dir=str(log_dir))
    log_dir.mkdir()
    upstream.EMACallback(0).on_train_epoch_end(trainer, None)
    return log_dir / f"{saved['epoch']}.pth"


def _metrics(directory):
    data = json.loads((directory / "metrics_summary.json").read_text())
    return {k: v for k, v in data.items() if k not in NON_METRICS}, data["evaluated"]


def test_evaluating_an_ema_checkpoint_reproduces_the_in_training_metrics(tmp_path_factory):
    helpers.require_stack()
    source = require_source("bevdepth")
    data = helpers.tiny_dataset(tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("ema_eval")
    run = out / "run"
    env = ema_helpers.exp_env(threads=2)
    exp = ema_helpers.SMOKE_EMA_EXP
    common = ["--data_root", data]
    ema_helpers.run_exp(exp, [*common, "--learning_rate", "0.001", "--max_epochs", "1",
                              "--limit_train_batches", "2", "--limit_val_batches", "1.0",
                              "--default_root_dir", run], out / "train.log", env)
    in_training, record = _metrics(run)
    assert record == {"weights": "ema", "global_step": 2,
                      "ema_updates": _train_samples(data) + 2}
    predictions = json.loads((run / "results_nusc.json").read_text())["results"]
    assert sum(len(boxes) for boxes in predictions.values()) > 0   # something to compare

    checkpoint = run / "checkpoints" / "last.ckpt"
    ema_helpers.run_exp(exp, [*common, "-e", "--ckpt_path", checkpoint,
                              "--default_root_dir", out / "eval_ema"], out / "eval.log", env)
    metrics, record = _metrics(out / "eval_ema")
    assert record == {"weights": "ema", "checkpoint": str(checkpoint), "global_step": 2,
                      "ema_updates": _train_samples(data) + 2}
    assert metrics == in_training
    assert (out / "eval_ema" / "results_nusc.json").read_text() == \
        (run / "results_nusc.json").read_text()

    # The trained weights are other weights: other boxes.
    ema_helpers.run_exp(exp, [*common, "-e", "--ckpt_path", checkpoint, "--weights", "model",
                              "--default_root_dir", out / "eval_model"], out / "eval.log", env)
    assert _metrics(out / "eval_model")[1]["weights"] == "model"
    assert json.loads((out / "eval_model" / "results_nusc.json").read_text())["results"] != \
        predictions

    # Upstream's <epoch>.pth of the same average.
    pth = _upstream_epoch_pth(source, checkpoint, out / "upstream_logs")
    assert sorted(torch.load(pth, map_location="cpu")) == ["epoch", "global_step", "state_dict"]
    ema_helpers.run_exp(exp, [*common, "-e", "--ckpt_path", pth,
                              "--default_root_dir", out / "eval_pth"], out / "eval.log", env)
    metrics, record = _metrics(out / "eval_pth")
    assert record["weights"] == "state_dict" and record["checkpoint"] == str(pth)
    assert metrics == in_training
    assert (out / "eval_pth" / "results_nusc.json").read_text() == \
        (run / "results_nusc.json").read_text()


def test_checkpoint_weights_says_what_it_cannot_give(tmp_path):
    helpers.require_stack()
    from bevdepth.callbacks.ema import checkpoint_weights
    from bevdepth.utils.checkpoint_file import CheckpointError
    plain = tmp_path / "plain.ckpt"
    torch.save({"pytorch-lightning_version": "1.6.5", "state_dict": {"model.w": torch.ones(1)},
                "callbacks": {}, "global_step": 3}, plain)
    state, record = checkpoint_weights(str(plain), "model")
    assert list(state) == ["model.w"] and record == {
        "weights": "model", "checkpoint": str(plain), "global_step": 3}
    with pytest.raises(CheckpointError, match="holds no EMA weights.*--weights model"):
        checkpoint_weights(str(plain), "ema")
    not_one = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, not_one)
    with pytest.raises(CheckpointError, match="other.pt: a torch file but not a checkpoint"):
        checkpoint_weights(str(not_one), "ema")


def test_ema_state_restores_into_a_fresh_callback():
    helpers.require_stack()
    from bevdepth.callbacks.ema import EMACallback, ModelEMA
    with pytest.raises(ValueError, match="weights must be one of"):
        EMACallback(weights="raw")
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    callback = EMACallback(10)
    callback.ema_model = ModelEMA(model, 0.999, updates=10)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    callback.ema_model.update(None, model)
    state = callback.state_dict()
    assert state["updates"] == 11
    # A strategy that restores after setup: the average exists when the state arrives.
    fresh = EMACallback(10)
    fresh.ema_model = ModelEMA(torch.nn.Sequential(torch.nn.Linear(3, 3),
                                                   torch.nn.BatchNorm1d(3)), 0.999)
    fresh.load_state_dict(state)
    assert_same(fresh.state_dict(), state, "restored EMA state")
    with pytest.raises(ValueError, match="version"):
        EMACallback().load_state_dict({"version": 99})
