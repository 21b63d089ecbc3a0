"""`bevdepth-npu ops --on-device`'s parent side off the hardware: a contract double (a tiny child
process writing torch_npu's real warning lines to its file descriptor 2 from C level, as
libtorch_npu.so does) drives the FAIL path; the child's environment turns torch_npu's warnings on.

The warning texts are checked against the pinned wheel's binary in
tests/integration/test_ops_physical.py.
Run:
    PYTHONPATH=. python -m pytest tests/unit/test_ops_on_device.py -q
"""
from __future__ import annotations

import argparse
import sys

from bevdepth_npu.ops import on_device

FALLBACK_LINE = ("[W VariableFallbackKernel.cpp:51] Warning: CAUTION: The operator "
                 "'aten::_foreach_mul_.Tensor' is not currently supported on the NPU backend and "
                 "will fall back to run on the CPU. This may have performance implications. "
                 "(function npu_cpu_fallback)\n")
SYNC_LINE = "UserWarning: called a synchronizing NPU operation (Triggered internally)\n"


def double(*chunks: str, status: int = 0):
    """A child that writes ``chunks`` to fd 2 with os.write (below Python's sys.stderr, as a
    C++ log line is written) and exits with ``status``."""
    script = ("import os, sys\n"
              f"for chunk in {list(chunks)!r}:\n"
              "    os.write(2, chunk.encode())\n"
              f"sys.exit({status})\n")
    return [sys.executable, "-c", script]


def args() -> argparse.Namespace:
    return argparse.Namespace(exp="smoke", pooling="product")


def test_a_fallback_warning_fails_naming_the_op(capsys) -> None:
    command = double("step 1\n", FALLBACK_LINE, on_device.STEP_BEGIN + "\n", SYNC_LINE,
                     SYNC_LINE, on_device.STEP_END + "\n")
    assert on_device.run(args(), command=command) == 1
    out = capsys.readouterr()
    assert "FAIL: CPU fallback on the NPU: aten::_foreach_mul_.Tensor" in out.err
    assert "device syncs in step 2: at least 2" in out.out


def test_a_clean_step_passes_and_counts_only_step_2s_syncs(capsys) -> None:
    command = double(SYNC_LINE, on_device.STEP_BEGIN + "\n", SYNC_LINE,
                     on_device.STEP_END + "\n", SYNC_LINE)
    assert on_device.run(args(), command=command) == 0
    out = capsys.readouterr()
    assert "at least 1 " in out.out and "FAIL" not in out.err


def test_a_failed_or_unfinished_child_fails(capsys) -> None:
    assert on_device.run(args(), command=double("Traceback: boom\n", status=3)) == 1
    assert "exited with status 3" in capsys.readouterr().err
    assert on_device.run(args(), command=double(on_device.STEP_BEGIN + "\n")) == 1
    assert "did not reach the end of step 2" in capsys.readouterr().err


def test_each_op_is_named_once() -> None:
    ops, syncs = on_device.parse(FALLBACK_LINE * 3 + FALLBACK_LINE.replace(
        "_foreach_mul_.Tensor", "special_erfcx"))
    assert ops == ["aten::_foreach_mul_.Tensor", "aten::special_erfcx"] and syncs is None


def test_the_child_runs_with_warnings_on_and_rank_0() -> None:
    env = on_device.child_env({"TORCH_NPU_DISABLED_WARNING": "1", "RANK": "3", "PATH": "/bin"})
    assert env["TORCH_NPU_DISABLED_WARNING"] != "1"
    assert "RANK" not in env and env["PATH"] == "/bin"
