"""The run record (``run.json``) and the layout of run directories: one schema, one reader, one
writer, shared by the runner (``bevdepth-npu run``) and ``bevdepth-npu summarize``.

Layout (one fresh directory per run, nothing earlier deleted)::

    <output root>/<ASCEND_DEVICE_ID>/<CaseName>_<YYYYmmdd-HHMMSS>[-N]/
        run.json  train_<id>.log  eval_<id>.log  steps.jsonl  checkpoints/  eval/ ...
    <output root>/<ASCEND_DEVICE_ID>/latest, train_<id>.log, eval_<id>.log, <CaseName>.log
        symbolic links to the newest run's files (the ModelZoo paths)

``run.json`` holds one object; every field is optional for a reader (other tools write partial
records) and unknown fields are kept as they are:

    mode          full | performance | eval (the smoke run records full)
    status        running | completed | failed | interrupted
    network, case_name, device_type, device, settings, bevdepth_root, python, checkpoint,
    data_root     single-line text
    error         the line the command stopped with (a failed run), single-line text
    rank_size, batch_size_per_device, steps      integers >= 1
    attempts      one object per process run of the command (a resumed run adds one):
                  start_time_s, end_time_s, train_start_s, train_end_s (Unix seconds),
                  train_exit_code, eval_exit_code, node_rank, bind_cores,
                  bind_cores_eval, resume (the checkpoint it resumed from, or "none")
    start_time_s, end_time_s, train_start_s, train_end_s
                  derived on every write: start of the first attempt, end of the last; the
                  training times only for a single attempt (the TrainingTime of a resumed run
                  is the sum of its step times). Records without attempts keep their own.

Use: ``RunRecord.load(path)`` (raises RunRecordError naming the file and field),
``record.save(run_dir)``; ``new_run_dir``, ``find_resumable_run``, ``newest_checkpoint``,
``link_latest``. Tests: tests/unit/test_runrecord.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from bevdepth_npu.fsutil import atomic_write_text, newest_file, replace_symlink

RUN_JSON = "run.json"
STEPS_JSONL = "steps.jsonl"
CHECKPOINTS = "checkpoints"
LAST_CKPT = "last.ckpt"
MODES = ("full", "performance", "eval")
STATUSES = ("running", "completed", "failed", "interrupted")
TIMES = ("start_time_s", "end_time_s", "train_start_s", "train_end_s")

# field -> kind; the kinds are checked by _check.
RECORD_FIELDS: Dict[str, str] = {
    "mode": "mode", "status": "status",
    "network": "text", "case_name": "text", "device_type": "text", "device": "text",
    "settings": "any_text", "bevdepth_root": "text", "python": "text", "checkpoint": "text",
    "data_root": "text", "error": "text",
    "rank_size": "count", "batch_size_per_device": "count", "steps": "count",
    **{name: "seconds" for name in TIMES},
}
ATTEMPT_FIELDS: Dict[str, str] = {
    **{name: "seconds" for name in TIMES},
    "train_exit_code": "int", "eval_exit_code": "int", "node_rank": "int",
    "bind_cores": "int", "bind_cores_eval": "int", "resume": "text",
}
_PROBLEMS = {
    "text": "a non-empty single-line string",
    "any_text": "a single-line string",
    "count": "an integer >= 1",
    "int": "an integer",
    "seconds": "a number of seconds",
    "mode": "one of " + ", ".join(MODES),
    "status": "one of " + ", ".join(STATUSES),
}


class RunRecordError(ValueError):
    """run.json cannot be read, or a field has the wrong kind; the message names both."""


def _check(kind: str, value: Any) -> bool:
    if kind in ("text", "any_text", "mode", "status"):
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            return False
        if kind == "mode":
            return value in MODES
        if kind == "status":
            return value in STATUSES
        return kind == "any_text" or bool(value.strip())
    if kind in ("count", "int"):
        return isinstance(value, int) and not isinstance(value, bool) and (
            kind == "int" or value >= 1)
    if kind == "seconds":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    raise AssertionError(kind)


def _validated(data: Dict[str, Any], fields: Dict[str, str], where: str) -> Dict[str, Any]:
    for key, kind in fields.items():
        value = data.get(key)
        if value is not None and not _check(kind, value):
            raise RunRecordError(f"{where}: {key} must be {_PROBLEMS[kind]}, got {value!r}")
    return data


@dataclasses.dataclass
class RunRecord:
    """The contents of run.json: known fields in ``fields``, process runs in ``attempts``."""

    fields: Dict[str, Any] = dataclasses.field(default_factory=dict)
    attempts: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: Union[str, Path], missing_ok: bool = True) -> "RunRecord":
        """The record in ``path``; an empty one if the file does not exist and ``missing_ok``."""
        path = Path(path)
        if not path.exists() and missing_ok:
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise RunRecordError(f"cannot read run metadata {path}: {err}") from None
        if not isinstance(data, dict):
            raise RunRecordError(f"run metadata {path} must hold a JSON object")
        attempts = data.pop("attempts", [])
        if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
            raise RunRecordError(f"run metadata {path}: attempts must be a list of objects")
        _validated(data, RECORD_FIELDS, f"run metadata {path}")
        for index, attempt in enumerate(attempts):
            _validated(attempt, ATTEMPT_FIELDS, f"run metadata {path}: attempts[{index}]")
        return cls(fields=data, attempts=attempts)

    def get(self, key: str, default: Any = None) -> Any:
        if key in TIMES:
            return self.times().get(key, default)
        return self.fields.get(key, default)

    def times(self) -> Dict[str, float]:
        """start/end of the run and of its training, derived as the module docstring says."""
        if not self.attempts:
            return {key: self.fields[key] for key in TIMES if key in self.fields}
        first, last = self.attempts[0], self.attempts[-1]
        times = {}
        if "start_time_s" in first:
            times["start_time_s"] = first["start_time_s"]
        if "end_time_s" in last:
            times["end_time_s"] = last["end_time_s"]
        if len(self.attempts) == 1:
            for key in ("train_start_s", "train_end_s"):
                if key in first:
                    times[key] = first[key]
        return times

    # ------------------------------------------------------------------ writing
    def update(self, **values: Any) -> "RunRecord":
        for key, value in values.items():
            if key in TIMES:
                raise ValueError(f"{key} is derived from the attempts; set it on an attempt")
            if value is None:
                self.fields.pop(key, None)
            else:
                self.fields[key] = value
        return self

    def new_attempt(self, **values: Any) -> "RunRecord":
        self.attempts.append({})
        return self.attempt(**values)

    def attempt(self, **values: Any) -> "RunRecord":
        """Set fields of the current (last) attempt."""
        if not self.attempts:
            self.attempts.append({})
        self.attempts[-1].update({k: v for k, v in values.items() if v is not None})
        return self

    def to_json(self) -> Dict[str, Any]:
        data = {k: v for k, v in self.fields.items() if k not in TIMES}
        data["attempts"] = self.attempts
        data.update(self.times())
        _validated(data, RECORD_FIELDS, RUN_JSON)
        return data

    def save(self, run_dir: Union[str, Path]) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_text(Path(run_dir) / RUN_JSON, text)


def now_s() -> float:
    return round(time.time(), 3)


# ---------------------------------------------------------------------- run directories

def new_run_dir(device_dir: Path, prefix: str, stamp: Optional[str] = None) -> Path:
    """Create ``<device_dir>/<prefix>_<time>``; a second run in the same second gets -2, -3...
    (mkdir claims a name atomically, so two commands never share a directory)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = device_dir / f"{prefix}_{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def run_dirs(device_dir: Path, prefix: str) -> List[Path]:
    """Run directories of ``prefix`` (``<prefix>_<digit>...``), oldest first: names carry the
    time, and another case whose name merely starts with ``prefix`` is not matched."""
    pattern = re.compile(re.escape(prefix) + r"_[0-9]")
    if not device_dir.is_dir():
        return []
    return sorted(p for p in device_dir.iterdir()
                  if pattern.match(p.name) and p.is_dir() and not p.is_symlink())


def find_resumable_run(device_dir: Path, prefix: str, settings: str) -> Optional[Path]:
    """The newest run of ``prefix`` with the same ``settings`` that can be continued.

    Walking back from the newest run: one with other settings (or an unreadable record) is
    passed over, a completed one ends the search (a new run starts), one that did not complete
    and has a checkpoint in checkpoints/ is the answer (last.ckpt, or the others where a rerun
    set an unreadable last.ckpt aside: bevdepth_npu/checkpoints.py).
    """
    for run_dir in reversed(run_dirs(device_dir, prefix)):
        try:
            record = RunRecord.load(run_dir / RUN_JSON, missing_ok=False)
        except RunRecordError:
            continue
        if record.get("settings") != settings:
            continue
        if record.get("status") == "completed":
            return None
        if any(path.is_file() for path in (run_dir / CHECKPOINTS).glob("*.ckpt")):
            return run_dir
    return None


def last_checkpoint(path: Path) -> Optional[Path]:
    """``path`` if it is a file; for a run directory (or its checkpoints/) its last.ckpt."""
    if path.is_file():
        return path
    for candidate in (path / CHECKPOINTS / LAST_CKPT, path / LAST_CKPT):
        if candidate.is_file():
            return candidate
    return None


def newest_checkpoint(*roots: Path) -> Optional[Path]:
    """The newest ``*.ckpt`` below ``roots`` (the one checkpoint search of the project)."""
    return newest_file(roots, lambda name: name.endswith(".ckpt"))


def link_latest(device_dir: Path, name: str, target: str) -> Optional[str]:
    """Point the ModelZoo path ``<device_dir>/<name>`` at ``target`` (relative to device_dir).
    Returns a note when a regular file of that name (an older tool's output) is kept instead."""
    if replace_symlink(device_dir / name, target):
        return None
    return (f"{device_dir / name} is a regular file from an earlier tool; leaving it, see "
            f"{device_dir / target}")


def exit_status(returncode: int) -> int:
    """A subprocess's status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_settings(pairs: List[Tuple[str, Any]]) -> str:
    """The one-line settings string that identifies identical commands (resume)."""
    return " ".join(f"{key}={value}" for key, value in pairs)


__all__ = [
    "RUN_JSON", "STEPS_JSONL", "CHECKPOINTS", "LAST_CKPT", "MODES", "STATUSES", "RunRecord",
    "RunRecordError", "new_run_dir", "run_dirs", "find_resumable_run", "last_checkpoint",
    "newest_checkpoint", "link_latest", "exit_status", "describe_settings", "now_s",
]
