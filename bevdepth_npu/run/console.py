"""What a run shows on the console: stage lines, one progress line, errors.

On a terminal the progress line is rewritten in place; otherwise (a pipe, a log file, CI) it is
a plain line every N steps, and a stage that prints nothing gets a "running" line after 30 s,
at one minute, then every two minutes, so a log always says the run is alive without filling
up.

Part of ``bevdepth-npu run`` (bevdepth_npu/run/) and of ``bevdepth-npu env``, whose stages run
through the same ``stages.run_stage``. Tests: tests/unit/test_run_console.py.
"""
from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Callable, Deque, Iterator, List, Optional

from bevdepth_npu.steplog import StepRecord, parse_record

HEARTBEAT_S = 60.0          # a waiting training's progress line again after this long
STEP_WINDOW = 20            # steps behind the speed and ETA of the progress line


class Console:
    """Stage lines on ``out`` (stdout), errors on ``err`` (stderr), prefixed with ``prog:``
    (or ``prefix``: the environment builder's lines start ``[bevdepth-npu]``)."""

    def __init__(self, prog: str, verbose: bool = False, out: Optional[IO[str]] = None,
                 err: Optional[IO[str]] = None, prefix: Optional[str] = None):
        self.prog = prog
        self.prefix = prefix or f"{prog}:"
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._status_shown = False
        self.last_output_s = time.monotonic()

    def _clear_status(self) -> None:
        if self._status_shown:
            self.out.write("\r\033[K")
            self._status_shown = False

    def note(self, message: str) -> None:
        self._clear_status()
        self.out.write(f"{self.prefix} {message}\n")
        self.out.flush()
        self.last_output_s = time.monotonic()

    def lines(self, lines: List[str]) -> None:
        """Lines without the prefix (tables, a log's tail)."""
        self._clear_status()
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()
        self.last_output_s = time.monotonic()

    def error(self, message: str) -> None:
        self._clear_status()
        self.out.flush()
        self.err.write(f"{self.prog}: error: {message}\n")
        self.err.flush()

    def warning(self, message: str) -> None:
        self._clear_status()
        self.out.flush()
        self.err.write(f"{self.prog}: warning: {message}\n")
        self.err.flush()

    def status(self, message: str, permanent: bool) -> None:
        """A progress line: rewritten in place on a terminal; elsewhere printed when
        ``permanent`` (the caller decides which updates are worth a line)."""
        if self.tty:
            self.out.write(f"\r\033[K{self.prefix} {message}")
            self.out.flush()
            self._status_shown = True
        elif permanent:
            self.note(message)

    def end_status(self) -> None:
        if self._status_shown:
            self.out.write("\n")
            self.out.flush()
            self._status_shown = False


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def heartbeat_gaps() -> Iterator[float]:
    """Seconds of quiet before each "running" line of a slow stage: two in its first minute,
    then one every two minutes (a 20-minute mmcv build prints 11, not 40)."""
    yield 30.0
    yield 30.0
    while True:
        yield 120.0


class Heartbeat:
    """Elapsed time of a stage without progress of its own (evaluation, data preparation, a
    build of the environment): rewritten in place on a terminal, elsewhere a line after each
    gap of ``heartbeat_gaps`` without other output. ``detail`` adds what the stage can say of
    its progress ("8/73 C++ files compiled")."""

    def __init__(self, console: Console, stage: str,
                 detail: Optional[Callable[[], str]] = None,
                 gaps: Optional[Iterator[float]] = None):
        self.console = console
        self.stage = stage
        self.detail = detail
        self.gaps = gaps or heartbeat_gaps()
        self.gap = next(self.gaps)
        self.start = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        permanent = now - self.console.last_output_s >= self.gap
        extra = self.detail() if self.detail is not None and (permanent or self.console.tty) \
            else ""
        self.console.status(f"{self.stage}: running, {duration(now - self.start)}"
                            + (f", {extra}" if extra else ""), permanent=permanent)
        if permanent:
            self.gap = next(self.gaps)

    def close(self) -> None:
        self.console.end_status()


class TrainProgress:
    """The training progress line, from the new records of steps.jsonl (what rank 0 appends
    while this stage runs): step of total, loss, samples/s and ETA over the last steps."""

    def __init__(self, console: Console, steps_path: Path, stage: str = "train"):
        self.console = console
        self.path = steps_path
        self.stage = stage
        self.offset = steps_path.stat().st_size if steps_path.is_file() else 0
        self.pending = b""
        self.window: Deque[StepRecord] = collections.deque(maxlen=STEP_WINDOW)
        self.heartbeat = Heartbeat(console, stage)
        self.last: Optional[StepRecord] = None

    def _new_records(self) -> List[StepRecord]:
        """The complete lines appended since the last poll, through the step log's own record
        parser (a line it rejects is skipped here; ``summarize`` reports it)."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        *complete, self.pending = (self.pending + chunk).split(b"\n")
        records = []
        for line in complete:
            try:
                records.append(parse_record(json.loads(line)))
            except ValueError:
                continue
        return records

    def every(self, total: Optional[int]) -> int:
        """Steps between plain lines: about six lines a run, at least one per 100 steps."""
        if not total:
            return 10
        return min(100, max(1, math.ceil(total / 6)))

    def line(self, record: StepRecord) -> str:
        total = record.total_steps
        step = record.step
        parts = [f"step {step}/{total}" if total else f"step {step}", f"epoch {record.epoch}",
                 f"loss {record.loss:.4g}"]
        # The first step of a process run waits for start-up; it would bend speed and ETA.
        timed = [r for r in self.window if r.process_step > 1] or list(self.window)
        seconds = sum(r.step_time_s for r in timed)
        if seconds > 0:
            samples = sum(r.global_batch for r in timed)
            parts.append(f"{samples / seconds:.3g} samples/s")
            if total and total > step:
                parts.append(f"ETA {duration((total - step) * seconds / len(timed))}")
        return f"{self.stage}: " + ", ".join(parts)

    def poll(self) -> None:
        records = self._new_records()
        if not records:
            if self.last is None:
                self.heartbeat.poll()
            elif time.monotonic() - self.console.last_output_s >= HEARTBEAT_S:
                self.console.status(self.line(self.last) + " (waiting for the next step)",
                                    permanent=True)
            return
        for record in records:
            self.window.append(record)
            total = record.total_steps
            step = record.step
            permanent = (self.last is None or step % self.every(total) == 0
                         or (total is not None and step >= total))
            self.last = record
            if permanent or self.console.tty:
                self.console.status(self.line(record), permanent=permanent)

    def close(self) -> None:
        self.poll()
        self.console.end_status()
