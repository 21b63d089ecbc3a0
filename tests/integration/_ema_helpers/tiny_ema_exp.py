"""The test-sized smoke experiment (tests/integration/_scripts_helpers/tiny_exp.py) with the EMA
callback, for the EMA resume and DDP tests.

    PYTHONPATH=<bevdepth-npu checkout> python tiny_ema_exp.py [experiment flags]

Besides tiny_exp's fault injection (BEVDEPTH_TEST_KILL_AT_STEPS, BEVDEPTH_TEST_KILL_MARKERS),
BEVDEPTH_TEST_EMA_DUMP=DIR makes every rank save, at the end of training, its moving average, its
update count and its own model weights to DIR/rank<R>.pt: only rank 0 writes checkpoints, and
the DDP test compares what each rank holds. Never part of the shipped tree.
"""
import os

import torch
from pytorch_lightning.callbacks import Callback

from bevdepth.exps.base_cli import run_cli
from tests.integration._scripts_helpers import tiny_exp


class DumpEMA(Callback):
    """Save this rank's average and model weights when training ends."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        ema = trainer.ema_model
        state = {'ema_state_dict': ema.ema.state_dict(), 'updates': ema.updates,
                 'model_state_dict': pl_module.model.state_dict(),
                 'global_step': trainer.global_step}
        torch.save(state, os.path.join(self.directory, f'rank{trainer.global_rank}.pt'))


class BEVDepthLightningModel(tiny_exp.BEVDepthLightningModel):

    def configure_callbacks(self):
        callbacks = list(super().configure_callbacks())
        if os.environ.get('BEVDEPTH_TEST_EMA_DUMP'):
            callbacks.append(DumpEMA(os.environ['BEVDEPTH_TEST_EMA_DUMP']))
        return callbacks


if __name__ == '__main__':
    run_cli(BEVDepthLightningModel, 'tiny_ema_exp', use_ema=True)
