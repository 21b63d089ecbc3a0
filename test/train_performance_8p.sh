#!/usr/bin/env bash
# BEVDepth performance run: train bev_depth_lss_r50_256x704_128x128_24e_2key for one epoch on
# --cards devices per node; report samples/s (ActualFPS, warm-up excluded), images/s and loss.
#
# Usage:  bash test/train_performance_8p.sh [--name=value ...] [--fresh] [-- EXPERIMENT ARGS...]
#         bash test/train_performance_8p.sh --help      (every setting, its variable and default)
# From the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/; the run is
# `bevdepth-npu run performance` (bevdepth_npu/run/), started by launch.sh beside this script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch performance "${BASH_SOURCE[0]}" "$@"
