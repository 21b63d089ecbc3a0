"""``curves.png`` of a run: loss (log scale: it falls from thousands to tens), learning rate,
and step and data time against step, warm-up steps marked.

Needs matplotlib (the bevdepth-npu environment has it); without it the caller gets a warning
instead of a file. Figure + Agg canvas rather than pyplot: no global backend switch, no GUI.
Part of ``bevdepth-npu summarize`` (bevdepth_npu/summarize/); tests: tests/unit/test_summarize.py.
"""
from __future__ import annotations

import math
from typing import Optional

from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.steplog import StepLog

CURVES_PNG = "curves.png"


def plot_curves(path: str, log: StepLog, warmup_steps: int, title: str) -> Optional[str]:
    """Write the curves to ``path``; return a warning instead if matplotlib is missing."""
    try:
        figure = curves_figure(log, warmup_steps, title)
    except ImportError as err:
        return f"matplotlib is not installed ({err}); {CURVES_PNG} not written"
    # No "Software" entry: the PNG then depends only on the data, not on the matplotlib version.
    atomic_write(path, lambda handle: figure.savefig(
        handle, format="png", dpi=100, metadata={"Software": None}))
    return None


def curves_figure(log: StepLog, warmup_steps: int, title: str):
    """The matplotlib Figure of the curves (ImportError without matplotlib)."""
    # Imported here: matplotlib is optional and slow to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(8, 9), constrained_layout=True)
    FigureCanvasAgg(figure)
    loss_ax, lr_ax, time_ax = figure.subplots(3, 1, sharex=True)
    records = log.records
    steps = [r.step for r in records]
    losses = [r.loss for r in records]
    loss_ax.plot(steps, losses, linewidth=1)
    finite = [loss for loss in losses if math.isfinite(loss)]
    if finite and min(finite) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    lr_ax.plot(steps, [r.lr for r in records], linewidth=1)
    lr_ax.set_ylabel("lr")
    time_ax.plot(steps, [r.step_time_s for r in records], linewidth=1, label="step_time_s")
    time_ax.plot(steps, [r.data_time_s for r in records], linewidth=1, label="data_time_s")
    warm = [(r.step, r.step_time_s) for r in records if r.process_step <= warmup_steps]
    if warm:
        time_ax.scatter([s for s, _ in warm], [t for _, t in warm], marker="x", color="grey",
                        label="warm-up (not in FPS)", zorder=3)
    time_ax.set_ylabel("seconds")
    time_ax.set_xlabel("step")
    time_ax.legend(loc="upper right")
    figure.suptitle(title)
    return figure
