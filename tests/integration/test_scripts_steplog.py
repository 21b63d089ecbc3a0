"""The step-log callback of the patched BEVDepth tree writes what bevdepth-npu reads.

bevdepth/callbacks/step_log.py cannot import bevdepth_npu (the BEVDepth tree runs without it),
so it writes the steps.jsonl records itself; here its records, from a real Lightning 1.6.5 fit,
go through bevdepth_npu.steplog.read_steps and must come back as the values the run had, and
the human line per step still goes to the stream.

Run: python -m pytest tests/integration/test_scripts_steplog.py -q   (in the bevdepth-npu env)
"""
from __future__ import annotations

import io
import json
import math

import pytest

from bevdepth_npu import steplog
from tests.integration import _bevdepth_helpers

torch = pytest.importorskip("torch", reason=_bevdepth_helpers.ENV_REASON)
pl = pytest.importorskip("pytorch_lightning", reason=_bevdepth_helpers.ENV_REASON)
step_log = pytest.importorskip("bevdepth.callbacks.step_log",
                               reason="needs the patched BEVDepth tree: bevdepth-npu env")

BATCH = 4
FRAMES, CAMERAS = 2, 6


class ToyCameras(torch.utils.data.Dataset):
    """Samples shaped like BEVDepth's: (frames, cameras, 3, H, W) images and a target."""

    def __len__(self):
        return 3 * BATCH

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return (torch.rand(FRAMES, CAMERAS, 3, 4, 4, generator=generator),
                torch.rand(1, generator=generator))


class ToyModel(pl.LightningModule):

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(FRAMES * CAMERAS * 3 * 16, 1)
        self.losses = []
        self.lrs = []

    def training_step(self, batch, batch_idx):
        images, target = batch
        loss = torch.nn.functional.mse_loss(self.layer(images.flatten(1)), target)
        self.losses.append(float(loss))
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], 0.5)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(ToyCameras(), batch_size=BATCH)


def _fit(tmp_path, accumulate=1, model=None, max_epochs=2, max_steps=-1):
    stream = io.StringIO()
    model = model or ToyModel()
    trainer = pl.Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path),
                         accumulate_grad_batches=accumulate,
                         callbacks=[step_log.StepLogCallback(stream=stream)])
    trainer.fit(model)
    return model, stream.getvalue()


def test_records_of_a_lightning_fit_read_back(tmp_path):
    model, text = _fit(tmp_path)
    lines = text.splitlines()
    assert len(lines) == 6 and all(line.startswith("BEVDEPTH_STEP step=") for line in lines)
    log = steplog.read_steps(tmp_path / "steps.jsonl")
    assert not log.malformed and log.restarts == 0
    assert [r.step for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert [r.process_step for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert [r.epoch for r in log.records] == [0, 0, 0, 1, 1, 1]
    assert [r.loss for r in log.records] == pytest.approx(model.losses, rel=1e-6)
    # The learning rate the step used: halved by the scheduler after epoch 0.
    assert [r.lr for r in log.records] == pytest.approx(model.lrs)
    assert model.lrs == [0.01] * 3 + [0.005] * 3
    assert all(r.global_batch == BATCH for r in log.records)
    assert all(r.images_per_sample == FRAMES * CAMERAS for r in log.records)
    assert all(r.total_steps == 6 for r in log.records)
    assert all(r.step_time_s > 0 and 0 <= r.data_time_s <= r.step_time_s for r in log.records)
    times = [r.time_s for r in log.records]
    assert times == sorted(times) and times[0] > 1.6e9
    # The human line carries the same numbers.
    assert lines[0].split()[1:3] == ["step=1", "epoch=0"]


def test_gradient_accumulation_logs_optimizer_steps(tmp_path):
    _fit(tmp_path, accumulate=3)
    log = steplog.read_steps(tmp_path / "steps.jsonl")
    assert not log.malformed
    assert [r.step for r in log.records] == [1, 2]   # 2 epochs of 3 batches, 1 update each
    assert [r.epoch for r in log.records] == [0, 1]
    assert all(r.total_steps == 2 for r in log.records)
    assert all(0 <= r.data_time_s <= r.step_time_s for r in log.records)


@pytest.mark.parametrize("max_epochs, max_steps, total", [(-1, 7, 7), (5, 4, 4), (-1, -1, None)])
def test_total_steps_is_what_ends_the_fit(tmp_path, max_epochs, max_steps, total):
    """The smoke run trains with --max_steps N --max_epochs -1: N steps, whatever the epochs."""
    if total is None:   # nothing bounds the fit: stop it after two epochs from the model
        model = ToyModel()
        model.training_epoch_end = lambda outputs: setattr(
            model.trainer, "should_stop", model.trainer.current_epoch >= 1)
        _fit(tmp_path, model=model, max_epochs=max_epochs, max_steps=max_steps)
    else:
        _fit(tmp_path, max_epochs=max_epochs, max_steps=max_steps)
    records = steplog.read_steps(tmp_path / "steps.jsonl").records
    assert records and all(r.total_steps == total for r in records)
    if total is not None:
        assert records[-1].step == total


class Diverging(ToyModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.inf if batch_idx == 1 else loss


def test_a_second_run_appends_after_a_cut_line_and_a_nan_loss_is_null(tmp_path):
    steps = tmp_path / "steps.jsonl"
    steps.write_text('{"step": 1, "epoch": 0, "step_ti')   # a crash mid-line
    _fit(tmp_path, model=Diverging())
    raw = steps.read_text().splitlines()
    assert raw[0] == '{"step": 1, "epoch": 0, "step_ti' and len(raw) == 7
    assert json.loads(raw[2])["loss"] is None      # strict JSON: no NaN/Infinity tokens
    log = steplog.read_steps(steps)
    assert [m.line_no for m in log.malformed] == [1]
    assert [r.step for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert math.isnan(log.records[1].loss)
