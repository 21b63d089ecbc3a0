"""The figures of a run summary: speed and loss from the step log, nuScenes metrics from the
devkit's metrics_summary.json, training and end-to-end times from run.json.

Each function returns (figures, sources, warnings): the numbers, where each came from (a short
sentence for summary.json), and what was left out and why. Definitions:

  - ActualFPS = samples/s = sum(global_batch) / sum(step_time_s) over the measured steps, that
    is all steps except the first ``warmup_steps`` of every process run (a resumed run warms up
    again); images_per_s uses global_batch x images_per_sample the same way; mean_step_time_s,
    mean_data_time_s and data_time_fraction = sum(data) / sum(step) also over measured steps.
  - ActualLoss = mean loss of the last ``loss_window`` logged steps; left out, with a warning,
    if any of them is not finite.
  - mAP = mean_ap, mATE..mAAE = tp_errors trans_err..attr_err, NDS = nd_score (fractions, as
    the devkit writes them).
  - TrainingTime = run.json train_end_s - train_start_s, else the sum of step_time_s over all
    logged steps; E2ETrainingTime = run.json end_time_s - start_time_s.
  - Computed figures are rounded to 6 significant digits once; both output files carry them.

Part of ``bevdepth-npu summarize`` (bevdepth_npu/summarize/); tests: tests/unit/test_summarize.py.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Tuple

from bevdepth_npu.runrecord import RUN_JSON, RunRecord
from bevdepth_npu.steplog import StepLog

METRICS_NAME = "metrics_summary.json"

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

Figures = Tuple[Dict[str, Any], Dict[str, str], List[str]]


class SummarizeInputError(Exception):
    """Bad input: the message names the path or setting; the command exits 2."""


def sig6(value: float) -> float:
    """Round to 6 significant digits, once, so both output files carry the same number."""
    return float("%.6g" % value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_figures(log: StepLog, warmup_steps: int, loss_window: int, log_name: str) -> Figures:
    """Speed, loss and step counts of a step log."""
    records = log.records
    measured = log.measured(warmup_steps)
    figures: Dict[str, Any] = {
        "steps_total": len(records), "steps_measured": len(measured),
        "steps_duplicate_dropped": log.duplicates_dropped, "restarts": log.restarts,
        "nonfinite_loss_steps": sum(1 for r in records if not math.isfinite(r.loss)),
    }
    sources: Dict[str, str] = {}
    warnings: List[str] = []
    if records:
        figures["first_step"], figures["last_step"] = records[0].step, records[-1].step
    if log.malformed:
        first = log.malformed[0]
        warnings.append(f"{len(log.malformed)} malformed step line(s) in {log_name} left out "
                        f"(first at line {first.line_no}: {first.reason})")
    if measured:
        step_time_s = math.fsum(r.step_time_s for r in measured)
        data_time_s = math.fsum(r.data_time_s for r in measured)
        samples = sum(r.global_batch for r in measured)
        images = sum(r.global_batch * r.images_per_sample for r in measured)
        figures.update(
            samples_measured=samples, step_time_measured_s=sig6(step_time_s),
            samples_per_s=sig6(samples / step_time_s), images_per_s=sig6(images / step_time_s),
            mean_step_time_s=sig6(step_time_s / len(measured)),
            mean_data_time_s=sig6(data_time_s / len(measured)),
            data_time_fraction=sig6(data_time_s / step_time_s))
        figures["ActualFPS"] = figures["samples_per_s"]
        sources["ActualFPS"] = (f"{log_name}: sum(global_batch) / sum(step_time_s) over "
                                f"{len(measured)} measured steps; the first {warmup_steps} steps "
                                f"of each of {log.restarts + 1} process run(s) excluded as warm-up")
    elif records:
        warnings.append(f"all {len(records)} logged steps in {log_name} are warm-up "
                        f"(--warmup-steps {warmup_steps}); no speed figures")
    if records:
        last = records[-loss_window:]
        if all(math.isfinite(r.loss) for r in last):
            figures["ActualLoss"] = sig6(math.fsum(r.loss for r in last) / len(last))
            sources["ActualLoss"] = (f"{log_name}: mean loss of the last {len(last)} steps "
                                     f"(steps {last[0].step}-{last[-1].step})")
        else:
            warnings.append(f"loss is nan/inf in the last {len(last)} steps of {log_name}; "
                            "ActualLoss left out")
    return figures, sources, warnings


def metric_figures(path: str, name: str) -> Figures:
    """The ModelZoo metrics of a devkit metrics_summary.json (``name``: how sources show it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SummarizeInputError(f"cannot read metrics {path}: {err}") from None
    figures: Dict[str, Any] = {}
    sources: Dict[str, str] = {"metrics": name}
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
        figures[key] = float(value)
        sources[key] = f"{name} {'.'.join(keys)}"
    return figures, sources, warnings


def time_figures(record: RunRecord, log: "StepLog | None", log_name: str) -> Figures:
    """TrainingTime and E2ETrainingTime."""
    figures: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    warnings: List[str] = []
    times = record.times()
    for key, start, end, what in (("TrainingTime", "train_start_s", "train_end_s", "train"),
                                  ("E2ETrainingTime", "start_time_s", "end_time_s", "")):
        if start in times and end in times:
            seconds = times[end] - times[start]
            if seconds >= 0:
                figures[key] = sig6(seconds)
                sources[key] = f"{RUN_JSON} {end} - {start}"
            else:
                warnings.append(f"{RUN_JSON}: {end} is before {start}; ignored")
    if "TrainingTime" not in figures and log is not None and log.records:
        figures["TrainingTime"] = sig6(math.fsum(r.step_time_s for r in log.records))
        sources["TrainingTime"] = (f"{log_name}: sum of step_time_s over all "
                                   f"{len(log.records)} logged steps")
    return figures, sources, warnings
