"""The results a run prints at its end: the ModelZoo summary and the nuScenes metrics table.

The summary comes from ``bevdepth-npu summarize`` (called in-process on the run directory), of
which the console gets the speed, loss and times; the table comes from the devkit's
metrics_summary.json, in the layout of the devkit's own printout (which is in the evaluation
log): mAP, the five TP errors, NDS, then one row per class.

Part of ``bevdepth-npu run`` (bevdepth_npu/run/). Tests: tests/unit/test_run_console.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from bevdepth_npu.summarize import modelzoo

TP_ERRORS = (("mATE", "trans_err"), ("mASE", "scale_err"), ("mAOE", "orient_err"),
             ("mAVE", "vel_err"), ("mAAE", "attr_err"))
METRIC_KEYS = ("mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS")


# What the console shows of a summary, in this order (the rest is in the files); units.
SHOWN = (("ActualFPS", " samples/s"), ("ActualLoss", ""), ("TrainingTime", " s"),
         ("E2ETrainingTime", " s"))


def summary_lines(summary: Dict[str, Any]) -> List[str]:
    """The speed, loss and times of a summary in one line (the metrics get the table)."""
    parts = [f"{key} {modelzoo.format_value(summary[key])}{unit}" for key, unit in SHOWN
             if key in summary]
    return ["  " + ", ".join(parts)] if parts else []


def metrics_table(metrics_json: Path, split: str = "") -> List[str]:
    """The devkit's metrics as a table; ValueError/KeyError if the file is not a summary."""
    metrics = json.loads(metrics_json.read_text(encoding="utf-8"))
    heading = "nuScenes detection metrics (devkit detection_cvpr_2019 protocol"
    lines = ["", heading + (f", {split} split)" if split else ")"),
             f"mAP: {metrics['mean_ap']:.4f}"]
    lines += [f"{name}: {metrics['tp_errors'][key]:.4f}" for name, key in TP_ERRORS]
    lines += [f"NDS: {metrics['nd_score']:.4f}", "", "Per-class results:",
              f"{'Object Class':<22}{'AP':>8}" + "".join(f"{n[1:]:>8}" for n, _ in TP_ERRORS)]
    for name, ap in metrics["mean_dist_aps"].items():
        errors = metrics["label_tp_errors"][name]
        lines.append(f"{name:<22}{ap:>8.3f}" + "".join(f"{errors[key]:>8.3f}"
                                                      for _, key in TP_ERRORS))
    return lines + [""]
