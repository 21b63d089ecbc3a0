#!/usr/bin/env bash
# Shared code of test/train_full_8p.sh, test/train_performance_8p.sh and test/eval_bevdepth.sh.
#
# Not run on its own: those scripts source it after `set -euo pipefail`. It defines functions
# only (prefix bd_) and changes nothing until one of them is called.
#
# Run layout (one fresh directory per run, nothing earlier deleted):
#   ${OUTPUT_ROOT}/${ASCEND_DEVICE_ID}/<CaseName>_<YYYYmmdd-HHMMSS>/
#       train_<id>.log  eval_<id>.log  run.json  <CaseName>.log  summary.json  curves.png
#       checkpoints/last.ckpt ...   (Lightning default_root_dir = the run directory)
#       eval/metrics_summary.json   (evaluation outputs)
#   ${OUTPUT_ROOT}/${ASCEND_DEVICE_ID}/train_<id>.log, eval_<id>.log, <CaseName>.log, latest
#       symbolic links to the newest run's files (the ModelZoo paths).
# A training run that did not complete is continued in its own directory by the next identical
# command (its log is appended to); --fresh starts a new directory instead.

# ------------------------------------------------------------------------------------------------
# messages and usage

BD_SCRIPT_NAME=$(basename "${BASH_SOURCE[1]:-$0}")

bd_note() { printf '%s: %s\n' "$BD_SCRIPT_NAME" "$*"; }
bd_die() { printf '%s: error: %s\n' "$BD_SCRIPT_NAME" "$*" >&2; exit 1; }
# bd_fail STATUS MESSAGE: like bd_die, with the exit status of the stage that failed.
bd_fail() {
    local rc=$1
    shift
    printf '%s: error: %s\n' "$BD_SCRIPT_NAME" "$*" >&2
    exit "$rc"
}

# Evaluate CKPT with CARDS processes of BATCH samples into the run's eval log; on failure mark the
# run failed and exit with the evaluation's status (HINT: what the user can do next).
bd_eval_or_fail() {
    local ckpt=$1 cards=$2 batch=$3 hint=$4 rc=0
    bd_link "eval_${ASCEND_DEVICE_ID}.log" "$(basename "$RUN_DIR")/eval_${ASCEND_DEVICE_ID}.log"
    bd_eval "$ckpt" "$cards" "$batch" || rc=$?
    if ((rc != 0)); then
        bd_finish_run failed
        BD_FINISHED=1
        bd_fail "$rc" "evaluation failed (exit $rc). Log: $RUN_DIR/eval_${ASCEND_DEVICE_ID}.log${hint:+. $hint}"
    fi
}

# Print the calling script's header comment (from line 2 to the first line that is not a
# comment): the one place where its usage is written.
bd_usage() {
    local script=$1
    sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$script"
}

# ------------------------------------------------------------------------------------------------
# command line: --name=value sets the setting NAME (dashes become underscores), --help prints the
# header, arguments after -- are forwarded to the experiment (BD_EXTRA_ARGS).

BD_EXTRA_ARGS=()

# bd_parse_args SCRIPT "setting names" "switch names" ARGS...   (names in --flag form, e.g. batch-size)
bd_parse_args() {
    # Lists may span lines; a name is matched with a space on each side.
    local script=$1 names=" ${2//$'\n'/ } " switches=" ${3//$'\n'/ } "
    shift 3
    local arg key value var
    while (($#)); do
        arg=$1
        shift
        case $arg in
            -h | --help)
                bd_usage "$script"
                exit 0
                ;;
            --)
                BD_EXTRA_ARGS=("$@")
                return 0
                ;;
            --*=*)
                key=${arg%%=*}
                key=${key#--}
                value=${arg#*=}
                if [[ $names != *" $key "* ]]; then
                    bd_die "unknown option --$key (see --help; arguments for the experiment go after --)"
                fi
                var=$(printf '%s' "$key" | tr 'a-z-' 'A-Z_')
                printf -v "$var" '%s' "$value"
                ;;
            --*)
                key=${arg#--}
                if [[ $switches == *" $key "* ]]; then
                    var=$(printf '%s' "$key" | tr 'a-z-' 'A-Z_')
                    printf -v "$var" '%s' 1
                elif [[ $names == *" $key "* ]]; then
                    bd_die "option --$key needs a value: --$key=VALUE"
                else
                    bd_die "unknown option --$key (see --help; arguments for the experiment go after --)"
                fi
                ;;
            *)
                bd_die "unexpected argument '$arg' (settings are --name=value; experiment arguments go after --)"
                ;;
        esac
    done
}

# ------------------------------------------------------------------------------------------------
# validation: each takes the setting's name and exits 1 with a message naming it

bd_require_int() {
    local name=$1 min=$2 value=${!1-}
    [[ $value =~ ^[0-9]+$ ]] || bd_die "$name='$value' is not a whole number"
    ((10#$value >= min)) || bd_die "$name=$value must be at least $min"
}

bd_require_positive_number() {
    local name=$1 value=${!1-}
    [[ $value =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] ||
        bd_die "$name='$value' is not a positive number"
    awk -v v="$value" 'BEGIN { exit !(v + 0 > 0) }' || bd_die "$name=$value must be above 0"
}

bd_require_choice() {
    local name=$1 value=${!1-} choice
    shift
    for choice in "$@"; do
        [[ $value == "$choice" ]] && return 0
    done
    bd_die "$name='$value' must be one of: $*"
}

# ------------------------------------------------------------------------------------------------
# where things are

# Sets BD_TEST_DIR (the scripts' directory), BD_PROJECT_ROOT (the bevdepth-npu checkout, or empty
# when the scripts were copied into BEVDepth/test), BEVDEPTH_ROOT and PYTHON.
bd_locate() {
    local script=$1 parent
    BD_TEST_DIR=$(cd "$(dirname "$script")" && pwd)
    parent=$(dirname "$BD_TEST_DIR")
    BD_PROJECT_ROOT=""
    if [[ -d $parent/bevdepth_npu ]]; then
        BD_PROJECT_ROOT=$parent
    fi
    PYTHON=${PYTHON:-$(bd_default_python)}
    command -v "$PYTHON" >/dev/null 2>&1 || bd_die "PYTHON=$PYTHON is not an executable"
    if [[ -n ${BEVDEPTH_ROOT:-} ]]; then
        bd_is_checkout "$BEVDEPTH_ROOT" ||
            bd_die "BEVDEPTH_ROOT=$BEVDEPTH_ROOT is not a BEVDepth checkout (no bevdepth/exps there)"
    elif bd_is_checkout "$parent"; then
        BEVDEPTH_ROOT=$parent # classic flow: cp -r test/* BEVDepth/test/
    elif bd_is_checkout "$parent/BEVDepth"; then
        BEVDEPTH_ROOT=$parent/BEVDepth
    else
        BEVDEPTH_ROOT=$("$PYTHON" -c 'import os, bevdepth; print(os.path.dirname(os.path.dirname(bevdepth.__file__)))' 2>/dev/null || true)
        bd_is_checkout "$BEVDEPTH_ROOT" ||
            bd_die "no BEVDepth checkout found: set BEVDEPTH_ROOT, or clone it into $parent/BEVDepth, or install it in $PYTHON's environment (pip install -e BEVDepth)"
    fi
    BEVDEPTH_ROOT=$(cd "$BEVDEPTH_ROOT" && pwd)
}

bd_is_checkout() { [[ -n $1 && -d $1/bevdepth/exps ]]; }

# $PYTHON, else the environment built by `bevdepth-npu env` (DEVICE's, else npu, cuda, cpu), else
# python3.
bd_default_python() {
    local cache=${BEVDEPTH_NPU_CACHE:-$HOME/.cache/bevdepth-npu} kind candidate
    for kind in ${DEVICE:-} npu cuda cpu; do
        for candidate in "$cache"/venvs/"$kind"-py*/bin/python; do
            if [[ -x $candidate ]]; then
                printf '%s\n' "$candidate"
                return 0
            fi
        done
    done
    printf 'python3\n'
}

# PYTHONPATH for `python -m bevdepth_npu` (the helper may be installed, or this checkout of it).
bd_helper_pythonpath() {
    if [[ -n $BD_PROJECT_ROOT ]]; then
        printf '%s\n' "$BD_PROJECT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        printf '%s\n' "${PYTHONPATH:-}"
    fi
}

# Fail now, not after hours of training, when the summary could not be written.
bd_check_helper() {
    PYTHONPATH=$(bd_helper_pythonpath) "$PYTHON" -c 'import bevdepth_npu.summarize' 2>/dev/null ||
        bd_die "$PYTHON cannot import bevdepth_npu (needed for the summary): pip install -e <bevdepth-npu checkout> in that environment, or run the scripts from the bevdepth-npu checkout"
}

# DEVICE: as given (validated), else what BEVDepth's device module picks on this machine.
bd_resolve_device() {
    if [[ -n ${DEVICE:-} ]]; then
        bd_require_choice DEVICE npu cuda cpu
        return 0
    fi
    DEVICE=$(cd "$BEVDEPTH_ROOT" && "$PYTHON" -c 'from bevdepth.utils import device; print(device.device_type())') ||
        bd_die "could not determine the device with $PYTHON in $BEVDEPTH_ROOT (set DEVICE=npu|cuda|cpu, or fix the environment)"
}

# Path of a file setting relative to the BEVDepth checkout unless absolute.
bd_in_checkout() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$BEVDEPTH_ROOT/$1" ;;
    esac
}

# Source CANN's and the NPU runtime's settings unless the platform (etp) sets them itself.
bd_source_env_npu() {
    if [[ ${etp_running_flag:-} == true ]]; then
        return 0
    fi
    # shellcheck source=env_npu.sh
    source "$BD_TEST_DIR/env_npu.sh"
}

# BEVDEPTH_BIND_CORES for a stage: each training process binds itself at start-up (torch_npu's
# CPU_AFFINITY_CONF where it has it, else its share of the cores); worth it for NPU training
# (eight ranks and their loader workers on one host), never for evaluation. BIND_CORES=0|1
# overrides the choice for training.
# bd_bind_cores_value train|eval DEVICE
bd_bind_cores_value() {
    local stage=$1 kind=$2
    if [[ $stage != train ]]; then
        printf '0\n'
    elif [[ ${BIND_CORES:-auto} == auto ]]; then
        if [[ $kind == npu ]]; then printf '1\n'; else printf '0\n'; fi
    else
        printf '%s\n' "$BIND_CORES"
    fi
}

# ------------------------------------------------------------------------------------------------
# run directories and run.json

bd_timestamp() { date +%Y%m%d-%H%M%S; }

# Create a new run directory for CASE under the device directory; sets RUN_DIR. A second run in
# the same second gets a -2, -3... suffix; mkdir claims the name atomically.
bd_new_run_dir() {
    local case_name=$1 base n=1
    base=$BD_DEVICE_DIR/${case_name}_$(bd_timestamp)
    RUN_DIR=$base
    until mkdir "$RUN_DIR" 2>/dev/null; do
        [[ -d $BD_DEVICE_DIR ]] || bd_die "cannot create $BD_DEVICE_DIR"
        n=$((n + 1))
        RUN_DIR=$base-$n
    done
}

# Hold a lock on RUN_DIR for as long as this script runs (released by the kernel on any exit), so
# that a second command cannot resume a run that is still in progress.
bd_lock_run_dir() {
    command -v flock >/dev/null 2>&1 || return 0
    exec {BD_LOCK_FD}>>"$RUN_DIR/.lock"
    flock -n "$BD_LOCK_FD" || bd_die "$RUN_DIR is in use by another running command; wait for it, or pass --fresh"
}

# Python that edits run.json atomically. Arguments: KIND:KEY=VALUE with KIND str, num or json;
# "attempt." keys go into the current (last) attempt, "new_attempt" appends one. The top-level
# times that bevdepth-npu summarize reads are derived from the attempts: start/end from the first
# and last; train_start_s/train_end_s only for a single attempt (TrainingTime of a resumed run is
# the sum of its logged step times).
bd_run_json() {
    "$PYTHON" - "$RUN_DIR/run.json" "$@" <<'PY'
import json, os, sys

path, edits = sys.argv[1], sys.argv[2:]
data = {}
if os.path.exists(path):
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
attempts = data.setdefault("attempts", [])
for edit in edits:
    if edit == "new_attempt":
        attempts.append({})
        continue
    kind, _, rest = edit.partition(":")
    key, _, text = rest.partition("=")
    if kind == "str":
        value = text
    elif kind == "num":
        value = float(text) if any(c in text for c in ".eE") else int(text)
    elif kind == "json":
        value = json.loads(text)
    else:
        raise SystemExit(f"bd_run_json: bad edit {edit!r}")
    if key.startswith("attempt."):
        if not attempts:
            attempts.append({})
        attempts[-1][key[len("attempt."):]] = value
    else:
        data[key] = value
for key in ("start_time_s", "end_time_s", "train_start_s", "train_end_s"):
    data.pop(key, None)
if attempts:
    if "start_time_s" in attempts[0]:
        data["start_time_s"] = attempts[0]["start_time_s"]
    if "end_time_s" in attempts[-1]:
        data["end_time_s"] = attempts[-1]["end_time_s"]
    if len(attempts) == 1:
        for key in ("train_start_s", "train_end_s"):
            if key in attempts[0]:
                data[key] = attempts[0][key]
temp = f"{path}.tmp-{os.getpid()}"
with open(temp, "w", encoding="utf-8") as handle:
    json.dump(data, handle, indent=2, sort_keys=True)
    handle.write("\n")
os.replace(temp, path)
PY
}

# Print a field of a run.json (empty if missing or unreadable).
bd_run_json_get() {
    "$PYTHON" - "$1" "$2" <<'PY' 2>/dev/null || true
import json, sys
try:
    with open(sys.argv[1], encoding="utf-8") as handle:
        value = json.load(handle).get(sys.argv[2], "")
except (OSError, ValueError):
    value = ""
print(value if isinstance(value, str) else json.dumps(value))
PY
}

bd_now() { date +%s.%N | cut -c1-14; }

# The newest run of CASE with the same SETTINGS that can be continued: walking back from the
# newest run of the case, a completed one ends the search (a new run starts), one with
# checkpoints/last.ckpt that did not complete is the answer, others are passed over.
bd_find_resumable_run() {
    local case_name=$1 settings=$2 dir status
    local -a dirs=()
    shopt -s nullglob
    dirs=("$BD_DEVICE_DIR/${case_name}"_[0-9]*)
    shopt -u nullglob
    local i
    for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
        dir=${dirs[i]}
        [[ -f $dir/run.json ]] || continue
        [[ $(bd_run_json_get "$dir/run.json" settings) == "$settings" ]] || continue
        status=$(bd_run_json_get "$dir/run.json" status)
        [[ $status == completed ]] && return 0
        if [[ -f $dir/checkpoints/last.ckpt ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
}

# Point the ModelZoo path NAME in the device directory at TARGET (relative to that directory).
# Only symbolic links are replaced: a regular file of that name (an older script's output) stays.
bd_link() {
    local name=$1 target=$2 link=$BD_DEVICE_DIR/$1
    if [[ -e $link && ! -L $link ]]; then
        bd_note "$link is a regular file from an earlier tool; leaving it, see $BD_DEVICE_DIR/$target"
        return 0
    fi
    ln -s "$target" "$link.tmp.$$"
    mv -fT "$link.tmp.$$" "$link"
}

# ------------------------------------------------------------------------------------------------
# the stages

# Experiment flags shared by training and evaluation (the original scripts' flags).
bd_common_flags() {
    BD_FLAGS=(--seed "$SEED" --learning_rate "$LEARNING_RATE" --max_epoch "$EPOCHS"
        --amp_backend native --precision "$PRECISION" --device "$DEVICE"
        --data_root "$DATA_ROOT")
}

# Train in the foreground, output appended to the run's train log; returns the exit status.
bd_train() {
    local log=$RUN_DIR/train_${ASCEND_DEVICE_ID}.log bind rc resume
    bind=$(bd_bind_cores_value train "$DEVICE")
    resume=none
    if [[ -f $RUN_DIR/checkpoints/last.ckpt ]]; then
        resume=$RUN_DIR/checkpoints/last.ckpt
    elif [[ -f ${BD_RESUME_FROM:-} ]]; then
        resume=$BD_RESUME_FROM
    fi
    bd_common_flags
    local -a cmd=("$PYTHON" "$EXP" "${BD_FLAGS[@]}" --gpus "$CARDS" --num_nodes "$NNODES"
        --batch_size_per_device "$BATCH_SIZE" --default_root_dir "$RUN_DIR" --resume "$resume")
    if ((CKPT_EVERY_N_STEPS > 0)); then
        cmd+=(--ckpt_every_n_steps "$CKPT_EVERY_N_STEPS")
    fi
    cmd+=("${BD_EXTRA_ARGS[@]}")
    bd_run_json "num:attempt.train_start_s=$(bd_now)" "str:attempt.resume=$resume" \
        "num:attempt.pl_bind_cores=$bind"
    printf '[%s] BEVDEPTH_BIND_CORES=%s %s\n' "$(date '+%F %T')" "$bind" "${cmd[*]}" >>"$log"
    set +e
    (cd "$BEVDEPTH_ROOT" && BEVDEPTH_BIND_CORES=$bind "${cmd[@]}") 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    bd_run_json "num:attempt.train_end_s=$(bd_now)" "num:attempt.train_exit_code=$rc"
    return "$rc"
}

# Evaluate CKPT in the foreground into the run's eval log; returns the exit status.
bd_eval() {
    local ckpt=$1 cards=$2 batch=$3 log=$RUN_DIR/eval_${ASCEND_DEVICE_ID}.log rc bind
    bind=$(bd_bind_cores_value eval "$DEVICE")
    bd_common_flags
    local -a cmd=("$PYTHON" "$EXP" -e --ckpt_path "$ckpt" "${BD_FLAGS[@]}" --gpus "$cards"
        --batch_size_per_device "$batch" --default_root_dir "$RUN_DIR/eval"
        "${BD_EXTRA_ARGS[@]}")
    bd_run_json "str:checkpoint=$ckpt" "num:attempt.pl_bind_cores_eval=$bind"
    printf '[%s] BEVDEPTH_BIND_CORES=%s %s\n' "$(date '+%F %T')" "$bind" "${cmd[*]}" >>"$log"
    set +e
    (cd "$BEVDEPTH_ROOT" && BEVDEPTH_BIND_CORES=$bind "${cmd[@]}") 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    bd_run_json "num:attempt.eval_exit_code=$rc"
    return "$rc"
}

# Write <CaseName>.log, summary.json and curves.png with bevdepth-npu summarize; link the log.
bd_summarize() {
    local rc=0
    PYTHONPATH=$(bd_helper_pythonpath) "$PYTHON" -m bevdepth_npu summarize "$RUN_DIR" \
        --warmup-steps "$WARMUP_STEPS" || rc=$?
    if [[ -f $RUN_DIR/$CASE_NAME.log ]]; then
        bd_link "$CASE_NAME.log" "$(basename "$RUN_DIR")/$CASE_NAME.log"
    fi
    return "$rc"
}

# The newest checkpoint of earlier runs: *.ckpt below the run directories of this device and
# below the checkout's outputs/ (runs started without these scripts); empty if there is none.
bd_newest_checkpoint() {
    "$PYTHON" - "$BD_DEVICE_DIR" "$BEVDEPTH_ROOT/outputs" <<'PY'
import os, sys

found = []
for root in sys.argv[1:]:
    for directory, _, files in os.walk(root):
        found += [os.path.join(directory, n) for n in files if n.endswith(".ckpt")]
if found:
    print(max(found, key=lambda p: (os.stat(p).st_mtime_ns, p)))
PY
}

# Common start: output directory, run.json skeleton for MODE, links.
bd_start_run() {
    local mode=$1
    bd_run_json "str:network=$NETWORK" "str:case_name=$CASE_NAME" "num:rank_size=$RANK_SIZE" \
        "num:batch_size_per_device=$BATCH_SIZE" "str:device_type=$DEVICE_TYPE" "str:mode=$mode" \
        "str:device=$DEVICE" "str:status=running" "str:settings=$BD_SETTINGS" \
        "str:bevdepth_root=$BEVDEPTH_ROOT" "str:python=$PYTHON" \
        "new_attempt" "num:attempt.start_time_s=$BD_START_S" "str:attempt.node_rank=$NODE_RANK"
    bd_link latest "$(basename "$RUN_DIR")"
}

bd_finish_run() {
    local status=$1
    bd_run_json "num:attempt.end_time_s=$(bd_now)" "str:status=$status"
}

# ------------------------------------------------------------------------------------------------
# the two training scripts: train_full_8p.sh (MODE full: train, evaluate, summarize) and
# train_performance_8p.sh (MODE performance: train, summarize)

BD_TRAIN_SETTINGS="cards batch-size epochs learning-rate seed precision data-root exp device
    nnodes node-rank master-addr master-port ascend-device-id output-root network
    ckpt-every-n-steps warmup-steps eval-cards eval-batch-size bind-cores resume python
    bevdepth-root"

# bd_train_script MODE SCRIPT ARGS...
bd_train_script() {
    local mode=$1 script=$2
    shift 2
    bd_parse_args "$script" "$BD_TRAIN_SETTINGS" "fresh" "$@"
    local default_epochs=24
    [[ $mode == performance ]] && default_epochs=1
    CARDS=${CARDS:-8}
    BATCH_SIZE=${BATCH_SIZE:-8}
    EPOCHS=${EPOCHS:-$default_epochs}
    LEARNING_RATE=${LEARNING_RATE:-0.000003125}
    SEED=${SEED:-0}
    PRECISION=${PRECISION:-16}
    DATA_ROOT=${DATA_ROOT:-data/nuScenes}
    EXP=${EXP:-bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py}
    NNODES=${NNODES:-1}
    NODE_RANK=${NODE_RANK:-0}
    ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
    NETWORK=${NETWORK:-BEVDepth_for_PyTorch}
    CKPT_EVERY_N_STEPS=${CKPT_EVERY_N_STEPS:-0}
    WARMUP_STEPS=${WARMUP_STEPS:-5}
    EVAL_CARDS=${EVAL_CARDS:-1}
    EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-$BATCH_SIZE}
    BIND_CORES=${BIND_CORES:-auto}
    RESUME=${RESUME:-auto}
    FRESH=${FRESH:-0}
    DEVICE_TYPE=${DEVICE_TYPE:-$(uname -m)}

    bd_require_int CARDS 1
    bd_require_int BATCH_SIZE 1
    bd_require_int EPOCHS 1
    bd_require_positive_number LEARNING_RATE
    bd_require_int SEED 0
    bd_require_choice PRECISION 16 32 bf16
    bd_require_int NNODES 1
    bd_require_int NODE_RANK 0
    ((NODE_RANK < NNODES)) || bd_die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
    bd_require_int ASCEND_DEVICE_ID 0
    [[ $NETWORK =~ ^[A-Za-z0-9._+-]+$ ]] || bd_die "NETWORK='$NETWORK' may hold only letters, digits and ._+-"
    bd_require_int CKPT_EVERY_N_STEPS 0
    bd_require_int WARMUP_STEPS 0
    bd_require_int EVAL_CARDS 1
    bd_require_int EVAL_BATCH_SIZE 1
    bd_require_choice BIND_CORES auto 0 1
    if ((NNODES > 1)); then
        [[ -n ${MASTER_ADDR:-} ]] || bd_die "NNODES=$NNODES needs MASTER_ADDR (address of the node with NODE_RANK=0)"
        [[ -n ${MASTER_PORT:-} ]] || bd_die "NNODES=$NNODES needs MASTER_PORT (a free port on the MASTER_ADDR node, the same on every node)"
    fi
    if [[ -n ${MASTER_PORT:-} ]]; then
        bd_require_int MASTER_PORT 1
        ((MASTER_PORT <= 65535)) || bd_die "MASTER_PORT=$MASTER_PORT is not a port number"
    fi
    if [[ $FRESH == 1 ]]; then
        RESUME=none
    fi

    bd_locate "$script"
    OUTPUT_ROOT=${OUTPUT_ROOT:-$BD_TEST_DIR/output}
    EXP=$(bd_in_checkout "$EXP")
    DATA_ROOT=$(bd_in_checkout "$DATA_ROOT")
    [[ -f $EXP ]] || bd_die "EXP=$EXP: no such experiment file"
    [[ -d $DATA_ROOT ]] || bd_die "DATA_ROOT=$DATA_ROOT: no such directory (prepare nuScenes there, or set DATA_ROOT)"
    case $RESUME in
        auto | none) ;;
        *) [[ -f $RESUME ]] || bd_die "RESUME=$RESUME: no such checkpoint file (auto, none or a .ckpt path)" ;;
    esac
    bd_check_helper
    bd_source_env_npu
    bd_resolve_device

    RANK_SIZE=$((CARDS * NNODES))
    local kind=acc
    [[ $mode == performance ]] && kind=perf
    CASE_NAME=${NETWORK}_bs${BATCH_SIZE}_${RANK_SIZE}p_${kind}
    local run_prefix=$CASE_NAME
    ((NNODES > 1)) && run_prefix=${CASE_NAME}_node${NODE_RANK}
    BD_DEVICE_DIR=$OUTPUT_ROOT/$ASCEND_DEVICE_ID
    mkdir -p "$BD_DEVICE_DIR" || bd_die "cannot create $BD_DEVICE_DIR (set OUTPUT_ROOT)"
    BD_SETTINGS="exp=$EXP data_root=$DATA_ROOT cards=$CARDS nnodes=$NNODES batch=$BATCH_SIZE"
    BD_SETTINGS+=" epochs=$EPOCHS lr=$LEARNING_RATE seed=$SEED precision=$PRECISION device=$DEVICE"
    BD_SETTINGS+=" ckpt_every_n_steps=$CKPT_EVERY_N_STEPS extra=${BD_EXTRA_ARGS[*]}"
    BD_START_S=$(bd_now)

    RUN_DIR=""
    if [[ $RESUME == auto ]]; then
        RUN_DIR=$(bd_find_resumable_run "$run_prefix" "$BD_SETTINGS")
    fi
    if [[ -n $RUN_DIR ]]; then
        bd_note "continuing the unfinished run $RUN_DIR from its last checkpoint (--fresh starts a new run)"
    else
        bd_new_run_dir "$run_prefix"
        bd_note "new run directory $RUN_DIR"
    fi
    bd_lock_run_dir
    bd_start_run "$mode"
    bd_link "train_${ASCEND_DEVICE_ID}.log" "$(basename "$RUN_DIR")/train_${ASCEND_DEVICE_ID}.log"
    trap 'bd_on_exit' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    if ((NNODES > 1)); then
        export MASTER_ADDR MASTER_PORT NODE_RANK
    fi
    local rc=0
    BD_RESUME_FROM=$RESUME
    bd_train || rc=$?
    if ((rc != 0)); then
        bd_finish_run failed
        BD_FINISHED=1
        bd_fail "$rc" "training failed (exit $rc); evaluation skipped. Log: $RUN_DIR/train_${ASCEND_DEVICE_ID}.log. The same command continues from the last checkpoint, if one was written."
    fi
    if [[ $mode == full && $NODE_RANK == 0 ]]; then
        local ckpt=$RUN_DIR/checkpoints/last.ckpt
        [[ -f $ckpt ]] || { bd_finish_run failed; BD_FINISHED=1; bd_die "training ended without $ckpt; nothing to evaluate"; }
        bd_eval_or_fail "$ckpt" "$EVAL_CARDS" "$EVAL_BATCH_SIZE" \
            "The same command evaluates again without retraining."
    fi
    bd_finish_run completed
    BD_FINISHED=1
    if [[ $NODE_RANK != 0 ]]; then
        bd_note "done; node 0 writes the summary (global rank 0 logs the steps)"
        return 0
    fi
    bd_summarize || bd_die "the summary of $RUN_DIR is incomplete (see the warnings above)"
}

# Whatever stopped the script before the end: mark the run as interrupted so that the next
# identical command continues it.
BD_FINISHED=0
bd_on_exit() {
    local rc=$?
    if [[ $BD_FINISHED != 1 && -n ${RUN_DIR:-} && -f ${RUN_DIR}/run.json ]]; then
        bd_finish_run interrupted || true
    fi
    return "$rc"
}

# ------------------------------------------------------------------------------------------------
# eval_bevdepth.sh: evaluate a checkpoint into a run directory of its own

BD_EVAL_SETTINGS="ckpt cards batch-size epochs learning-rate seed precision data-root exp device
    ascend-device-id output-root network warmup-steps python bevdepth-root"

# bd_eval_script SCRIPT ARGS...
bd_eval_script() {
    local script=$1
    shift
    bd_parse_args "$script" "$BD_EVAL_SETTINGS" "" "$@"
    CKPT=${CKPT:-}
    CARDS=${CARDS:-1}
    BATCH_SIZE=${BATCH_SIZE:-32}
    EPOCHS=${EPOCHS:-24}
    LEARNING_RATE=${LEARNING_RATE:-0.000003125}
    SEED=${SEED:-0}
    PRECISION=${PRECISION:-16}
    DATA_ROOT=${DATA_ROOT:-data/nuScenes}
    EXP=${EXP:-bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py}
    ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
    NETWORK=${NETWORK:-BEVDepth_for_PyTorch}
    WARMUP_STEPS=${WARMUP_STEPS:-5}
    NNODES=1
    NODE_RANK=0
    DEVICE_TYPE=${DEVICE_TYPE:-$(uname -m)}

    bd_require_int CARDS 1
    bd_require_int BATCH_SIZE 1
    bd_require_int EPOCHS 1
    bd_require_positive_number LEARNING_RATE
    bd_require_int SEED 0
    bd_require_choice PRECISION 16 32 bf16
    bd_require_int ASCEND_DEVICE_ID 0
    bd_require_int WARMUP_STEPS 0
    [[ $NETWORK =~ ^[A-Za-z0-9._+-]+$ ]] || bd_die "NETWORK='$NETWORK' may hold only letters, digits and ._+-"

    bd_locate "$script"
    OUTPUT_ROOT=${OUTPUT_ROOT:-$BD_TEST_DIR/output}
    EXP=$(bd_in_checkout "$EXP")
    DATA_ROOT=$(bd_in_checkout "$DATA_ROOT")
    [[ -f $EXP ]] || bd_die "EXP=$EXP: no such experiment file"
    [[ -d $DATA_ROOT ]] || bd_die "DATA_ROOT=$DATA_ROOT: no such directory (prepare nuScenes there, or set DATA_ROOT)"
    BD_DEVICE_DIR=$OUTPUT_ROOT/$ASCEND_DEVICE_ID
    if [[ -n $CKPT ]]; then
        if [[ -d $CKPT ]]; then
            # A run directory (or its checkpoints/): its last checkpoint.
            if [[ -f $CKPT/checkpoints/last.ckpt ]]; then
                CKPT=$CKPT/checkpoints/last.ckpt
            elif [[ -f $CKPT/last.ckpt ]]; then
                CKPT=$CKPT/last.ckpt
            else
                bd_die "CKPT=$CKPT is a directory without last.ckpt or checkpoints/last.ckpt"
            fi
        fi
        [[ -f $CKPT ]] || bd_die "CKPT=$CKPT: no such checkpoint file"
    else
        CKPT=$(bd_newest_checkpoint)
        [[ -n $CKPT ]] || bd_die "no checkpoint found below $BD_DEVICE_DIR or $BEVDEPTH_ROOT/outputs; train first (bash test/train_full_8p.sh) or pass --ckpt=PATH"
        bd_note "evaluating the newest checkpoint, $CKPT (--ckpt=PATH chooses another)"
    fi
    CKPT=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")
    bd_check_helper
    bd_source_env_npu
    bd_resolve_device

    RANK_SIZE=$CARDS
    CASE_NAME=${NETWORK}_bs${BATCH_SIZE}_${RANK_SIZE}p_eval
    mkdir -p "$BD_DEVICE_DIR" || bd_die "cannot create $BD_DEVICE_DIR (set OUTPUT_ROOT)"
    BD_SETTINGS="exp=$EXP data_root=$DATA_ROOT cards=$CARDS batch=$BATCH_SIZE ckpt=$CKPT"
    BD_SETTINGS+=" precision=$PRECISION device=$DEVICE extra=${BD_EXTRA_ARGS[*]}"
    BD_START_S=$(bd_now)
    bd_new_run_dir "$CASE_NAME"
    bd_note "new run directory $RUN_DIR"
    bd_lock_run_dir
    bd_start_run eval
    trap 'bd_on_exit' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    bd_eval_or_fail "$CKPT" "$CARDS" "$BATCH_SIZE" ""
    bd_finish_run completed
    BD_FINISHED=1
    bd_summarize || bd_die "the summary of $RUN_DIR is incomplete (see the warnings above)"
}
