"""What a run shows on the console: stage lines, one progress line, errors.

On a terminal the progress line is rewritten in place; otherwise (a pipe, a log file, CI) it is
a plain line every N steps, and a stage that prints nothing for a minute gets a "still running"
line, so a log always says the run is alive without filling up.

Part of ``bevdepth-npu run`` (bevdepth_npu/run/). Tests: tests/unit/test_run_console.py.
"""
from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Deque, List, Optional

from bevdepth_npu.steplog import StepRecord, parse_record

HEARTBEAT_S = 60.0          # a plain "still running" line after this long without output
STEP_WINDOW = 20            # steps behind the speed and ETA of the progress line


class Console:
    """Stage lines on ``out`` (stdout), errors on ``err`` (stderr), prefixed with ``prog``."""

    def __init__(self, prog: str, verbose: bool = False, out: Optional[IO[str]] = None,
                 err: Optional[IO[str]] = None):
        self.prog = prog
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
        self.out.write(f"{self.prog}: {message}\n")
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
            self.out.write(f"\r\033[K{self.prog}: {message}")
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


class Heartbeat:
    """Elapsed time of a stage without progress of its own (evaluation, data preparation)."""

    def __init__(self, console: Console, stage: str):
        self.console = console
        self.stage = stage
        self.start = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        quiet_s = now - self.console.last_output_s
        self.console.status(f"{self.stage}: running, {duration(now - self.start)}",
                            permanent=quiet_s >= HEARTBEAT_S)

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
