"""The step-log callback of the patched BEVDepth tree writes what bevdepth-npu parses.

bevdepth/callbacks/step_log.py cannot import bevdepth_npu (the BEVDepth tree runs without it),
so it writes the format itself; here its lines, from a real Lightning 1.6.5 fit, go through
bevdepth_npu.steplog.parse_step_lines and must come back as the values the run had.

Run: python -m pytest tests/integration/test_scripts_steplog.py -q   (in the bevdepth-npu env)
"""
from __future__ import annotations

import io
import math
import random

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


def _fit(tmp_path, accumulate=1):
    stream = io.StringIO()
    model = ToyModel()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         accumulate_grad_batches=accumulate,
                         callbacks=[step_log.StepLogCallback(stream=stream)])
    trainer.fit(model)
    return model, stream.getvalue()


def test_lines_of_a_lightning_fit_parse_back(tmp_path):
    model, text = _fit(tmp_path)
    lines = text.splitlines(keepends=True)
    assert len(lines) == 6 and all(line.startswith("BEVDEPTH_STEP ") for line in lines)
    log = steplog.parse_step_lines(lines)
    assert not log.malformed and log.restarts == 0
    assert [r.step for r in log.records] == [1, 2, 3, 4, 5, 6]
    assert [r.epoch for r in log.records] == [0, 0, 0, 1, 1, 1]
    assert [r.loss for r in log.records] == pytest.approx(model.losses, rel=1e-5)
    # The learning rate the step used: halved by the scheduler after epoch 0.
    assert [r.lr for r in log.records] == pytest.approx(model.lrs)
    assert model.lrs == [0.01] * 3 + [0.005] * 3
    assert all(r.global_batch == BATCH for r in log.records)
    assert all(r.images_per_sample == FRAMES * CAMERAS for r in log.records)
    assert all(r.step_time_s > 0 and 0 <= r.data_time_s <= r.step_time_s for r in log.records)


def test_gradient_accumulation_logs_optimizer_steps(tmp_path):
    model, text = _fit(tmp_path, accumulate=3)
    assert len(text.splitlines()) == 2
    log = steplog.parse_step_lines(text.splitlines(keepends=True))
    assert not log.malformed
    assert [r.step for r in log.records] == [1, 2]   # 2 epochs of 3 batches, 1 update each
    assert [r.epoch for r in log.records] == [0, 1]
    assert all(0 <= r.data_time_s <= r.step_time_s for r in log.records)


def test_same_text_as_the_helper_for_any_values():
    rng = random.Random(5)
    cases = [dict(step=1, epoch=0, step_time_s=1e-9, data_time_s=0.0, loss=math.nan, lr=0.0,
                  global_batch=1, images_per_sample=1),
             dict(step=10536, epoch=23, step_time_s=1.98234567, data_time_s=0.0123456789,
                  loss=-math.inf, lr=3.125e-06, global_batch=64, images_per_sample=12)]
    for _ in range(200):
        cases.append(dict(step=rng.randint(1, 10**7), epoch=rng.randint(0, 500),
                          step_time_s=10 ** rng.uniform(-6, 4), data_time_s=10 ** rng.uniform(-9, 3),
                          loss=rng.choice([1, -1]) * 10 ** rng.uniform(-8, 8),
                          lr=10 ** rng.uniform(-12, 0), global_batch=rng.randint(1, 4096),
                          images_per_sample=rng.randint(1, 60)))
    for values in cases:
        ours = step_log.format_step_line(**values)
        assert ours == steplog.format_step_line(**values)
        parsed = steplog.parse_step_line(ours + "\n")
        assert parsed.step == values["step"] and parsed.global_batch == values["global_batch"]
