"""The one step-log line format of bevdepth-npu, its writer and its parser.

Rank 0 writes one line per training step into the training log:

    BEVDEPTH_STEP step=<int> epoch=<int> step_time_s=<float> data_time_s=<float> loss=<float> lr=<float> global_batch=<int> images_per_sample=<int>

Format (what ``format_step_line`` writes and ``parse_step_line`` accepts):
  - the marker ``BEVDEPTH_STEP`` and one space, then exactly these eight ``key=value`` pairs in this
    order, separated by single spaces, then the end of the line (``\\n``; ``\\r\\n`` and trailing
    spaces or tabs are tolerated);
  - ints are plain decimal digits; floats are written with ``%.6g``
    (``0.0002``, ``1.98234``, ``3.125e-06``); ``loss`` may be ``nan``, ``inf`` or ``-inf``
    (a diverged step is data, not a broken line);
  - ``step`` counts optimizer steps from 1 across epochs and keeps counting after a resume;
    ``epoch`` counts from 0; ``step_time_s`` is the wall time of the whole step (end of the
    previous step to end of this one, data wait included, > 0); ``data_time_s`` is the part
    spent waiting for the batch (>= 0); ``lr`` >= 0; ``global_batch`` = batch per device x
    devices (>= 1); ``images_per_sample`` = cameras x key frames (>= 1).

Parsing rules (``parse_step_log``), chosen because training logs are messy:
  - the marker may appear anywhere in a line: Lightning progress bars (``\\r``-separated
    fragments), logging prefixes and other output before it are ignored;
  - a record counts only if nothing but the line end follows it. A record cut by a ``\\r``
    (another writer's progress bar landed inside it) or by a second marker is malformed: its
    tail may be missing or mixed with other output, so its numbers cannot be trusted;
  - a record on a last line without ``\\n`` is counted as truncated, even if it parses: the
    writer may have been stopped (or still be writing) halfway through a number;
  - malformed records (missing, extra or reordered keys, non-numeric or out-of-range values,
    truncated) are counted with their line number and reason; they never stop the parse;
  - duplicate step numbers (a run resumed from a checkpoint repeats steps) keep the LAST
    occurrence, because that is the history the final model went through;
  - a restart is where a step number does not increase over the previous record in file order;
    each restart begins a new process run, whose first steps are warm-up again
    (``StepLog.measured``).

The writer should emit the line with a single write followed by a flush
(``sys.stdout.write(format_step_line(...) + "\\n"); sys.stdout.flush()``), so that a progress
bar or a block-buffered flush on the same stream cannot land inside it.

Use: ``from bevdepth_npu.steplog import format_step_line, parse_step_log``; the command
``bevdepth-npu summarize RUN_DIR`` (bevdepth_npu/summarize.py) is the main reader.
Tests: ``python -m pytest tests/unit/test_steplog.py -q``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

MARKER = "BEVDEPTH_STEP "

# (key, kind) in the order the line carries them; kind is "int" or "float".
FIELDS: Tuple[Tuple[str, str], ...] = (
    ("step", "int"),
    ("epoch", "int"),
    ("step_time_s", "float"),
    ("data_time_s", "float"),
    ("loss", "float"),
    ("lr", "float"),
    ("global_batch", "int"),
    ("images_per_sample", "int"),
)
FIELD_NAMES: Tuple[str, ...] = tuple(name for name, _ in FIELDS)

# Plain ASCII digits only: int() alone would also take "1_000", " 7" or "٣".
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE_RE = re.compile(r"nan|[+-]?inf")

# Smallest allowed value per field; None: no bound. step_time_s must be > 0 (checked apart).
_MINIMUM: Dict[str, Optional[float]] = {
    "step": 1,
    "epoch": 0,
    "step_time_s": 0.0,
    "data_time_s": 0.0,
    "loss": None,
    "lr": 0.0,
    "global_batch": 1,
    "images_per_sample": 1,
}

# How much of a malformed line to keep in a report; progress bars make lines long.
_EXCERPT_CHARS = 160


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One training step as logged by rank 0."""

    step: int
    epoch: int
    step_time_s: float
    data_time_s: float
    loss: float
    lr: float
    global_batch: int
    images_per_sample: int


@dataclasses.dataclass(frozen=True)
class MalformedLine:
    """A step record that could not be used: where it was and why."""

    line_no: int     # 1-based, counting "\n"-terminated lines of the file
    reason: str
    excerpt: str     # the record text from the marker on, cut to _EXCERPT_CHARS


class MalformedStepLine(ValueError):
    """A line carries the step marker but no usable step record."""


@dataclasses.dataclass
class StepLog:
    """The step records of one training log, after the parsing rules above."""

    records: List[StepRecord]          # kept records, sorted by step
    run_positions: List[int]           # per record: 0-based index within its process run
    malformed: List[MalformedLine]
    duplicates_dropped: int            # earlier occurrences replaced by a later one
    restarts: int                      # process runs after the first
    lines_read: int

    def measured(self, warmup_steps: int) -> List[StepRecord]:
        """Records left after dropping the first ``warmup_steps`` of every process run."""
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return [rec for rec, pos in zip(self.records, self.run_positions) if pos >= warmup_steps]


def _format_float(name: str, value: object) -> str:
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"step line field {name} must be a number, got {value!r}")
    number = float(value)  # type: ignore[arg-type]  # accepts numpy/torch scalars
    if name != "loss" and not math.isfinite(number):
        raise ValueError(f"step line field {name} must be finite, got {number!r}")
    text = "%.6g" % number
    # %.6g writes "nan"/"inf"/"-inf", the forms the parser accepts.
    _check_range(name, float(text))
    return text


def _format_int(name: str, value: object) -> str:
    if isinstance(value, bool):
        raise TypeError(f"step line field {name} must be an int, got {value!r}")
    try:
        number = int(value.__index__())  # type: ignore[attr-defined]  # int-like only, no floats
    except AttributeError:
        raise TypeError(f"step line field {name} must be an int, got {value!r}") from None
    _check_range(name, number)
    return str(number)


def _check_range(name: str, number: float) -> None:
    minimum = _MINIMUM[name]
    if name == "step_time_s":
        if not number > 0:
            raise ValueError(f"step_time_s must be > 0, got {number!r}")
    elif minimum is not None and not number >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number!r}")


def format_step_line(
    step: int,
    epoch: int,
    step_time_s: float,
    data_time_s: float,
    loss: float,
    lr: float,
    global_batch: int,
    images_per_sample: int,
) -> str:
    """The step line for these values, without the trailing newline.

    Raises TypeError/ValueError for a value the parser would reject, so a writer can never
    emit a line that summarize later drops.
    """
    values = {
        "step": step,
        "epoch": epoch,
        "step_time_s": step_time_s,
        "data_time_s": data_time_s,
        "loss": loss,
        "lr": lr,
        "global_batch": global_batch,
        "images_per_sample": images_per_sample,
    }
    parts = []
    for name, kind in FIELDS:
        value = values[name]
        text = _format_int(name, value) if kind == "int" else _format_float(name, value)
        parts.append(f"{name}={text}")
    return MARKER + " ".join(parts)


def _parse_payload(payload: str) -> StepRecord:
    """Parse the text after the marker; raise MalformedStepLine with the reason."""
    payload = payload.rstrip(" \t")
    if not payload:
        raise MalformedStepLine("no fields after the marker")
    tokens = payload.split(" ")
    if "" in tokens:
        raise MalformedStepLine("fields must be separated by single spaces")
    keys = []
    raw: Dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise MalformedStepLine(f"field {token[:40]!r} is not key=value")
        if key in raw:
            raise MalformedStepLine(f"key {key} appears twice")
        keys.append(key)
        raw[key] = value
    missing = [name for name in FIELD_NAMES if name not in raw]
    if missing:
        raise MalformedStepLine("missing key(s): " + ", ".join(missing))
    extra = [key for key in keys if key not in FIELD_NAMES]
    if extra:
        raise MalformedStepLine("unexpected key(s): " + ", ".join(extra))
    if tuple(keys) != FIELD_NAMES:
        raise MalformedStepLine("keys out of order: " + " ".join(keys))
    parsed: Dict[str, Union[int, float]] = {}
    for name, kind in FIELDS:
        text = raw[name]
        if kind == "int":
            if not _INT_RE.fullmatch(text):
                raise MalformedStepLine(f"{name}={text[:40]!r} is not a decimal integer")
            number: Union[int, float] = int(text)
        else:
            if _FLOAT_RE.fullmatch(text):
                number = float(text)
            elif name == "loss" and _NONFINITE_RE.fullmatch(text):
                number = float(text)
            else:
                raise MalformedStepLine(f"{name}={text[:40]!r} is not a number")
            if name != "loss" and not math.isfinite(number):
                # Only an overflowing exponent gets here, e.g. 1e999.
                raise MalformedStepLine(f"{name}={text[:40]!r} is not finite")
        try:
            _check_range(name, number)
        except ValueError as err:
            raise MalformedStepLine(str(err)) from None
        parsed[name] = number
    return StepRecord(**parsed)  # type: ignore[arg-type]


def _scan_line(line: str, terminated: bool) -> Tuple[Optional[StepRecord], List[Tuple[str, str]]]:
    """Find the step record of one physical line.

    Returns (record or None, [(reason, excerpt) for every unusable record in the line]).
    ``terminated``: the line ended with "\\n" (False only for a cut-off last line of a file).
    """
    body = line[:-1] if line.endswith("\n") else line
    body = body.rstrip("\r")  # "\r\n" endings
    if MARKER not in body:
        return None, []
    # Every marker starts a candidate that runs to the next marker or "\r".
    candidates: List[Tuple[str, bool]] = []   # (payload, reaches the end of the line)
    segments = body.split("\r")
    for segment_index, segment in enumerate(segments):
        last_segment = segment_index == len(segments) - 1
        pieces = segment.split(MARKER)
        for piece_index, piece in enumerate(pieces[1:], start=1):
            at_end = last_segment and piece_index == len(pieces) - 1
            candidates.append((piece, at_end))
    record: Optional[StepRecord] = None
    problems: List[Tuple[str, str]] = []
    for payload, at_end in candidates:
        excerpt = (MARKER + payload)[:_EXCERPT_CHARS]
        if not at_end:
            problems.append(("record interrupted by other output before its line end", excerpt))
            continue
        try:
            parsed = _parse_payload(payload)
        except MalformedStepLine as err:
            problems.append((str(err), excerpt))
            continue
        if not terminated:
            problems.append(("truncated: last line of the file has no newline", excerpt))
            continue
        record = parsed
    return record, problems


def parse_step_line(line: str) -> Optional[StepRecord]:
    """Parse one log line (trailing newline optional).

    Returns the StepRecord at the end of the line, or None when the line has no
    ``BEVDEPTH_STEP `` marker at all. Raises MalformedStepLine (a ValueError) with the reason
    when the line has the marker but no usable record. Interrupted records earlier in the same
    line are reported only by ``parse_step_log``.
    """
    record, problems = _scan_line(line, terminated=True)
    if record is not None:
        return record
    if problems:
        raise MalformedStepLine(problems[-1][0])
    return None


def parse_step_lines(lines: Iterable[str]) -> StepLog:
    """Apply the parsing rules to lines that keep their "\\n".

    Lines are split on "\\n" only (progress-bar "\\r" stays inside a line). A line without
    "\\n" can only be the last one and counts as cut off.
    """
    in_order: List[Tuple[StepRecord, int, int]] = []   # (record, run index, position in run)
    malformed: List[MalformedLine] = []
    run_index = 0
    position = 0
    previous_step: Optional[int] = None
    lines_read = 0
    for line_no, line in enumerate(lines, start=1):
        lines_read = line_no
        record, problems = _scan_line(line, terminated=line.endswith("\n"))
        for reason, excerpt in problems:
            malformed.append(MalformedLine(line_no=line_no, reason=reason, excerpt=excerpt))
        if record is None:
            continue
        if previous_step is not None and record.step <= previous_step:
            run_index += 1
            position = 0
        in_order.append((record, run_index, position))
        position += 1
        previous_step = record.step
    last_by_step: Dict[int, Tuple[StepRecord, int]] = {}
    for record, _, pos in in_order:
        last_by_step[record.step] = (record, pos)   # later occurrences win
    steps = sorted(last_by_step)
    return StepLog(
        records=[last_by_step[s][0] for s in steps],
        run_positions=[last_by_step[s][1] for s in steps],
        malformed=malformed,
        duplicates_dropped=len(in_order) - len(last_by_step),
        restarts=run_index,
        lines_read=lines_read,
    )


def _iter_file_lines(path: Union[str, os.PathLike]) -> Iterable[str]:
    # Binary iteration splits on b"\n" only; text mode would also split on "\r" and lose
    # the difference between a progress-bar fragment and a line end.
    with open(path, "rb") as handle:
        for raw in handle:
            yield raw.decode("utf-8", errors="replace")


def parse_step_log(path: Union[str, os.PathLike]) -> StepLog:
    """Parse a training log file (any size; read line by line; undecodable bytes replaced)."""
    return parse_step_lines(_iter_file_lines(path))


def log_has_step_marker(path: Union[str, os.PathLike]) -> bool:
    """True if the file contains the step marker anywhere (cheap check used to pick a log)."""
    needle = MARKER.encode("ascii")
    overlap = len(needle) - 1
    tail = b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                return False
            if needle in tail + chunk:
                return True
            tail = chunk[-overlap:]
