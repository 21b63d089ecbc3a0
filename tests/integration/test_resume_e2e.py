"""Resume after SIGKILL: the same training command continues, and ends exactly where an
uninterrupted run ends.

test/train_performance_8p.sh trains the smoke experiment at test sizes (2 epochs of 2 steps,
checkpoint every step) in a deterministic CPU configuration: one process, no loader workers,
fp32, deterministic algorithms, seed 0. The process kills itself with SIGKILL (fault injection of
tests/integration/_scripts_helpers/tiny_exp.py) after step 1 (mid-epoch checkpoint) and after
step 2 (end-of-epoch checkpoint); the very same command is rerun after each kill. Every step's
loss and learning rate, and the final weights, optimizer, scheduler, epoch and step, must equal
those of an uninterrupted run. Data augmentation (numpy) and dropout (torch) draw random numbers
in every step, so a resume that lost the generator states or the position in the epoch differs.

Run: python -m pytest tests/integration/test_resume_e2e.py -q   (in the bevdepth-npu env; ~2 min)
"""
from __future__ import annotations

import pytest

from bevdepth_npu.testing import assert_same
from tests.integration import _scripts_helpers as helpers

torch = pytest.importorskip("torch")

SETTINGS = dict(CARDS=1, EPOCHS=2, CKPT_EVERY_N_STEPS=1, OMP_NUM_THREADS=2)
ARGS = ["--", *helpers.EXP_ARGS, "--limit_train_batches", "2", "--deterministic", "true"]


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path_factory):
    helpers.require_stack()
    from bevdepth_npu.steplog import read_steps
    base = tmp_path_factory.getbasetemp()
    data = helpers.tiny_dataset(base)
    out = tmp_path_factory.mktemp("resume")

    reference_env = helpers.script_env(out / "reference", data, **SETTINGS)
    helpers.run_script("train_performance_8p.sh", reference_env, ARGS)
    (reference,) = helpers.run_dirs(out / "reference")

    markers = out / "kill_markers"
    markers.mkdir()
    env = helpers.script_env(out / "killed", data, BEVDEPTH_TEST_KILL_AT_STEPS="1,2",
                             BEVDEPTH_TEST_KILL_MARKERS=str(markers), **SETTINGS)
    for killed_at in (1, 2):
        proc = helpers.run_script("train_performance_8p.sh", env, ARGS, check=False)
        assert proc.returncode == 137, proc.stdout[-4000:]   # the training's own status
        assert "training failed (exit 137)" in proc.stdout
        assert (markers / f"killed_at_step_{killed_at}").is_file()
    proc = helpers.run_script("train_performance_8p.sh", env, ARGS)
    assert "continuing the unfinished run" in proc.stdout

    (run_dir,) = helpers.run_dirs(out / "killed")   # one run directory for all three attempts
    run = helpers.read_json(run_dir / "run.json")
    assert run["status"] == "completed"
    last = str(run_dir / "checkpoints" / "last.ckpt")
    assert [a["resume"] for a in run["attempts"]] == ["none", last, last]
    assert [a["train_exit_code"] for a in run["attempts"]] == [137, 137, 0]
    log_text = (run_dir / "train_0.log").read_text()
    assert log_text.count(f"resuming from {last}") == 2

    # Step by step the same losses and learning rates: each process run picked up at the
    # right batch with the right random state.
    ours = read_steps(run_dir / "steps.jsonl")
    theirs = read_steps(reference / "steps.jsonl")
    assert [r.step for r in theirs.records] == [1, 2, 3, 4]
    # Step numbers go on after a resume: no step is repeated or skipped; each of the three
    # processes logged its own steps (and warms up again in the figures).
    assert ours.duplicates_dropped == 0 and not ours.malformed
    assert ours.restarts == 2 and [r.process_step for r in ours.records] == [1, 1, 1, 2]
    assert [(r.step, r.epoch, r.loss, r.lr) for r in ours.records] == \
        [(r.step, r.epoch, r.loss, r.lr) for r in theirs.records]

    # And the final state, bit for bit.
    final = torch.load(last, map_location="cpu")
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu")
    assert (final["epoch"], final["global_step"]) == (expected["epoch"], expected["global_step"])
    assert_same(final["state_dict"], expected["state_dict"], "state_dict")
    assert_same(final["optimizer_states"], expected["optimizer_states"], "optimizer_states")
    assert_same(final["lr_schedulers"], expected["lr_schedulers"], "lr_schedulers")
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
