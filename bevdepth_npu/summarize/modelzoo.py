"""The ModelZoo summary file ``<CaseName>.log``: which keys, in which order, the CaseName, and
the rule that it only ever replaces an earlier summary.

``<CaseName>.log`` holds ``Key = value`` lines for the keys of LOG_KEYS that have values.
CaseName is --case-name, else run.json case_name, else ``<Network>_bs<BatchSize>_<RankSize>p_
<kind>`` (kind acc/perf/eval; unknown parts left out). An existing file of that name is
replaced only if it holds nothing but ``Key = value`` lines; anything else (a training log,
notes) is refused.

Part of ``bevdepth-npu summarize`` (bevdepth_npu/summarize/); tests: tests/unit/test_summarize.py.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

from bevdepth_npu.summarize.figures import SummarizeInputError

DEFAULT_NETWORK = "BEVDepth"   # the only network this project trains
CASE_SUFFIX = {"full": "acc", "performance": "perf", "eval": "eval"}

# ModelZoo keys in the order the .log lists them.
LOG_KEYS: Tuple[str, ...] = (
    "Network", "RankSize", "BatchSize", "DeviceType", "CaseName",
    "ActualFPS", "ActualLoss", "TrainingTime", "E2ETrainingTime",
    "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS",
)

_CASE_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_MODELZOO_LINE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]* = [^\r\n]*")


def case_name(network: str, batch: Optional[int], ranks: Optional[int], mode: Optional[str]
              ) -> str:
    parts = [network]
    if batch is not None:
        parts.append(f"bs{batch}")
    if ranks is not None:
        parts.append(f"{ranks}p")
    if mode is not None:
        parts.append(CASE_SUFFIX[mode])
    return "_".join(parts)


def check_case_name(name: str, source: str) -> None:
    if not _CASE_NAME_RE.fullmatch(name):
        raise SummarizeInputError(
            f"CaseName {name!r} ({source}) is not a plain file name "
            "(letters, digits, '._+-', not starting with '.')")


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def log_text(summary: Dict[str, Any]) -> str:
    return "".join(f"{key} = {format_value(summary[key])}\n" for key in LOG_KEYS
                   if key in summary)


def check_target(target: str, case: str, protected: Tuple[str, ...] = ()) -> None:
    """Refuse to replace anything that is not an earlier ModelZoo summary."""
    if not os.path.lexists(target):
        return
    for path in protected:
        if os.path.exists(target) and os.path.samefile(target, path):
            raise SummarizeInputError(
                f"CaseName {case!r} would overwrite the training log {target}; "
                "pass another --case-name")
    if not os.path.isfile(target) or os.path.islink(target):
        raise SummarizeInputError(f"{target} exists and is not a regular file; not replacing it")
    with open(target, "rb") as handle:
        head = handle.read(1 << 16)
    try:
        lines = head.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["<binary>"]
    if any(line and not _MODELZOO_LINE_RE.fullmatch(line) for line in lines):
        raise SummarizeInputError(
            f"{target} exists and holds more than 'Key = value' lines, so it is not an earlier "
            "summary; not replacing it (pass another --case-name)")
