"""Pieces of resume in the patched BEVDepth tree, without training: atomic checkpoint writes under
SIGKILL, the resumable training sampler, resolving --resume, the rank-order merge of evaluation.

Run: python -m pytest tests/integration/test_resume_units.py -q   (in the bevdepth-npu env)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.integration import _bevdepth_helpers

torch = pytest.importorskip("torch", reason=_bevdepth_helpers.ENV_REASON)
np = pytest.importorskip("numpy", reason=_bevdepth_helpers.ENV_REASON)
checkpoint_io = pytest.importorskip("bevdepth.utils.checkpoint_io",
                                    reason="needs the patched BEVDepth tree: bevdepth-npu env")
resume = pytest.importorskip("bevdepth.callbacks.resume",
                             reason="needs the patched BEVDepth tree: bevdepth-npu env")

# A checkpoint whose pickling blocks after the file was opened: the writer is killed mid-save.
SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    from bevdepth.utils.checkpoint_io import atomic_torch_save

    class Slow:
        def __reduce__(self):
            print("saving", flush=True)
            time.sleep(120)
            return (int, (0,))

    obj = {"weights": torch.full((1000,), 2.0), "slow": Slow()}
    if sys.argv[2] == "atomic":
        atomic_torch_save(obj, sys.argv[1])
    else:
        torch.save(obj, sys.argv[1])
""")


def _kill_while_saving(path, how):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path), how],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert proc.stdout.readline() == "saving\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return proc.pid


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    checkpoint_io.atomic_torch_save({"weights": torch.full((1000,), 1.0)}, str(target))
    pid = _kill_while_saving(target, "atomic")
    assert torch.equal(torch.load(target)["weights"], torch.full((1000,), 1.0))
    assert (tmp_path / f".last.ckpt.tmp-{pid}").exists()   # the dead writer's leftover
    # The next save replaces the checkpoint and clears the leftover.
    checkpoint_io.atomic_torch_save({"weights": torch.full((1000,), 3.0)}, str(target))
    assert torch.equal(torch.load(target)["weights"], torch.full((1000,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_same_kill_breaks_a_plain_torch_save(tmp_path):
    """Control: the scenario above really interrupts a save that is not atomic."""
    target = tmp_path / "last.ckpt"
    torch.save({"weights": torch.full((1000,), 1.0)}, target)
    _kill_while_saving(target, "plain")
    with pytest.raises(Exception):
        torch.load(target)


def test_lightning_saves_through_the_atomic_plugin(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    plugin = checkpoint_io.AtomicCheckpointIO()
    trainer = pl.Trainer(plugins=[plugin], logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path))
    assert trainer.strategy.checkpoint_io is plugin
    plugin.save_checkpoint({"epoch": 3}, tmp_path / "sub" / "x.ckpt")
    assert torch.load(tmp_path / "sub" / "x.ckpt") == {"epoch": 3}
    with pytest.raises(TypeError, match="storage_options"):
        plugin.save_checkpoint({}, tmp_path / "y.ckpt", storage_options={"a": 1})


def test_resolve_resume(tmp_path):
    root = tmp_path / "run"
    assert checkpoint_io.resolve_resume("auto", str(root)) is None
    assert checkpoint_io.resolve_resume(None, str(root)) is None
    (root / "checkpoints").mkdir(parents=True)
    last = root / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert checkpoint_io.resolve_resume("auto", str(root)) == str(last)
    assert checkpoint_io.resolve_resume("none", str(root)) is None
    assert checkpoint_io.resolve_resume(str(root), "elsewhere") == str(last)
    assert checkpoint_io.resolve_resume(str(last), "elsewhere") == str(last)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        checkpoint_io.resolve_resume(str(tmp_path / "nope.ckpt"), str(root))
    with pytest.raises(ValueError, match="holds no last.ckpt"):
        checkpoint_io.resolve_resume(str(tmp_path), "elsewhere")


class Counting(torch.utils.data.Dataset):
    """Each item draws from numpy, like BEVDepth's augmentation."""

    def __len__(self):
        return 11

    def __getitem__(self, index):
        return index, float(np.random.uniform())


def test_sampler_orders_like_lightning():
    from torch.utils.data.distributed import DistributedSampler
    data = Counting()
    assert list(resume.ResumableSampler(data, 2, num_replicas=1, rank=0)) == list(range(11))
    for rank in (0, 1):
        ours = resume.ResumableSampler(data, 2, num_replicas=2, rank=rank, seed=7)
        theirs = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


def test_sampler_starts_an_epoch_at_a_batch_with_the_states_from_before_it():
    data = Counting()
    sampler = resume.ResumableSampler(data, 3, num_replicas=1, rank=0)
    loader = torch.utils.data.DataLoader(data, batch_size=3, sampler=sampler, drop_last=True)
    np.random.seed(1)
    first = list(loader)
    assert [b[0].tolist() for b in first] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    before_batch_2 = sampler.host_rng_before(2)
    # A resumed epoch: start at batch 2 from the generator states recorded before it.
    np.random.seed(99)
    resume.set_host_rng_state(before_batch_2)
    sampler.start_next_epoch_at(2)
    resumed = list(loader)
    assert len(resumed) == 1
    assert resumed[0][0].tolist() == [6, 7, 8]
    assert resumed[0][1].tolist() == first[2][1].tolist()   # the same augmentation draws
    # The start applies to one epoch only.
    assert [b[0].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert sampler.host_rng_before(2) is not None and sampler.host_rng_before(7) is None


def test_sampler_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        resume.ResumableSampler(Counting(), 0, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="batch"):
        resume.ResumableSampler(Counting(), 1, num_replicas=1, rank=0).start_next_epoch_at(-1)


@pytest.mark.parametrize("size,world", [(5, 2), (6, 2), (7, 3), (1, 2), (8, 8), (3, 4)])
def test_rank_merge_restores_dataset_order_exactly_once(size, world):
    """What base_cli.interleave_ranks and base_exp's test_epoch_end do with the gathered
    per-rank results, for Lightning's padded (test) and unpadded (predict) samplers."""
    from torch.utils.data.distributed import DistributedSampler
    from bevdepth.exps.base_cli import interleave_ranks
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
    data = list(range(size))
    padded = [list(DistributedSampler(data, world, r, shuffle=False)) for r in range(world)]
    assert interleave_ranks(padded, size) == data
    if size >= world:   # Lightning's unpadded sampler needs a sample for every rank
        unpadded = [list(UnrepeatedDistributedSampler(data, world, r, shuffle=False))
                    for r in range(world)]
        assert interleave_ranks(unpadded, size) == data
    # base_exp.test_epoch_end: the upstream expression, right for the padded sampler.
    assert sum(map(list, zip(*padded)), [])[:size] == data
