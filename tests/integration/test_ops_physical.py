"""`bevdepth-npu ops --memory --roofline`: the memory estimator against torch.profiler, the
FLOP and byte counting rules on small ops checked by hand, and the on-device warning texts
against the pinned torch_npu wheel's binary.

Checked:
  - the estimator's arithmetic (allocations and frees from storage lifetimes) on a few ops whose
    peak is computed by hand, and on a tiny conv + linear model forward and backward, equal to the
    peak of torch.profiler's memory events (profile_memory=True); the NPU dtype halves an fp16
    autocast output;
  - the estimate within 15% of the profiler's peak for the smoke experiment's training step at 1
    and 2 samples (slow: two recordings);
  - counting rules: matmul and convolution FLOPs (2 per multiply-add) and bytes (inputs plus
    outputs), a broadcast add (the broadcast operand counted once), views (nothing), autocast's
    fp16 inputs, DCN's convolution plus bilinear sampling, NpuFusedAdamW's flat update;
  - the CPU-fallback and sync-debug warning texts `--on-device` parses are in the wheel pin's
    lib/libtorch_npu.so.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_ops_physical.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bevdepth_npu.ops import memory, on_device, roofline, tables  # noqa: E402
from bevdepth_npu.ops.recorder import Recorder  # noqa: E402

KIB = 1024


def recorder() -> Recorder:
    rec = Recorder(tables.NpuTable(frozenset(), frozenset(), "empty table"),
                   [Path(__file__).parent])
    rec.recording = True
    return rec


def test_the_estimate_of_a_few_ops_is_the_hand_computed_peak_and_the_profilers() -> None:
    x = torch.ones(64, 64)                        # 16 KiB, made before: not the step's
    rec, lifetimes, profiled = recorder(), memory.Lifetimes(), memory.ProfiledPeak()
    with rec.active():
        rec.taps = [lifetimes]
        with profiled():
            a = x * 2                             # +16 KiB
            b = a.view(-1)                        # a view: nothing
            c = a + 1                             # +16 KiB: 32
            del a, b                              # -16 KiB: 16
            d = torch.cat([c, c])                 # +32 KiB: 48, the peak
            del c, d
        lifetimes.finish()
    assert memory.cpu_peak(lifetimes) == 48 * KIB
    # the profiler also sees the 0-dim tensors C++ wraps the Python scalars in (a few bytes)
    assert 48 * KIB <= profiled.peak_bytes <= 48 * KIB + 64
    assert all(a.end is not None for a in lifetimes.allocations)   # all freed


def test_the_estimate_of_a_tiny_models_step_matches_the_profiler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10))
    x = torch.randn(4, 3, 32, 32)
    rec, lifetimes, profiled = recorder(), memory.Lifetimes(), memory.ProfiledPeak()
    with rec.active(model):
        rec.taps = [lifetimes]
        with profiled():
            rec.phase = "forward"
            loss = model(x).square().mean()
            rec.phase = "backward"
            loss.backward()
            del loss
            model.zero_grad(set_to_none=True)
        lifetimes.finish()
    estimate = memory.cpu_peak(lifetimes)
    assert estimate > 4 * 16 * 32 * 32 * 4          # at least the conv's output
    assert abs(memory.error(estimate, profiled.peak_bytes)) < 0.01


def test_an_fp16_autocast_output_counts_half_on_the_npu() -> None:
    rec, lifetimes = recorder(), memory.Lifetimes()
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.randn(1, 3, 10, 10)
    with rec.active(conv):
        rec.taps = [lifetimes]
        with rec.autocast_region(True):
            out = conv(x)
    alloc = lifetimes.allocations[-1]
    assert alloc.nbytes == out.numel() * 4 and alloc.npu_nbytes == out.numel() * 2
    assert alloc.on_device


@pytest.mark.slow
def test_the_smoke_steps_estimate_is_within_15_percent_of_the_profiler() -> None:
    from bevdepth_npu.ops import recipe
    npu_steps = {}
    for batch in (1, 2):
        lifetimes, profiled = memory.Lifetimes(), memory.ProfiledPeak()
        recipe.record("smoke", "product", eval_step=False, batch_size=batch, taps=[lifetimes],
                      step_context=profiled)
        lifetimes.finish()
        error = memory.error(memory.cpu_peak(lifetimes), profiled.peak_bytes)
        assert abs(error) < 0.15, f"batch {batch}: {100 * error:.1f}% off the profiler"
        npu_steps[batch] = memory.npu_step_peak(lifetimes)
    assert npu_steps[1] < npu_steps[2] < 2.5 * npu_steps[1]


class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def counted(fn, cast=None):
    with Calls() as mode:
        fn()
    total = roofline.Count()
    for func, args, kwargs, out in mode.calls:
        inputs = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_flatten(out)[0]
                   if isinstance(t, torch.Tensor)]
        name = func._schema.name.partition("::")[2]
        total.add(roofline.count(name, func, args, kwargs, out, inputs, outputs,
                                 lambda t: t.dtype, cast))
    return total


def test_matmul_and_convolution_flops_and_bytes() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    c = counted(lambda: torch.mm(a, b))
    assert c.matrix_flops == 2 * 8 * 4 * 16 and c.vector_flops == 0
    assert c.bytes == (8 * 16 + 16 * 4 + 8 * 4) * 4
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    c = counted(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    assert c.matrix_flops == 2 * 4 * 8 * 8 * 3 * 9
    assert c.bytes == (3 * 64 + 4 * 27 + 4 * 64) * 4
    # autocast's fp16 inputs: half the input bytes
    c16 = counted(lambda: torch.nn.functional.conv2d(x, w, padding=1), cast=torch.float16)
    assert c16.bytes == (3 * 64 + 4 * 27) * 2 + 4 * 64 * 4


def test_convolution_backward_is_twice_the_forward_transposed_too() -> None:
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    for conv in (torch.nn.Conv2d(4, 6, 3, padding=1, groups=2),
                 torch.nn.ConvTranspose2d(4, 6, 4, stride=4)):
        forward = counted(lambda: conv(x))
        weight = conv.weight.shape
        side = (x.shape if isinstance(conv, torch.nn.ConvTranspose2d) else conv(x).shape)[2:]
        assert forward.matrix_flops == 2 * weight.numel() * side.numel()
        out = conv(x)
        both = counted(lambda: out.sum().backward())
        assert both.matrix_flops == 2 * forward.matrix_flops


def test_element_wise_views_and_broadcasts() -> None:
    a, b = torch.randn(4, 8), torch.randn(8)
    c = counted(lambda: a + b)
    assert c.vector_flops == 32 and c.bytes == (32 + 8 + 32) * 4
    c = counted(lambda: a + b.expand(4, 8))                  # stride 0: read once
    assert c.bytes == (32 + 8 + 32) * 4
    assert counted(lambda: a.view(32).t()).bytes == 0
    c = counted(lambda: torch.cat([a, a]))                   # data movement: bytes, no FLOPs
    assert c.vector_flops == 0 and c.bytes == (32 + 32 + 64) * 4


def test_dcn_and_the_fused_optimizer() -> None:
    x, offset = torch.zeros(1, 4, 6, 6), torch.zeros(1, 18, 6, 6)
    weight, out = torch.zeros(8, 1, 3, 3), torch.zeros(1, 8, 6, 6)   # groups 4
    forward, backward = roofline.dcn_count(x, offset, weight, out, 4, lambda t: t.dtype)
    assert forward.matrix_flops == 2 * 8 * 36 * 1 * 9
    assert forward.vector_flops == 7 * (4 * 9 * 36)
    assert forward.bytes == (144 + 648 + 72 + 288) * 4
    assert backward.matrix_flops == 2 * forward.matrix_flops
    assert backward.bytes == forward.bytes + (144 + 648 + 72) * 4
    adamw = roofline.adamw_count(10)
    assert adamw.bytes == 4 * 10 * 23 and adamw.vector_flops == 10 * 15


def test_the_bound_takes_the_largest_term() -> None:
    chip = dict(name="x", matrix_flops=100.0, vector_flops=10.0, bandwidth=1.0)
    c = roofline.Count(matrix_flops=300.0, vector_flops=10.0, bytes=2.0)
    assert c.bound_s(chip) == 3.0 and c.bound_kind(chip) == "compute"
    c.bytes = 5.0
    assert c.bound_s(chip) == 5.0 and c.bound_kind(chip) == "memory"


def test_the_warning_texts_are_the_wheels() -> None:
    from bevdepth_npu import paths
    lib = paths.source_dir("torch-npu") / "lib" / "libtorch_npu.so"
    if not lib.is_file():
        pytest.skip(f"{lib} missing: run `bevdepth-npu fetch torch-npu`")
    data = lib.read_bytes()
    # the fallback line is assembled from three literals in npu_cpu_fallback
    assert b"CAUTION: The operator '\x00" in data
    assert b"' is not currently supported \x00" in data
    assert b"on the NPU backend and will fall back to run on the CPU." in data
    assert b"called a synchronizing NPU operation" in data
    line = ("CAUTION: The operator 'aten::x' is not currently supported "
            "on the NPU backend and will fall back to run on the CPU.")
    assert on_device.parse(line)[0] == ["aten::x"]


def test_batch_extrapolation() -> None:
    c = roofline.Count
    two = {1: {"head": c(bytes=10.0), "optimizer step": c(bytes=5.0)},
           2: {"head": c(bytes=18.0), "optimizer step": c(bytes=5.0)}}
    at8 = roofline.at_batch(two, 8)
    assert at8["head"].bytes == 66.0 and at8["optimizer step"].bytes == 5.0
    one = roofline.at_batch({1: two[1]}, 8)    # proportional, the optimizer as recorded
    assert one["head"].bytes == 80.0 and one["optimizer step"].bytes == 5.0
    estimate = memory.NpuEstimate("product", 10, 160, 20, {1: 100, 2: 180})
    assert estimate.step_bytes(8) == 660 and estimate.total_bytes(8) == 840
    assert memory.NpuEstimate("product", 10, 160, 20, {1: 100}).step_bytes(8) == 800
