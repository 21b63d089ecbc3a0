"""Run an experiment with one piece of the training geometry broken on purpose.

    python -m bench.ablation --break rotation-geometry EXPERIMENT.py [EXPERIMENT ARGS...]
    python -m bench.ablation --break flip-geometry EXPERIMENT.py [EXPERIMENT ARGS...]
    python -m bench.ablation --break augmentation-geometry EXPERIMENT.py [EXPERIMENT ARGS...]
    python -m bench.ablation --break depth-shift --depth-shift-m 2 EXPERIMENT.py [ARGS...]
    python -m bench.ablation --break no-depth-labels EXPERIMENT.py [EXPERIMENT ARGS...]

The held-out learning check (``python -m bench.learning_check --held-out --ablation ...``) trains
through this wrapper to show that its held-out mAP falls when the port's geometry is wrong, as it
would if a change to the loader or to ``get_geometry`` broke it; the train-sample check alone
survives such breaks by memorising. The breaks replace functions of
``bevdepth.datasets.nusc_det_dataset`` in this process (the data loader's forked workers inherit
them), then run the experiment file as ``__main__`` with the remaining arguments:

  rotation-geometry  the image augmentation rotates the image (and, as before, the depth labels
                     drawn on it) but the matrix that ``get_geometry`` receives leaves the
                     rotation out: the lift puts image features where the rotated pixels are not.
  flip-geometry      the same with the augmentation's horizontal flip (half the training
                     images): the matrix leaves the flip out, so the lift mirrors those images'
                     features within each camera's view.
  augmentation-geometry
                     the whole image augmentation (resize, crop, flip, rotation) on the image
                     and its depth labels, and the matrix of the evaluation's fixed resize and
                     crop given to ``get_geometry``: the loader as if it forgot to pass the
                     augmentation's matrix on.
  depth-shift        every depth label is ``--depth-shift-m`` metres deeper than the lidar says
                     (1 m is one depth bin of the smoke experiment).
  no-depth-labels    no depth label at all, as a loader that lost the lidar would give: the
                     depth loss sees no foreground pixel, and only the detection loss, through
                     the lift, trains the depth net. What depth supervision is worth: a shift
                     that pushes labels past the last bin drops them, tending to this.

Evaluation never augments, and never reads depth labels, so it runs the experiment unbroken.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from typing import Callable, Optional, Sequence

BREAKS = ("rotation-geometry", "flip-geometry", "augmentation-geometry", "depth-shift",
          "no-depth-labels")


def _matrix_from(dataset_module, matrix_params: Callable) -> None:
    """``img_transform`` returns the augmented image with the matrix of
    ``matrix_params(resize, resize_dims, crop, flip, rotate)`` instead of its own."""
    from PIL import Image

    original = dataset_module.img_transform
    blank = Image.new("RGB", (1, 1))

    def img_transform(img, resize, resize_dims, crop, flip, rotate):
        image, _ = original(img, resize, resize_dims, crop, flip, rotate)
        # The matrix depends on the parameters only: take it from a 1x1 image.
        _, ida_mat = original(blank, *matrix_params(resize, resize_dims, crop, flip, rotate))
        return image, ida_mat

    dataset_module.img_transform = img_transform


def break_rotation_geometry(dataset_module) -> None:
    """``img_transform`` returns the rotated image with the matrix of rotation 0."""
    _matrix_from(dataset_module, lambda resize, dims, crop, flip, rotate:
                 (resize, dims, crop, flip, 0))


def break_flip_geometry(dataset_module) -> None:
    """``img_transform`` returns the flipped image with the matrix of no flip."""
    _matrix_from(dataset_module, lambda resize, dims, crop, flip, rotate:
                 (resize, dims, crop, False, rotate))


def break_augmentation_geometry(dataset_module) -> None:
    """``img_transform`` returns the augmented image with the matrix of the evaluation's
    transform: ``NuscDetDataset.sample_ida_augmentation`` draws the training augmentation as
    before and also keeps what it returns with ``is_train`` off, which the next
    ``img_transform`` calls (those of the same camera, every sweep) use for the matrix."""
    dataset_cls = dataset_module.NuscDetDataset
    original_sample = dataset_cls.sample_ida_augmentation
    evaluation = {}

    def sample_ida_augmentation(self):
        drawn = original_sample(self)
        is_train, self.is_train = self.is_train, False
        try:
            evaluation["params"] = original_sample(self)
        finally:
            self.is_train = is_train
        return drawn

    dataset_cls.sample_ida_augmentation = sample_ida_augmentation
    _matrix_from(dataset_module, lambda *drawn: evaluation["params"])


def shifted(load: Callable, shift_m: float) -> Callable:
    """``load`` with the depth column (the last of its rows) ``shift_m`` metres deeper."""

    def load_shifted(*args, **kwargs):
        rows = load(*args, **kwargs).copy()
        rows[:, -1] += shift_m
        return rows

    return load_shifted


def emptied(load: Callable) -> Callable:
    """``load`` with none of its rows."""

    def load_empty(*args, **kwargs):
        return load(*args, **kwargs)[:0].copy()

    return load_empty


def _depth_labels_through(dataset_module, change: Callable) -> None:
    """Depth labels, precomputed (``load_depth_gt``) or projected on the fly, through ``change``."""
    dataset_module.load_depth_gt = change(dataset_module.load_depth_gt)
    dataset_module.project_lidar_depth = change(dataset_module.project_lidar_depth)


def break_depth_labels(dataset_module, shift_m: float) -> None:
    """Every depth label ``shift_m`` deeper."""
    _depth_labels_through(dataset_module, lambda load: shifted(load, shift_m))


def drop_depth_labels(dataset_module) -> None:
    """No depth label at all."""
    _depth_labels_through(dataset_module, emptied)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--break", dest="broken", choices=BREAKS, required=True,
                   help="what to break (see the module's docstring)")
    p.add_argument("--depth-shift-m", type=float, default=1.0,
                   help="depth-shift: metres added to every depth label (default %(default)s)")
    p.add_argument("experiment", help="experiment file to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the experiment's own arguments")
    return p


def apply(broken: str, dataset_module, depth_shift_m: float = 1.0) -> None:
    """Break ``broken`` (one of BREAKS) in ``dataset_module``."""
    if broken == "rotation-geometry":
        break_rotation_geometry(dataset_module)
    elif broken == "flip-geometry":
        break_flip_geometry(dataset_module)
    elif broken == "augmentation-geometry":
        break_augmentation_geometry(dataset_module)
    elif broken == "depth-shift":
        break_depth_labels(dataset_module, depth_shift_m)
    elif broken == "no-depth-labels":
        drop_depth_labels(dataset_module)
    else:
        raise ValueError(f"unknown break {broken!r}; one of {', '.join(BREAKS)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bevdepth.datasets import nusc_det_dataset

    apply(args.broken, nusc_det_dataset, args.depth_shift_m)
    print(f"bench.ablation: {args.broken} broken on purpose"
          + (f" ({args.depth_shift_m:g} m)" if args.broken == "depth-shift" else ""), flush=True)
    sys.argv = [args.experiment, *args.args]
    runpy.run_path(args.experiment, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
