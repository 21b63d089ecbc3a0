#!/usr/bin/env bash
# BEVDepth accuracy run: train bev_depth_lss_r50_256x704_128x128_24e_2key on --cards devices per
# node, evaluate the last checkpoint on the nuScenes val split, write the ModelZoo summary.
#
# Usage:  bash test/train_full_8p.sh [--name=value ...] [--fresh] [-- EXPERIMENT ARGS...]
#         bash test/train_full_8p.sh --help      (every setting, its variable and default)
# From the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/; the run is
# `bevdepth-npu run full` (bevdepth_npu/run/), started by launch.sh beside this script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch full "${BASH_SOURCE[0]}" "$@"
