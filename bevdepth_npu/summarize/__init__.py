"""``bevdepth-npu summarize RUN_DIR``: turn a run directory into the ModelZoo and JSON summaries.

Run:  bevdepth-npu summarize RUN_DIR [--warmup-steps 5] [--metrics PATH] [--steps PATH] ...
      python -m bevdepth_npu.summarize RUN_DIR ...        (same, without the console script)
From Python: ``summarize(run_dir, ...) -> dict`` (the dict written to summary.json).

Inputs, all inside RUN_DIR unless a flag names them:
  - ``run.json`` (optional; bevdepth_npu/runrecord.py describes it): network, case_name,
    rank_size, batch_size_per_device, device_type, mode and the times. Flags override it.
  - the step log (``--steps PATH``; otherwise RUN_DIR/steps.jsonl, else the newest steps.jsonl
    below RUN_DIR), in the format of bevdepth_npu/steplog.py. Eval runs read none unless
    ``--steps`` names one.
  - the nuScenes metrics (``--metrics PATH``; otherwise the newest ``metrics_summary.json``
    below RUN_DIR).

Outputs, each written atomically: ``<CaseName>.log`` (ModelZoo ``Key = value`` lines,
bevdepth_npu/summarize/modelzoo.py), ``summary.json`` (the same numbers plus images_per_s, step
counts, malformed lines, the source of each figure and warnings; sorted keys; strict JSON) and
``curves.png`` (bevdepth_npu/summarize/plot.py; skipped with a warning without matplotlib, or
with --no-plot). The figures are defined in bevdepth_npu/summarize/figures.py.

Exit codes: 0 all figures of the mode are there; 1 files written but a figure the mode needs is
missing (performance/full: no measured steps; full: no metrics; no mode given and neither steps
nor metrics), with a warning saying which (warnings go to stderr and into summary.json); 2 bad
input, nothing written. Without a mode from a flag or run.json, it is inferred: full (steps and
metrics), performance (steps only), eval (metrics only). Running it twice on the same run
directory writes identical .log and summary.json bytes.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from bevdepth_npu.argtypes import non_negative_int, positive_int
from bevdepth_npu.fsutil import atomic_write_text, newest_file
from bevdepth_npu.runrecord import MODES, RUN_JSON, RunRecord, RunRecordError
from bevdepth_npu.steplog import STEPS_FILE, StepLog, read_steps
from bevdepth_npu.summarize import modelzoo
from bevdepth_npu.summarize.figures import (METRICS_NAME, Figures, SummarizeInputError,
                                            metric_figures, step_figures, time_figures)
from bevdepth_npu.summarize.plot import CURVES_PNG, plot_curves

DEFAULT_WARMUP_STEPS = 5       # graph compilation, allocator growth and loader start-up slow these
DEFAULT_LOSS_WINDOW = 10       # one step's loss is noisy; a short mean is a fairer final loss
MALFORMED_EXAMPLES = 10        # how many malformed records summary.json lists in full
SUMMARY_JSON = "summary.json"

__all__ = ["summarize", "find_steps", "find_metrics", "SummarizeInputError", "add_arguments",
           "run", "main", "DEFAULT_WARMUP_STEPS"]


def _display(path: str, run_dir: str) -> str:
    """A path relative to RUN_DIR when inside it (summary.json stays valid if RUN_DIR moves)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return os.path.abspath(path).replace(os.sep, "/")
    return rel.replace(os.sep, "/")


def find_steps(run_dir: str) -> Optional[str]:
    """RUN_DIR/steps.jsonl, else the newest steps.jsonl below RUN_DIR, else None."""
    top = os.path.join(run_dir, STEPS_FILE)
    if os.path.isfile(top):
        return top
    found = newest_file([run_dir], lambda name: name == STEPS_FILE)
    return str(found) if found else None


def find_metrics(run_dir: str) -> Optional[str]:
    """The newest metrics_summary.json anywhere below RUN_DIR, or None."""
    found = newest_file([run_dir], lambda name: name == METRICS_NAME)
    return str(found) if found else None


def _check_arguments(run_dir: str, warmup_steps: int, loss_window: int, mode: Optional[str],
                     counts: Tuple[Tuple[str, Any], ...], texts: Tuple[Tuple[str, Any], ...]
                     ) -> None:
    if not os.path.isdir(run_dir):
        raise SummarizeInputError(f"run directory {run_dir} does not exist or is not a directory")
    if warmup_steps < 0:
        raise SummarizeInputError(f"--warmup-steps must be >= 0, got {warmup_steps}")
    if loss_window < 1:
        raise SummarizeInputError(f"--loss-window must be >= 1, got {loss_window}")
    if mode is not None and mode not in MODES:
        raise SummarizeInputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    for flag, value in counts:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise SummarizeInputError(f"{flag} must be an integer >= 1, got {value!r}")
    for flag, text in texts:
        if text is not None and (not text.strip() or "\n" in text or "\r" in text):
            raise SummarizeInputError(
                f"{flag} must be a non-empty single-line string, got {text!r}")


def _inputs(run_dir: str, steps_path: Optional[str], metrics_path: Optional[str],
            mode: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """The step log and the metrics file to read (either may be None)."""
    steps_file: Optional[str] = None
    if steps_path is not None:
        if not os.path.isfile(steps_path):
            raise SummarizeInputError(f"step log {steps_path} (--steps) does not exist")
        steps_file = steps_path
    elif mode != "eval":
        steps_file = find_steps(run_dir)
        if steps_file is None and mode is not None:
            raise SummarizeInputError(
                f"no step log in {run_dir}: looked for {STEPS_FILE} there and below it; "
                "pass --steps PATH")
    if metrics_path is not None:
        if not os.path.isfile(metrics_path):
            raise SummarizeInputError(f"metrics file {metrics_path} (--metrics) does not exist")
        metrics_file: Optional[str] = metrics_path
    else:
        metrics_file = find_metrics(run_dir)
        if metrics_file is None and mode == "eval":
            raise SummarizeInputError(
                f"no {METRICS_NAME} below {run_dir} for this eval run; pass --metrics PATH")
    if steps_file is None and metrics_file is None:
        raise SummarizeInputError(
            f"nothing to summarize in {run_dir}: no {STEPS_FILE} and no {METRICS_NAME}")
    return steps_file, metrics_file


def _identity(summary: Dict[str, Any], sources: Dict[str, str], chosen: Dict[str, Tuple[Any, Any]],
              mode: Optional[str]) -> str:
    """Network, RankSize, BatchSize, DeviceType and CaseName into the summary; the CaseName."""
    network, network_source = chosen["network"]
    if network is None:
        network, network_source = modelzoo.DEFAULT_NETWORK, "default"
    case, case_source = chosen["case_name"]
    if case is None:
        case = modelzoo.case_name(network, chosen["batch_size"][0], chosen["rank_size"][0], mode)
        case_source = "derived: Network_bsBatchSize_RankSizep_kind"
    modelzoo.check_case_name(case, case_source)
    for key, (value, source) in (("Network", (network, network_source)),
                                 ("RankSize", chosen["rank_size"]),
                                 ("BatchSize", chosen["batch_size"]),
                                 ("DeviceType", chosen["device_type"]),
                                 ("CaseName", (case, case_source))):
        if value is not None:
            summary[key] = value
            sources[key] = source
    return case


def _missing(summary: Dict[str, Any], mode: Optional[str]) -> List[str]:
    """What the mode needs and the summary lacks."""
    missing = []
    if mode in ("performance", "full") and "ActualFPS" not in summary:
        missing.append("ActualFPS (no measured step lines)")
    if mode == "full" and "mAP" not in summary:
        missing.append(f"mAP/NDS (no {METRICS_NAME})")
    if mode is None:
        missing.append("everything: there are no step records and no metrics")
    return missing


def _load_record(run_dir: str) -> RunRecord:
    """RUN_DIR/run.json (empty when absent); a bad one is an input error."""
    try:
        return RunRecord.load(os.path.join(run_dir, RUN_JSON))
    except RunRecordError as err:
        raise SummarizeInputError(str(err)) from None


def _pick(record: RunRecord, value: Any, flag: str, key: str) -> Tuple[Any, Any]:
    """(value, source): the flag's value when given, else run.json's, else (None, None)."""
    if value is not None:
        return value, flag
    if record.get(key) is not None:
        return record.get(key), RUN_JSON
    return None, None


class _Draft:
    """The summary as it is built: the figures, the source of each, and the warnings in order."""

    def __init__(self) -> None:
        self.summary: Dict[str, Any] = {}
        self.sources: Dict[str, str] = {}
        self.warnings: List[str] = []

    def take(self, part: Figures) -> None:
        self.summary.update(part[0])
        self.sources.update(part[1])
        self.warnings.extend(part[2])


def _read_inputs(draft: _Draft, run_dir: str, steps_file: Optional[str],
                 metrics_file: Optional[str], warmup_steps: int, loss_window: int
                 ) -> Tuple[Optional[StepLog], str]:
    """Figures of the step log and the metrics into ``draft``; the step log and its name."""
    log: Optional[StepLog] = None
    log_name = ""
    if steps_file is not None:
        log = read_steps(steps_file)
        log_name = _display(steps_file, run_dir)
        draft.sources["step_log"] = log_name
        draft.take(step_figures(log, warmup_steps, loss_window, log_name))
    else:
        draft.summary.update(steps_total=0, steps_measured=0)
    if metrics_file is not None:
        draft.take(metric_figures(metrics_file, _display(metrics_file, run_dir)))
    return log, log_name


def _infer_mode(mode_value: Optional[str], mode_source: Optional[str], log: Optional[StepLog],
                metrics_file: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(mode, source): the given mode, else the one RUN_DIR's files imply (None if neither)."""
    if mode_value is None:
        if log is not None and log.records:
            mode_value = "full" if metrics_file is not None else "performance"
        elif metrics_file is not None:
            mode_value = "eval"
        mode_source = "inferred from what RUN_DIR holds" if mode_value else None
    return mode_value, mode_source


def _batch_warnings(log: Optional[StepLog], ranks: Optional[int], batch: Optional[int]
                    ) -> List[str]:
    """A warning when the log's usual global batch is not BatchSize x RankSize."""
    if log is not None and log.records and ranks is not None and batch is not None:
        common = collections.Counter(r.global_batch for r in log.records).most_common(1)[0][0]
        if common != ranks * batch:
            return [f"global_batch in the log is {common}, but BatchSize x RankSize "
                    f"is {batch} x {ranks} = {batch * ranks}"]
    return []


def _write_outputs(draft: _Draft, run_dir: str, case: str, steps_file: Optional[str],
                   log: Optional[StepLog], warmup_steps: int, plot: bool) -> None:
    """<CaseName>.log, summary.json and (when asked and there are steps) curves.png.

    The .log target is checked first, so a CaseName that would overwrite the training log
    writes nothing; a plot that cannot be drawn becomes a warning.
    """
    summary, warnings = draft.summary, draft.warnings
    target = os.path.join(run_dir, f"{case}.log")
    modelzoo.check_target(target, case, tuple(p for p in (steps_file,) if p))
    files = [os.path.basename(target), SUMMARY_JSON]
    if plot and log is not None and log.records:
        warning = plot_curves(os.path.join(run_dir, CURVES_PNG), log, warmup_steps, case)
        if warning:
            warnings.append(warning)
        else:
            files.append(CURVES_PNG)
    summary.update(files=sorted(files), sources=draft.sources, warnings=warnings)
    atomic_write_text(target, modelzoo.log_text(summary))
    atomic_write_text(os.path.join(run_dir, SUMMARY_JSON),
                      json.dumps(summary, sort_keys=True, indent=2, allow_nan=False) + "\n")


def summarize(
    run_dir: str,
    *,
    steps_path: Optional[str] = None,
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
    _check_arguments(run_dir, warmup_steps, loss_window, mode,
                     (("--rank-size", rank_size), ("--batch-size", batch_size)),
                     (("--network", network), ("--case-name", case_name),
                      ("--device-type", device_type)))
    record = _load_record(run_dir)
    mode_value, mode_source = _pick(record, mode, "--mode", "mode")
    steps_file, metrics_file = _inputs(run_dir, steps_path, metrics_path, mode_value)
    draft = _Draft()
    summary, sources, warnings = draft.summary, draft.sources, draft.warnings
    log, log_name = _read_inputs(draft, run_dir, steps_file, metrics_file, warmup_steps,
                                 loss_window)

    mode_value, mode_source = _infer_mode(mode_value, mode_source, log, metrics_file)
    if mode_source:
        sources["mode"] = mode_source

    chosen = {key: _pick(record, value, flag, meta) for key, value, flag, meta in (
        ("network", network, "--network", "network"),
        ("case_name", case_name, "--case-name", "case_name"),
        ("rank_size", rank_size, "--rank-size", "rank_size"),
        ("batch_size", batch_size, "--batch-size", "batch_size_per_device"),
        ("device_type", device_type, "--device-type", "device_type"))}
    case = _identity(summary, sources, chosen, mode_value)
    warnings.extend(_batch_warnings(log, chosen["rank_size"][0], chosen["batch_size"][0]))
    draft.take(time_figures(record, log, log_name))

    missing = _missing(summary, mode_value)
    warnings.extend(f"{mode_value or 'unknown'} run is missing {item}" for item in missing)
    malformed = log.malformed if log is not None else []
    summary.update({
        "mode": mode_value, "complete": not missing, "warmup_steps": warmup_steps,
        "loss_window_steps": loss_window, "malformed_lines": len(malformed),
        "malformed_examples": [{"line": m.line_no, "reason": m.reason, "excerpt": m.excerpt}
                               for m in malformed[:MALFORMED_EXAMPLES]],
    })
    _write_outputs(draft, run_dir, case, steps_file, log, warmup_steps, plot)
    return summary


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bevdepth-npu summarize``."""
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="run directory written by `bevdepth-npu run` (the test/*.sh scripts)")
    parser.add_argument("--steps", metavar="PATH", default=None,
                        help=f"step log (default: RUN_DIR/{STEPS_FILE}, else the newest one "
                             "below RUN_DIR)")
    parser.add_argument("--metrics", metavar="PATH", default=None,
                        help=f"nuScenes {METRICS_NAME} (default: newest one below RUN_DIR)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="kind of run (default: run.json mode, else inferred from the files)")
    parser.add_argument("--network", default=None,
                        help=f"Network (default: run.json network, else "
                             f"{modelzoo.DEFAULT_NETWORK})")
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


def print_table(summary: Dict[str, Any], run_dir: str, out: IO[str]) -> None:
    rows: List[Tuple[str, str]] = [("mode", f"{summary['mode'] or 'unknown'}")]
    rows += [(key, modelzoo.format_value(summary[key])) for key in modelzoo.LOG_KEYS
             if key in summary]
    for key in ("images_per_s", "mean_step_time_s", "mean_data_time_s", "data_time_fraction"):
        if key in summary:
            rows.append((key, modelzoo.format_value(summary[key])))
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
            args.run_dir, steps_path=args.steps, metrics_path=args.metrics,
            network=args.network, case_name=args.case_name, rank_size=args.rank_size,
            batch_size=args.batch_size, device_type=args.device_type, mode=args.mode,
            warmup_steps=args.warmup_steps, loss_window=args.loss_window,
            plot=not args.no_plot)
    except (SummarizeInputError, OSError) as err:
        print(f"bevdepth-npu summarize: error: {err}", file=sys.stderr)
        return 2
    print_table(summary, args.run_dir, sys.stdout)
    for warning in summary["warnings"]:
        print(f"bevdepth-npu summarize: warning: {warning}", file=sys.stderr)
    return 0 if summary["complete"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bevdepth-npu summarize",
        description="Write <CaseName>.log, summary.json and curves.png for a run directory.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
