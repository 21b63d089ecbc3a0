"""Device checks of ``bevdepth-npu doctor``: what devices this machine has, the runtime settings
in force, and a two-process collective over the device's DDP backend.

    python -m bevdepth_npu.doctor.machine RANK WORLD_SIZE PORT DEVICE   (one collective rank)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Dict, List

from bevdepth_npu.doctor.report import Fail, Skip

COLLECTIVE_TIMEOUT_S = 120
# NPU settings the training scripts make (test/env_npu.sh) or torch_npu reads
NPU_SETTINGS = ("TASK_QUEUE_ENABLE", "CPU_AFFINITY_CONF", "COMBINED_ENABLE",
                "HCCL_CONNECT_TIMEOUT", "ASCEND_GLOBAL_LOG_LEVEL")


def check_devices(kind: str) -> str:
    """Count, names and memory of the selected device type."""
    import torch
    if kind == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"cpu: {cores} cores usable, torch threads {torch.get_num_threads()}"
    module = getattr(torch, kind)
    count = module.device_count()
    if count == 0:
        raise Fail(f"torch sees no {kind} device", f"check the driver (`{kind}-smi`) and "
                   f"{'ASCEND_RT_VISIBLE_DEVICES' if kind == 'npu' else 'CUDA_VISIBLE_DEVICES'}")
    names: Dict[str, int] = {}
    memory = []
    for index in range(count):
        names[module.get_device_name(index)] = names.get(module.get_device_name(index), 0) + 1
        props = module.get_device_properties(index)
        memory.append(getattr(props, "total_memory", 0) / 2 ** 30)
    described = ", ".join(f"{n} x {name}" for name, n in names.items())
    return f"{count} {kind}: {described}; {min(memory):.0f} GiB each"


def check_runtime_settings(kind: str) -> str:
    import torch
    if kind != "npu":
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        return f"OMP_NUM_THREADS={threads}; cudnn.benchmark={torch.backends.cudnn.benchmark}" \
            if kind == "cuda" else f"OMP_NUM_THREADS={threads}"
    internal = torch.npu.config.allow_internal_format
    settings = [f"allow_internal_format={internal}"]
    settings += [f"{name}={os.environ.get(name, 'unset')}" for name in NPU_SETTINGS]
    opp = os.environ.get("ASCEND_CUSTOM_OPP_PATH", "")
    if "mx_driving" not in opp:
        raise Fail("ASCEND_CUSTOM_OPP_PATH does not name mx_driving's kernel package: "
                   "mx_driving was not imported before the device started",
                   "import mx_driving right after torch_npu (bevdepth.utils.device.start does)")
    if internal:
        raise Fail("torch.npu.config.allow_internal_format is True (this model was tuned "
                   "without internal formats)", "start through bevdepth.utils.device.start")
    return "; ".join(settings)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_collective(kind: str, device_count: int) -> str:
    """all_reduce across two processes over the backend DDP uses here (gloo on CPU)."""
    if kind != "cpu" and device_count < 2:
        raise Skip(f"one {kind} device: no collective to test")
    from bevdepth.utils import device
    backend = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[kind]
    port = str(free_port())
    env = dict(os.environ, **{device.ENV_VAR: kind})
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "bevdepth_npu.doctor.machine", str(rank),
                               "2", port, kind], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for rank in range(2)]
    outputs: List[str] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=COLLECTIVE_TIMEOUT_S)
            outputs.append(out.decode(errors="replace").strip())
    except subprocess.TimeoutExpired:
        raise Fail(f"{backend} all_reduce did not finish in {COLLECTIVE_TIMEOUT_S} s",
                   "check HCCL/NCCL network settings (HCCL_IF_IP, HCCL_SOCKET_IFNAME)"
                   if kind != "cpu" else "") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(rank, out) for rank, (proc, out) in enumerate(zip(procs, outputs))
              if proc.returncode != 0 or not out.endswith("sum=3.0")]
    if failed:
        rank, out = failed[0]
        raise Fail(f"{backend} all_reduce failed on rank {rank}: "
                   f"{(out.splitlines() or ['no output'])[-1]}",
                   "rerun `python -m bevdepth_npu.doctor.machine 0 2 PORT DEVICE` by hand "
                   "to see the whole output")
    return f"{backend}: all_reduce over 2 processes, {time.monotonic() - t0:.1f} s"


def _collective_rank(rank: int, world_size: int, port: int, kind: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from bevdepth.utils import device
    device.start(kind)
    if kind != "cpu":
        getattr(torch, kind).set_device(rank)
    dist.init_process_group(device.ddp_backend(), init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    value = torch.full((4,), float(rank + 1)).to(device.current())
    dist.all_reduce(value)
    dist.destroy_process_group()
    print(f"rank {rank}: sum={value[0].item()}", flush=True)


if __name__ == "__main__":
    _collective_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
