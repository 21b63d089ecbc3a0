"""`bevdepth-npu ops`: the classification rule on entries checked by hand in torch_npu's sources,
NPU autocast's dtype lists, and the regression guard over the smoke experiment's training step.

Checked:
  - the rule (bevdepth_npu/ops/tables.py) on hand-checked ops of torch_npu 2.1.0.post12's table:
    `batch_norm` is CompositeImplicitAutograd in torch and has an NPU kernel (listed in the wheel's
    npu_native_functions_by_codegen.yaml), so the NPU runs it as itself, not the
    `native_batch_norm` decomposition the CPU runs; `_foreach_mul_.Tensor` has only a CPU kernel
    in torch and no NPU kernel: CPU fallback; `diag_embed` (CompositeExplicitAutogradNonFunctional,
    no NPU kernel) is composite; `nonzero` is host-synchronising; `index_put` an AI CPU suspect;
    `add.Tensor` on int64 an AI CPU suspect, on float16 an NPU kernel; an op with host tensors only
    is no NPU op;
  - NPU autocast's lists differ from CPU's: `exp` is fp32 on the NPU (AutoCastOps.cpp) and not
    on CPU autocast's fp32 list of torch 2.1; the recorder gives a conv under autocast fp16;
  - the regression guard: the smoke experiment's training step (product pooling, the NPU
    pooling's chunk limit lowered so its chunked path runs) has no CPU fallback but the known
    ones and device syncs only at the listed file:line with at most the listed count per step
    (none are listed for product pooling);
  - with --pooling fused, the NPU pooling module's rank arithmetic is int32 (no AI CPU suspect
    there; the double in mx_driving_double.py checks that the ranks reach the op as int32, and
    the contract tests that fused pooling equals the product path) and its one listed sync is
    the nonzero that ranks the points.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_ops_inventory.py -q
"""
from __future__ import annotations

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth_npu import errors  # noqa: E402
from bevdepth_npu.ops import guard, tables  # noqa: E402

NPU_POOLING_MODULE = "bevdepth/ops/voxel_pooling/npu.py"


@pytest.fixture(scope="module")
def table():
    try:
        return tables.NpuTable.from_wheel_pin()
    except errors.UserError as exc:
        pytest.skip(str(exc))


def test_a_composite_op_with_an_npu_kernel_runs_as_itself(table) -> None:
    # torch 2.1: batch_norm decomposes (CompositeImplicitAutograd) into native_batch_norm on
    # the CPU; torch_npu registers batch_norm itself at PrivateUse1, which takes precedence
    assert tables.has_composite_kernel("aten::batch_norm", "CompositeImplicitAutograd")
    assert table.has("batch_norm")
    from bevdepth_npu.ops.recorder import composite_on_npu
    assert composite_on_npu(table, "batch_norm") == "batch_norm"
    # cat.default has a kernel of its own; only cat.names decomposes: not a composite parent
    assert composite_on_npu(table, "cat") == ""


@pytest.mark.parametrize("name,overload,dtypes,on_device,expected", [
    ("_foreach_mul_", "Tensor", ("float32",), True, tables.CPU_FALLBACK),
    ("_foreach_mul_", "Scalar", ("float32",), True, tables.NPU_KERNEL),
    ("diag_embed", "default", ("float32",), True, tables.COMPOSITE),
    ("nonzero", "default", ("bool",), True, tables.HOST_SYNC),
    ("index", "Tensor", ("float32", "bool"), True, tables.HOST_SYNC),
    ("index_put", "default", ("float32", "int64", "float32"), True, tables.AI_CPU),
    ("add", "Tensor", ("int64", "int64"), True, tables.AI_CPU),
    ("add", "Tensor", ("float16", "float16"), True, tables.NPU_KERNEL),
    # structured, served by CompositeExplicitAutogradNonFunctional over its out= overload
    # (.inverse), which torch_npu lacks: a fallback as itself (the recipe calls torch.inverse,
    # an NPU kernel, which the recording lists above it)
    ("linalg_inv_ex", "default", ("float32",), True, tables.CPU_FALLBACK),
    ("special_erfcx", "default", ("float32",), True, tables.CPU_FALLBACK),   # no overload
    ("linalg_inv_ex", "default", ("float32",), False, tables.HOST),
])
def test_the_rule_on_hand_checked_entries(table, name, overload, dtypes, on_device,
                                          expected) -> None:
    assert tables.classify(table, "aten", name, overload, on_device, True, dtypes) == expected


def test_no_tensor_is_no_npu_op(table) -> None:
    assert tables.classify(table, "aten", "promote_types", "default", True, False, ()) \
        == tables.HOST


def test_npu_autocast_lists_differ_from_cpus() -> None:
    assert tables.autocast_class(["exp"]) == "fp32"
    assert tables.autocast_class(["conv2d", "convolution"]) == "fp16"
    # CPU autocast of torch 2.1 runs exp at the input's dtype (not on its fp32 list)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.exp(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def training_recording(table):
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    from bevdepth_npu.ops import recipe
    with pytest.MonkeyPatch.context() as mp:
        # the chunked NPU path: several calls per sample
        mp.setattr(npu_pooling, "NPU_POOLING_MAX_POINTS", 20_000)
        return recipe.record("smoke", "product", eval_step=False, table=table)


@pytest.mark.slow
def test_training_step_guard(training_recording) -> None:
    from bevdepth_npu.ops import recipe
    entries = list(training_recording.entries.values())
    pooling = [e for e in entries if e.namespace == "mx_driving"]
    assert {e.op for e in pooling} == {"voxel_pooling_train", "voxel_pool_train_backward"}
    assert all(e.calls > 2 for e in pooling)  # chunked: several calls per key frame
    convs = [e for e in entries if e.op == "convolution" and e.phase == "forward"]
    # fp16 under autocast; the autocast(enabled=False) regions keep theirs in fp32
    assert sum(e.dtypes[0] == "float16" for e in convs) > len(convs) // 2
    problems = guard(entries, recipe.TRAINING_SYNCS, recipe.KNOWN_FALLBACKS)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_fused_training_step_guard(table) -> None:
    from bevdepth_npu.ops import recipe
    recording = recipe.record("smoke", "fused", eval_step=False, table=table)
    entries = [e for e in recording.entries.values() if not e.under]
    assert {e.op for e in entries if e.namespace == "mx_driving"} == {
        "npu_bev_pool_v3", "npu_bev_pool_v3_backward"}
    npu_module = [e for e in entries if e.caller.startswith(NPU_POOLING_MODULE)]
    ranks = [e for e in npu_module if e.op in ("floor_divide", "remainder.Scalar")]
    assert ranks and all(e.dtypes[0] == "int32" for e in ranks)
    suspects = [f"{e.op} ({','.join(e.dtypes)}) at {e.caller}" for e in npu_module
                if e.klass == tables.AI_CPU]
    assert not suspects, suspects
    problems = guard(entries, {**recipe.TRAINING_SYNCS, **recipe.FUSED_POOLING_SYNCS},
                     recipe.KNOWN_FALLBACKS)
    assert not problems, "\n".join(problems)
