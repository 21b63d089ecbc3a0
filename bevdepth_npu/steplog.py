"""The step log of a training run, ``steps.jsonl``, and its reader.

Global rank 0's step-log callback (bevdepth/callbacks/step_log.py of the patched BEVDepth tree)
appends one JSON object per optimizer step to ``<default_root_dir>/steps.jsonl`` and flushes it
after every line (the human line on stdout stays, nobody parses it)::

    {"step": 12, "epoch": 0, "step_time_s": 0.84, "data_time_s": 0.05, "loss": 4.2,
     "lr": 0.0002, "global_batch": 64, "images_per_sample": 12, "total_steps": 10536,
     "process_step": 12, "time_s": 1700000000.5}

Fields: ``step`` counts optimizer steps from 1 and keeps counting after a resume; ``epoch``
from 0; ``step_time_s`` (> 0) is the wall time of the whole step, data wait included, and
``data_time_s`` (>= 0) the wait for the batch; ``loss`` is null when it is not finite;
``lr`` >= 0; ``global_batch`` = batch per device x processes; ``images_per_sample`` = cameras x
frames; ``total_steps`` is the run's planned number of steps, or null when unknown;
``process_step`` counts the steps of this process from 1 (a resumed run starts at 1 again);
``time_s`` is the Unix time at the end of the step. Other keys are ignored.

Reading rules (``read_steps``):
  - one record per line; a last line without a newline is being written, or was cut by a crash:
    it is left out and reported as truncated (the writer puts a newline before its first record
    when it finds the file ending mid-line, so such a fragment never swallows a record);
  - a line that is not such an object is malformed: counted with its line number and reason,
    never fatal;
  - a step logged twice (a resume from a checkpoint older than the last logged step repeats
    steps) keeps its LAST occurrence, the history the final model went through;
  - every record with ``process_step`` 1 starts a process run; the first ``warmup_steps`` of
    each process run are warm-up (``StepLog.measured``).

Use: ``from bevdepth_npu.steplog import read_steps``; ``bevdepth-npu summarize`` and the
runner's progress line read it. Tests: tests/unit/test_steplog.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Union

STEPS_FILE = "steps.jsonl"

# How much of a malformed line to keep in a report.
_EXCERPT_CHARS = 160

# (name, kind, smallest value); kind "int" or "float"; step_time_s must be above its bound.
FIELDS = (
    ("step", "int", 1),
    ("epoch", "int", 0),
    ("step_time_s", "float", 0.0),
    ("data_time_s", "float", 0.0),
    ("loss", "loss", None),
    ("lr", "float", 0.0),
    ("global_batch", "int", 1),
    ("images_per_sample", "int", 1),
    ("process_step", "int", 1),
)
OPTIONAL_FIELDS = (("total_steps", "int", 1), ("time_s", "float", 0.0))


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One optimizer step as logged by global rank 0 (loss nan when the log has null)."""

    step: int
    epoch: int
    step_time_s: float
    data_time_s: float
    loss: float
    lr: float
    global_batch: int
    images_per_sample: int
    process_step: int
    total_steps: Optional[int] = None
    time_s: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class MalformedLine:
    """A line that holds no usable record: where it was and why."""

    line_no: int     # 1-based
    reason: str
    excerpt: str


@dataclasses.dataclass
class StepLog:
    """The records of one steps.jsonl after the reading rules."""

    records: List[StepRecord]          # kept records, sorted by step
    malformed: List[MalformedLine]     # a truncated last line included
    duplicates_dropped: int            # earlier occurrences replaced by a later one
    restarts: int                      # process runs after the first
    lines_read: int

    def measured(self, warmup_steps: int) -> List[StepRecord]:
        """Records left after dropping the first ``warmup_steps`` of every process run."""
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return [r for r in self.records if r.process_step > warmup_steps]


def _value(name: str, kind: str, minimum: Optional[float], raw: Any) -> Any:
    if kind == "loss":
        if raw is None:
            return math.nan
        kind = "float"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (
            kind == "int" and not isinstance(raw, int)):
        raise ValueError(f"{name} is not {'an integer' if kind == 'int' else 'a number'}: "
                         f"{raw!r}")
    if not math.isfinite(raw):
        raise ValueError(f"{name} is not finite: {raw!r}")
    if minimum is not None:
        if name == "step_time_s" and not raw > minimum:
            raise ValueError(f"step_time_s must be > 0, got {raw!r}")
        if raw < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {raw!r}")
    return float(raw) if kind == "float" else raw


def parse_record(data: Any) -> StepRecord:
    """The StepRecord of one decoded JSON line; ValueError with the reason if unusable."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [name for name, _, _ in FIELDS if name not in data]
    if missing:
        raise ValueError("missing key(s): " + ", ".join(missing))
    values = {name: _value(name, kind, minimum, data[name]) for name, kind, minimum in FIELDS}
    for name, kind, minimum in OPTIONAL_FIELDS:
        if data.get(name) is not None:
            values[name] = _value(name, kind, minimum, data[name])
    return StepRecord(**values)


def read_step_lines(lines: Iterable[str]) -> StepLog:
    """Apply the reading rules to lines that keep their "\\n"."""
    in_order: List[StepRecord] = []
    malformed: List[MalformedLine] = []
    lines_read = 0
    for line_no, line in enumerate(lines, start=1):
        lines_read = line_no
        text = line.rstrip("\n").rstrip("\r")
        if not text.strip():
            continue
        excerpt = text[:_EXCERPT_CHARS]
        if not line.endswith("\n"):
            malformed.append(MalformedLine(line_no, "truncated: last line of the file has no "
                                           "newline", excerpt))
            continue
        try:
            in_order.append(parse_record(json.loads(text)))
        except ValueError as err:   # json.JSONDecodeError is a ValueError
            malformed.append(MalformedLine(line_no, str(err).split("\n")[0], excerpt))
    last: Dict[int, StepRecord] = {}
    for record in in_order:
        last[record.step] = record   # later occurrences win
    process_runs = sum(1 for r in in_order if r.process_step == 1)
    return StepLog(records=[last[s] for s in sorted(last)], malformed=malformed,
                   duplicates_dropped=len(in_order) - len(last),
                   restarts=max(0, process_runs - 1), lines_read=lines_read)


def read_steps(path: Union[str, "os.PathLike[str]"]) -> StepLog:
    """Read a steps.jsonl file (line by line; undecodable bytes replaced)."""
    with open(path, "rb") as handle:
        return read_step_lines(raw.decode("utf-8", errors="replace") for raw in handle)
