"""Probe for tests/integration/test_lightning_patch.py and test_npu_startup.py: a tiny model
trained with the patched Lightning 1.6.5 (torch 2 MultiStepLR, optional DDP on CPU). It starts
the way a BEVDepth experiment does (``bevdepth.utils.device.start``, with core binding for
training unless --evaluate) and records the CPU affinity of every thread of each rank during fit
or validate into OUT_DIR/affinity_<fn>_<rank>.json. Like an experiment's command line, it ends the
process group when the run is over (bevdepth.utils.torch_dist.end_gloo_process_group).

    python lightning_probe.py OUT_DIR [--ddp N] [--evaluate]
"""
import argparse
import json
import os
import threading
import time
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
        # every thread: binding only the calling one would leave the others on every core
        threads = {tid: sorted(os.sched_getaffinity(int(tid)))
                   for tid in os.listdir("/proc/self/task")}
        path = self.out_dir / f"affinity_{fn}_{self.global_rank}.json"
        path.write_text(json.dumps(threads))

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
    ap.add_argument("--evaluate", action="store_true", help="validate only (no binding)")
    args = ap.parse_args()
    from bevdepth.utils import device
    device.start("cpu", bind=not args.evaluate, local_world_size=max(args.ddp, 1))
    # a thread that exists before the first training step, like the loader's pin-memory thread
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = DataLoader(data, batch_size=4)
    kwargs = dict(max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, default_root_dir=str(args.out_dir))
    if args.ddp:
        kwargs.update(accelerator="cpu", devices=args.ddp, strategy="ddp")
    trainer = pl.Trainer(**kwargs)
    model = Probe(args.out_dir)
    if args.evaluate:
        trainer.validate(model, loader)
    else:
        trainer.fit(model, loader, loader)
    from bevdepth.utils.torch_dist import end_gloo_process_group
    end_gloo_process_group()
    if trainer.global_rank == 0 and not args.evaluate:
        (args.out_dir / "lr.json").write_text(json.dumps(trainer.optimizers[0].param_groups[0]["lr"]))


if __name__ == "__main__":
    main()
