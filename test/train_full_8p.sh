#!/usr/bin/env bash
# BEVDepth accuracy run: train bev_depth_lss_r50_256x704_128x128_24e_2key on CARDS devices, evaluate
# the last checkpoint on the nuScenes val split, write the ModelZoo summary.
#
# Usage:  bash test/train_full_8p.sh [--name=value ...] [--fresh] [-- EXPERIMENT ARGS...]
#         (from the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/)
#
# Settings: --name=value flags or environment variables (NAME in capitals), defaults in ():
#   --cards=N               devices per node, one process each (8)
#   --batch-size=N          samples per device (8)
#   --epochs=N              epochs (24)
#   --learning-rate=X       learning rate per sample; times batch x devices (0.000003125 = 2e-4/64)
#   --seed=N                (0)        --precision=16|32|bf16  (16; CPU falls back to 32)
#   --data-root=DIR         nuScenes with info files, relative to BEVDepth (data/nuScenes)
#   --exp=FILE              experiment (bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py)
#   --device=npu|cuda|cpu   (what BEVDepth detects)
#   --nnodes=N --node-rank=R --master-addr=HOST --master-port=PORT
#                           several machines: run this on each, same NNODES/MASTER_*, NODE_RANK 0..N-1 (1 0)
#   --ascend-device-id=N    output subdirectory, ModelZoo convention (0)
#   --output-root=DIR       (test/output next to this script)
#   --network=NAME          Network of the summary (BEVDepth_for_PyTorch)
#   --ckpt-every-n-steps=N  also checkpoint every N steps, 0 = at epoch ends only (0)
#   --warmup-steps=N        steps left out of the speed figures (5)
#   --eval-cards=N --eval-batch-size=N   evaluation (1, BATCH_SIZE)
#   --bind-cores=auto|0|1   per-rank CPU core binding in training (auto: on for npu)
#   --resume=auto|none|CKPT auto: continue the newest unfinished identical run (auto)
#   --fresh                 same as --resume=none: always a new run directory
#   --python=PATH --bevdepth-root=DIR    interpreter and BEVDepth checkout (found if not given)
#   after --                passed to the experiment unchanged (training and evaluation)
#
# Output: test/output/<ASCEND_DEVICE_ID>/<CaseName>_<time>/ (train_<id>.log, eval_<id>.log,
# <CaseName>.log, summary.json, curves.png, run.json, checkpoints/), links to the newest run's
# files in test/output/<ASCEND_DEVICE_ID>/. Exit status: 0 on success; a failed training exits
# with its status and skips evaluation; rerunning the same command continues from last.ckpt.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bd_train_script full "${BASH_SOURCE[0]}" "$@"
