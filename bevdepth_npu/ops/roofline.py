"""The training step's physical limit: FLOPs and bytes moved per module from the recorded ops,
and a roofline lower bound of the step time on one Atlas 800T A2 card.

Counting rules, per recorded op call (``count``), at the NPU dtypes the recorder gives:
- bytes: the sum of the input and output tensors' bytes (each tensor's addressable elements:
  broadcast dimensions of stride 0 count once) at the NPU dtype; floating inputs of an op on
  NPU autocast's fp16 list count as fp16 (autocast casts them). An upper bound on the traffic of
  the unfused op (a kernel that reads a tensor twice, or caches, moves more or less); views move
  nothing; ``empty`` allocations write nothing.
- matrix FLOPs (the cube unit): matmuls by ``torch.utils.flop_counter``'s formulas, convolutions
  forward and backward by ``convolution_flops`` (2 per multiply-add; torch 2.1's backward formula
  is wrong for transposed convolutions).
- vector FLOPs (the vector unit), everything else: per element of the larger of the largest
  input and the largest output, times a factor: 1 for element-wise and reduction ops, ``FACTORS``
  for the ones that do more per element (normalisation, softmax, sigmoid, addcmul, ...), 0 for
  data movement (copies, casts, indexing, concatenation, ``MOVES``).
- mmcv's DCN (``DeformConv2d``): its CPU ops are not the NPU's, so the ops recorded under it are
  replaced by one count per call: its convolution (2 * N * Cout * Hout * Wout * Cin/groups * k^2,
  matrix) plus the bilinear sampling (N * Cin * k^2 * Hout * Wout samples, 7 vector FLOPs each:
  4 multiplies, 3 adds); bytes: input, offset, weight and output. Backward: twice the forward's
  FLOPs; bytes: the forward's plus the three gradients.
- optimizer: the recorded stand-in (torch.optim.AdamW) is replaced by NpuFusedAdamW's update as
  the wheel's ``npu_fused_adamw.py`` writes it, on the flat fp32 buffers of P parameters: mul_,
  mul_, add_, mul_, addcmul_, sqrt, div, add_, addcdiv_ (``ADAMW_UPDATE``); the clipping is
  recorded as the port runs it (``device.clip_grad_norm``, per gradient).

Per module (``CATEGORIES``: image backbone, FPN/neck, depth net, lift and pooling, BEV encoder,
head, losses, optimizer step), forward + backward + optimizer; a backward op belongs to the module
whose forward made its autograd node. Batch: recorded at 1 and 2 samples, extrapolated linearly.

The bound per module: ``max(matrix FLOPs / matrix peak, vector FLOPs / vector peak, bytes /
bandwidth)`` (the units and the memory can overlap); ``compute`` or ``memory`` bound by the
larger term. Its sum is a lower bound of the step time on one card only as far as the bytes are:
fusion can move fewer bytes than counted here. The chip figures (``CHIP``) and their sources are
in the README's "Ops on the NPU".
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_map

# Ascend 910B2's figures from CANN's platform configuration (Ascend910B2*.ini: 24 cube cores,
# 48 vector cores, cube_freq 1800 MHz, 16x16x16 cube, vec_calc_size 128) and CANN's migration
# guide (64 GB, 1.6 TB/s); the 910B3/B4 of other Atlas 800T A2 builds have fewer cores, so these
# peaks keep the bound a lower bound for them too.
CHIP = dict(
    name="Ascend 910B2 (Atlas 800T A2)",
    matrix_flops=24 * 16 * 16 * 16 * 2 * 1.8e9,   # 353.9 TFLOPS fp16
    vector_flops=48 * 128 * 2 * 1.8e9,            # 22.1 TFLOPS fp16
    bandwidth=1.6e12,                              # bytes/s, HBM
)
# 32.29 samples/s on 8 cards at global batch 64 (8 per card): one step in 64 / 32.29 = 1.98 s
EARLIER_EXAMPLE_STEP_S = 64 / 32.29

CATEGORIES = ("image backbone", "FPN/neck", "depth net", "lift and pooling", "BEV encoder",
              "head", "losses", "optimizer step", "other")
_PREFIXES = (
    ("model.backbone.img_backbone", "image backbone"),
    ("model.backbone.img_neck", "FPN/neck"),
    ("model.backbone.depth_net", "depth net"),
    ("model.backbone.depth_aggregation_net", "depth net"),
    ("model.backbone", "lift and pooling"),
    ("model.head.trunk", "BEV encoder"),
    ("model.head.neck", "BEV encoder"),
    ("model.head.loss", "losses"),
    ("model.head", "head"),
)

MATRIX = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
          "convolution_backward"}
MOVES = frozenset("""
_to_copy copy_ clone cat stack index index_select gather constant_pad_nd repeat _unsafe_index
flip roll contiguous new_zeros new_ones new_full zeros ones full zeros_like ones_like full_like
fill_ zero_ scalar_tensor arange linspace lift_fresh _local_scalar_dense masked_select nonzero
select_backward slice_backward expand_copy permute_copy view_copy
""".split())
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                         "new_empty_strided", "resize_"})
FACTORS = {
    "native_batch_norm": 8, "batch_norm": 8, "_native_batch_norm_legit": 8,
    "native_batch_norm_backward": 10, "batch_norm_backward": 10,
    "_softmax": 5, "_log_softmax": 5, "softmax": 5, "log_softmax": 5,
    "_softmax_backward_data": 4, "_log_softmax_backward_data": 4,
    "sigmoid": 4, "sigmoid_backward": 3, "exp": 4, "log": 4, "sqrt": 2, "rsqrt": 2,
    "addcmul": 2, "addcdiv": 2, "lerp": 3, "binary_cross_entropy": 6,
    "binary_cross_entropy_backward": 5, "smooth_l1_loss": 3, "l1_loss": 2,
    "linalg_vector_norm": 2, "norm": 2, "threshold_backward": 1, "clamp": 1,
    "max_pool2d_with_indices": 9, "max_pool2d_with_indices_backward": 2,
    "upsample_bilinear2d": 8, "upsample_bilinear2d_backward": 8,
    "voxel_pooling_train": 1, "voxel_pool_train_backward": 0,
    "npu_bev_pool_v3": 2, "npu_bev_pool_v3_backward": 4,
}
DCN_SAMPLE_FLOPS = 7
# NpuFusedAdamW._group_step on flat fp32 buffers: (op, tensors read, tensors written, FLOPs per
# element)
ADAMW_UPDATE = (("mul_", 1, 1, 1), ("mul_", 1, 1, 1), ("add_", 2, 1, 2), ("mul_", 1, 1, 1),
                ("addcmul_", 3, 1, 3), ("sqrt", 1, 1, 2), ("div", 1, 1, 1), ("add_", 1, 1, 1),
                ("addcdiv_", 3, 1, 3))


@dataclasses.dataclass
class Count:
    matrix_flops: float = 0.0
    vector_flops: float = 0.0
    bytes: float = 0.0
    op_bound_s: float = 0.0   # sum over ops of each op's own roofline time

    def add(self, other: "Count", scale: float = 1.0) -> None:
        self.matrix_flops += scale * other.matrix_flops
        self.vector_flops += scale * other.vector_flops
        self.bytes += scale * other.bytes
        self.op_bound_s += scale * other.op_bound_s

    def terms(self, chip=CHIP) -> Tuple[float, float, float]:
        return (self.matrix_flops / chip["matrix_flops"], self.vector_flops / chip["vector_flops"],
                self.bytes / chip["bandwidth"])

    def bound_s(self, chip=CHIP) -> float:
        return max(self.terms(chip))

    def bound_kind(self, chip=CHIP) -> str:
        matrix, vector, memory = self.terms(chip)
        return "memory" if memory >= max(matrix, vector) else "compute"

    def with_op_bound(self, chip=CHIP) -> "Count":
        self.op_bound_s = self.bound_s(chip)
        return self


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def addressable(t: torch.Tensor) -> int:
    """Elements a kernel must touch: dimensions broadcast with stride 0 count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n if t.dim() else 1


def is_view(func) -> bool:
    """Every return aliases an input without writing it (view ops)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def count(name: str, func, args, kwargs, out, inputs: Sequence[torch.Tensor],
          outputs: Sequence[torch.Tensor], dtype_of, cast: Optional[torch.dtype] = None
          ) -> Count:
    """The rules of the module docstring for one call of ``func(*args, **kwargs) -> out``;
    ``inputs`` and ``outputs`` are its tensors, ``dtype_of(t)`` gives the NPU dtype, ``cast``
    autocast's cast of the floating inputs."""
    if func is not None and is_view(func):
        return Count()
    base = name.split(".", 1)[0]
    if base in ALLOCATIONS:
        return Count()

    def nbytes(t: torch.Tensor, is_input: bool) -> int:
        dtype = dtype_of(t)
        if is_input and cast is not None and dtype.is_floating_point:
            dtype = cast
        return addressable(t) * _itemsize(dtype)

    moved = sum(nbytes(t, True) for t in inputs) + sum(nbytes(t, False) for t in outputs)
    c = Count(bytes=float(moved))
    if base in CONVOLUTIONS:
        c.matrix_flops = float(convolution_flops(base, args))
        return c
    if base in MATRIX and func is not None:
        from torch.utils.flop_counter import flop_mapping
        formula = flop_mapping.get(func._overloadpacket)
        if formula is not None:
            def shape(x):
                return x.shape if isinstance(x, torch.Tensor) else x
            a, k, out_shape = tree_map(shape, (args, kwargs, out))
            c.matrix_flops = float(formula(*a, **k, out_shape=out_shape))
            return c
    if base in MOVES:
        return c
    elements = max([addressable(t) for t in list(inputs) + list(outputs)] or [0])
    c.vector_flops = float(elements * FACTORS.get(base, FACTORS.get(base.rstrip("_"), 1)))
    return c


CONVOLUTIONS = frozenset({"convolution", "_convolution", "convolution_backward"})


def convolution_flops(name: str, args) -> int:
    """2 x N x prod(weight shape) x prod(S), S the spatial size of the output (of the input for
    a transposed convolution: the side the kernel slides over); groups are in the weight's shape.
    Backward: the same again for each of grad_input and grad_weight it computes. torch 2.1's
    ``conv_backward_flop`` is not used: for a transposed convolution it takes the input's
    spatial size as the kernel's for grad_weight (the BEV neck's deconvolutions: 27x too many)."""
    if name == "convolution_backward":
        grad_out, x, weight = args[0], args[1], args[2]
        transposed, mask = args[7], args[10]
        spatial = (x.shape if transposed else grad_out.shape)[2:]
        passes = int(bool(mask[0])) + int(bool(mask[1]))
    else:
        x, weight, transposed = args[0], args[1], args[6]
        spatial = x.shape[2:] if transposed else _conv_out_spatial(x, weight, args)
        passes = 1
    macs = x.shape[0] * _prod(weight.shape) * _prod(spatial)
    return 2 * macs * passes


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def _conv_out_spatial(x, weight, args) -> List[int]:
    stride, padding, dilation = args[3], args[4], args[5]
    return [(size + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i, size in enumerate(x.shape[2:])]


def dcn_count(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
              groups: int, dtype_of) -> Tuple[Count, Count]:
    """(forward, backward) of one deformable convolution call, by the docstring's rule."""
    n, cin = x.shape[:2]
    cout, cin_g, kh, kw = weight.shape
    hout, wout = out.shape[-2:]
    conv = 2.0 * n * cout * hout * wout * cin_g * kh * kw
    samples = float(n * cin * kh * kw * hout * wout)
    tensors = (x, offset, weight, out)
    moved = float(sum(addressable(t) * _itemsize(dtype_of(t)) for t in tensors))
    grads = float(sum(addressable(t) * _itemsize(dtype_of(t)) for t in (x, offset, weight)))
    forward = Count(matrix_flops=conv, vector_flops=DCN_SAMPLE_FLOPS * samples, bytes=moved)
    backward = Count(matrix_flops=2 * conv, vector_flops=2 * DCN_SAMPLE_FLOPS * samples,
                     bytes=moved + grads)
    return forward.with_op_bound(), backward.with_op_bound()


def adamw_count(parameters: int) -> Count:
    total = Count()
    for _, reads, writes, flops in ADAMW_UPDATE:
        total.add(Count(vector_flops=float(flops * parameters),
                        bytes=float(4 * parameters * (reads + writes))).with_op_bound())
    return total


def category(module: str, phase: str, segment: str) -> str:
    if phase == "optimizer":
        return "optimizer step"
    name = module.split(":", 1)[-1]
    for prefix, cat in _PREFIXES:
        if name == prefix or name.startswith(prefix + "."):
            return cat
    return "losses" if name == "" else "other"   # the loss code runs outside any module


class Flops:
    """A recorder tap: FLOPs and bytes per category of the recorded step."""

    def __init__(self) -> None:
        self.counts: Dict[str, Count] = collections.defaultdict(Count)
        self.parameters = 0
        self._dcn: Dict[str, int] = {}      # module name -> groups
        self._offsets: Dict[int, torch.Tensor] = {}   # DCN module id -> its last offsets
        self._hooks: List[Any] = []
        self.recorder = None

    def attach(self, recorder, model: torch.nn.Module, optimizer) -> None:
        self.recorder = recorder
        self.parameters = sum(p.numel() for p in model.parameters())
        for name, m in model.named_modules():
            if "DeformConv2d" in type(m).__name__:
                self._dcn[f"{type(m).__name__}:{name}"] = getattr(m, "groups", 1)
                self._hooks.append(m.register_forward_hook(self._dcn_hook(
                    f"{type(m).__name__}:{name}", name)))
                if hasattr(m, "conv_offset"):
                    self._hooks.append(m.conv_offset.register_forward_hook(
                        lambda mod, args, out, key=id(m): self._offsets.__setitem__(key, out)))

    def _dcn_hook(self, key: str, name: str):
        def hook(module, args, out):
            rec = self.recorder
            if not rec.taps or rec.phase != "forward" or self not in rec.taps:
                return
            x = args[0]
            offset = self._offsets.pop(id(module)) if hasattr(module, "conv_offset") else args[1]
            forward, backward = dcn_count(x, offset, module.weight, out, module.groups,
                                          rec.npu_dtype)
            cat = category(key, "forward", "")
            self.counts[cat].add(forward)
            if out.requires_grad:
                self.counts[cat].add(backward)
        return hook

    def __call__(self, recorder, func, args, kwargs, out, inputs, outputs, cast) -> None:
        if recorder.phase == "optimizer" and recorder.segment == "update":
            return   # the stand-in optimizer: NpuFusedAdamW is counted instead (finish)
        if not (any(recorder.on_device(t) for t in inputs) if inputs
                else recorder.host_depth == 0):
            return   # host work (the head's targets): not the card's
        module = recorder.module_now()
        if module in self._dcn:
            return   # counted per call by the DCN hook
        schema = func._schema
        name = schema.name.partition("::")[2]
        c = count(name, func, args, kwargs, out, inputs, outputs, recorder.npu_dtype, cast)
        self.counts[category(module, recorder.phase, recorder.segment)].add(c.with_op_bound())

    def before_optimizer(self, model: torch.nn.Module) -> None:
        pass

    def finish(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.counts["optimizer step"].add(adamw_count(self.parameters))


def at_batch(by_batch: Dict[int, Dict[str, Count]], batch: int) -> Dict[str, Count]:
    """Per category, the counts extrapolated linearly from two recorded batches; from one,
    proportionally (the weights' share of the bytes then grows with the batch too: an
    over-count), the optimizer step as recorded."""
    points = sorted(by_batch.items())
    if len(points) == 1:
        points = [(0, {"optimizer step": points[0][1].get("optimizer step", Count())}),
                  points[0]]
    (b1, c1), (b2, c2) = points[:2]
    out: Dict[str, Count] = {}
    for cat in CATEGORIES:
        low, high = c1.get(cat, Count()), c2.get(cat, Count())
        t = (batch - b1) / (b2 - b1)
        out[cat] = Count(*(getattr(low, f) + t * (getattr(high, f) - getattr(low, f))
                           for f in ("matrix_flops", "vector_flops", "bytes", "op_bound_s")))
    return out


def table_rows(counts: Dict[str, Count], chip=CHIP) -> List[Dict[str, Any]]:
    rows = []
    total = Count()
    for cat in CATEGORIES:
        c = counts.get(cat)
        if c is None or (c.bytes == 0 and c.matrix_flops == 0 and c.vector_flops == 0):
            continue
        total.add(c)
        matrix, vector, memory = c.terms(chip)
        rows.append(dict(module=cat, matrix_gflop=c.matrix_flops / 1e9,
                         vector_gflop=c.vector_flops / 1e9, gbytes=c.bytes / 1e9,
                         matrix_ms=1e3 * matrix, vector_ms=1e3 * vector, memory_ms=1e3 * memory,
                         bound_ms=1e3 * c.bound_s(chip), bound=c.bound_kind(chip),
                         op_bound_ms=1e3 * c.op_bound_s))
    rows.append(dict(module="sum", matrix_gflop=total.matrix_flops / 1e9,
                     vector_gflop=total.vector_flops / 1e9, gbytes=total.bytes / 1e9,
                     matrix_ms=sum(r["matrix_ms"] for r in rows),
                     vector_ms=sum(r["vector_ms"] for r in rows),
                     memory_ms=sum(r["memory_ms"] for r in rows),
                     bound_ms=sum(r["bound_ms"] for r in rows), bound="",
                     op_bound_ms=1e3 * total.op_bound_s))
    return rows


def format_table(pooling: str, batch: int, rows: Sequence[Dict[str, Any]], chip=CHIP) -> str:
    lines = [f"Roofline, {pooling} pooling, {batch} samples per card, forward+backward+optimizer, "
             f"on {chip['name']}: {chip['matrix_flops'] / 1e12:.1f} TFLOPS fp16 matrix, "
             f"{chip['vector_flops'] / 1e12:.1f} TFLOPS fp16 vector, "
             f"{chip['bandwidth'] / 1e12:.1f} TB/s",
             f"  {'module':17s} {'matrix GF':>10s} {'vector GF':>9s} {'GB':>7s} "
             f"{'matrix ms':>9s} {'vector ms':>9s} {'memory ms':>9s} {'bound ms':>8s} "
             f"{'':7s} {'per-op ms':>9s}"]
    for r in rows:
        lines.append(f"  {r['module']:17s} {r['matrix_gflop']:10.1f} {r['vector_gflop']:9.1f} "
                     f"{r['gbytes']:7.2f} {r['matrix_ms']:9.2f} {r['vector_ms']:9.2f} "
                     f"{r['memory_ms']:9.2f} {r['bound_ms']:8.2f} {r['bound']:7s} "
                     f"{r['op_bound_ms']:9.2f}")
    total_s = rows[-1]["bound_ms"] / 1e3
    lines.append(f"  lower bound {1e3 * total_s:.0f} ms per step (per-op sum "
                 f"{rows[-1]['op_bound_ms']:.0f} ms) against the earlier Ascend example's "
                 f"{EARLIER_EXAMPLE_STEP_S:.2f} s: {100 * total_s / EARLIER_EXAMPLE_STEP_S:.0f}% "
                 f"of it")
    return "\n".join(lines)
