#!/usr/bin/env bash
# BEVDepth smoke run: the whole pipeline in minutes on any machine, the project's end-to-end test.
# Prepares the environment, generates the synthetic nuScenes (cached), writes its info files and
# depth ground truth, trains the smoke experiment (the R50 2-key recipe's model class and code path
# at toy sizes) for STEPS steps on the best available device, evaluates the checkpoint with the
# nuScenes devkit on mini_val and prints the metrics table.
#
# Usage:  bash test/train_smoke.sh [--name=value ...] [-- EXPERIMENT ARGS...]
#
# Settings: --name=value flags or environment variables (NAME in capitals), defaults in ():
#   --steps=N               training steps (60)
#   --batch-size=N          samples per step, training and evaluation (2)
#   --learning-rate=X       learning rate per sample; times the batch size (0.001, as in
#                           bench/learning_check.py; the recipe's 2e-4/64 moves nothing in 60 steps)
#   --num-workers=N         data loader processes (1 on cpu, 4 otherwise)
#   --threads=N             cpu only: torch threads (cores minus loader processes, at least 1;
#                           OMP_NUM_THREADS wins if set). More threads than free cores make every
#                           step wait for the slowest one.
#   --device=auto|cpu|cuda|npu   environment and training device (auto: npu, cuda, else cpu)
#   --python=PATH           interpreter of an existing environment; skips `bevdepth-npu env`
#                           (default: the environment `bevdepth-npu env --device DEVICE` builds
#                           or reuses under ~/.cache/bevdepth-npu/venvs)
#   --data-dir=DIR          nuScenes-style root in the v1.0-mini layout. Created with the
#                           synthetic generator if it does not exist; info files and depth_gt are
#                           written if missing. A real nuScenes-mini works too. (default: a cached
#                           synthetic dataset under ~/.cache/bevdepth-npu/data, keyed by the
#                           generator settings and code, reused when present)
#   --scenes=N --samples-per-scene=N --synth-seed=N   generator settings (2 10 0)
#   --warmup-steps=N        first steps left out of the speed figures of the summary (5)
#   --exp=FILE              experiment, relative to the BEVDepth checkout
#                           (bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py)
#   --ascend-device-id=N    output subdirectory, ModelZoo convention (0)
#   --output-root=DIR       (test/output next to this script)
#   after --                passed to the experiment unchanged (training and evaluation)
#
# Output: <output root>/<id>/BEVDepth_smoke_bs<B>_1p_acc_<time>/ with train_<id>.log, eval_<id>.log,
# run.json, the checkpoint, eval/metrics_summary.json (the devkit's metrics JSON), summary.json,
# <CaseName>.log and curves.png (loss curve); links to the newest run's files in <output root>/<id>/.
# Exit status 0 when every stage succeeded and the summary is complete.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT=${BASH_SOURCE[0]}
bd_parse_args "$SCRIPT" "steps batch-size learning-rate num-workers threads device python data-dir
    scenes samples-per-scene synth-seed warmup-steps exp ascend-device-id output-root" "" "$@"

STEPS=${STEPS:-60}
BATCH_SIZE=${BATCH_SIZE:-2}
LEARNING_RATE=${LEARNING_RATE:-0.001}
DEVICE=${DEVICE:-auto}
SCENES=${SCENES:-2}
SAMPLES_PER_SCENE=${SAMPLES_PER_SCENE:-10}
SYNTH_SEED=${SYNTH_SEED:-0}
WARMUP_STEPS=${WARMUP_STEPS:-5}
ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
NETWORK=BEVDepth_smoke
SEED=0
EXP=${EXP:-bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py}

bd_require_int STEPS 1
bd_require_int BATCH_SIZE 1
bd_require_positive_number LEARNING_RATE
bd_require_choice DEVICE auto cpu cuda npu
bd_require_int SCENES 2 # one mini_train and one mini_val scene at least
bd_require_int SAMPLES_PER_SCENE 2
bd_require_int SYNTH_SEED 0
bd_require_int WARMUP_STEPS 0
((WARMUP_STEPS < STEPS)) || bd_die "WARMUP_STEPS=$WARMUP_STEPS must be below STEPS=$STEPS: the summary needs measured steps"
bd_require_int ASCEND_DEVICE_ID 0
[[ -z ${NUM_WORKERS:-} ]] || bd_require_int NUM_WORKERS 0
[[ -z ${THREADS:-} ]] || bd_require_int THREADS 1

START_S=$(bd_now)
TEST_DIR=$(cd "$(dirname "$SCRIPT")" && pwd)
REPO_ROOT=$(dirname "$TEST_DIR")
[[ -d $REPO_ROOT/bevdepth_npu ]] || bd_die "$REPO_ROOT is not a bevdepth-npu checkout (no bevdepth_npu/ there)"
CACHE=${BEVDEPTH_NPU_CACHE:-$HOME/.cache/bevdepth-npu}
OUTPUT_ROOT=${OUTPUT_ROOT:-$TEST_DIR/output}

# ------------------------------------------------------------------------------------------------
# environment

if [[ -n ${PYTHON:-} ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || bd_die "PYTHON=$PYTHON is not an executable"
    bd_note "using the environment of $PYTHON (bevdepth-npu env skipped)"
else
    bd_note "preparing the environment: bevdepth-npu env --device $DEVICE"
    # Progress goes to stderr; the last line on stdout is the interpreter.
    PYTHON=$(cd "$REPO_ROOT" && python3 -m bevdepth_npu env --device "$DEVICE" --print-python | tail -n 1) ||
        bd_die "bevdepth-npu env --device $DEVICE failed (see above); --python=PATH uses an existing environment"
fi
# The helper from this checkout, whatever the environment has installed.
export PYTHONPATH=$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}
BEVDEPTH_ROOT=$("$PYTHON" -c 'import os, bevdepth; print(os.path.dirname(os.path.dirname(bevdepth.__file__)))') ||
    bd_die "$PYTHON cannot import bevdepth: not a bevdepth-npu environment (run bevdepth-npu env)"
case $EXP in
    /*) ;;
    *) EXP=$BEVDEPTH_ROOT/$EXP ;;
esac
[[ -f $EXP ]] || bd_die "EXP=$EXP: no such experiment file (is $BEVDEPTH_ROOT the patched BEVDepth tree? bevdepth-npu apply bevdepth)"
if [[ $DEVICE == auto ]]; then
    DEVICE=$(cd "$BEVDEPTH_ROOT" && "$PYTHON" -c 'from bevdepth.utils import device; print(device.device_type())') ||
        bd_die "could not determine the device with $PYTHON (set --device=cpu|cuda|npu)"
fi
if [[ $DEVICE == cpu ]]; then
    NUM_WORKERS=${NUM_WORKERS:-1}
    if [[ -z ${OMP_NUM_THREADS:-} ]]; then
        THREADS=${THREADS:-$(($(nproc) - NUM_WORKERS))}
        ((THREADS >= 1)) || THREADS=1
        export OMP_NUM_THREADS=$THREADS
    fi
else
    NUM_WORKERS=${NUM_WORKERS:-4}
fi
bd_note "python $PYTHON, BEVDepth $BEVDEPTH_ROOT, device $DEVICE${OMP_NUM_THREADS:+, $OMP_NUM_THREADS torch threads}"

# ------------------------------------------------------------------------------------------------
# data: synthetic nuScenes, info files, depth ground truth

# The default dataset is keyed by what determines its bytes: generator settings and the code of
# the generator and of the two BEVDepth scripts.
data_key() {
    "$PYTHON" - "$REPO_ROOT/bevdepth_npu/synth" "$BEVDEPTH_ROOT/scripts" <<'PY'
import glob, hashlib, os, sys

digest = hashlib.sha256()
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.py")))
files += [os.path.join(sys.argv[2], name) for name in ("gen_info.py", "gen_depth_gt.py")]
for path in files:
    with open(path, "rb") as handle:
        digest.update(os.path.basename(path).encode() + b"\0" + handle.read())
print(digest.hexdigest()[:12])
PY
}

# prepare_data DIR: synthetic dataset if DIR has no v1.0-mini, then the info files if missing, then
# depth_gt (gen_depth_gt.py skips the files that exist).
prepare_data() {
    local dir=$1
    if [[ ! -d $dir/v1.0-mini ]]; then
        "$PYTHON" -m bevdepth_npu synth --out "$dir" --scenes "$SCENES" \
            --samples-per-scene "$SAMPLES_PER_SCENE" --seed "$SYNTH_SEED" ||
            bd_die "bevdepth-npu synth --out $dir failed"
    fi
    if [[ ! -f $dir/nuscenes_infos_train.pkl || ! -f $dir/nuscenes_infos_val.pkl ]]; then
        (cd "$BEVDEPTH_ROOT" && "$PYTHON" scripts/gen_info.py --data-root "$dir" --version v1.0-mini) ||
            bd_die "scripts/gen_info.py --data-root $dir failed"
    fi
    (cd "$BEVDEPTH_ROOT" && "$PYTHON" scripts/gen_depth_gt.py --data-root "$dir") ||
        bd_die "scripts/gen_depth_gt.py --data-root $dir failed"
}

READY_MARK=.bevdepth-npu-smoke-ready
if [[ -n ${DATA_DIR:-} ]]; then
    DATA_DIR=$(mkdir -p "$DATA_DIR" && cd "$DATA_DIR" && pwd) || bd_die "DATA_DIR=$DATA_DIR cannot be created"
    bd_note "data: $DATA_DIR"
    prepare_data "$DATA_DIR"
else
    DATA_DIR=$CACHE/data/synth-v1.0-mini-s${SCENES}-n${SAMPLES_PER_SCENE}-seed${SYNTH_SEED}-$(data_key)
    if [[ -f $DATA_DIR/$READY_MARK ]]; then
        bd_note "data: reusing $DATA_DIR"
    else
        # Built beside its final name and renamed when complete: an interrupted preparation is
        # never mistaken for a dataset.
        partial=$DATA_DIR.partial-$$
        bd_note "data: generating $DATA_DIR"
        mkdir -p "$(dirname "$DATA_DIR")"
        prepare_data "$partial"
        touch "$partial/$READY_MARK"
        if ! mv -T "$partial" "$DATA_DIR" 2>/dev/null; then
            # Another run finished the same dataset first; use it.
            [[ -f $DATA_DIR/$READY_MARK ]] || bd_die "cannot move $partial to $DATA_DIR"
            rm -rf -- "$partial"
        fi
    fi
fi

# ------------------------------------------------------------------------------------------------
# run directory

BD_DEVICE_DIR=$OUTPUT_ROOT/$ASCEND_DEVICE_ID
mkdir -p "$BD_DEVICE_DIR" || bd_die "cannot create $BD_DEVICE_DIR (set --output-root)"
CASE_NAME=${NETWORK}_bs${BATCH_SIZE}_1p_acc
bd_new_run_dir "$CASE_NAME"
bd_lock_run_dir
bd_note "run directory $RUN_DIR"
bd_run_json "str:network=$NETWORK" "str:case_name=$CASE_NAME" "num:rank_size=1" \
    "num:batch_size_per_device=$BATCH_SIZE" "str:device_type=$(uname -m)" "str:mode=full" \
    "str:device=$DEVICE" "str:status=running" "str:data_root=$DATA_DIR" "num:steps=$STEPS" \
    "new_attempt" "num:attempt.start_time_s=$START_S"
bd_link latest "$(basename "$RUN_DIR")"
LOG_ID=$ASCEND_DEVICE_ID
STATUS=running
finish() {
    local rc=$?
    if [[ $STATUS == running ]]; then
        bd_run_json "num:attempt.end_time_s=$(bd_now)" "str:status=failed" || true
    fi
    return "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

COMMON_FLAGS=(--data_root "$DATA_DIR" --device "$DEVICE" --seed "$SEED"
    --batch_size_per_device "$BATCH_SIZE" --num_workers "$NUM_WORKERS")

# ------------------------------------------------------------------------------------------------
# train

TRAIN_LOG=$RUN_DIR/train_$LOG_ID.log
bd_link "train_$LOG_ID.log" "$(basename "$RUN_DIR")/train_$LOG_ID.log"
# --max_epochs -1: the step count alone ends the run, whatever the dataset size.
train_cmd=("$PYTHON" "$EXP" "${COMMON_FLAGS[@]}" --learning_rate "$LEARNING_RATE"
    --max_steps "$STEPS" --max_epochs -1 --default_root_dir "$RUN_DIR" "${BD_EXTRA_ARGS[@]}")
printf '[%s] %s\n' "$(date '+%F %T')" "${train_cmd[*]}" >"$TRAIN_LOG"
bd_run_json "num:attempt.train_start_s=$(bd_now)"
rc=0
(cd "$BEVDEPTH_ROOT" && "${train_cmd[@]}") 2>&1 | tee -a "$TRAIN_LOG" || rc=$?
bd_run_json "num:attempt.train_end_s=$(bd_now)" "num:attempt.train_exit_code=$rc"
((rc == 0)) || bd_fail "$rc" "training failed (exit $rc); evaluation skipped. Log: $TRAIN_LOG"

# The checkpoint this run wrote: checkpoints/last.ckpt where the experiment keeps one, else the
# newest *.ckpt below the run directory (Lightning's lightning_logs/version_N/checkpoints/).
CKPT=$("$PYTHON" - "$RUN_DIR" <<'PY'
import os, sys

if os.path.isfile(os.path.join(sys.argv[1], "checkpoints", "last.ckpt")):
    print(os.path.join(sys.argv[1], "checkpoints", "last.ckpt"))
else:
    found = [os.path.join(d, n) for d, _, files in os.walk(sys.argv[1]) for n in files
             if n.endswith(".ckpt")]
    if found:
        print(max(found, key=lambda p: (os.stat(p).st_mtime_ns, p)))
PY
)
[[ -n $CKPT ]] || bd_die "training ended without writing a checkpoint below $RUN_DIR; nothing to evaluate (see $TRAIN_LOG)"
bd_run_json "str:checkpoint=$CKPT"

# ------------------------------------------------------------------------------------------------
# evaluate with the nuScenes devkit (mini_val)

EVAL_LOG=$RUN_DIR/eval_$LOG_ID.log
bd_link "eval_$LOG_ID.log" "$(basename "$RUN_DIR")/eval_$LOG_ID.log"
eval_cmd=("$PYTHON" "$EXP" -e --ckpt_path "$CKPT" "${COMMON_FLAGS[@]}"
    --default_root_dir "$RUN_DIR/eval" "${BD_EXTRA_ARGS[@]}")
printf '[%s] %s\n' "$(date '+%F %T')" "${eval_cmd[*]}" >"$EVAL_LOG"
rc=0
(cd "$BEVDEPTH_ROOT" && "${eval_cmd[@]}") 2>&1 | tee -a "$EVAL_LOG" || rc=$?
bd_run_json "num:attempt.eval_exit_code=$rc"
((rc == 0)) || bd_fail "$rc" "evaluation failed (exit $rc). Log: $EVAL_LOG"
METRICS=$RUN_DIR/eval/metrics_summary.json
[[ -f $METRICS ]] || bd_die "evaluation wrote no $METRICS (see $EVAL_LOG)"

# ------------------------------------------------------------------------------------------------
# summary and metrics table

bd_run_json "num:attempt.end_time_s=$(bd_now)" "str:status=completed"
STATUS=completed
summary_rc=0
"$PYTHON" -m bevdepth_npu summarize "$RUN_DIR" --mode full --warmup-steps "$WARMUP_STEPS" ||
    summary_rc=$?
if [[ -f $RUN_DIR/$CASE_NAME.log ]]; then
    bd_link "$CASE_NAME.log" "$(basename "$RUN_DIR")/$CASE_NAME.log"
fi

"$PYTHON" - "$METRICS" <<'PY'
import json, sys

with open(sys.argv[1], encoding="utf-8") as handle:
    metrics = json.load(handle)
errors = (("mATE", "trans_err"), ("mASE", "scale_err"), ("mAOE", "orient_err"),
          ("mAVE", "vel_err"), ("mAAE", "attr_err"))
print()
print("nuScenes detection metrics (devkit detection_cvpr_2019 protocol, mini_val split)")
print(f"mAP: {metrics['mean_ap']:.4f}")
for name, key in errors:
    print(f"{name}: {metrics['tp_errors'][key]:.4f}")
print(f"NDS: {metrics['nd_score']:.4f}")
print()
print("Per-class results:")
print(f"{'Object Class':<22}{'AP':>8}" + "".join(f"{n[1:]:>8}" for n, _ in errors))
for name, ap in metrics["mean_dist_aps"].items():
    tp = metrics["label_tp_errors"][name]
    print(f"{name:<22}{ap:>8.3f}" + "".join(f"{tp[key]:>8.3f}" for _, key in errors))
PY

elapsed_s=$(awk -v a="$START_S" -v b="$(bd_now)" 'BEGIN { printf "%.0f", b - a }')
bd_note "metrics JSON: $METRICS"
bd_note "run directory: $RUN_DIR (wall time ${elapsed_s} s)"
if ((summary_rc != 0)); then
    bd_fail "$summary_rc" "the summary of $RUN_DIR is incomplete (see the warnings of bevdepth-npu summarize above)"
fi
[[ -f $RUN_DIR/curves.png ]] || bd_die "no loss curve: $RUN_DIR/curves.png was not written (is matplotlib installed in $PYTHON's environment?)"
bd_note "loss curve: $RUN_DIR/curves.png"
