"""Check results of ``bevdepth-npu doctor``: one line per check on the console, a JSON record.

A check is a function that returns a detail string (PASS), raises ``Fail`` or ``Skip`` with a
cause and what to do, or raises anything else (a FAIL that names the exception).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, List, Optional, TextIO, Tuple

from bevdepth_npu.fsutil import atomic_write

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Fail(Exception):
    """The check failed: ``cause``, and ``hint``, what to do about it."""

    def __init__(self, cause: str, hint: str = "") -> None:
        super().__init__(cause)
        self.cause, self.hint = cause, hint


class Skip(Fail):
    """The check does not apply here (``cause`` says why)."""


@dataclasses.dataclass
class Result:
    name: str
    status: str
    detail: str
    hint: str = ""
    seconds: float = 0.0
    files: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, problem)


class Report:
    """Runs checks, prints a line for each, collects the results."""

    def __init__(self, stream: TextIO = sys.stdout, verbose: bool = False) -> None:
        self.stream, self.verbose = stream, verbose
        self.results: List[Result] = []
        self.started = time.time()

    def run(self, name: str, check: Callable[[], Optional[str]]) -> Result:
        """Run ``check`` with the libraries' warnings and log output held back (shown with
        --verbose when it fails)."""
        t0 = time.monotonic()
        held = io.StringIO()
        try:
            with contextlib.redirect_stderr(held), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                detail = check() or "ok"
            result = Result(name, PASS, detail)
        except Skip as skip:
            result = Result(name, SKIP, skip.cause, skip.hint)
        except Fail as fail:
            result = Result(name, FAIL, fail.cause, fail.hint, files=getattr(fail, "files", []))
        except Exception as error:  # a broken environment shows up as anything
            detail = f"{type(error).__name__}: {error}".strip().splitlines()[0]
            if self.verbose:
                traceback.print_exc(file=self.stream)
            result = Result(name, FAIL, detail, "rerun with --verbose for the traceback"
                            if not self.verbose else "")
        if self.verbose and held.getvalue() and result.status == FAIL:
            print(held.getvalue().rstrip(), file=self.stream)
        result.seconds = round(time.monotonic() - t0, 3)
        self.results.append(result)
        self._print(result)
        return result

    def _print(self, result: Result) -> None:
        timing = f" ({result.seconds:.1f} s)" if result.seconds >= 1.0 else ""
        print(f"{result.status}  {result.name:<26s} {result.detail}{timing}", file=self.stream,
              flush=True)
        if result.hint and result.status != PASS:
            print(f"      -> {result.hint}", file=self.stream, flush=True)

    @property
    def failed(self) -> List[Result]:
        return [r for r in self.results if r.status == FAIL]

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in (PASS, FAIL, SKIP)}
        elapsed = time.time() - self.started
        verdict = "training will not work here" if counts[FAIL] else "ready to train"
        return (f"doctor: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped "
                f"in {elapsed:.0f} s: {verdict}")

    def write_json(self, path: Path, **context) -> None:
        record = dict(context, ok=not self.failed, started=self.started,
                      elapsed_s=round(time.time() - self.started, 3),
                      checks=[dataclasses.asdict(r) for r in self.results])
        atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
