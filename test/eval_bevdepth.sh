#!/usr/bin/env bash
# BEVDepth evaluation: score a checkpoint on the nuScenes val split (mAP, mATE, mASE, mAOE,
# mAVE, mAAE, NDS) into the ModelZoo summary; on several devices every sample is scored once.
#
# Usage:  bash test/eval_bevdepth.sh [--ckpt=PATH] [--name=value ...] [-- EXPERIMENT ARGS...]
#         bash test/eval_bevdepth.sh --help      (every setting, its variable and default)
# From the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/. The run
# is `bevdepth-npu run eval` (bevdepth_npu/run/); this script only finds its interpreter:
# $PYTHON, else the environment `bevdepth-npu env` built, else python3.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ ! -d $here/../bevdepth_npu ]] || export PYTHONPATH=$here/..${PYTHONPATH:+:$PYTHONPATH}
shopt -s nullglob
cache=${BEVDEPTH_NPU_CACHE:-$HOME/.cache/bevdepth-npu}
envs=("$cache"/venvs/{"${DEVICE:-npu}",npu,cuda,cpu}-py*/bin/python)
python=${PYTHON:-${envs[0]:-python3}}
command -v "$python" >/dev/null || { echo "error: PYTHON=$python: no such program" >&2; exit 1; }
exec "$python" -m bevdepth_npu run eval --launcher "${BASH_SOURCE[0]}" "$@"
