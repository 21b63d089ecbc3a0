#!/usr/bin/env bash
# BEVDepth evaluation: score a checkpoint on the nuScenes val split (mAP, mATE, mASE, mAOE, mAVE,
# mAAE, NDS) and write them into the ModelZoo summary. Across several devices every validation
# sample is scored exactly once.
#
# Usage:  bash test/eval_bevdepth.sh [--ckpt=PATH] [--name=value ...] [-- EXPERIMENT ARGS...]
#         (from the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/)
#
# Settings: --name=value flags or environment variables (NAME in capitals), defaults in ():
#   --ckpt=PATH             checkpoint file, or a run directory (its checkpoints/last.ckpt)
#                           (the newest *.ckpt below test/output/<id>/ and BEVDepth/outputs/)
#   --cards=N               devices, one process each (1)
#   --batch-size=N          samples per device (32)
#   --seed=N                (0)        --precision=16|32|bf16  (16; CPU falls back to 32)
#   --epochs=N --learning-rate=X   passed on as in training; no effect on evaluation (24, 0.000003125)
#   --data-root=DIR         nuScenes with info files, relative to BEVDepth (data/nuScenes)
#   --exp=FILE              experiment (bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py)
#   --device=npu|cuda|cpu   (what BEVDepth detects)
#   --ascend-device-id=N    output subdirectory, ModelZoo convention (0)
#   --output-root=DIR       (test/output next to this script)
#   --network=NAME          Network of the summary (BEVDepth_for_PyTorch)
#   --python=PATH --bevdepth-root=DIR    interpreter and BEVDepth checkout (found if not given)
#   after --                passed to the experiment unchanged
#
# Output: test/output/<ASCEND_DEVICE_ID>/<CaseName>_<time>/ (eval_<id>.log, <CaseName>.log,
# summary.json, run.json, eval/metrics_summary.json), links to them in test/output/<id>/.
# Exit status: 0 on success, the evaluation's status if it failed, 1 for bad settings.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bd_eval_script "${BASH_SOURCE[0]}" "$@"
