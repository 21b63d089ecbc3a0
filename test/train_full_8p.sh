#!/usr/bin/env bash
# BEVDepth accuracy run: train bev_depth_lss_r50_256x704_128x128_24e_2key on CARDS devices per
# node, evaluate the last checkpoint on the nuScenes val split, write the ModelZoo summary.
#
# Usage:  bash test/train_full_8p.sh [--name=value ...] [--fresh] [-- EXPERIMENT ARGS...]
#         bash test/train_full_8p.sh --help      (every setting, its variable and default)
# From the bevdepth-npu checkout, or from BEVDepth after cp -r test/* BEVDepth/test/. The run
# is `bevdepth-npu run full` (bevdepth_npu/run/); this script only finds its interpreter:
# $PYTHON, else the environment `bevdepth-npu env` built, else python3.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ ! -d $here/../bevdepth_npu ]] || export PYTHONPATH=$here/..${PYTHONPATH:+:$PYTHONPATH}
shopt -s nullglob
cache=${BEVDEPTH_NPU_CACHE:-$HOME/.cache/bevdepth-npu}
envs=("$cache"/venvs/{"${DEVICE:-npu}",npu,cuda,cpu}-py*/bin/python)
python=${PYTHON:-${envs[0]:-python3}}
command -v "$python" >/dev/null || { echo "error: PYTHON=$python: no such program" >&2; exit 1; }
exec "$python" -m bevdepth_npu run full --launcher "${BASH_SOURCE[0]}" "$@"
