"""``bevdepth-npu ops --on-device``: one real training step of the experiment on an Ascend NPU,
in a fresh process, with every CPU fallback torch_npu reports turned into a FAIL.

Why a fresh process and its file descriptor 2: torch_npu reports a CPU fallback once per op and
process, from C++ (``npu_cpu_fallback`` in ``torch_npu/csrc/aten/VariableFallbackKernel.cpp``
of the pinned release), so the warning must be read where it is written, on the child's fd 2,
and an op that fell back earlier in the same process would not be reported again. The child runs
with ``TORCH_NPU_DISABLED_WARNING`` not ``1`` (torch_npu's OptionsManager silences its warnings,
this one included, when it is) and without ``RANK`` (torch_npu warns on rank 0 only).

What the child does (``child_main``): the experiment's model on the NPU, NpuFusedAdamW
(``device.adamw``), torch_npu's GradScaler, autocast, clipping at 5 as the port does it; step 1,
then step 2 with ``torch.npu.set_sync_debug_mode("warn")`` (torch_npu/npu/utils.py), whose
warning is "called a synchronizing NPU operation". The sync warnings are counted between the
child's step-2 markers and reported as "at least N": the mode is a prototype that does not detect
every synchronising operation (its own warning says so) and Python shows a repeated warning from
one place once unless told otherwise (the child says ``always``, C++ may still deduplicate).

The warning texts, from the wheel pin's ``lib/libtorch_npu.so`` (``strings``):
"CAUTION: The operator '<op>' is not currently supported on the NPU backend and will fall back
to run on the CPU." and "called a synchronizing NPU operation".

Not part of the training scripts' pre-flight: it loads the model and runs two steps, about a
minute or more on the R50 experiment.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

FALLBACK = re.compile(r"CAUTION: The operator '([^']+)' is not currently supported on the NPU "
                      r"backend and will fall back to run on the CPU")
SYNC = re.compile(r"called a synchronizing NPU operation")
STEP_BEGIN = "bevdepth-npu ops: step 2 begins"
STEP_END = "bevdepth-npu ops: step 2 ends"
GRADIENT_CLIP = 5.0


def child_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The child's environment: torch_npu's warnings on, rank 0."""
    env = dict(os.environ if base is None else base)
    if env.get("TORCH_NPU_DISABLED_WARNING") == "1":
        env["TORCH_NPU_DISABLED_WARNING"] = "0"
    env.pop("RANK", None)
    env["PYTHONWARNINGS"] = "always"
    return env


def child_command(exp: str, pooling: str) -> List[str]:
    return [sys.executable, "-m", "bevdepth_npu.ops.on_device", "--exp", exp,
            "--pooling", pooling]


def capture(command: Sequence[str], env: Dict[str, str], timeout_s: float = 1800.0
            ) -> Tuple[int, str]:
    """Run ``command``; its file descriptor 2 goes to a file, read back afterwards (C++ writes
    included). Returns (exit status, the text)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(list(command), env=env, stdout=None, stderr=err,
                              timeout=timeout_s, check=False)
        err.seek(0)
        return proc.returncode, err.read().decode(errors="replace")


def parse(text: str) -> Tuple[List[str], Optional[int]]:
    """(the ops that fell back, in order of first report; sync warnings within step 2, None
    when the step-2 markers are missing)."""
    ops: List[str] = []
    for match in FALLBACK.finditer(text):
        if match.group(1) not in ops:
            ops.append(match.group(1))
    begin, end = text.find(STEP_BEGIN), text.find(STEP_END)
    syncs = len(SYNC.findall(text[begin:end])) if 0 <= begin < end else None
    return ops, syncs


def report(returncode: int, text: str) -> Tuple[List[str], int]:
    """The lines to print and the exit status: 1 on a fallback or a failed child."""
    ops, syncs = parse(text)
    lines = [f"FAIL: CPU fallback on the NPU: {op}" for op in ops]
    if syncs is not None:
        lines.append(f"device syncs in step 2: at least {syncs} (sync debug mode)")
    if returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-20:])
        lines.append(f"FAIL: the step's process exited with status {returncode}:\n{tail}")
    elif syncs is None:
        lines.append("FAIL: the step's process did not reach the end of step 2")
    if not lines or (returncode == 0 and not ops and syncs is not None):
        lines.append("on-device: no CPU fallback")
    bad = bool(ops) or returncode != 0 or syncs is None
    return lines, 1 if bad else 0


def run(args: argparse.Namespace, command: Optional[Sequence[str]] = None) -> int:
    """The parent: refuses off an NPU (``command`` given: a stand-in child, for tests)."""
    if command is None:
        from bevdepth_npu import devices
        if devices.choose(None) != "npu":
            from bevdepth_npu.errors import UserError
            raise UserError("--on-device needs an Ascend NPU with CANN and torch_npu set up "
                            "(`bevdepth-npu env --device npu`); off the hardware the recorded "
                            "inventory (`bevdepth-npu ops`) is what can be checked")
        command = child_command(args.exp, args.pooling)
    returncode, text = capture(command, child_env())
    lines, status = report(returncode, text)
    for line in lines:
        print(line, file=sys.stderr if line.startswith("FAIL") else sys.stdout)
    return status


def child_main(argv: Optional[Sequence[str]] = None) -> int:
    """Two training steps of the experiment on the NPU (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m bevdepth_npu.ops.on_device")
    p.add_argument("--exp", default="smoke")
    p.add_argument("--pooling", default="product")
    args = p.parse_args(argv)
    import torch
    from bevdepth.utils import device

    from bevdepth_npu.ops import recipe
    device.start("npu")
    module, model = recipe.load_model(args.exp, args.pooling)
    model.log = lambda *a, **k: None
    model.to(device.current()).train()
    optimizer = device.adamw(model.parameters(), lr=2e-4 / 64, weight_decay=1e-7)
    scaler = torch.npu.amp.GradScaler()
    for step in (1, 2):
        # host tensors, as the loader gives them: training_step moves what it needs
        batch = recipe.batch_for(module, model, seed=step)
        if step == 2:
            torch.npu.synchronize()
            torch.npu.set_sync_debug_mode("warn")
            os.write(2, (STEP_BEGIN + "\n").encode())
        with device.autocast():
            loss = model.training_step(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        device.clip_grad_norm(model.parameters(), GRADIENT_CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if step == 2:
            torch.npu.set_sync_debug_mode("default")
            torch.npu.synchronize()
            os.write(2, (STEP_END + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
