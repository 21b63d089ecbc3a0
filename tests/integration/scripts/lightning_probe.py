"""Probe for tests/integration/test_lightning_patch.py: a tiny model trained with the patched
Lightning 1.6.5 (torch 2 MultiStepLR, optional DDP on CPU), recording each rank's CPU affinity
during fit and during validate into OUT_DIR/affinity_<fn>_<rank>.json.

    python lightning_probe.py OUT_DIR [--ddp N]
"""
import argparse
import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class Probe(pl.LightningModule):
    def __init__(self, out_dir: Path):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.out_dir = out_dir

    def _record(self, fn: str) -> None:
        path = self.out_dir / f"affinity_{fn}_{self.global_rank}.json"
        path.write_text(json.dumps(sorted(os.sched_getaffinity(0))))

    def on_train_start(self) -> None:
        self._record("fit")

    def on_validation_start(self) -> None:
        if not self.trainer.training and self.trainer.state.fn == "validate":
            self._record("validate")

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, [1])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--ddp", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = DataLoader(data, batch_size=4)
    kwargs = dict(max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, default_root_dir=str(args.out_dir))
    if args.ddp:
        kwargs.update(accelerator="cpu", devices=args.ddp, strategy="ddp")
    trainer = pl.Trainer(**kwargs)
    model = Probe(args.out_dir)
    trainer.fit(model, loader, loader)
    trainer.validate(model, loader)
    if trainer.global_rank == 0:
        (args.out_dir / "lr.json").write_text(json.dumps(trainer.optimizers[0].param_groups[0]["lr"]))


if __name__ == "__main__":
    main()
