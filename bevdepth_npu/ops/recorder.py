"""Record every aten op a piece of the recipe dispatches, with real CPU tensors, as the NPU run
would see it: where its tensors live, the dtypes NPU autocast would give them, its caller.

Where the recording happens: a ``TorchDispatchMode`` sits at the Python dispatch key, below
Autograd and below every CompositeImplicitAutograd decomposition. It therefore sees what the CPU
runs: ``convolution`` and ``convolution_backward``, but for ``F.batch_norm`` the parts of aten's
decomposition of ``batch_norm``. On the NPU a kernel that torch_npu registers for a composite op
takes precedence over the decomposition (``tables`` gives the rule), so those parts never run
there. A ``TorchFunctionMode`` around it records the torch API call each op came from (the
outermost one: ``conv2d``, ``batch_norm``, ``binary_cross_entropy``); where that call's aten op is
CompositeImplicitAutograd in torch and listed in torch_npu's table, the recorder adds an entry for
the op itself and marks the recorded parts ``under`` it (they are listed, not classified as the
NPU's). Backward ops come from autograd's engine with no API call around them: a composite op's
backward on the NPU is torch_npu's autograd registration, which this recording cannot see; the
parts recorded for it on the CPU keep their own class.

Placement (``on_device``): tensors are on the device when the run puts them there: parameters and
buffers (Lightning moves the model), whatever passes ``bevdepth.utils.device.to_device``, and the
outputs of any op with an input on the device; an op with no tensor input (a factory: ``zeros``,
``arange``) is on the device unless it runs inside a host region (``host_region``: the head's
target building from the loader's host boxes). The function mode also records the Python-level
reads back to the host that dispatch no aten op on a CPU tensor (``.cpu()``, ``.numpy()``,
``.tolist()``) and tensors built from Python data, as ``Tensor.cpu`` etc.

dtypes: CPU autocast has no fp16 and CUDA's switches itself off without a GPU, so the step runs in
fp32 and each tensor carries the dtype NPU autocast would give it: ops on its fp16 list produce
fp16, on its fp32 list fp32, others the promotion of their inputs' NPU dtypes (``shadow dtype``).
The casts autocast inserts (one ``_to_copy`` per weight and call) are not recorded, and a
backward op sees the fp32 parameter where the NPU saved an fp16 copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from bevdepth_npu.ops import tables

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
_THIS_FILE = str(Path(__file__).resolve())
_TRACE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
MAX_DTYPES = 6  # a foreach op's hundreds of tensors are listed by count
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Python-level reads back to the host and host data sent to the device (no aten op on CPU)
TRANSFERS = {"cpu": "Tensor.cpu", "numpy": "Tensor.numpy", "tolist": "Tensor.tolist",
             "tensor": "torch.tensor", "as_tensor": "torch.as_tensor",
             "new_tensor": "Tensor.new_tensor"}
# ``self.new_*``: on ``self``'s device
NEW_FACTORIES = frozenset({"new_tensor", "new_zeros", "new_ones", "new_full", "new_empty"})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class Entry:
    phase: str
    namespace: str
    op: str              # name.overload (name for the default overload)
    dtypes: Tuple[str, ...]
    on_device: bool
    caller: str
    module: str
    api: str
    example_shape: List[List[int]]
    under: str = ""      # composite op the NPU runs instead of this part
    klass: str = ""
    calls: int = 0
    note: str = ""

    def key(self) -> Tuple:
        return (self.phase, self.namespace, self.op, self.dtypes, self.on_device, self.caller,
                self.under)


class Recorder:
    """One recording: ``with recorder.active(model): ...``; ``phase`` set by the caller."""

    def __init__(self, table: tables.NpuTable, roots: Sequence[Path]):
        self.table = table
        self.roots = [str(Path(r).resolve()) for r in roots]
        self.entries: Dict[Tuple, Entry] = {}
        self.phase = "forward"
        self.recording = True
        self.placed = WeakTensorKeyDictionary()      # tensor -> True (on the device)
        self.shadow = WeakTensorKeyDictionary()      # tensor -> NPU dtype under autocast
        self.autocast: List[bool] = [False]
        self.host_depth = 0
        self.api: List[str] = []
        self.modules: List[str] = []
        self._module_names: Dict[int, str] = {}
        # observers of every recorded op:
        # ``tap(recorder, func, args, kwargs, out, inputs, outputs, cast)``
        self.taps: List[Any] = []
        self.segment = ""            # the caller's label inside a phase (``clip``, ``update``)
        # autograd node sequence number -> the module whose forward created it (backward ops
        # are attributed to the module of their node: ``module_now``)
        self.node_modules: Dict[int, str] = {}
        self._node_keys: List[int] = []

    # ---------------------------------------------------------------- placement and dtypes

    def place(self, obj: Any) -> Any:
        """Mark every tensor in ``obj`` as on the device (what ``to_device`` does in the run)."""
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                self.placed[t] = True
        return obj

    def on_device(self, t: torch.Tensor) -> bool:
        return t in self.placed

    def npu_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.shadow.get(t, t.dtype)

    @contextlib.contextmanager
    def host_region(self) -> Iterator[None]:
        self.host_depth += 1
        try:
            yield
        finally:
            self.host_depth -= 1

    @contextlib.contextmanager
    def autocast_region(self, enabled: bool) -> Iterator[None]:
        self.autocast.append(enabled)
        try:
            yield
        finally:
            self.autocast.pop()

    def _out_shadow(self, names: Sequence[str], inputs: List[torch.Tensor],
                    out: torch.Tensor) -> torch.dtype:
        if out.dtype not in FLOATING:
            return out.dtype
        real_in = {t.dtype for t in inputs if t.dtype in FLOATING}
        if self.autocast[-1]:
            kind = tables.autocast_class(names)
            if kind == "fp16":
                return torch.float16
            if kind == "fp32":
                return torch.float32
        if real_in and real_in != {out.dtype}:
            return out.dtype  # an explicit cast (``.float()``, ``to(dtype)``): as written
        floats = [t for t in inputs if t.dtype in FLOATING]
        if not floats:
            return out.dtype
        # promotion of the NPU dtypes; 0-dim tensors only when nothing else is (weak operands)
        dtypes = ([self.npu_dtype(t) for t in floats if t.dim() > 0]
                  or [self.npu_dtype(t) for t in floats])
        result = dtypes[0]
        for dtype in dtypes[1:]:
            result = torch.promote_types(result, dtype)
        return result

    # ---------------------------------------------------------------- callers

    def _inside(self, filename: str) -> Optional[str]:
        if filename == _THIS_FILE:
            return None
        for root in self.roots:
            if filename.startswith(root + "/"):
                return filename[len(root) + 1:]
        return None

    def caller(self) -> str:
        node = torch._C._current_autograd_node() if self.phase == "backward" else None
        if node is not None:
            trace = node.metadata.get("traceback_") if hasattr(node, "metadata") else None
            for line in reversed("".join(trace or ()).splitlines()):
                match = _TRACE_LINE.search(line)
                if match:
                    where = self._inside(str(Path(match.group(1)).resolve()))
                    if where:
                        return f"backward of {where}:{match.group(2)}"
            return f"backward of {node.name()}"
        frame = sys._getframe(1)
        while frame is not None:
            where = self._inside(frame.f_code.co_filename)
            if where:
                return f"{where}:{frame.f_lineno}"
            frame = frame.f_back
        return "(outside the recipe's code)"

    # ---------------------------------------------------------------- entries

    def add(self, namespace: str, op: str, inputs: List[torch.Tensor], on_device: bool,
            has_tensor: bool, under: str = "", klass: str = "", note: str = "",
            cast: Optional[torch.dtype] = None) -> Entry:
        # ``cast``: autocast's cast of the floating inputs (fp16 and fp32 list ops)
        dtypes = tuple(dtype_name(cast if cast is not None and self.npu_dtype(t) in FLOATING
                                  else self.npu_dtype(t)) for t in inputs[:MAX_DTYPES])
        if len(inputs) > MAX_DTYPES:
            dtypes += (f"... {len(inputs)} tensors",)
        entry = Entry(self.phase, namespace, op, dtypes, on_device, self.caller(),
                      self.modules[-1] if self.modules else "", self.api[-1] if self.api else "",
                      [list(t.shape) for t in inputs[:3]], under)
        entry = self.entries.setdefault(entry.key(), entry)
        entry.calls += 1
        if not entry.klass:
            if klass:
                entry.klass = klass
            elif namespace == "aten":
                name, _, overload = op.partition(".")
                entry.klass = tables.classify(self.table, namespace, name, overload or "default",
                                              on_device, has_tensor, dtypes)
            else:
                entry.klass = tables.HOST if not on_device else tables.NPU_KERNEL
            entry.note = note
        return entry

    def record_dispatch(self, func, args, kwargs, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        on_device = (any(self.on_device(t) for t in inputs) if inputs
                     else self.host_depth == 0)
        schema = func._schema
        namespace, _, name = schema.name.partition("::")
        op = tables.op_key(name, schema.overload_name)
        names = ([self.api[-1]] if self.api else []) + [name]
        for t in outputs:
            if on_device:
                self.placed[t] = True
            self.shadow[t] = self._out_shadow(names, inputs, t)
        if not self.recording:
            return
        under = self._composite_parent() if self.phase in ("forward", "eval") else ""
        kind = tables.autocast_class(names) if self.autocast[-1] else None
        cast = {"fp16": torch.float16, "fp32": torch.float32}.get(kind or "")
        self.add(namespace, op, inputs, on_device, bool(inputs or outputs), under=under,
                 cast=cast)
        for tap in self.taps:
            tap(self, func, args, kwargs, out, inputs, outputs, cast)

    # ---------------------------------------------------------------- modules of ops

    def note_nodes(self, out: Any, module: Optional[str] = None) -> None:
        """Remember which module created the autograd nodes of ``out`` (forward only)."""
        if self.phase != "forward" or not self.recording:
            return
        name = module if module is not None else (self.modules[-1] if self.modules else "")
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.node_modules.setdefault(t.grad_fn._sequence_nr(), name)

    def module_now(self) -> str:
        """The module (``Type:dotted.name``, '' outside any) running the current op: the
        innermost module in forward; in backward the module whose forward created the node
        being run (nodes made inside one API call map to the call's output node: the nearest
        remembered sequence number at or above the node's; '?' for a node no forward call made,
        such as gradient accumulation)."""
        if self.phase != "backward":
            return self.modules[-1] if self.modules else ""
        node = torch._C._current_autograd_node()
        if node is None:
            return ""
        if len(self._node_keys) != len(self.node_modules):
            self._node_keys = sorted(self.node_modules)
        import bisect
        i = bisect.bisect_left(self._node_keys, node._sequence_nr())
        return self.node_modules[self._node_keys[i]] if i < len(self._node_keys) else "?"

    def _composite_parent(self) -> str:
        """The API call's aten op when it is CompositeImplicitAutograd in torch and has an NPU
        kernel in the table (the NPU runs it instead of its decomposition); else ''."""
        if not self.api:
            return ""
        return composite_on_npu(self.table, self.api[-1])

    # ---------------------------------------------------------------- modes

    @contextlib.contextmanager
    def active(self, model: Optional[torch.nn.Module] = None) -> Iterator["Recorder"]:
        if model is not None:
            self._module_names = {id(m): f"{type(m).__name__}:{n}" for n, m in
                                  model.named_modules()}
            self.place(list(model.parameters()) + list(model.buffers()))
        hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                 torch.nn.modules.module.register_module_forward_hook(self._leave_module)]
        try:
            with _ApiMode(self), _DispatchMode(self):
                yield self
        finally:
            for hook in hooks:
                hook.remove()

    def _enter_module(self, module, args):
        name = self._module_names.get(id(module))
        if name is not None:
            self.modules.append(name)

    def _leave_module(self, module, args, out):
        if id(module) in self._module_names and self.modules:
            self.note_nodes(out, self.modules[-1])
            self.modules.pop()


_COMPOSITE_CACHE: Dict[Tuple[int, str], str] = {}


def composite_on_npu(table: tables.NpuTable, api_name: str) -> str:
    """``api_name``'s aten op (``batch_norm`` for ``torch.batch_norm``) when torch has a
    CompositeImplicitAutograd kernel for it and torch_npu a kernel at the NPU key; else ''."""
    key = (id(table), api_name)
    if key not in _COMPOSITE_CACHE:
        found = ""
        try:
            packet = getattr(torch.ops.aten, api_name)
            overloads = packet.overloads()
        except (AttributeError, RuntimeError):
            overloads = []
        # only when every overload decomposes (``cat`` has a kernel of its own, ``cat.names``
        # decomposes): the API call cannot say which overload it dispatches
        implicit = [tables.has_composite_kernel(f"aten::{tables.op_key(api_name, o)}",
                                                "CompositeImplicitAutograd") for o in overloads]
        if overloads and all(implicit):
            found = next((tables.op_key(api_name, o) for o in overloads
                          if table.has(api_name, o)), "")
        _COMPOSITE_CACHE[key] = found
    return _COMPOSITE_CACHE[key]


class _DispatchMode(TorchDispatchMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recorder.record_dispatch(func, args, kwargs, out)
        return out


class _ApiMode(TorchFunctionMode):
    """The outermost torch API call of each op, and the host transfers Python makes."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        name = getattr(func, "__name__", "") or str(func)
        transfer = TRANSFERS.get(name)
        if name == "to" and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", next((a for a in args[1:]
                                                if isinstance(a, (str, torch.device))), None))
            # only where the recipe's code names the host (torch's own code moves a tensor to
            # ``grad.device``, which is the CPU here and the NPU in the run)
            if (target is not None and torch.device(target).type == "cpu"
                    and rec._inside(sys._getframe(1).f_code.co_filename)):
                transfer = "Tensor.to(cpu)"
        parent = composite_on_npu(rec.table, name) if rec.recording else ""
        if rec.recording and parent and rec.phase in ("forward", "eval"):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            rec.add("aten", parent, tensors, any(rec.on_device(t) for t in tensors),
                    bool(tensors),
                    note="composite op with an NPU kernel: runs as itself on the NPU; its "
                         "backward is torch_npu's autograd registration")
        if name in NEW_FACTORIES and args and rec.on_device(args[0]):
            rec.host_depth, host_depth = 0, rec.host_depth  # ``self``'s device, not the region's
            try:
                return self._call(func, name, args, kwargs, transfer)
            finally:
                rec.host_depth = host_depth
        return self._call(func, name, args, kwargs, transfer)

    def _call(self, func, name, args, kwargs, transfer):
        rec = self.recorder
        rec.api.append(name)
        try:
            out = func(*args, **kwargs)
        finally:
            rec.api.pop()
        if rec.taps and len(rec.api) == 0:
            rec.note_nodes(out)
        if rec.recording and transfer is not None:
            self._transfer(transfer, args, out)
        if (transfer in ("Tensor.cpu", "Tensor.to(cpu)") and isinstance(out, torch.Tensor)
                and out is args[0]):
            # on the CPU ``.cpu()`` returns the tensor itself; in the run it is a new host
            # tensor: an alias, not placed, stands for it
            recording, rec.recording = rec.recording, False
            try:
                with torch._C.DisableTorchFunction():
                    out = out.view_as(out)
                rec.placed.pop(out, None)
            finally:
                rec.recording = recording
        return out

    def _transfer(self, transfer: str, args, out) -> None:
        rec = self.recorder
        if transfer.startswith("torch."):
            # host data to the device: an H2D copy from pageable memory outside host regions
            if rec.host_depth == 0 and isinstance(out, torch.Tensor):
                rec.placed[out] = True
                rec.add("python", transfer, [out], True, True, klass=tables.HOST_SYNC,
                        note="a tensor built from host data on the device")
            return
        source = args[0]
        if transfer == "Tensor.new_tensor":
            if rec.on_device(source) and isinstance(out, torch.Tensor):
                rec.placed[out] = True
                rec.add("python", transfer, [out], True, True, klass=tables.HOST_SYNC,
                        note="a tensor built from host data on the device")
            return
        on_device = rec.on_device(source)
        rec.add("python", transfer, [source], on_device, True,
                klass=tables.HOST_SYNC if on_device else tables.HOST,
                note="read back to the host" if on_device else "")


def tree_root() -> Path:
    """The root of the bevdepth tree this process imports (the patched tree of the cache)."""
    import bevdepth
    return Path(bevdepth.__file__).resolve().parent.parent
