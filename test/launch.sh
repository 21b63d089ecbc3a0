# Sourced by train_full_8p.sh, train_performance_8p.sh and eval_bevdepth.sh (not run by itself):
# `launch MODE SCRIPT ARGS...` starts `bevdepth-npu run MODE` (bevdepth_npu/run/, which also
# picks the stack's interpreter) with $BEVDEPTH_NPU_PYTHON, else python3, and the helper of the
# bevdepth-npu checkout these scripts sit in, when they do.
launch() {
    local mode=$1 script=$2 here python=${BEVDEPTH_NPU_PYTHON:-python3}
    shift 2
    here=$(cd "$(dirname "$script")" && pwd)
    [[ ! -d $here/../bevdepth_npu ]] || export PYTHONPATH=$here/..${PYTHONPATH:+:$PYTHONPATH}
    "$python" -c 'import bevdepth_npu' 2>/dev/null || {
        echo "error: $python cannot import bevdepth_npu: run this from a bevdepth-npu checkout," \
            "or set BEVDEPTH_NPU_PYTHON to the environment's interpreter" \
            "(bevdepth-npu env --print-python)" >&2
        exit 1
    }
    exec "$python" -m bevdepth_npu run "$mode" --launcher "$script" "$@"
}
