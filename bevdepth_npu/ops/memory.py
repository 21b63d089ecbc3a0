"""Peak device memory of one training step, estimated from the recorded tensors' sizes and
lifetimes, and checked against torch.profiler's memory events on the CPU.

How the estimate is made (``Lifetimes``, a recorder tap):
- Every output of a recorded op whose storage aliases none of the op's inputs is a new
  allocation (views and in-place ops alias an input; ``empty`` and friends are allocations too).
  Its size is the storage's bytes; at the NPU dtype the bytes scale by the NPU dtype's item size
  over the recorded one (the recorder's shadow dtypes: NPU autocast's lists).
- An allocation is freed when its storage is: each allocation keeps a weak reference to its
  storage (``StorageWeakRef``), polled after every op. Storages, not tensors: autograd keeps some
  outputs alive through a second tensor on the same storage.
- The peak is the largest sum of live allocations over the op sequence of step 2 (forward,
  backward, clipping, optimizer; ``zero_grad`` at the end frees the gradients).

CPU configuration (the check): fp32, every allocation on any device, the profiler's
``[memory]`` events (``profile_memory=True``) over the same step: the peak of their running sum.
What the profiler sees and the estimate does not: allocations inside a kernel (workspace,
temporaries of CPU kernels below the dispatcher), tensors made outside dispatch.

NPU configuration (``npu_estimate``), the recipe's step on one card:
- static: fp32 weights, fp32 gradients and NpuFusedAdamW's exp_avg and exp_avg_sq: 16 bytes per
  parameter. NpuFusedAdamW (torch_npu/optim/npu_fused_optim_base.py and npu_fused_adamw.py of the
  wheel pin) moves the parameters and gradients into one flat buffer per dtype at its first step
  (``npu_combine_tensors``) and zeroes the gradients there instead of freeing them, so the
  gradients stay allocated between steps; the recorded gradient allocations are left out of the
  step's part for that reason.
- the step: the recorded allocations on the device at the NPU dtype, without the gradient
  storages and without the stand-in optimizer's (torch.optim.AdamW) temporaries; plus
  NpuFusedAdamW's own temporaries at the update (``denom = exp_avg_sq.sqrt() / c`` on the flat
  buffer: two fp32 tensors of the parameter count alive at once), plus autocast's fp16 copies of
  the conv and linear weights (cached for the forward and saved for backward: 2 bytes per such
  parameter, counted as alive at the peak).
- batch: the step's peak is recorded at 1 and 2 samples and extrapolated linearly,
  ``peak(B) = peak(1) + (B - 1) * (peak(2) - peak(1))`` (activations scale with the batch; the
  intercept holds what does not); recorded at one batch b only, ``peak(B) = peak(b) * B / b``,
  which over-counts by the batch-independent part (0.2% of R50's step at 1 sample).
Not counted: the caching allocator's rounding and fragmentation, CANN's workspace and the HCCL
buffers of a multi-card run; the 10% headroom of ``largest_batch`` stands for them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef

GIB = 1024 ** 3
CARD_BYTES = 64 * GIB       # Atlas 800T A2's Ascend 910B: 64 GB HBM per card (npu-smi: 65536 MB)
HEADROOM = 0.10             # left free for the allocator's fragmentation and CANN's workspace
BYTES_PER_PARAMETER = 16    # fp32 weight, fp32 gradient (flat buffer), exp_avg, exp_avg_sq
OPTIMIZER_TEMPORARIES = 2   # NpuFusedAdamW: sqrt and the division, fp32, alive together
FP16_WEIGHT_MODULES = ("Conv", "Linear", "DeformConv", "DCN")


@dataclasses.dataclass
class Allocation:
    start: int               # index of the op that made it
    end: Optional[int]       # index of the first op that saw it freed; None: alive at the end
    nbytes: int              # as recorded (fp32 computation)
    npu_nbytes: int          # at the NPU dtype
    on_device: bool
    phase: str
    segment: str
    gradient: bool = False


def _storage(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage if storage.nbytes() else None


class Lifetimes:
    """A recorder tap: every allocation of the recorded step with its lifetime."""

    def __init__(self) -> None:
        self.index = 0
        self.allocations: List[Allocation] = []
        self._live: Dict[int, Tuple[StorageWeakRef, Allocation]] = {}
        self.parameters = 0
        self.fp16_weight_parameters = 0

    def attach(self, recorder, model: torch.nn.Module, optimizer) -> None:
        self.parameters = sum(p.numel() for p in model.parameters())
        self.fp16_weight_parameters = sum(
            p.numel() for m in model.modules()
            if any(k in type(m).__name__ for k in FP16_WEIGHT_MODULES)
            for p in m.parameters(recurse=False))

    def _poll(self) -> None:
        for ptr in [p for p, (ref, _) in self._live.items() if ref.expired()]:
            self._live.pop(ptr)[1].end = self.index

    def __call__(self, recorder, func, args, kwargs, out, inputs: Sequence[torch.Tensor],
                 outputs: Sequence[torch.Tensor], cast) -> None:
        self.index += 1
        self._poll()
        seen = set()
        for t in inputs:
            storage = _storage(t)
            if storage is not None:
                seen.add(storage.data_ptr())
        for t in outputs:
            storage = _storage(t)
            if storage is None:
                continue
            ptr = storage.data_ptr()
            if ptr in seen or ptr in self._live:
                continue
            seen.add(ptr)
            nbytes = storage.nbytes()
            npu_dtype = recorder.npu_dtype(t)
            npu_nbytes = nbytes * _itemsize(npu_dtype) // _itemsize(t.dtype)
            alloc = Allocation(self.index, None, nbytes, npu_nbytes, recorder.on_device(t),
                               recorder.phase, recorder.segment)
            self.allocations.append(alloc)
            self._live[ptr] = (StorageWeakRef(storage), alloc)

    def before_optimizer(self, model: torch.nn.Module) -> None:
        self._poll()
        for p in model.parameters():
            if p.grad is not None:
                entry = self._live.get(p.grad.untyped_storage().data_ptr())
                if entry is not None:
                    entry[1].gradient = True

    def finish(self) -> None:
        self.index += 1
        self._poll()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def peak(allocations: Sequence[Allocation], size: Callable[[Allocation], int],
         keep: Callable[[Allocation], bool] = lambda a: True) -> Tuple[int, int]:
    """(largest sum of live ``size`` over the op indices, the index where it is reached): an
    allocation is live from ``start`` to before ``end``."""
    deltas: Dict[int, int] = {}
    for a in allocations:
        if not keep(a):
            continue
        deltas[a.start] = deltas.get(a.start, 0) + size(a)
        if a.end is not None:
            deltas[a.end] = deltas.get(a.end, 0) - size(a)
    live = best = best_at = 0
    for index in sorted(deltas):
        live += deltas[index]
        if live > best:
            best, best_at = live, index
    return best, best_at


def live_at(allocations: Sequence[Allocation], index: int, size, keep) -> int:
    return sum(size(a) for a in allocations if keep(a) and a.start <= index
               and (a.end is None or a.end > index))


def cpu_peak(lifetimes: Lifetimes) -> int:
    """The estimate in the CPU configuration: every allocation, recorded bytes."""
    return peak(lifetimes.allocations, lambda a: a.nbytes)[0]


def npu_step_peak(lifetimes: Lifetimes) -> int:
    """The step's part on the NPU (see the module docstring), at the recorded batch."""
    allocations = lifetimes.allocations

    def keep(a: Allocation) -> bool:
        return a.on_device and not a.gradient and a.segment != "update"

    def size(a: Allocation) -> int:
        return a.npu_nbytes

    activations, _ = peak(allocations, size, keep)
    update_starts = [a.start for a in allocations if a.segment == "update"]
    at_update = (live_at(allocations, min(update_starts), size, keep) if update_starts else 0)
    optimizer = at_update + OPTIMIZER_TEMPORARIES * 4 * lifetimes.parameters
    return max(activations, optimizer)


@dataclasses.dataclass
class NpuEstimate:
    pooling: str
    parameters: int
    static_bytes: int
    fp16_weight_bytes: int
    step_bytes_by_batch: Dict[int, int]     # recorded batches -> the step's peak

    def step_bytes(self, batch: int) -> int:
        points = sorted(self.step_bytes_by_batch.items())
        if len(points) == 1:   # one recorded batch: proportional, no batch-independent part
            (b1, p1), = points
            return int(round(p1 * batch / b1))
        (b1, p1), (b2, p2) = points[:2]
        slope = (p2 - p1) / (b2 - b1)
        return int(round(p1 + (batch - b1) * slope))

    def total_bytes(self, batch: int) -> int:
        return self.static_bytes + self.fp16_weight_bytes + self.step_bytes(batch)

    def largest_batch(self, card_bytes: int = CARD_BYTES, headroom: float = HEADROOM) -> int:
        usable = card_bytes * (1.0 - headroom)
        batch = 0
        while self.total_bytes(batch + 1) <= usable and batch < 4096:
            batch += 1
        return batch

    def to_json(self, batch: int) -> Dict[str, Any]:
        return dict(pooling=self.pooling, parameters=self.parameters,
                    static_bytes=self.static_bytes, fp16_weight_bytes=self.fp16_weight_bytes,
                    step_bytes_recorded={str(k): v for k, v in self.step_bytes_by_batch.items()},
                    batch=batch, step_bytes=self.step_bytes(batch),
                    total_bytes=self.total_bytes(batch), card_bytes=CARD_BYTES,
                    headroom=HEADROOM, largest_batch=self.largest_batch())


def npu_estimate(pooling: str, recorded: Dict[int, Lifetimes]) -> NpuEstimate:
    first = next(iter(recorded.values()))
    return NpuEstimate(pooling, first.parameters, BYTES_PER_PARAMETER * first.parameters,
                       2 * first.fp16_weight_parameters,
                       {batch: npu_step_peak(lt) for batch, lt in recorded.items()})


# ---------------------------------------------------------------- the profiler's reference


class ProfiledPeak:
    """``step_context`` for ``recipe.record``: torch.profiler with ``profile_memory=True``
    around step 2; ``peak_bytes`` is the peak of the running sum of its ``[memory]`` events
    (allocations positive, frees negative, in time order)."""

    def __init__(self) -> None:
        self.peak_bytes: Optional[int] = None
        self.events = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_us())
        live = best = 0
        for e in events:
            live += e.nbytes()
            best = max(best, live)
        self.peak_bytes, self.events = best, len(events)


def error(estimate: int, reference: int) -> float:
    """Relative error of the estimate against the reference."""
    return (estimate - reference) / reference if reference else float("inf")


def format_tables(checks: Sequence[Dict[str, Any]], estimates: Sequence[NpuEstimate],
                  batch: int) -> str:
    rows = ["CPU check (fp32, every allocation of step 2): estimate vs torch.profiler's peak",
            f"  {'pooling':8s} {'batch':>5s} {'estimate MiB':>12s} {'profiler MiB':>12s} "
            f"{'error':>7s}"]
    for c in checks:
        rows.append(f"  {c['pooling']:8s} {c['batch']:5d} {c['estimate_bytes'] / 2**20:12.1f} "
                    f"{c['profiler_bytes'] / 2**20:12.1f} {100 * c['error']:6.1f}%")
    rows.append(f"NPU estimate (fp16 autocast dtypes, fp32 master weights, NpuFusedAdamW) at "
                f"{batch} samples per card, against {CARD_BYTES / GIB:.0f} GiB with "
                f"{100 * HEADROOM:.0f}% headroom")
    rows.append(f"  {'pooling':8s} {'static GiB':>10s} {'fp16 w GiB':>10s} "
                f"{'step GiB':>9s} {'total GiB':>9s} {'fits':>5s} {'largest batch':>13s}")
    for e in estimates:
        total = e.total_bytes(batch)
        fits = total <= CARD_BYTES * (1 - HEADROOM)
        rows.append(f"  {e.pooling:8s} {e.static_bytes / GIB:10.2f} "
                    f"{e.fp16_weight_bytes / GIB:10.2f} {e.step_bytes(batch) / GIB:9.2f} "
                    f"{total / GIB:9.2f} {'yes' if fits else 'no':>5s} "
                    f"{e.largest_batch():13d}")
    return "\n".join(rows)
