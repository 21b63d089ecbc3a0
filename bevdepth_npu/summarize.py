"""``bevdepth-npu summarize RUN_DIR``: turn a run directory into the ModelZoo and JSON summaries.

Run:  bevdepth-npu summarize RUN_DIR [--warmup-steps 5] [--metrics PATH] [--log PATH] ...
      python -m bevdepth_npu.summarize RUN_DIR ...        (same, without the console script)
From Python: ``summarize(run_dir, ...) -> dict`` (the dict written to summary.json).

Inputs, all inside RUN_DIR unless a flag names them:
  - ``run.json`` (optional; written by the test/*.sh scripts): network, case_name, rank_size,
    batch_size_per_device, device_type, start_time_s, end_time_s, train_start_s, train_end_s,
    mode ("full" | "performance" | "eval"). Every field is optional; flags override it.
  - the training log (``--log PATH``; otherwise found by this rule): the files named
    ``train.log`` or ``train_*.log`` directly in RUN_DIR, or, if there are none there, anywhere
    below it (ModelZoo writes ``output/<device id>/train_<device id>.log``); of these, the newest
    (modification time, then path) that contains a step line, else the newest. Only rank 0
    writes step lines, so this picks rank 0's log among per-device logs. Eval runs do not read
    a training log unless ``--log`` is given. Step lines: see bevdepth_npu/steplog.py.
  - the nuScenes metrics (``--metrics PATH``; otherwise the newest ``metrics_summary.json``
    anywhere below RUN_DIR): the devkit's summary, values as the devkit writes them
    (fractions, not percent): mAP = mean_ap, mATE/mASE/mAOE/mAVE/mAAE = tp_errors
    trans_err/scale_err/orient_err/vel_err/attr_err, NDS = nd_score.

Figures:
  - ActualFPS = samples/s = sum(global_batch) / sum(step_time_s) over the measured steps, that
    is all steps except the first ``--warmup-steps`` (default 5) of every process run (a resumed
    run warms up again); images_per_s uses global_batch x images_per_sample the same way;
    mean_step_time_s, mean_data_time_s and data_time_fraction = sum(data) / sum(step) also
    over the measured steps.
  - ActualLoss = mean loss of the last ``--loss-window`` (default 10) logged steps (fewer if
    the log has fewer); omitted, with a warning, if any of them is nan/inf.
  - TrainingTime (s) = run.json train_end_s - train_start_s, else the sum of step_time_s over
    all logged steps; E2ETrainingTime (s) = run.json end_time_s - start_time_s. summary.json
    ``sources`` says where each figure came from.
  - Computed figures are rounded to 6 significant digits once; both files carry those numbers.

Outputs, each written atomically (temporary file in RUN_DIR, then rename):
  - ``<CaseName>.log``: ModelZoo ``Key = value`` lines for the keys that have values. CaseName
    is --case-name, else run.json case_name, else ``<Network>_bs<BatchSize>_<RankSize>p_<kind>``
    (kind acc/perf/eval; unknown parts left out). An existing file of that name is replaced
    only if it holds nothing but ``Key = value`` lines (an earlier summary); anything else is
    refused, so a training log can never be overwritten.
  - ``summary.json``: the same numbers plus images_per_s, step counts, malformed lines, the
    source of each figure and warnings; sorted keys; strict JSON (no NaN).
  - ``curves.png``: loss, lr and step/data time against step (needs matplotlib; skipped with a
    warning if it is missing, or with --no-plot).

Exit codes: 0 all figures of the mode are there; 1 files written but a figure the mode needs is
missing (performance/full: no measured step lines; full: no metrics; no mode given and the log
has no step lines and there are no metrics), with a warning saying which (warnings go to stderr
and into summary.json); 2 bad input, nothing written (RUN_DIR missing, no training log for a
training mode, no metrics for an eval run, a named file missing, unreadable run.json or
metrics, a CaseName that would replace some other file, RUN_DIR not writable). Without a mode
from a flag or run.json, the mode is inferred: full (steps and metrics), performance (steps
only), eval (metrics only).
Running it twice on the same run directory writes identical .log and summary.json bytes.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, Tuple

from bevdepth_npu.argtypes import non_negative_int, positive_int
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.steplog import StepLog, log_has_step_marker, parse_step_log

DEFAULT_WARMUP_STEPS = 5       # graph compilation, allocator growth and loader start-up slow these
DEFAULT_LOSS_WINDOW = 10       # one step's loss is noisy; a short mean is a fairer final loss
DEFAULT_NETWORK = "BEVDepth"   # the only network this project trains
MALFORMED_EXAMPLES = 10        # how many malformed records summary.json lists in full

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
CURVES_PNG = "curves.png"
METRICS_NAME = "metrics_summary.json"
MODES = ("full", "performance", "eval")
CASE_SUFFIX = {"full": "acc", "performance": "perf", "eval": "eval"}

# ModelZoo keys in the order the .log lists them.
LOG_KEYS: Tuple[str, ...] = (
    "Network", "RankSize", "BatchSize", "DeviceType", "CaseName",
    "ActualFPS", "ActualLoss", "TrainingTime", "E2ETrainingTime",
    "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS",
)

# ModelZoo metric key -> path of keys in the devkit's metrics_summary.json.
METRIC_PATHS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("mAP", ("mean_ap",)),
    ("mATE", ("tp_errors", "trans_err")),
    ("mASE", ("tp_errors", "scale_err")),
    ("mAOE", ("tp_errors", "orient_err")),
    ("mAVE", ("tp_errors", "vel_err")),
    ("mAAE", ("tp_errors", "attr_err")),
    ("NDS", ("nd_score",)),
)

# run.json field -> kind of value it must hold.
RUN_FIELDS: Dict[str, str] = {
    "network": "text",
    "case_name": "text",
    "rank_size": "count",
    "batch_size_per_device": "count",
    "device_type": "text",
    "start_time_s": "seconds",
    "end_time_s": "seconds",
    "train_start_s": "seconds",
    "train_end_s": "seconds",
    "mode": "mode",
}

_CASE_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_MODELZOO_LINE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]* = [^\r\n]*")


class SummarizeInputError(Exception):
    """Bad input: the message names the path or setting; the command exits 2."""


# ---------------------------------------------------------------------------------------------
# small helpers

def _sig6(value: float) -> float:
    """Round to 6 significant digits, once, so both output files carry the same number."""
    return float("%.6g" % value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _display(path: str, run_dir: str) -> str:
    """A path relative to RUN_DIR when inside it (summary.json stays valid if RUN_DIR moves)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return os.path.abspath(path).replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def _newest(paths: Sequence[str]) -> Optional[str]:
    if not paths:
        return None
    # Ties on mtime (coarse clocks, copied trees) are broken by path so the choice is stable.
    return max(paths, key=lambda p: (os.stat(p).st_mtime_ns, p))


def _walk_files(run_dir: str, match: Callable[[str], bool]) -> List[str]:
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in sorted(files) if match(name))
    return found


def _is_train_log_name(name: str) -> bool:
    return name == "train.log" or (name.startswith("train_") and name.endswith(".log"))


def find_train_log(run_dir: str) -> Optional[str]:
    """The training log of RUN_DIR by the rule in the module docstring, or None."""
    top = [
        os.path.join(run_dir, name)
        for name in sorted(os.listdir(run_dir))
        if _is_train_log_name(name) and os.path.isfile(os.path.join(run_dir, name))
    ]
    candidates = top or _walk_files(run_dir, _is_train_log_name)
    with_steps = [path for path in candidates if log_has_step_marker(path)]
    return _newest(with_steps) or _newest(candidates)


def find_metrics(run_dir: str) -> Optional[str]:
    """The newest metrics_summary.json anywhere below RUN_DIR, or None."""
    return _newest(_walk_files(run_dir, lambda name: name == METRICS_NAME))


def load_run_json(path: str) -> Dict[str, Any]:
    """The validated fields of run.json ({} if the file does not exist); unknown keys ignored."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SummarizeInputError(f"cannot read run metadata {path}: {err}") from None
    if not isinstance(data, dict):
        raise SummarizeInputError(f"run metadata {path} must hold a JSON object")
    fields: Dict[str, Any] = {}
    for key, kind in RUN_FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        problem = None
        if kind in ("text", "mode"):
            if not isinstance(value, str) or not value.strip() or "\n" in value or "\r" in value:
                problem = "a non-empty single-line string"
            elif kind == "mode" and value not in MODES:
                problem = "one of " + ", ".join(MODES)
        elif kind == "count":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problem = "an integer >= 1"
        elif kind == "seconds":
            if not _is_number(value) or not math.isfinite(value):
                problem = "a number of seconds"
        if problem:
            raise SummarizeInputError(
                f"run metadata {path}: {key} must be {problem}, got {value!r}")
        fields[key] = value
    return fields


def load_metrics(path: str) -> Tuple[Dict[str, float], List[str]]:
    """ModelZoo metric figures from a devkit metrics_summary.json, plus warnings."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SummarizeInputError(f"cannot read metrics {path}: {err}") from None
    metrics: Dict[str, float] = {}
    warnings: List[str] = []
    for key, keys in METRIC_PATHS:
        value: Any = data
        for part in keys:
            if not isinstance(value, dict) or part not in value:
                raise SummarizeInputError(
                    f"metrics {path} is not a nuScenes metrics summary: no {'.'.join(keys)}")
            value = value[part]
        if not _is_number(value):
            raise SummarizeInputError(
                f"metrics {path}: {'.'.join(keys)} is not a number: {value!r}")
        if not math.isfinite(value):
            warnings.append(f"{key} ({'.'.join(keys)}) in {path} is {value}; left out")
            continue
        metrics[key] = float(value)
    return metrics, warnings


# ---------------------------------------------------------------------------------------------
# figures

def _step_figures(
    log: StepLog, warmup_steps: int, loss_window: int, log_name: str,
) -> Tuple[Dict[str, Any], Dict[str, str], List[str]]:
    figures: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    warnings: List[str] = []
    records = log.records
    measured = log.measured(warmup_steps)
    figures["steps_total"] = len(records)
    figures["steps_measured"] = len(measured)
    figures["steps_duplicate_dropped"] = log.duplicates_dropped
    figures["restarts"] = log.restarts
    figures["nonfinite_loss_steps"] = sum(1 for r in records if not math.isfinite(r.loss))
    if records:
        figures["first_step"] = records[0].step
        figures["last_step"] = records[-1].step
    if log.malformed:
        warnings.append(f"{len(log.malformed)} malformed step line(s) in {log_name} left out "
                        f"(first at line {log.malformed[0].line_no}: {log.malformed[0].reason})")
    if measured:
        step_time_s = math.fsum(r.step_time_s for r in measured)
        data_time_s = math.fsum(r.data_time_s for r in measured)
        samples = sum(r.global_batch for r in measured)
        images = sum(r.global_batch * r.images_per_sample for r in measured)
        figures["samples_measured"] = samples
        figures["step_time_measured_s"] = _sig6(step_time_s)
        figures["samples_per_s"] = _sig6(samples / step_time_s)
        figures["ActualFPS"] = figures["samples_per_s"]
        figures["images_per_s"] = _sig6(images / step_time_s)
        figures["mean_step_time_s"] = _sig6(step_time_s / len(measured))
        figures["mean_data_time_s"] = _sig6(data_time_s / len(measured))
        figures["data_time_fraction"] = _sig6(data_time_s / step_time_s)
        sources["ActualFPS"] = (f"{log_name}: sum(global_batch) / sum(step_time_s) over "
                                f"{len(measured)} measured steps; the first {warmup_steps} steps "
                                f"of each of {log.restarts + 1} process run(s) excluded as warm-up")
    elif records:
        warnings.append(f"all {len(records)} logged steps in {log_name} are warm-up "
                        f"(--warmup-steps {warmup_steps}); no speed figures")
    if records:
        last = records[-loss_window:]
        if all(math.isfinite(r.loss) for r in last):
            figures["ActualLoss"] = _sig6(math.fsum(r.loss for r in last) / len(last))
            sources["ActualLoss"] = (f"{log_name}: mean loss of the last {len(last)} steps "
                                     f"(steps {last[0].step}-{last[-1].step})")
        else:
            warnings.append(f"loss is nan/inf in the last {len(last)} steps of {log_name}; "
                            "ActualLoss left out")
    return figures, sources, warnings


def _plot_curves(path: str, log: StepLog, warmup_steps: int, title: str) -> Optional[str]:
    """Write curves.png; return a warning instead if matplotlib is not installed."""
    try:
        # Imported here: matplotlib is optional and slow to import.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        return f"matplotlib is not installed ({err}); {CURVES_PNG} not written"
    # Figure + Agg canvas rather than pyplot: no global backend switch, no GUI, no state.
    figure = Figure(figsize=(8, 9), constrained_layout=True)
    FigureCanvasAgg(figure)
    loss_ax, lr_ax, time_ax = figure.subplots(3, 1, sharex=True)
    records = log.records
    steps = [r.step for r in records]
    loss_ax.plot(steps, [r.loss for r in records], linewidth=1)
    loss_ax.set_ylabel("loss")
    lr_ax.plot(steps, [r.lr for r in records], linewidth=1)
    lr_ax.set_ylabel("lr")
    time_ax.plot(steps, [r.step_time_s for r in records], linewidth=1, label="step_time_s")
    time_ax.plot(steps, [r.data_time_s for r in records], linewidth=1, label="data_time_s")
    warm = [(r.step, r.step_time_s) for r, pos in zip(records, log.run_positions)
            if pos < warmup_steps]
    if warm:
        time_ax.scatter([s for s, _ in warm], [t for _, t in warm], marker="x", color="grey",
                        label="warm-up (not in FPS)", zorder=3)
    time_ax.set_ylabel("seconds")
    time_ax.set_xlabel("step")
    time_ax.legend(loc="upper right")
    figure.suptitle(title)
    # No "Software" entry: the PNG then depends only on the data, not on the matplotlib version.
    atomic_write(path, lambda handle: figure.savefig(
        handle, format="png", dpi=100, metadata={"Software": None}))
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _check_target(target: str, log_path: Optional[str], case_name: str) -> None:
    """Refuse to replace anything that is not an earlier ModelZoo summary."""
    if not os.path.lexists(target):
        return
    if log_path is not None and os.path.exists(target) and os.path.samefile(target, log_path):
        raise SummarizeInputError(
            f"CaseName {case_name!r} would overwrite the training log {target}; "
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


# ---------------------------------------------------------------------------------------------
# the command

def summarize(
    run_dir: str,
    *,
    log_path: Optional[str] = None,
    metrics_path: Optional[str] = None,
    network: Optional[str] = None,
    case_name: Optional[str] = None,
    rank_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    device_type: Optional[str] = None,
    mode: Optional[str] = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    loss_window: int = DEFAULT_LOSS_WINDOW,
    plot: bool = True,
) -> Dict[str, Any]:
    """Summarize RUN_DIR; write <CaseName>.log, summary.json, curves.png; return the summary.

    Arguments override run.json. Raises SummarizeInputError for bad input (nothing written).
    The returned dict is what summary.json holds; ``complete`` is False when a figure the mode
    needs is missing (``warnings`` says which).
    """
    if not os.path.isdir(run_dir):
        raise SummarizeInputError(f"run directory {run_dir} does not exist or is not a directory")
    if warmup_steps < 0:
        raise SummarizeInputError(f"--warmup-steps must be >= 0, got {warmup_steps}")
    if loss_window < 1:
        raise SummarizeInputError(f"--loss-window must be >= 1, got {loss_window}")
    if mode is not None and mode not in MODES:
        raise SummarizeInputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    for flag, value in (("--rank-size", rank_size), ("--batch-size", batch_size)):
        if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SummarizeInputError(f"{flag} must be an integer >= 1, got {value!r}")
    for flag, text in (("--network", network), ("--case-name", case_name),
                       ("--device-type", device_type)):
        if text is not None and (not text.strip() or "\n" in text or "\r" in text):
            raise SummarizeInputError(
                f"{flag} must be a non-empty single-line string, got {text!r}")

    run_json_path = os.path.join(run_dir, RUN_JSON)
    meta = load_run_json(run_json_path)
    sources: Dict[str, str] = {}
    warnings: List[str] = []

    def pick(flag_value: Any, flag: str, meta_key: str) -> Any:
        if flag_value is not None:
            return flag_value, flag
        if meta_key in meta:
            return meta[meta_key], RUN_JSON
        return None, None

    mode_value, mode_source = pick(mode, "--mode", "mode")

    # The training log.
    log_file: Optional[str] = None
    if log_path is not None:
        if not os.path.isfile(log_path):
            raise SummarizeInputError(f"training log {log_path} (--log) does not exist")
        log_file = log_path
    elif mode_value != "eval":
        log_file = find_train_log(run_dir)
        if log_file is None and mode_value is not None:
            raise SummarizeInputError(
                f"no training log in {run_dir}: looked for train.log and train_*.log there and "
                "below it; pass --log PATH")

    # The evaluation metrics.
    metrics_file: Optional[str] = None
    if metrics_path is not None:
        if not os.path.isfile(metrics_path):
            raise SummarizeInputError(f"metrics file {metrics_path} (--metrics) does not exist")
        metrics_file = metrics_path
    else:
        metrics_file = find_metrics(run_dir)
        if metrics_file is None and mode_value == "eval":
            raise SummarizeInputError(
                f"no {METRICS_NAME} below {run_dir} for this eval run; pass --metrics PATH")
    if log_file is None and metrics_file is None:
        raise SummarizeInputError(
            f"nothing to summarize in {run_dir}: no train.log / train_*.log and no {METRICS_NAME}")

    metrics: Dict[str, float] = {}
    if metrics_file is not None:
        metrics, metric_warnings = load_metrics(metrics_file)
        warnings.extend(metric_warnings)
        sources["metrics"] = _display(metrics_file, run_dir)
        for key, keys in METRIC_PATHS:
            if key in metrics:
                sources[key] = f"{sources['metrics']} {'.'.join(keys)}"

    log: Optional[StepLog] = None
    figures: Dict[str, Any] = {}
    if log_file is not None:
        log = parse_step_log(log_file)
        log_name = _display(log_file, run_dir)
        sources["step_log"] = log_name
        figures, step_sources, step_warnings = _step_figures(
            log, warmup_steps, loss_window, log_name)
        sources.update(step_sources)
        warnings.extend(step_warnings)

    if mode_value is None:
        has_steps = log is not None and bool(log.records)
        if has_steps:
            mode_value = "full" if metrics_file is not None else "performance"
        elif metrics_file is not None:
            mode_value = "eval"
        mode_source = "inferred from what RUN_DIR holds" if mode_value else None
    if mode_source:
        sources["mode"] = mode_source

    summary: Dict[str, Any] = {}
    summary.update(figures)
    summary.update(metrics)

    network_value, network_source = pick(network, "--network", "network")
    if network_value is None:
        network_value, network_source = DEFAULT_NETWORK, "default"
    rank_value, rank_source = pick(rank_size, "--rank-size", "rank_size")
    batch_value, batch_source = pick(batch_size, "--batch-size", "batch_size_per_device")
    device_value, device_source = pick(device_type, "--device-type", "device_type")
    case_value, case_source = pick(case_name, "--case-name", "case_name")
    if case_value is None:
        parts = [network_value]
        if batch_value is not None:
            parts.append(f"bs{batch_value}")
        if rank_value is not None:
            parts.append(f"{rank_value}p")
        if mode_value is not None:
            parts.append(CASE_SUFFIX[mode_value])
        case_value, case_source = "_".join(parts), "derived: Network_bsBatchSize_RankSizep_kind"
    if not _CASE_NAME_RE.fullmatch(case_value):
        raise SummarizeInputError(
            f"CaseName {case_value!r} ({case_source}) is not a plain file name "
            "(letters, digits, '._+-', not starting with '.')")
    for key, value, source in (
        ("Network", network_value, network_source),
        ("RankSize", rank_value, rank_source),
        ("BatchSize", batch_value, batch_source),
        ("DeviceType", device_value, device_source),
        ("CaseName", case_value, case_source),
    ):
        if value is not None:
            summary[key] = value
            sources[key] = source

    if log is not None and log.records and rank_value is not None and batch_value is not None:
        common_batch = collections.Counter(r.global_batch for r in log.records).most_common(1)[0][0]
        if common_batch != rank_value * batch_value:
            warnings.append(f"global_batch in the log is {common_batch}, but BatchSize x RankSize "
                            f"is {batch_value} x {rank_value} = {batch_value * rank_value}")

    # Times.
    if "train_start_s" in meta and "train_end_s" in meta:
        train_s = meta["train_end_s"] - meta["train_start_s"]
        if train_s >= 0:
            summary["TrainingTime"] = _sig6(train_s)
            sources["TrainingTime"] = f"{RUN_JSON} train_end_s - train_start_s"
        else:
            warnings.append(f"{RUN_JSON}: train_end_s is before train_start_s; ignored")
    if "TrainingTime" not in summary and log is not None and log.records:
        summary["TrainingTime"] = _sig6(math.fsum(r.step_time_s for r in log.records))
        sources["TrainingTime"] = (f"{sources['step_log']}: sum of step_time_s over all "
                                   f"{len(log.records)} logged steps")
    if "start_time_s" in meta and "end_time_s" in meta:
        e2e_s = meta["end_time_s"] - meta["start_time_s"]
        if e2e_s >= 0:
            summary["E2ETrainingTime"] = _sig6(e2e_s)
            sources["E2ETrainingTime"] = f"{RUN_JSON} end_time_s - start_time_s"
        else:
            warnings.append(f"{RUN_JSON}: end_time_s is before start_time_s; ignored")

    # What the mode needs.
    missing = []
    if mode_value in ("performance", "full") and "ActualFPS" not in summary:
        missing.append("ActualFPS (no measured step lines)")
    if mode_value == "full" and "mAP" not in summary:
        missing.append(f"mAP/NDS (no {METRICS_NAME})")
    if mode_value is None:
        missing.append("everything: the training log has no step lines and there are no metrics")
    for item in missing:
        warnings.append(f"{mode_value or 'unknown'} run is missing {item}")

    summary.update({
        "mode": mode_value,
        "complete": not missing,
        "warmup_steps": warmup_steps,
        "loss_window_steps": loss_window,
        "malformed_lines": len(log.malformed) if log is not None else 0,
        "malformed_examples": [
            {"line": m.line_no, "reason": m.reason, "excerpt": m.excerpt}
            for m in (log.malformed[:MALFORMED_EXAMPLES] if log is not None else [])
        ],
    })
    if log is None:
        summary["steps_total"] = 0
        summary["steps_measured"] = 0

    target = os.path.join(run_dir, f"{case_value}.log")
    _check_target(target, log_file, case_value)

    files = [os.path.basename(target), SUMMARY_JSON]
    if plot and log is not None and log.records:
        warning = _plot_curves(os.path.join(run_dir, CURVES_PNG), log, warmup_steps, case_value)
        if warning:
            warnings.append(warning)
        else:
            files.append(CURVES_PNG)
    summary["files"] = sorted(files)
    summary["sources"] = sources
    summary["warnings"] = warnings

    log_text = "".join(
        f"{key} = {_format_value(summary[key])}\n" for key in LOG_KEYS if key in summary)
    json_text = json.dumps(summary, sort_keys=True, indent=2, allow_nan=False) + "\n"
    atomic_write(target, lambda handle: handle.write(log_text.encode("utf-8")))
    atomic_write(os.path.join(run_dir, SUMMARY_JSON),
                  lambda handle: handle.write(json_text.encode("utf-8")))
    return summary


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bevdepth-npu summarize``."""
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory written by test/train_*.sh or test/eval_bevdepth.sh")
    parser.add_argument("--log", metavar="PATH", default=None,
                        help="training log with BEVDEPTH_STEP lines (default: newest train.log / "
                             "train_*.log in RUN_DIR that has step lines)")
    parser.add_argument("--metrics", metavar="PATH", default=None,
                        help=f"nuScenes {METRICS_NAME} (default: newest one below RUN_DIR)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="kind of run (default: run.json mode, else inferred from the files)")
    parser.add_argument("--network", default=None,
                        help=f"Network (default: run.json network, else {DEFAULT_NETWORK})")
    parser.add_argument("--case-name", default=None,
                        help="CaseName, also the name of the .log (default: run.json case_name, "
                             "else Network_bsBatchSize_RankSizep_acc|perf|eval)")
    parser.add_argument("--rank-size", type=positive_int, default=None,
                        help="number of devices (default: run.json rank_size)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="batch per device (default: run.json batch_size_per_device)")
    parser.add_argument("--device-type", default=None,
                        help="DeviceType (default: run.json device_type)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=DEFAULT_WARMUP_STEPS,
                        help="steps left out of speed figures at the start of every process run "
                             "(default: %(default)s)")
    parser.add_argument("--loss-window", type=positive_int, default=DEFAULT_LOSS_WINDOW,
                        help="ActualLoss is the mean loss of this many last steps "
                             "(default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true",
                        help=f"do not write {CURVES_PNG}")


def _print_table(summary: Dict[str, Any], run_dir: str, out: IO[str]) -> None:
    rows: List[Tuple[str, str]] = [("mode", f"{summary['mode'] or 'unknown'}")]
    rows += [(key, _format_value(summary[key])) for key in LOG_KEYS if key in summary]
    for key in ("images_per_s", "mean_step_time_s", "mean_data_time_s", "data_time_fraction"):
        if key in summary:
            rows.append((key, _format_value(summary[key])))
    rows.append(("steps", f"{summary['steps_total']} logged, {summary['steps_measured']} measured "
                          f"(warm-up {summary['warmup_steps']} per process run), "
                          f"{summary['malformed_lines']} malformed"))
    width = max(len(key) for key, _ in rows)
    print(f"summary of {run_dir}", file=out)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)
    print("wrote:", file=out)
    for name in summary["files"]:
        print(f"  {os.path.join(run_dir, name)}", file=out)


def run(args: argparse.Namespace) -> int:
    """Run ``bevdepth-npu summarize``; returns the exit code (see the module docstring)."""
    try:
        summary = summarize(
            args.run_dir,
            log_path=args.log,
            metrics_path=args.metrics,
            network=args.network,
            case_name=args.case_name,
            rank_size=args.rank_size,
            batch_size=args.batch_size,
            device_type=args.device_type,
            mode=args.mode,
            warmup_steps=args.warmup_steps,
            loss_window=args.loss_window,
            plot=not args.no_plot,
        )
    except SummarizeInputError as err:
        print(f"bevdepth-npu summarize: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"bevdepth-npu summarize: error: {err}", file=sys.stderr)
        return 2
    _print_table(summary, args.run_dir, sys.stdout)
    for warning in summary["warnings"]:
        print(f"bevdepth-npu summarize: warning: {warning}", file=sys.stderr)
    return 0 if summary["complete"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bevdepth-npu summarize",
        description="Write <CaseName>.log, summary.json and curves.png for a run directory.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
