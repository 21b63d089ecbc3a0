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
Fused pooling (``--pooling fused``: mx_driving.bev_pool_v3 through DrivingSDK's own wrapper):
  - at the R50 recipe's shapes the forward and both gradients equal the product path's within
    1e-5 relative; every point inside the grid is ranked once, every call is float32 with int32
    ranks and inside the limits (C % 8 == 0, C <= 360, B*D*H*W*C <= 2^31);
  - fp16 and bf16 inputs reach the op as float32 and come back in their dtype; channels padded
    to a multiple of 8 (C=20) and split at 360 (C=400); samples split when a call would pass
    2^31 elements (a lowered limit); no point inside the grid makes no call;
  - the op is found at mx_driving.bev_pool_v3 (v7.0.RC1); a release without it (v6.0.0) is an
    error naming the release and --pooling product;
  - the double follows DrivingSDK's own golden loop (tests/torch/test_bev_pool_v3.py) and refuses
    what the op refuses: C not a multiple of 8, fp16, int64 ranks, zero ranks, ranks out of
    bounds, C > 360, B*D*H*W*C > 2^31.
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
from bevdepth.ops.voxel_pooling import npu as npu_pooling  # noqa: E402
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


@pytest.mark.slow
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
    op, found = npu_pooling.pooling_op()
    assert found == where
    geom, features = case(1, 500, 8, seed=5)
    out, _ = npu_pool(geom, features)
    assert mx.calls == [("forward", 1, 500, 8)]
    torch.testing.assert_close(out.detach().cpu(), helpers.pool_reference(geom, features, GRID))


def test_a_release_without_the_op_is_refused_at_start_up(monkeypatch) -> None:
    double.install(monkeypatch, "none")
    with pytest.raises(RuntimeError, match="branch_v7.0.RC1") as raised:
        npu_pooling.pooling_op()
    assert "mx_driving.point.npu_voxel_pooling_train" in str(raised.value)
    monkeypatch.setattr(device, "_selected", device.NPU)
    monkeypatch.setattr(device, "_runtime_ready", False)
    monkeypatch.setattr(device, "import_npu_stack", lambda: None)
    with pytest.raises(RuntimeError, match="has no npu_voxel_pooling_train"):
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


# ---------------------------------------------------------------- fused pooling (bev_pool_v3)


def fused_npu(geom, depth, context, grid=GRID):
    """The port's fused NPU dispatch on tagged tensors; returns (out, depth, context)."""
    npu_depth = double.to_npu(depth).requires_grad_(True)
    npu_context = double.to_npu(context).requires_grad_(True)
    out = vp.voxel_pooling_fused(double.to_npu(geom), npu_depth, npu_context, grid,
                                 backend=device.NPU)
    return out, npu_depth, npu_context


def fused_calls(mx, name="bev_pool_v3"):
    return [c for c in mx.calls if c[0] == name]


def inside_count(geom, grid=GRID):
    return int(((geom >= 0) & (geom < torch.tensor(grid))).all(-1).sum())


def test_fused_r50_shapes_equal_the_product_path(mx) -> None:
    geom, depth, context = helpers.lss_case(2, 6, 112, 16, 44, 80, seed=21, grid=GRID, margin=8)
    out, npu_depth, npu_context = fused_npu(geom, depth, context)
    assert isinstance(out, double.NpuTensor) and out.shape == (2, 80, 128, 128)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    out.backward(double.to_npu(grad_out))
    expected, grad_depth, grad_context = helpers.product_reference(geom, depth, context,
                                                                   grad_out, GRID)
    assert helpers.relative_error(out.detach().cpu(), expected) <= 1e-5
    assert helpers.relative_error(npu_depth.grad.cpu(), grad_depth) <= 1e-5
    assert helpers.relative_error(npu_context.grad.cpu(), grad_context) <= 1e-5
    assert fused_calls(mx) == [("bev_pool_v3", 2, 1, 128, 128, 80, inside_count(geom))]
    assert fused_calls(mx, "bev_pool_v3_backward") == [
        ("bev_pool_v3_backward", 2, 1, 128, 128, 80, inside_count(geom))]
    assert not [c for c in mx.calls if c[0] in ("forward", "backward")]  # no product path


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_fused_half_inputs_reach_the_op_as_float32(mx, monkeypatch, dtype, tol) -> None:
    seen = []
    kernel = mx._C.npu_bev_pool_v3

    def spy(depth, feat, *args):
        seen.append((depth.dtype, feat.dtype, *(r.dtype for r in args[:3])))
        return kernel(depth, feat, *args)

    monkeypatch.setattr(mx._C, "npu_bev_pool_v3", spy)
    geom, depth, context = helpers.lss_case(1, 2, 10, 4, 6, 16, seed=22, dtype=dtype, grid=GRID,
                                            margin=8)
    out, npu_depth, npu_context = fused_npu(geom, depth, context)
    assert seen == [(torch.float32, torch.float32, torch.int32, torch.int32, torch.int32)]
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    out.backward(double.to_npu(grad_out))
    expected, grad_depth, grad_context = helpers.product_reference(geom, depth, context,
                                                                   grad_out, GRID)
    assert helpers.relative_error(out.detach().cpu(), expected) < tol
    assert npu_depth.grad.dtype == npu_context.grad.dtype == dtype
    assert helpers.relative_error(npu_context.grad.cpu(), grad_context) < tol


@pytest.mark.parametrize("channels,calls", [(20, [24]), (400, [360, 40]), (8, [8])])
def test_fused_channels_padded_to_eight_and_split_at_360(mx, channels, calls) -> None:
    geom, depth, context = helpers.lss_case(2, 2, 6, 3, 5, channels, seed=23, grid=[12, 10, 1],
                                            margin=8)
    out, npu_depth, npu_context = fused_npu(geom, depth, context, [12, 10, 1])
    assert out.shape == (2, channels, 10, 12)
    assert [c[5] for c in fused_calls(mx)] == calls
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(double.to_npu(grad_out))
    assert [c[5] for c in fused_calls(mx, "bev_pool_v3_backward")] == calls[::-1]
    expected, grad_depth, grad_context = helpers.product_reference(geom, depth, context,
                                                                   grad_out, [12, 10, 1])
    assert helpers.relative_error(out.detach().cpu(), expected) <= 1e-5
    assert helpers.relative_error(npu_depth.grad.cpu(), grad_depth) <= 1e-5
    assert helpers.relative_error(npu_context.grad.cpu(), grad_context) <= 1e-5


def test_fused_samples_split_when_a_call_would_pass_the_element_limit(mx, monkeypatch) -> None:
    """With the limit lowered to two samples' output, four samples take two calls, each inside
    the (equally lowered) limit the double enforces."""
    grid = [12, 10, 1]
    limit = 2 * 12 * 10 * 16
    monkeypatch.setattr(npu_pooling, "NPU_FUSED_MAX_ELEMENTS", limit)
    monkeypatch.setitem(double.FUSED_LIMITS, "elements", limit)
    geom, depth, context = helpers.lss_case(4, 2, 6, 3, 5, 16, seed=24, grid=grid, margin=8)
    out, npu_depth, npu_context = fused_npu(geom, depth, context, grid)
    assert [c[1] for c in fused_calls(mx)] == [2, 2]
    out.sum().backward()
    expected, grad_depth, grad_context = helpers.product_reference(geom, depth, context,
                                                                   torch.ones(out.shape), grid)
    assert helpers.relative_error(out.detach().cpu(), expected) <= 1e-5
    assert helpers.relative_error(npu_depth.grad.cpu(), grad_depth) <= 1e-5
    assert helpers.relative_error(npu_context.grad.cpu(), grad_context) <= 1e-5


def test_fused_without_a_point_in_the_grid_makes_no_call(mx) -> None:
    geom, depth, context = helpers.lss_case(1, 2, 4, 3, 5, 8, seed=25, grid=GRID, margin=8)
    geom[..., 0] = -1
    out, _, _ = fused_npu(geom, depth, context)
    assert out.shape == (1, 8, 128, 128) and not out.any()
    assert mx.calls == []


def test_fused_chunks_stay_inside_the_limits_at_large_shapes() -> None:
    limit = npu_pooling.NPU_FUSED_MAX_ELEMENTS
    for shape in [(8, 6, 112, 16, 44, 80, 128, 128), (8, 6, 112, 40, 100, 80, 128, 128),
                  (64, 6, 112, 32, 88, 360, 512, 512), (2, 6, 112, 16, 44, 1000, 1500, 1500)]:
        batch, cams, bins, height, width, channels, grid_x, grid_y = shape
        batch_step, channel_step, padded = npu_pooling.fused_pooling_chunks(*shape)
        assert padded % 8 == 0 and channel_step % 8 == 0 and 8 <= channel_step <= 360
        assert 1 <= batch_step <= batch
        assert batch_step * grid_x * grid_y * channel_step <= limit  # the output
        assert batch_step * cams * height * width * channel_step <= limit  # feat rows x C
        assert batch_step * cams * bins * height * width < limit  # depth, int32 ranks
    assert npu_pooling.fused_pooling_chunks(8, 6, 112, 16, 44, 80, 128, 128) == (8, 80, 80)
    with pytest.raises(ValueError, match="--pooling product"):
        npu_pooling.fused_pooling_chunks(1, 6, 112, 16, 44, 80, 20000, 20000)


def test_fused_op_is_found_in_v7_and_missing_in_v6(monkeypatch) -> None:
    double.install(monkeypatch, "v7")
    assert npu_pooling.fused_op()[1] == "mx_driving.bev_pool_v3"
    double.install(monkeypatch, "v6")
    with pytest.raises(RuntimeError, match="branch_v7.0.RC1") as raised:
        npu_pooling.fused_op()
    assert "--pooling product" in str(raised.value)


def golden_loop(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape):
    """DrivingSDK's golden function of tests/torch/test_bev_pool_v3.py, as a plain loop."""
    batch, bins, height, width, channels = shape
    out = torch.zeros(batch * bins * height * width, channels, dtype=torch.float64)
    flat_depth, rows = depth.double().reshape(-1), feat.double().reshape(-1, channels)
    for d, f, b in zip(ranks_depth.tolist(), ranks_feat.tolist(), ranks_bev.tolist()):
        out[b] += flat_depth[d] * rows[f]
    return out.view(shape).permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 8, 1), (3, 3, 3, 3, 16, 3),
                                   (3, 3, 15, 15, 32, 33), (1, 5, 17, 23, 8, 777)])
def test_the_fused_double_follows_drivingsdks_golden_loop(mx, shape) -> None:
    batch, bins, height, width, channels, count = shape
    gen = torch.Generator().manual_seed(26)
    depth = torch.rand(batch, 1, bins, height, width, generator=gen)
    feat = torch.rand(batch, 1, height, width, channels, generator=gen)
    ranks = [torch.randint(0, high, (count,), generator=gen, dtype=torch.int32)
             for high in (batch * bins * height * width, batch * height * width, batch)]
    npu_depth = double.to_npu(depth).requires_grad_(True)
    npu_feat = double.to_npu(feat).requires_grad_(True)
    out = mx.bev_pool_v3(npu_depth, npu_feat, *[double.to_npu(r) for r in ranks],
                         [batch, bins, height, width, channels])
    ref_depth = depth.double().requires_grad_(True)
    ref_feat = feat.double().requires_grad_(True)
    expected = golden_loop(ref_depth, ref_feat, *ranks, (batch, bins, height, width, channels))
    tol = dict(rtol=1e-5, atol=1e-6)  # float32 sums against float64
    torch.testing.assert_close(out.detach().cpu().double(), expected.detach(), **tol)
    grad_out = torch.rand(out.shape, generator=gen)
    out.backward(double.to_npu(grad_out))
    expected.backward(grad_out.double())
    torch.testing.assert_close(npu_feat.grad.cpu().double(), ref_feat.grad, **tol)
    torch.testing.assert_close(npu_depth.grad.cpu().double(), ref_depth.grad, **tol)


def test_the_fused_double_refuses_what_the_op_refuses(mx) -> None:
    gen = torch.Generator().manual_seed(27)

    def call(channels=16, dtype=torch.float32, rank_dtype=torch.int32, count=5, shape=None,
             bev_rank=None):
        depth = double.to_npu(torch.rand(1, 2, 3, 4, 5, generator=gen).to(dtype))
        feat = double.to_npu(torch.rand(1, 2, 4, 5, channels, generator=gen).to(dtype))
        ranks = [torch.randint(0, high, (count,), generator=gen).to(rank_dtype)
                 for high in (depth.numel(), 2 * 4 * 5, 4 * 5)]
        if bev_rank is not None:
            ranks[2].fill_(bev_rank)
        return mx.bev_pool_v3(depth, feat, *[double.to_npu(r) for r in ranks],
                              shape or [1, 1, 4, 5, channels])

    assert call().shape == (1, 16, 1, 4, 5)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        call(channels=12)
    with pytest.raises(RuntimeError, match="aclnnBEVPoolV3: depth has dtype torch.float16"):
        call(dtype=torch.float16)
    with pytest.raises(RuntimeError, match="ranks_depth has dtype torch.int64"):
        call(rank_dtype=torch.int64)
    with pytest.raises(RuntimeError, match="0 ranks"):
        call(count=0)
    with pytest.raises(RuntimeError, match="ranks_bev spans .* out of bounds"):
        call(bev_rank=20)  # one past the 4x5 cells
    with pytest.raises(double.LimitViolation, match="C=368 > 360"):
        call(channels=368)
    with pytest.raises(double.LimitViolation,
                       match="B\\*D\\*H\\*W\\*C=4294967296 > 2147483648"):
        call(shape=[2 ** 12, 1, 2 ** 10, 2 ** 6, 16])
    with pytest.raises(RuntimeError, match="feat must be an NPU tensor"):
        mx.bev_pool_v3(double.to_npu(torch.rand(1, 1, 1, 1, 1)), torch.rand(1, 1, 1, 1, 8),
                       *[double.to_npu(torch.zeros(1, dtype=torch.int32))] * 3, [1, 1, 1, 1, 8])
