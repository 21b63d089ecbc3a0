#!/usr/bin/env bash
# BEVDepth evaluation: score a checkpoint on the nuScenes val split (mAP, mATE, mASE, mAOE,
# mAVE, mAAE, NDS) into the ModelZoo summary; on several devices every sample is scored once.
#
# Usage:  bash test/eval_bevdepth.sh [--ckpt=PATH] [--name=value ...] [-- EXPERIMENT ARGS...]
#         bash test/eval_bevdepth.sh --help      (every setting, its variable and default)
# From the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/; the run is
# `bevdepth-npu run eval` (bevdepth_npu/run/), started by launch.sh beside this script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch eval "${BASH_SOURCE[0]}" "$@"
