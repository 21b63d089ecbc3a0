"""The NPU voxel-pooling path, run through DrivingSDK's own Python wrapper over a CPU double of its
compiled op (tests/integration/mx_driving_double.py says which DrivingSDK files it follows).

Checked:
  - at the R50 recipe's shapes with 8 samples per device (B=8, N=6*112*16*44, C=80, grid
    128x128x1) every kernel call, forward and backward, stays inside the documented limits, every
    point is pooled once, and result and gradient equal the reference;
  - fp32, fp16 and bf16 features: the kernel only ever sees float32 (its OpDef), the result comes
    back in the features' dtype, gradients flow; bf16 handed to the op directly fails as it would
    inside aclnn;
  - batch and channel chunking, empty input (no call), grids over the limits (no call);
  - the op is found at mx_driving.npu_voxel_pooling_train (DrivingSDK v7.0.RC1) or
    mx_driving.point.npu_voxel_pooling_train (v6.0.0); a DrivingSDK with neither is an error
    naming the release to install, at start-up (setup_runtime), not mid-step;
  - the double itself refuses what the real op refuses: host tensors, wrong dims, a dtype outside
    the OpDef, attributes that disagree with the tensors, a call over a documented limit.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_npu_contract.py -q   (after
    `bevdepth-npu fetch drivingsdk`)
"""
from __future__ import annotations

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth.ops import voxel_pooling as vp  # noqa: E402
from bevdepth.utils import device  # noqa: E402
from tests.integration import mx_driving_double as double  # noqa: E402

GRID = [128, 128, 1]


def case(batch, points, channels, seed, dtype=torch.float32, low=-20, high=150):
    gen = torch.Generator().manual_seed(seed)
    geom = torch.stack([torch.randint(low, high, (batch, points), generator=gen),
                        torch.randint(low, high, (batch, points), generator=gen),
                        torch.randint(-1, 2, (batch, points), generator=gen)], -1).int()
    features = torch.randn(batch, points, channels, generator=gen).to(dtype)
    return geom, features


def npu_pool(geom, features, grid=GRID):
    """The port's NPU dispatch with tensors tagged as on the NPU; returns (out, features)."""
    npu_features = double.to_npu(features).requires_grad_(True)
    out = vp.voxel_pooling(double.to_npu(geom), npu_features, grid, backend=device.NPU)
    return out, npu_features


@pytest.fixture
def mx(monkeypatch):
    return double.install(monkeypatch)


def test_r50_shapes_stay_inside_the_limits_and_equal_the_reference(mx) -> None:
    batch, points, channels = 8, 6 * 112 * 16 * 44, 80
    assert batch * points * channels > double.DOCUMENTED_LIMITS["elements"]  # must be split
    geom, features = case(batch, points, channels, seed=11)
    out, npu_features = npu_pool(geom, features)
    assert isinstance(out, double.NpuTensor) and out.shape == (batch, channels, 128, 128)
    forwards = [c for c in mx.calls if c[0] == "forward"]
    assert len(forwards) >= 5
    assert sum(c[1] * c[2] for c in forwards) == batch * points  # every point pooled once
    expected = helpers.pool_reference(geom, features, GRID)
    torch.testing.assert_close(out.detach().cpu(), expected, rtol=1e-5, atol=1e-4)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(double.to_npu(grad_out))
    assert len([c for c in mx.calls if c[0] == "backward"]) == len(forwards)
    assert torch.equal(npu_features.grad.cpu(), helpers.gather_reference(geom, grad_out, GRID))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3),
                                       (torch.bfloat16, 8e-3)])
def test_every_dtype_reaches_the_kernel_as_float32(mx, monkeypatch, dtype, tol) -> None:
    seen = []
    kernel = mx._C.voxel_pooling_train

    def spy(features, *args):
        seen.append(features.dtype)
        return kernel(features, *args)

    monkeypatch.setattr(mx._C, "voxel_pooling_train", spy)
    geom, features = case(2, 120_000, 16, seed=3, dtype=dtype)  # N > 100,000
    out, npu_features = npu_pool(geom, features)
    assert seen == [torch.float32, torch.float32]  # both samples per call, two point chunks
    assert out.dtype == dtype
    expected = helpers.pool_reference(geom, features.double(), GRID)
    assert helpers.relative_error(out.detach().cpu(), expected) < tol
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out.backward(double.to_npu(grad_out))
    assert npu_features.grad.dtype == dtype
    assert torch.equal(npu_features.grad.cpu(), helpers.gather_reference(geom, grad_out, GRID))


def test_bf16_straight_into_the_op_fails_as_in_aclnn(mx) -> None:
    """What the port used to do: the host code converts fp16 only, the OpDef takes float32."""
    geom, features = case(1, 100, 8, seed=4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="aclnnVoxelPoolingTrain: input_features has dtype "
                                           "torch.bfloat16"):
        mx.npu_voxel_pooling_train(double.to_npu(geom), double.to_npu(features), GRID)
    fp16 = mx.npu_voxel_pooling_train(double.to_npu(geom), double.to_npu(features.half()), GRID)
    assert fp16.dtype == torch.float16  # fp16 is the host code's business, as documented


def test_batch_and_channel_chunks(mx) -> None:
    geom, features = case(130, 50, 300, seed=12, low=-2, high=22)
    geom[..., 2] = 0
    out, npu_features = npu_pool(geom, features, [20, 10, 1])
    assert out.shape == (130, 300, 10, 20)
    assert max(c[1] for c in mx.calls) <= 128 and max(c[3] for c in mx.calls) <= 256
    torch.testing.assert_close(out.detach().cpu(),
                               helpers.pool_reference(geom, features, [20, 10, 1]),
                               rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert len([c for c in mx.calls if c[0] == "backward"]) == 4  # 2 batch x 2 channel chunks
    assert torch.equal(npu_features.grad.cpu(),
                       helpers.gather_reference(geom, torch.ones(out.shape), [20, 10, 1]))


def test_empty_input_and_oversized_grids_make_no_call(mx) -> None:
    out = vp.voxel_pooling(double.to_npu(torch.zeros(2, 0, 3, dtype=torch.int32)),
                           double.to_npu(torch.zeros(2, 0, 8)), [16, 16, 1], backend=device.NPU)
    assert out.shape == (2, 8, 16, 16) and not out.any()
    geom, features = case(1, 10, 2, seed=13)
    with pytest.raises(ValueError, match="1001x8x1"):
        npu_pool(geom, features, [1001, 8, 1])
    with pytest.raises(ValueError, match="Z <= 10"):
        npu_pool(geom, features, [8, 8, 11])
    assert mx.calls == []


def test_inference_chunks_stay_inside_the_limits(mx) -> None:
    gen = torch.Generator().manual_seed(14)
    geom = torch.randint(-5, 133, (2, 6, 112, 16, 44, 3), generator=gen).int()
    geom[..., 2] = torch.randint(-1, 2, geom.shape[:-1], generator=gen)
    depth = torch.rand(12, 112, 16, 44, generator=gen)
    context = torch.randn(12, 80, 16, 44, generator=gen)
    out = vp.voxel_pooling_inference(double.to_npu(geom), double.to_npu(depth),
                                     double.to_npu(context), GRID, backend=device.NPU)
    assert mx.calls and all(c[0] == "forward" for c in mx.calls)
    assert max(c[1] * c[2] * c[3] for c in mx.calls) <= vp.INFERENCE_CHUNK_ELEMENTS
    torch.testing.assert_close(out.cpu(), vp.voxel_pooling_inference(geom, depth, context, GRID),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout,where", [("v7", "mx_driving.npu_voxel_pooling_train"),
                                          ("v6", "mx_driving.point.npu_voxel_pooling_train")])
def test_the_op_is_found_where_each_release_puts_it(monkeypatch, layout, where) -> None:
    mx = double.install(monkeypatch, layout)
    op, found = device.npu_pooling_op()
    assert found == where
    geom, features = case(1, 500, 8, seed=5)
    out, _ = npu_pool(geom, features)
    assert mx.calls == [("forward", 1, 500, 8)]
    torch.testing.assert_close(out.detach().cpu(), helpers.pool_reference(geom, features, GRID))


def test_a_release_without_the_op_is_refused_at_start_up(monkeypatch) -> None:
    double.install(monkeypatch, "none")
    with pytest.raises(RuntimeError, match="branch_v7.0.RC1") as raised:
        device.npu_pooling_op()
    assert "mx_driving.point.npu_voxel_pooling_train" in str(raised.value)
    monkeypatch.setattr(device, "_selected", device.NPU)
    monkeypatch.setattr(device, "_runtime_ready", False)
    monkeypatch.setattr(device, "_import_npu_stack", lambda: None)
    with pytest.raises(RuntimeError, match="no voxel-pooling op"):
        device.setup_runtime()


def test_the_double_refuses_what_the_op_refuses(mx) -> None:
    geom, features = case(1, 100, 8, seed=6)
    with pytest.raises(RuntimeError, match="must be an NPU tensor"):
        mx.npu_voxel_pooling_train(geom, double.to_npu(features), GRID)
    with pytest.raises(RuntimeError, match="same device"):
        double.to_npu(features) + features  # host and device tensors do not mix
    with pytest.raises(RuntimeError, match="aclnnVoxelPoolingTrain: geom has dtype torch.int64"):
        mx.npu_voxel_pooling_train(double.to_npu(geom.long()), double.to_npu(features), GRID)
    with pytest.raises(RuntimeError, match="inputFeatures.dim"):
        mx._C.voxel_pooling_train(double.to_npu(features[0]), double.to_npu(geom), None, None,
                                  1, 100, 8, 128, 128, 1)
    out = double.to_npu(torch.zeros(1, 128, 128, 8))
    memo = double.to_npu(-torch.ones(1, 100, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of bounds"):
        mx._C.voxel_pooling_train(double.to_npu(features), double.to_npu(geom), out, memo,
                                  1, 200, 8, 128, 128, 1)
    big_geom, big = case(1, 100_001, 8, seed=7)
    with pytest.raises(double.LimitViolation, match="N=100001"):
        mx.npu_voxel_pooling_train(double.to_npu(big_geom), double.to_npu(big), GRID)
    wide_geom, wide = case(1, 10, 257, seed=8)
    with pytest.raises(double.LimitViolation, match="C=257"):
        mx.npu_voxel_pooling_train(double.to_npu(wide_geom), double.to_npu(wide), GRID)


def test_the_double_follows_drivingsdks_own_golden_function(mx) -> None:
    """DrivingSDK's test (tests/torch/test_voxel_pooling_train.py) checks the op against a plain
    loop: pos_memo (b, y, x) for kept points, -1 for dropped ones; the output sums."""
    geom, features = case(2, 300, 4, seed=9, low=-3, high=12)
    npu_features = double.to_npu(features).requires_grad_(True)
    out = mx.npu_voxel_pooling_train(double.to_npu(geom), npu_features, [10, 8, 1])
    torch.testing.assert_close(out.detach().cpu(), helpers.pool_loop(geom, features, [10, 8, 1])
                               .float(), rtol=1e-6, atol=1e-6)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(double.to_npu(grad_out))
    assert torch.equal(npu_features.grad.cpu(),
                       helpers.gather_reference(geom, grad_out, [10, 8, 1]))
