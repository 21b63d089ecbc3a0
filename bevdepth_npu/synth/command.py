"""Command line of the synthetic nuScenes generator: ``bevdepth-npu synth``.

    bevdepth-npu synth --out data/nuScenes-synth [--version v1.0-mini] [--scenes 2]
                       [--val-scenes M] [--samples-per-scene 10]
                       [--sweeps 2] [--seed 0] [--workers N] [--force] [--quiet]

Argument definitions import nothing heavy; numpy and Pillow load only when ``run`` does.
Errors (bad counts, a non-empty --out) raise ``SynthError``, a ``UserError``: the front end
prints the message and exits with status 2.
"""
from __future__ import annotations

import argparse
import os

from bevdepth_npu.argtypes import int_range
from bevdepth_npu.synth import taxonomy as tx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="dataset root to create (nuScenes layout; must be empty or new)")
    parser.add_argument("--version", choices=tx.VERSIONS, default=tx.MINI,
                        help="devkit layout and scene names: v1.0-mini (up to "
                             f"{tx.MAX_SCENES} scenes, alternating mini_train/mini_val) or "
                             f"v1.0-trainval (up to {tx.MAX_TRAINVAL_SCENES}: --val-scenes from "
                             "the val split, the rest from the train split) (default %(default)s)")
    parser.add_argument("--scenes", type=int_range(1, tx.MAX_TRAINVAL_SCENES),
                        default=tx.DEFAULT_SCENES, metavar="N",
                        help=f"scenes (v1.0-mini: 1-{tx.MAX_SCENES}; v1.0-trainval: "
                             f"2-{tx.MAX_TRAINVAL_SCENES}; default %(default)s)")
    parser.add_argument("--val-scenes", type=int_range(1, len(tx.TRAINVAL_VAL)), default=None,
                        metavar="M",
                        help="v1.0-trainval: scenes of the val split, held out of training "
                             "(default: one in five, at least one)")
    parser.add_argument("--samples-per-scene", type=int_range(2, tx.MAX_SAMPLES_PER_SCENE),
                        default=tx.DEFAULT_SAMPLES_PER_SCENE, metavar="N",
                        help=f"key frames per scene, 0.5 s apart (2-{tx.MAX_SAMPLES_PER_SCENE}; "
                             f"default %(default)s)")
    parser.add_argument("--sweeps", type=int_range(0, tx.MAX_SWEEPS), default=tx.DEFAULT_SWEEPS, metavar="N",
                        help=f"non-key frames per sensor before each key frame, at the real 12 Hz "
                             f"camera / 20 Hz lidar spacing (0-{tx.MAX_SWEEPS}; default %(default)s)")
    parser.add_argument("--seed", type=int_range(0, 2 ** 63 - 1), default=tx.DEFAULT_SEED, metavar="S",
                        help="random seed; the same seed gives byte-identical files (default %(default)s)")
    parser.add_argument("--workers", type=int_range(1, 256), default=None, metavar="N",
                        help="processes rendering images and point clouds "
                             "(default: one per core, at most four)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out (overwrites files of the same name, "
                             "deletes nothing)")
    parser.add_argument("--quiet", action="store_true", help="print only the final line")


def run(args: argparse.Namespace) -> int:
    from bevdepth_npu.synth.dataset import SUMMARY_FILE, generate

    def say(line: str) -> None:
        print(line, flush=True)

    summary = generate(args.out, scenes=args.scenes, samples_per_scene=args.samples_per_scene,
                       sweeps=args.sweeps, seed=args.seed, force=args.force, workers=args.workers,
                       progress=None if args.quiet else say, version=args.version,
                       val_scenes=args.val_scenes)
    print(f"synth: {summary['version']} dataset with scenes {', '.join(summary['scenes'])} in "
          f"{summary['out_dir']} (summary: {os.path.join(summary['out_dir'], SUMMARY_FILE)})",
          flush=True)
    return 0
