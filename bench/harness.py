"""Shared machinery of the benchmarks: workers, interleaved timing, ratios, tables, JSON.

Not run on its own; ``python -m bench`` drives it. The pieces:

- ``Worker``: a Python subprocess (``python -m bench.worker``) that builds a benchmark case once
  and then times it on request. Patched BEVDepth and pristine upstream run in separate workers
  (both are the package ``bevdepth``), and so every variant of a benchmark runs under the same
  conditions: its own process, timed inside it, peak memory read there.
- ``interleave``: warm-up runs, then rounds that run every variant once in a rotating order, so
  that load from other processes on a shared machine falls on all variants alike; figures are
  medians over the rounds.
- ``Ratio``: a figure of one variant against another from the same run, with an optional target
  and its PASS/FAIL.
- ``BenchResult``: what a benchmark hands back (tables, ratios, notes, raw data), printed by
  ``format_result`` and written as JSON by ``write_json`` (atomically).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from bevdepth_npu.fsutil import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent

# Worker roles: which ``bevdepth`` a worker imports and how.
ROLE_PATCHED = "patched"            # the installed (patched) tree
ROLE_UPSTREAM_CPU = "upstream-cpu"  # pristine checkout, CUDA extensions replaced by a reference
ROLE_UPSTREAM_CUDA = "upstream-cuda"  # pristine checkout with its own compiled CUDA extensions
ROLE_PLAIN = "plain"                # no bevdepth at all (harness self-tests)
ROLES = (ROLE_PATCHED, ROLE_UPSTREAM_CPU, ROLE_UPSTREAM_CUDA, ROLE_PLAIN)

PASS = "PASS"
FAIL = "FAIL"
SKIP = "SKIP"
INFO = "info"  # a ratio shown for context, with no target


class BenchError(RuntimeError):
    """A benchmark could not run (missing checkout, failed worker); the message says why."""


# ---------------------------------------------------------------- statistics


@dataclasses.dataclass
class Stats:
    """Summary of repeated measurements of one variant (seconds, bytes, or any unit)."""
    median: float
    minimum: float
    maximum: float
    count: int
    values: List[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        if not values:
            raise ValueError("no measurements to summarise")
        values = [float(v) for v in values]
        return cls(median=statistics.median(values), minimum=min(values), maximum=max(values),
                   count=len(values), values=values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the rounds were."""
        return (self.maximum - self.minimum) / self.median if self.median else 0.0

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def rotation(items: Sequence[Any], round_index: int) -> List[Any]:
    """``items`` rotated left by ``round_index``: round r starts with item r mod len."""
    if not items:
        return []
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])


def interleave(runners: Dict[str, Callable[[], Dict[str, float]]], repeats: int,
               warmup: int = 1, log: Optional[Callable[[str], None]] = None
               ) -> Dict[str, Dict[str, List[float]]]:
    """Run every runner ``warmup`` times (discarded), then ``repeats`` rounds in which each runs
    once, the order rotating from round to round.

    A runner returns a dict of figures (at least ``time_s``); the result maps runner name ->
    figure name -> one value per round, in round order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: Dict[str, Dict[str, List[float]]] = {name: {} for name in names}
    for round_index in range(repeats):
        for name in rotation(names, round_index):
            figures = runners[name]()
            if "time_s" not in figures:
                raise BenchError(f"runner {name!r} returned no time_s: {figures!r}")
            for key, value in figures.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    samples[name].setdefault(key, []).append(float(value))
        if log:
            log(f"  round {round_index + 1}/{repeats} done")
    return samples


def median_of(samples: Dict[str, Dict[str, List[float]]], name: str, figure: str = "time_s"
              ) -> Optional[float]:
    values = samples.get(name, {}).get(figure)
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- ratios and targets


@dataclasses.dataclass
class Ratio:
    """``value`` = numerator / denominator, measured in one run.

    ``target`` is None (context only) or (op, threshold) with op ">=" or "<="; a ratio whose
    value is None (a variant did not run) is SKIP with ``note`` saying why.
    """
    name: str
    value: Optional[float]
    meaning: str
    target: Optional[Tuple[str, float]] = None
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return INFO
        if self.value is None:
            return SKIP
        op, threshold = self.target
        if op == ">=":
            return PASS if self.value >= threshold else FAIL
        if op == "<=":
            return PASS if self.value <= threshold else FAIL
        raise ValueError(f"ratio {self.name}: unknown target operator {op!r}")

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        op, threshold = self.target
        return f"{op} {threshold:g}"

    def to_json(self) -> Dict[str, Any]:
        target = None
        if self.target is not None:
            target = dict(op=self.target[0], threshold=self.target[1])
        return dict(name=self.name, value=self.value, meaning=self.meaning, target=target,
                    status=self.status, note=self.note)


def safe_ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ---------------------------------------------------------------- results and tables


@dataclasses.dataclass
class Table:
    title: str
    headers: List[str]
    rows: List[List[Any]]

    def to_json(self) -> Dict[str, Any]:
        return dict(title=self.title, headers=self.headers, rows=self.rows)


@dataclasses.dataclass
class BenchResult:
    name: str
    title: str
    tables: List[Table] = dataclasses.field(default_factory=list)
    ratios: List[Ratio] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: str = ""     # non-empty: the benchmark did not run, and why
    error: str = ""       # non-empty: it failed, and how
    duration_s: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        return dict(name=self.name, title=self.title, skipped=self.skipped, error=self.error,
                    duration_s=self.duration_s, tables=[t.to_json() for t in self.tables],
                    ratios=[r.to_json() for r in self.ratios], notes=self.notes, data=self.data)


def format_cell(value: Any) -> str:
    """Numbers with 4 significant digits (ratios and times alike), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> str:
    """A plain-text table: a title line, a header, a rule, one line per row; columns padded to
    their widest cell, numbers right-aligned, text left-aligned."""
    cells = [[format_cell(v) for v in row] for row in rows]
    head = [str(h) for h in headers]
    for row in cells:
        if len(row) != len(head):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(head)} columns")
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(head)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(head))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(head))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    if text == "-":
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


RATIO_HEADERS = ["ratio", "value", "target", "status", "meaning"]


def ratio_rows(ratios: Iterable[Ratio]) -> List[List[Any]]:
    return [[r.name, r.value, r.target_text, r.status,
             f"{r.meaning} ({r.note})" if r.note else r.meaning]
            for r in ratios]


def format_result(result: BenchResult) -> str:
    out = [f"== {result.name}: {result.title}"]
    if result.skipped:
        out.append(f"SKIPPED: {result.skipped}")
    if result.error:
        out.append(f"ERROR: {result.error}")
    for table in result.tables:
        out.append(format_table(table.headers, table.rows, table.title))
        out.append("")
    if result.ratios:
        out.append(format_table(RATIO_HEADERS, ratio_rows(result.ratios), "ratios"))
    for note in result.notes:
        out.append(f"note: {note}")
    out.append(f"({result.name} took {result.duration_s:.0f} s)")
    return "\n".join(out)


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically (a reader never sees half a file)."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (taskset and cgroup cpusets included)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


VERSIONED_MODULES = ("torch", "numpy", "PIL", "mmcv", "mmdet", "mmdet3d", "pytorch_lightning")


def machine_info(modules: Sequence[str] = VERSIONED_MODULES) -> Dict[str, Any]:
    """What the figures were measured on. The versions of ``modules`` are read if importable
    (each is imported: leave out the heavy ones where the caller does not use them)."""
    info: Dict[str, Any] = dict(
        cpu_model=cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable_cores(),
        memory_total_bytes=memory_total_bytes(), python=platform.python_version(),
        platform=platform.platform(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    for module in modules:
        info[f"{module}_version"] = _module_version(module)
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        # The CPU kernel set torch dispatches to (AVX2, AVX512, ...): two machines with
        # different sets may round differently, so a long training run's figures may differ.
        cpu_backend = getattr(torch.backends, "cpu", None)  # torch >= 2.1
        info["torch_cpu_capability"] = (cpu_backend.get_cpu_capability()
                                        if cpu_backend is not None else None)
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        pass
    return info


def choose_threads(requested: Optional[int], machine: Dict[str, Any]
                   ) -> Tuple[Optional[int], str]:
    """torch threads for the workers and why: ``requested`` when given; else 1 when other
    processes already keep the cores busy (load average >= usable cores - 0.5), because then
    torch's thread pool waits at every parallel region for a descheduled thread and small
    operations take a scheduler time slice (~10 ms) each, whatever they compute; else None
    (torch's own choice, one per usable core)."""
    if requested:
        return requested, "--threads"
    load = (machine.get("load_average") or [0.0])[0]
    cores = machine.get("usable_cores") or 1
    if cores > 1 and load >= cores - 0.5:
        return 1, (f"busy machine: load average {load:.1f} on {cores} cores; pass --threads "
                   "to override")
    return None, "torch's default"


def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:  # a broken optional package must not stop the benchmark
        return None
    return str(getattr(module, "__version__", "unknown"))


def repo_commit() -> Optional[str]:
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


# ---------------------------------------------------------------- test helpers


def test_helpers():
    """bevdepth_npu/testing.py: the realistic camera matrices, boxes, batches and reference
    pooling the parity tests use too, written once for both."""
    from bevdepth_npu import testing
    return testing


# ---------------------------------------------------------------- memory of this process


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ``clear_refs`` 5); False where unsupported,
    and then ``peak_rss_bytes`` is the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> Optional[int]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return None


# ---------------------------------------------------------------- workers


class Worker:
    """A ``python -m bench.worker`` subprocess speaking JSON lines on stdin/stdout.

    ``setup(key, factory, params)`` builds a case in the worker (``factory`` is
    ``"module:function"``; the function takes the params dict and returns an object with a
    ``run()`` method); ``run(key)`` times one ``run()`` there and returns its figures;
    ``call(key, method, **kwargs)`` calls another method of the case and returns its (JSON)
    result. The worker's stderr goes to a log file that error messages quote.
    """

    def __init__(self, role: str, *, upstream_source: Optional[Path] = None,
                 threads: Optional[int] = None, env: Optional[Dict[str, str]] = None,
                 log_dir: Optional[Path] = None, name: str = "", timeout_s: float = 1800.0):
        if role not in ROLES:
            raise ValueError(f"unknown worker role {role!r}; use one of {', '.join(ROLES)}")
        self.role = role
        self.name = name or role
        self.timeout_s = timeout_s
        cmd = [sys.executable, "-m", "bench.worker", "--role", role]
        if upstream_source is not None:
            cmd += ["--upstream-source", str(upstream_source)]
        if threads:
            cmd += ["--threads", str(threads)]
        full_env = dict(os.environ)
        # The repository root first, so that ``bench`` and ``tests`` resolve here; the
        # patched/pristine bevdepth is chosen by the worker itself.
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        log_dir = Path(log_dir or tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{self.name}-{os.getpid()}-{id(self):x}.log"
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, cwd=str(REPO_ROOT), env=full_env,
                                      text=True, bufsize=1)
        try:
            self.info = self._request(dict(op="hello"))
        except BaseException:
            self.close()
            raise

    # A reply line is the only thing a worker writes to its stdout (the worker points fd 1 at
    # stderr for everything else), so one readline is one reply.
    def _request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it exited; its last reply, if any, is still in the pipe
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            raise BenchError(f"worker {self.name} died during {message.get('op')} "
                             f"({message.get('key', '')}) with exit code {self._proc.returncode}; "
                             f"log: {self.log_path}\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"worker {self.name}: {message.get('op')} "
                             f"{message.get('key', '')} failed: {reply.get('error')}\n"
                             f"{reply.get('traceback', '')}")
        return reply

    def setup(self, key: str, factory: str, params: Optional[Dict[str, Any]] = None
              ) -> Dict[str, Any]:
        return self._request(dict(op="setup", key=key, factory=factory, params=params or {}))

    def run(self, key: str) -> Dict[str, float]:
        return self._request(dict(op="run", key=key))["figures"]

    def call(self, key: str, method: str, **kwargs: Any) -> Any:
        return self._request(dict(op="call", key=key, method=method, kwargs=kwargs))["result"]

    def drop(self, key: str) -> None:
        self._request(dict(op="drop", key=key))

    def runner(self, key: str) -> Callable[[], Dict[str, float]]:
        return lambda: self.run(key)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps(dict(op="exit")) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------- settings shared by benchmarks


@dataclasses.dataclass
class Context:
    """Settings every benchmark receives from ``python -m bench``."""
    quick: bool = False
    repeats: Optional[int] = None   # None: each benchmark's own default
    warmup: int = 1
    threads: Optional[int] = None   # torch threads in the workers; None: torch's default
    work_dir: Path = Path(".")
    upstream_source: Optional[Path] = None
    gpu_dry_run: bool = False
    log: Callable[[str], None] = print

    def repeats_for(self, full: int, quick: int) -> int:
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else full

    def worker(self, role: str, name: str = "", env: Optional[Dict[str, str]] = None,
               upstream_source: Optional[Path] = None) -> Worker:
        if role in (ROLE_UPSTREAM_CPU, ROLE_UPSTREAM_CUDA):
            upstream_source = upstream_source or self.upstream_source
            if upstream_source is None or not (Path(upstream_source) / "bevdepth").is_dir():
                raise BenchError(
                    f"no pristine BEVDepth checkout at {upstream_source}; run "
                    "`bevdepth-npu fetch bevdepth` or pass --upstream-source")
        self.log(f"  starting {name or role} worker")
        started = time.perf_counter()
        worker = Worker(role, upstream_source=upstream_source, threads=self.threads, env=env,
                        log_dir=self.work_dir / "logs", name=name or role)
        self.log(f"  {name or role} worker ready in {time.perf_counter() - started:.1f} s")
        return worker
