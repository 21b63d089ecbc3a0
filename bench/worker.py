"""Benchmark worker: builds benchmark cases once, then times them on request.

Started by ``bench.harness.Worker``; not meant to be run by hand, but it can be:

    python -m bench.worker --role patched          # then type JSON lines, e.g. {"op": "hello"}

Roles (which ``bevdepth`` this process imports):
  patched        the installed bevdepth (the patched tree of the bevdepth-npu environment)
  upstream-cpu   the pristine checkout given by --upstream-source, with upstream's two CUDA
                 voxel-pooling extensions replaced by the parity tests' reference pooling and
                 ``.cuda()`` mapped to the CPU (bevdepth_npu/testing.py does both, for the
                 parity tests too; nothing else of upstream changes)
  upstream-cuda  the pristine checkout as it is, its compiled CUDA extensions included
  plain          no bevdepth (harness self-tests)

Protocol: one JSON object per line on stdin, one reply per line on stdout
({"ok": true, ...} or {"ok": false, "error": ..., "traceback": ...}). Ops: hello, setup (key,
factory "module:function", params), run (key), call (key, method, kwargs), drop (key), exit.
Everything else the process prints goes to stderr, so it cannot corrupt the replies.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Optional

from bench import harness
from bevdepth_npu import testing

def prepare_role(role: str, upstream_source: Optional[str]) -> Dict[str, Any]:
    """Make ``import bevdepth`` give the code this role measures; return facts about it."""
    facts: Dict[str, Any] = dict(role=role)
    if role in (harness.ROLE_UPSTREAM_CPU, harness.ROLE_UPSTREAM_CUDA):
        if not upstream_source:
            raise harness.BenchError(f"role {role} needs --upstream-source")
        source = Path(upstream_source).resolve()
        if not (source / "bevdepth").is_dir():
            raise harness.BenchError(f"--upstream-source {source} has no bevdepth/ package")
        testing.import_pristine(source)
        if role == harness.ROLE_UPSTREAM_CPU:
            testing.install_cpu_shims()
        facts["bevdepth_root"] = str(source)
    elif role == harness.ROLE_PATCHED:
        import bevdepth
        root = Path(bevdepth.__file__).resolve().parent
        if not (root / "utils" / "device.py").is_file():
            raise harness.BenchError(
                f"bevdepth is imported from {root}, which is not the patched tree (no "
                "bevdepth/utils/device.py); run the benchmarks in the bevdepth-npu environment")
        facts["bevdepth_root"] = str(root.parent)
    return facts


class Server:

    def __init__(self, role: str, facts: Dict[str, Any]):
        self.role = role
        self.facts = facts
        self.cases: Dict[str, Any] = {}

    def handle(self, message: Dict[str, Any]) -> Dict[str, Any]:
        op = message.get("op")
        if op == "hello":
            return dict(self.facts, pid=os.getpid(), python=sys.version.split()[0],
                        **_torch_facts())
        if op == "setup":
            module_name, _, function_name = message["factory"].partition(":")
            factory = getattr(importlib.import_module(module_name), function_name)
            case = factory(message.get("params") or {})
            self.cases[message["key"]] = case
            describe = getattr(case, "describe", None)
            return dict(info=describe() if describe else {})
        if op == "run":
            return dict(figures=self.run(self.cases[message["key"]]))
        if op == "call":
            case = self.cases[message["key"]]
            return dict(result=getattr(case, message["method"])(**(message.get("kwargs") or {})))
        if op == "drop":
            self.cases.pop(message["key"], None)
            import gc
            gc.collect()
            return {}
        raise harness.BenchError(f"unknown op {op!r}")

    @staticmethod
    def run(case: Any) -> Dict[str, float]:
        """Time one ``case.run()``; the case may report its own ``time_s`` (when only part of
        what it does is the thing measured) and other figures."""
        synchronize = getattr(case, "synchronize", None)
        cuda = getattr(case, "device", "cpu") == "cuda"
        if cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_before = harness.rss_bytes()
        harness.reset_peak_rss()
        started = time.perf_counter()
        extra = case.run()
        if synchronize:
            synchronize()
        elapsed = time.perf_counter() - started
        figures: Dict[str, float] = dict(time_s=elapsed)
        peak = harness.peak_rss_bytes()
        if peak is not None:
            figures["peak_rss_bytes"] = float(peak)
            if rss_before is not None:
                figures["peak_rss_increase_bytes"] = float(max(0, peak - rss_before))
        if cuda:
            import torch
            figures["cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())
        if isinstance(extra, dict):
            figures.update({k: float(v) for k, v in extra.items()})
        return figures


def _torch_facts() -> Dict[str, Any]:
    if "torch" not in sys.modules:
        return {}
    import torch
    return dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bench worker (see the module docstring)")
    parser.add_argument("--role", choices=harness.ROLES, required=True,
                        help="which bevdepth this process imports")
    parser.add_argument("--upstream-source", default=None,
                        help="pristine BEVDepth checkout (upstream roles)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args(argv)

    # Replies go to the original stdout; everything printed later (by upstream code, mmcv
    # warnings, C extensions writing to fd 1) lands on stderr instead.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(payload: Dict[str, Any]) -> None:
        replies.write(json.dumps(payload) + "\n")
        replies.flush()

    try:
        if args.role != harness.ROLE_PLAIN or args.threads:
            import torch
            if args.threads:
                torch.set_num_threads(args.threads)
        facts = prepare_role(args.role, args.upstream_source)
    except Exception as error:  # reported to the parent, which shows the message
        reply(dict(ok=False, error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc()))
        return 1
    server = Server(args.role, facts)
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("op") == "exit":
            break
        try:
            payload = dict(ok=True, **server.handle(message))
        except Exception as error:
            payload = dict(ok=False, error=f"{type(error).__name__}: {error}",
                           traceback=traceback.format_exc())
        reply(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
