#!/usr/bin/env bash
# Ascend NPU environment for BEVDepth: CANN's set_env.sh plus the runtime settings this model was
# tuned with. Meant to be sourced (the training and evaluation scripts do it for you):
#
#   source test/env_npu.sh
#
# On a machine without the CANN toolkit (CPU or CUDA) it changes nothing and says so; it never
# fails and never turns on strict mode in the calling shell. Every setting keeps a value you
# exported before sourcing it. The toolkit is looked for at $CANN_SET_ENV (a set_env.sh path),
# then $ASCEND_TOOLKIT_HOME, /usr/local/Ascend/ascend-toolkit and $HOME/Ascend/ascend-toolkit.
#
# Not set here on purpose: CPU_AFFINITY_CONF (torch_npu's own core binding: each training process
# sets it at start-up when BEVDEPTH_BIND_CORES=1, which the training scripts switch on for NPU
# runs, to the mode its torch_npu supports; a value exported here is kept), HCCL_IF_IP / HCCL_SOCKET_IFNAME (the network interface for
# multi-node HCCL depends on the cluster; set them yourself when several NIC are present).

bd_env_npu_main() {
    local set_env="" candidate
    for candidate in "${CANN_SET_ENV:-}" \
        "${ASCEND_TOOLKIT_HOME:+$ASCEND_TOOLKIT_HOME/../set_env.sh}" \
        "${ASCEND_TOOLKIT_HOME:+$ASCEND_TOOLKIT_HOME/set_env.sh}" \
        /usr/local/Ascend/ascend-toolkit/set_env.sh \
        "$HOME/Ascend/ascend-toolkit/set_env.sh"; do
        if [[ -n $candidate && -f $candidate ]]; then
            set_env=$candidate
            break
        fi
    done
    if [[ -z $set_env ]]; then
        echo "env_npu.sh: no CANN toolkit found (no set_env.sh); NPU settings skipped, nothing changed"
        return 0
    fi
    # CANN's script reads unset variables; the caller may run with set -u.
    local saved_flags=$-
    set +eu
    # shellcheck source=/dev/null
    source "$set_env"
    [[ $saved_flags == *u* ]] && set -u
    [[ $saved_flags == *e* ]] && set -e

    # Host logs: errors only (3), not to the terminal, no event logs. Verbose logging costs time.
    export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
    export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
    export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}
    # Operator dispatch: level 2 task queue (more host work overlapped with the device).
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    # Fuse pairs of non-contiguous operators.
    export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
    # HCCL: no trust list, and a link-up timeout (s) long enough for eight ranks loading data.
    export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}

    # Device-side logs: errors only, events off. Needs the driver's tool; best effort.
    if command -v msnpureport >/dev/null 2>&1; then
        local id
        for id in 0 1 2 3 4 5 6 7; do
            msnpureport -g error -d "$id" >/dev/null 2>&1 || true
        done
        msnpureport -e disable >/dev/null 2>&1 || true
    fi
    echo "env_npu.sh: CANN environment from $set_env"
}

bd_env_npu_main
unset -f bd_env_npu_main
# Sourced: a plain `true` so that the caller sees success. Run directly: nothing to keep.
true
