#!/usr/bin/env bash
# Run the test suite: the README's test command and what CI runs.
#
#   bash tests/run.sh [PYTEST_ARGS...]
#
# Fetches the pinned upstreams (from the cache; set BEVDEPTH_NPU_MIRRORS or pass nothing when the
# cache already holds them), builds or reuses the CPU environment with `bevdepth-npu env`, then
# runs pytest in it. Without the upstream sources (a fresh machine with no GitHub access and no
# mirror) it runs the tests that need none, in a small venv, and the others skip with a reason.
# pip's own output goes to <venv>/bevdepth-npu-logs/test-requirements.log (shown if it fails).
#
# Settings (environment variables, the project's names: see bevdepth_npu/envvars.py):
#   BEVDEPTH_NPU_DEVICE=cpu|cuda|npu|auto   environment to test in (default here: cpu; `env`
#                                           checks the name)
#   BEVDEPTH_NPU_PYTHON=python3             interpreter that runs bevdepth-npu, seeds the venv
# The quick loop (no builds, trainings, upstream runs or registry look-ups; about 3 minutes):
#   bash tests/run.sh -m "not slow and not network"
set -euo pipefail

DEVICE=${BEVDEPTH_NPU_DEVICE:-cpu}
PYTHON=${BEVDEPTH_NPU_PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# quiet_pip VENV [PACKAGES...]: requirements-test.txt (and PACKAGES) into VENV; pip's resolver
# notes about packages installed without their requirements are not the test suite's business.
quiet_pip() {
    local venv=$1 log=$1/bevdepth-npu-logs/test-requirements.log
    shift
    mkdir -p "$(dirname "$log")"
    "$venv/bin/python" -m pip install --disable-pip-version-check -r requirements-test.txt "$@" \
        >"$log" 2>&1 || { cat "$log" >&2; echo "tests/run.sh: pip failed (log: $log)" >&2; exit 1; }
}

if "$PYTHON" -m bevdepth_npu fetch; then
    venv_python=$("$PYTHON" -m bevdepth_npu env --device "$DEVICE" --print-python)
else
    echo "tests/run.sh: upstream sources unavailable; running the tests that need none" >&2
    cache=${BEVDEPTH_NPU_CACHE:-$HOME/.cache/bevdepth-npu}
    light="$cache/venvs/light-$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
    [ -x "$light/bin/python" ] || "$PYTHON" -m venv "$light"
    venv_python="$light/bin/python"
    quiet_pip "$light" numpy==1.23.5 pillow matplotlib pyquaternion filelock \
        "nuscenes-devkit==1.2.0; python_version >= '3.9'" "nuscenes-devkit==1.1.11; python_version < '3.9'"
fi
quiet_pip "$("$venv_python" -c 'import sys; print(sys.prefix)')"
exec "$venv_python" -m pytest tests "$@"
