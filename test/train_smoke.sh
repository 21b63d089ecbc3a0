#!/usr/bin/env bash
# BEVDepth smoke run, the project's main job and end-to-end test: builds or reuses the
# environment (fetching the pins first; BEVDEPTH_NPU_MIRRORS offline), generates a synthetic
# nuScenes, trains the smoke experiment, evaluates it with the nuScenes devkit on mini_val and
# prints the metrics table, in minutes on any machine.
#
# Usage:  bash test/train_smoke.sh [--name=value ...] [--verbose] [-- EXPERIMENT ARGS...]
#         bash test/train_smoke.sh --help        (every setting, its variable and default)
# The run is `bevdepth-npu run smoke` (bevdepth_npu/run/), started with python3; it continues in
# the environment's interpreter (--python=PATH or BEVDEPTH_NPU_PYTHON: an existing one).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -d $root/bevdepth_npu ]] || { echo "error: $root is not a bevdepth-npu checkout" >&2; exit 1; }
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m bevdepth_npu run smoke --launcher "$root/test/train_smoke.sh" "$@"
