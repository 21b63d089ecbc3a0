"""What torch_npu 2.1.0.post12 (the torch-npu wheel pin) says about an aten op, and the one rule
that classifies a recorded op by it.

Sources, all of the pinned release (git tag v7.0.0-pytorch2.1.0 of Ascend/pytorch, commit
881a2763aca6b9469a72b3f8706de32ec4973788, which the wheel's version.py names):

- ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` in the wheel: the ops that have a
  kernel at the NPU's dispatch key (PrivateUse1), op-plugin's merged in; sections ``supported``,
  ``symint`` (aten ops) and ``custom`` (torch_npu's npu_* ops). Read from the wheel in the cache.
- ``torch_npu/csrc/aten/VariableFallbackKernel.cpp`` at the tag: ``TORCH_LIBRARY_IMPL(_,
  PrivateUse1)`` registers ``npu_cpu_fallback`` (an op without an NPU kernel runs on the CPU and
  warns once), ``TORCH_LIBRARY_IMPL(_, AutogradPrivateUse1)`` torch_npu's autograd fallback (an
  op without an autograd kernel there gets a grad_fn that warns at backward), and
  ``SparsePrivateUse1`` an error.
- ``torch_npu/csrc/aten/AutoCastOps.cpp`` at the tag: NPU autocast's lists (``AUTOCAST_*``
  below, transcribed: op names only).

The dispatcher rule (torch 2.1 ``aten/src/ATen/core/dispatch/OperatorEntry.cpp``,
``computeDispatchTableEntryWithDebug``), as it applies to an op whose tensors are on the NPU:

1. A kernel registered at PrivateUse1 (the yaml lists the op) serves the op: NPU kernel. For an op
   that also has a CompositeImplicitAutograd kernel, the backend kernel takes precedence at
   PrivateUse1, and at AutogradPrivateUse1 the math kernel is not used either (step 2.2: not when
   the backend has a kernel), so the op is not decomposed on the NPU: its backward needs torch_npu's
   own autograd registration, else the autograd fallback above.
2. Otherwise a CompositeExplicitAutograd kernel serves every backend key: composite (it calls
   other ops, each classified on its own). A CompositeExplicitAutogradNonFunctional kernel (the
   functional and in-place variants of a structured op) calls the op's out= overload: composite
   where torch_npu has that overload, else CPU fallback.
3. Otherwise a CompositeImplicitAutograd kernel decomposes the op above the backend: composite.
4. Otherwise the PrivateUse1 backend fallback: CPU fallback.
An op with no tensor at all (catch-all registrations such as ``promote_types``) or with host
tensors only is no NPU op (class ``host``).

On top of the kernel class, what the device does with it: ``host-synchronising`` (the host waits
for the device: ``_local_scalar_dense`` behind ``.item()``, ops whose output size depends on the
data) and ``AI CPU suspect`` (int64 index arithmetic and comparisons, ``index_put``; Ascend's
profiling docs list them on the AI CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import zipfile
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Optional, Sequence

from bevdepth_npu.errors import UserError

YAML_IN_WHEEL = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
RELEASE_TAG = "v7.0.0-pytorch2.1.0 (881a2763aca6b9469a72b3f8706de32ec4973788)"

# AutoCastOps.cpp at the tag (KERNEL_PRIVATEUSEONE / KERNEL_PRIVATEUSEONE2 lines): which ops NPU
# autocast runs in fp16 (lower_precision_fp), in fp32 (fp32 and fp32_set_opt_dtype), and at the
# widest input type (promote). Overloads collapsed to the op name, as the lists are applied.
AUTOCAST_FP16 = frozenset("""
_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
convolution cudnn_convolution cudnn_convolution_transpose prelu addmm addmv addr matmul einsum mm
mv linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell
_thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
_scaled_dot_product_flash_attention scaled_dot_product_attention
""".split())
AUTOCAST_FP32 = frozenset("""
acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus
layer_norm native_layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity
poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss
smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm
logsumexp prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum norm
""".split())
AUTOCAST_PROMOTE = frozenset(
    "addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put tensordot scatter_add".split())

# Ops the host waits on when their input is on the device: a value read back, or an output whose
# size depends on the data (op-plugin runs these with EXEC_NPU_CMD_SYNC or reads a size back).
HOST_SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "item", "nonzero_static", "_assert_async",
})
# Integer index arithmetic and comparisons that Ascend's profiling docs name among AI CPU ops
# when they run on int64; index_put runs on the AI CPU for every dtype.
AI_CPU_INT64_OPS = frozenset({
    "add", "sub", "mul", "div", "floor_divide", "remainder", "fmod", "eq", "ne", "lt", "le", "gt",
    "ge", "clamp", "bitwise_and", "bitwise_or", "argsort", "sort", "cumsum",
})
AI_CPU_ALWAYS = frozenset({"index_put", "_index_put_impl_", "index_put_"})

NPU_KERNEL = "NPU kernel"
COMPOSITE = "composite"
HOST_SYNC = "host-synchronising"
AI_CPU = "AI CPU suspect"
CPU_FALLBACK = "CPU fallback"
HOST = "host"
CLASSES = (NPU_KERNEL, COMPOSITE, HOST_SYNC, AI_CPU, CPU_FALLBACK, HOST)


def op_key(name: str, overload: str = "default") -> str:
    """``add.Tensor``; ``relu`` for the default overload (the yaml's spelling)."""
    return name if overload in ("", "default") else f"{name}.{overload}"


def _entry_name(entry) -> Optional[str]:
    func = entry.get("func") if isinstance(entry, dict) else entry
    if not isinstance(func, str):
        return None
    return func.split("(", 1)[0].strip()


@dataclasses.dataclass(frozen=True)
class NpuTable:
    """The ops with a kernel at the NPU key in one torch_npu release."""
    aten: FrozenSet[str]     # name.overload (or name) of supported and symint entries
    custom: FrozenSet[str]   # torch_npu's own ops
    source: str

    @classmethod
    def from_yaml_text(cls, text: str, source: str) -> "NpuTable":
        import yaml
        data = yaml.safe_load(text) or {}
        aten = {n for section in ("supported", "symint") for n in map(_entry_name,
                                                                       data.get(section) or ())
                if n}
        custom = {n for n in map(_entry_name, data.get("custom") or ()) if n}
        if not aten:
            raise UserError(f"{source}: no `supported` ops; is this torch_npu's "
                            f"npu_native_functions_by_codegen.yaml?")
        return cls(frozenset(aten), frozenset(custom), source)

    @classmethod
    def from_wheel_pin(cls) -> "NpuTable":
        """The table of the pinned torch-npu wheel, from its unpacked copy in the cache or the
        downloaded wheel; an error saying how to get it when neither is there."""
        from bevdepth_npu import paths
        unpacked = paths.source_dir("torch-npu") / YAML_IN_WHEEL.split("/", 1)[1]
        if unpacked.is_file():
            return cls.from_yaml_text(unpacked.read_text(), str(unpacked))
        for wheel in sorted(paths.downloads_dir().glob("torch_npu-2.1.0.post12-*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                return cls.from_yaml_text(archive.read(YAML_IN_WHEEL).decode(),
                                          f"{wheel}!{YAML_IN_WHEEL}")
        raise UserError(f"torch_npu's op table is not in the cache ({unpacked}); run "
                        f"`bevdepth-npu fetch torch-npu` (offline: --mirror "
                        f"torch-npu=PATH_TO_WHEEL_OR_DIR)")

    def has(self, name: str, overload: str = "default") -> bool:
        """A kernel at the NPU key for this overload. The yaml lists each registered overload;
        the out= variants torch_npu registers apart are listed under their own names."""
        return op_key(name, overload) in self.aten or op_key(name, overload) in self.custom


def has_composite_kernel(qualified: str, key: str) -> bool:
    """Whether torch (this process's) registers a ``key`` kernel (CompositeImplicitAutograd or
    CompositeExplicitAutograd) for ``aten::name.overload``; torch 2.1 is what torch_npu 2.1 runs
    on, so its registrations are the NPU run's."""
    import torch
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key))
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def structured_delegates() -> Dict[str, str]:
    """``name[.overload]`` -> the out= op it delegates to, for torch's structured ops, from the
    native_functions.yaml that torch ships (torchgen/packaged): the ops whose functional and
    in-place variants a backend without its own kernel runs through their out= overload."""
    import torchgen
    import yaml
    path = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / \
        "native_functions.yaml"
    delegates = {}
    for entry in yaml.safe_load(path.read_text()):
        if "structured_delegate" in entry:
            delegates[entry["func"].split("(", 1)[0]] = entry["structured_delegate"]
    return delegates


def kernel_class(table: NpuTable, name: str, overload: str,
                 composite_implicit: bool, composite_explicit: bool,
                 composite_nonfunctional: bool = False) -> str:
    """Steps 1-4 of the rule in the module docstring, for an op whose tensors are on the NPU.

    A structured op's functional and in-place variants that a backend lacks are served by
    torch's CompositeExplicitAutogradNonFunctional kernel, which calls the op's out= overload
    (its structured_delegate): on the NPU that is a kernel where torch_npu has that overload,
    else the CPU fallback (special_erfcx, linalg_inv_ex: no overload in the table at all).
    Other NonFunctional kernels (select_backward) are implementations over other ops."""
    if table.has(name, overload):
        return NPU_KERNEL
    if composite_explicit or composite_implicit:
        return COMPOSITE
    if composite_nonfunctional:
        delegate = structured_delegates().get(op_key(name, overload))
        if delegate is None:
            return COMPOSITE   # a kernel of its own (select_backward), over other ops
        return COMPOSITE if table.has(*(delegate.split(".", 1) + ["default"])[:2]) \
            else CPU_FALLBACK
    return CPU_FALLBACK


def classify(table: NpuTable, namespace: str, name: str, overload: str,
             on_device: bool, has_tensor: bool, input_dtypes: Sequence[str]) -> str:
    """The class of one recorded (op, dtypes): host; then host-synchronising; then CPU fallback
    or composite by ``kernel_class``; then AI CPU suspect; else NPU kernel. Ops outside aten
    (mx_driving's, mmcv's) are classified by the caller of this function from their own sources."""
    if not has_tensor or not on_device:
        return HOST
    if name in HOST_SYNC_OPS or (name == "index" and "bool" in input_dtypes):
        # boolean-mask indexing: the output's size is the mask's count (a nonzero inside)
        return HOST_SYNC
    qualified = f"{namespace}::{op_key(name, overload)}"
    kind = kernel_class(table, name, overload,
                        has_composite_kernel(qualified, "CompositeImplicitAutograd"),
                        has_composite_kernel(qualified, "CompositeExplicitAutograd"),
                        has_composite_kernel(qualified, "CompositeExplicitAutogradNonFunctional"))
    if kind != NPU_KERNEL:
        return kind
    base = name.rstrip("_")
    if name in AI_CPU_ALWAYS or base in AI_CPU_ALWAYS:
        return AI_CPU
    if base in AI_CPU_INT64_OPS and "int64" in input_dtypes:
        return AI_CPU
    return NPU_KERNEL


def autocast_class(names: Iterable[str]) -> Optional[str]:
    """``fp16``, ``fp32`` or ``promote`` for the first of ``names`` (the op as called, then the
    aten op it became) on NPU autocast's lists; None when none is listed."""
    for name in names:
        base = name.split(".", 1)[0]
        if base in AUTOCAST_FP16:
            return "fp16"
        if base in AUTOCAST_FP32:
            return "fp32"
        if base in AUTOCAST_PROMOTE:
            return "promote"
    return None


def table_path_hint() -> Path:
    from bevdepth_npu import paths
    return paths.source_dir("torch-npu") / YAML_IN_WHEEL.split("/", 1)[1]
