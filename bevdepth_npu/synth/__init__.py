"""Synthetic nuScenes generator: a small, learnable dataset in the real v1.0-mini layout
(or v1.0-trainval's, past ten scenes).

Six cameras (1600x900 JPEG), LIDAR_TOP point clouds and 3-D boxes of the ten detection classes,
rendered from one simple world so that images, depth from lidar, boxes and velocities agree; the
nuScenes devkit, its detection evaluation and BEVDepth's gen_info read it unchanged.

    bevdepth-npu synth --out data/nuScenes-synth            # command line
    python -m bevdepth_npu.synth --out data/nuScenes-synth  # same, without the front end
    from bevdepth_npu.synth import generate                  # Python: returns a summary dict

Modules: taxonomy (defaults, sensors, classes), geometry, world (scene planning), sensors
(rendering and ray casting), dataset (tables and files), command (argparse front end).
This module stays light: numpy and Pillow load on the first call to ``generate``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from bevdepth_npu.synth import taxonomy as _tx
from bevdepth_npu.synth.command import add_arguments, run

__all__ = ["add_arguments", "run", "generate"]


def generate(out_dir: str, scenes: int = _tx.DEFAULT_SCENES,
             samples_per_scene: int = _tx.DEFAULT_SAMPLES_PER_SCENE, sweeps: int = _tx.DEFAULT_SWEEPS,
             seed: int = _tx.DEFAULT_SEED, *, force: bool = False, workers: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None, version: str = _tx.MINI,
             val_scenes: Optional[int] = None) -> Dict[str, object]:
    """Write the dataset into ``out_dir``; see ``bevdepth_npu.synth.dataset.generate``."""
    from bevdepth_npu.synth.dataset import generate as _generate
    return _generate(out_dir, scenes, samples_per_scene, sweeps, seed, force=force,
                     workers=workers, progress=progress, version=version, val_scenes=val_scenes)
