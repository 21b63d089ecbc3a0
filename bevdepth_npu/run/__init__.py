"""``bevdepth-npu run full|performance|eval|smoke [--name=value ...] [-- EXPERIMENT ARGS]``:
the training, evaluation and smoke runs that test/*.sh launch.

    bevdepth-npu run full --cards=8 --epochs=24            # what bash test/train_full_8p.sh does
    bevdepth-npu run smoke --help                          # every setting, with its default

Modules: settings (the settings dataclass and its command line), runner (the entry point:
settings, the stack's interpreter, the mode's run), core (what every mode shares: run
directory, record, training and evaluation stages, summary, report), one module per mode:
train (full, performance), evaluate (eval), smoke (environment, dataset and the smoke run);
stages (a subprocess with its log), console (stage and progress lines), report (the summary and
the metrics table). The run record and the run directory layout are bevdepth_npu/runrecord.py,
shared with summarize.
"""
from __future__ import annotations

import argparse

from bevdepth_npu.run.settings import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=MODES,
                        help="full: train, evaluate, summarize; performance: train, summarize; "
                             "eval: evaluate a checkpoint; smoke: the whole pipeline in minutes")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                        help="settings (--name=value; `bevdepth-npu run MODE --help` lists "
                             "them), then -- and the experiment's own arguments")


def run(args: argparse.Namespace) -> int:
    from bevdepth_npu.run.runner import main
    return main(args.mode, args.args)
