"""The smoke experiment at test sizes, for the script, resume and DDP tests.

    python tiny_exp.py [experiment flags]     (same command line as any BEVDepth experiment)

It is bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py (same model class, data
pipeline, losses, head, evaluation, optimizer and schedule) with smaller tensors, because a smoke
step takes 8-25 s on the 2-core CI machine and these tests run about thirty training and
evaluation processes: 64x192 input instead of 128x352, 28 depth bins instead of 56, 16 camera
channels instead of 32 and a 32x32 BEV grid (3.2 m cells) instead of 64x64.

Fault injection for the resume tests (off unless set; never part of the shipped tree):
BEVDEPTH_TEST_KILL_AT_STEPS=3,6 and BEVDEPTH_TEST_KILL_MARKERS=DIR make the process SIGKILL
itself at the start of the first batch after global step 3 (then 6), once per step: a marker
file in DIR remembers each kill, so rerunning the very same command continues past it.
"""
import copy
import os
import signal

from pytorch_lightning.callbacks import Callback

from bevdepth.exps.base_cli import run_cli
from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
from bevdepth.models.base_bev_depth import BaseBEVDepth

final_dim = (64, 192)
resize_lim = (0.105, 0.15)      # the recipe's range scaled by 192 / 704
camera_channels = 16
bev_base_channels = 16
bev_neck_channels = 16
bev_cell_m = 3.2
out_size_factor = 16            # 0.2 m voxels x 16 = 3.2 m cells: 32 cells a side

backbone_conf = copy.deepcopy(smoke.backbone_conf)
backbone_conf.update(
    x_bound=[-51.2, 51.2, bev_cell_m],
    y_bound=[-51.2, 51.2, bev_cell_m],
    d_bound=[2.0, 58.0, 2.0],
    final_dim=final_dim,
    output_channels=camera_channels,
    img_neck_conf=dict(smoke.backbone_conf['img_neck_conf'], out_channels=[16, 16, 16, 16]),
    depth_net_conf=dict(in_channels=64, mid_channels=32),
)
ida_aug_conf = copy.deepcopy(smoke.ida_aug_conf)
ida_aug_conf.update(final_dim=final_dim, resize_lim=resize_lim)
head_conf = copy.deepcopy(smoke.head_conf)
head_conf['bev_backbone_conf'].update(base_channels=bev_base_channels)
head_conf['bev_neck_conf'].update(out_channels=[bev_neck_channels] * 4)
head_conf['in_channels'] = bev_neck_channels * 4
for key in ('bbox_coder', 'train_cfg', 'test_cfg'):
    head_conf[key].update(out_size_factor=out_size_factor)


class KillAtSteps(Callback):
    """SIGKILL this process at the first batch after each listed global step, once each."""

    def __init__(self, steps, marker_dir):
        self.steps = steps
        self.marker_dir = marker_dir

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, unused=0):
        step = trainer.global_step
        if step not in self.steps:
            return
        marker = os.path.join(self.marker_dir, f'killed_at_step_{step}')
        if os.path.exists(marker):
            return
        with open(marker, 'w') as handle:
            handle.write(f'{os.getpid()}\n')
        os.kill(os.getpid(), signal.SIGKILL)


class BEVDepthLightningModel(smoke.BEVDepthLightningModel):

    def __init__(self, **kwargs):
        kwargs.setdefault('backbone_conf', copy.deepcopy(backbone_conf))
        kwargs.setdefault('head_conf', copy.deepcopy(head_conf))
        kwargs.setdefault('ida_aug_conf', copy.deepcopy(ida_aug_conf))
        super().__init__(**kwargs)
        bev_in_channels = camera_channels * (len(self.key_idxes) + 1)
        self.head_conf['bev_backbone_conf']['in_channels'] = bev_in_channels
        self.head_conf['bev_neck_conf']['in_channels'] = [
            bev_in_channels, bev_base_channels, bev_base_channels * 2, bev_base_channels * 4]
        self.model = BaseBEVDepth(self.backbone_conf, self.head_conf, is_train_depth=True)

    def configure_callbacks(self):
        steps = os.environ.get('BEVDEPTH_TEST_KILL_AT_STEPS', '')
        if not steps:
            return []
        return [KillAtSteps({int(s) for s in steps.split(',')},
                            os.environ['BEVDEPTH_TEST_KILL_MARKERS'])]


if __name__ == '__main__':
    run_cli(BEVDepthLightningModel, 'tiny_exp')
