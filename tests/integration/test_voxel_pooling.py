"""Voxel pooling of the patched tree (bevdepth.ops.voxel_pooling), on CPU.

Checked:
  - the torch path equals a naive loop on random cases: out-of-range, negative and duplicate
    coordinates, points on every grid edge, empty input, several batches, fp16 and bf16;
  - its gradient: gradcheck in float64 and equality with the loop's (a gather);
  - the inference entry (depth x context, pooled a few depth bins at a time) equals pooling the
    whole product, and never hands the pooling more than its chunk bound;
  - the NPU chunk sizes for a grid at the limits (the NPU dispatch itself runs through
    DrivingSDK's own wrapper in test_npu_contract.py).
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_voxel_pooling.py -q
"""
from __future__ import annotations

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth.ops import voxel_pooling as vp  # noqa: E402
from bevdepth.ops.voxel_pooling import npu as npu_pooling  # noqa: E402
from bevdepth.utils import device  # noqa: E402

GRID = [10, 8, 2]


def random_case(batch: int, points: int, channels: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    geom = torch.stack([torch.randint(-3, GRID[0] + 3, (batch, points), generator=gen),
                        torch.randint(-3, GRID[1] + 3, (batch, points), generator=gen),
                        torch.randint(-1, GRID[2] + 1, (batch, points), generator=gen)], -1)
    features = torch.randn(batch, points, channels, generator=gen).to(dtype)
    return geom.int(), features


@pytest.mark.parametrize("batch,points,channels,seed", [(1, 200, 3, 0), (3, 150, 5, 1),
                                                        (2, 1, 1, 2), (4, 300, 16, 3)])
def test_torch_path_equals_loop(batch, points, channels, seed) -> None:
    geom, features = random_case(batch, points, channels, seed)
    out = vp.voxel_pooling(geom, features, GRID)
    assert out.shape == (batch, channels, GRID[1], GRID[0])
    assert out.dtype == features.dtype
    expected = helpers.pool_loop(geom, features, GRID)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    if points >= 100:  # the larger cases have both kept and dropped points
        inside = ((geom >= 0) & (geom < torch.tensor(GRID))).all(-1)
        assert 0 < int(inside.sum()) < inside.numel()


def test_duplicates_edges_and_negative_coordinates() -> None:
    geom = torch.tensor([[[0, 0, 0], [0, 0, 0], [9, 7, 1], [9, 7, 1], [9, 7, 1],  # duplicates
                          [10, 0, 0], [0, 8, 0], [0, 0, 2],                       # one past
                          [-1, 0, 0], [0, -1, 0], [0, 0, -1], [-2147483648, 5, 0]]],
                        dtype=torch.int32)
    features = torch.arange(12 * 2, dtype=torch.float32).view(1, 12, 2)
    out = vp.voxel_pooling(geom, features, GRID)
    expected = torch.zeros(1, 2, 8, 10)
    expected[0, :, 0, 0] = features[0, 0] + features[0, 1]
    expected[0, :, 7, 9] = features[0, 2] + features[0, 3] + features[0, 4]
    assert torch.equal(out, expected)


def test_empty_input() -> None:
    geom = torch.zeros(2, 0, 3, dtype=torch.int32)
    features = torch.zeros(2, 0, 4, requires_grad=True)
    out = vp.voxel_pooling(geom, features, GRID)
    assert out.shape == (2, 4, 8, 10) and not out.any()
    out.sum().backward()
    assert features.grad.shape == (2, 0, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype) -> None:
    geom, features = random_case(2, 120, 4, seed=5, dtype=dtype)
    out = vp.voxel_pooling(geom, features, GRID)
    assert out.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), helpers.pool_loop(geom, features, GRID),
                               rtol=tol, atol=tol)


def test_gradcheck_float64() -> None:
    geom, features = random_case(2, 40, 3, seed=6, dtype=torch.float64)
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: vp.voxel_pooling(geom, f, GRID), (features,))


def test_gradient_equals_loop_gradient() -> None:
    geom, features = random_case(3, 100, 4, seed=7)
    grad_out = torch.randn(3, 4, GRID[1], GRID[0])
    ours = features.clone().requires_grad_(True)
    vp.voxel_pooling(geom, ours, GRID).backward(grad_out)
    loop = features.double().requires_grad_(True)
    helpers.pool_loop(geom, loop, GRID).backward(grad_out.double())
    assert torch.equal(ours.grad.double(), loop.grad)
    dropped = ~((geom >= 0) & (geom < torch.tensor(GRID))).all(-1)
    assert dropped.any() and not ours.grad[dropped].any()


def test_voxel_num_as_tensor_and_leading_dims() -> None:
    geom, features = random_case(2, 60, 3, seed=8)
    by_list = vp.voxel_pooling(geom, features, GRID)
    by_tensor = vp.voxel_pooling(geom.view(2, 3, 4, 5, 3), features.view(2, 3, 4, 5, 3),
                                 torch.tensor(GRID))
    assert torch.equal(by_list, by_tensor)


def whole_product(depth, context, batch):
    product = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*cams, C, D, H, W)
    product = product.view(batch, -1, *product.shape[1:]).permute(0, 1, 3, 4, 5, 2)
    return product


@pytest.mark.parametrize("chunk_elements", [1, 5000, 10 ** 9])
def test_inference_chunks_equal_whole_product(chunk_elements, monkeypatch) -> None:
    geom, depth, context = helpers.lss_case(2, 3, 9, 4, 5, 6, seed=9, grid=(35, 35, 1))
    expected = helpers.pool_reference(geom, whole_product(depth, context, 2), [32, 32, 1])
    sizes = []
    pool = vp.pooling.voxel_pooling

    def recording_pool(geom_xyz, features, voxel_num, backend=None):
        sizes.append(features.numel())
        return pool(geom_xyz, features, voxel_num, backend)

    monkeypatch.setattr(vp.pooling, "voxel_pooling", recording_pool)
    out = vp.voxel_pooling_inference(geom, depth, context, [32, 32, 1],
                                     max_chunk_elements=chunk_elements)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    per_bin = 2 * 3 * 4 * 5 * 6
    assert sum(sizes) == per_bin * 9
    assert max(sizes) <= max(chunk_elements, per_bin)
    if chunk_elements < per_bin * 9:
        assert len(sizes) > 1


def test_inference_default_chunk_is_bounded_at_r50_shapes(monkeypatch) -> None:
    """Batch 2 at 256x704: the whole product has 2*6*112*16*44*80 = 76e6 elements."""
    geom, depth, context = helpers.lss_case(2, 6, 112, 16, 44, 80, seed=10, grid=(35, 35, 1))
    sizes = []
    pool = vp.pooling.voxel_pooling

    def recording_pool(geom_xyz, features, voxel_num, backend=None):
        sizes.append(features.numel())
        return pool(geom_xyz, features, voxel_num, backend)

    monkeypatch.setattr(vp.pooling, "voxel_pooling", recording_pool)
    out = vp.voxel_pooling_inference(geom, depth, context, [128, 128, 1])
    assert max(sizes) <= vp.INFERENCE_CHUNK_ELEMENTS
    assert sum(sizes) == 2 * 6 * 112 * 16 * 44 * 80
    monkeypatch.undo()
    pooled = torch.zeros_like(out)
    for d0 in range(0, 112, 16):  # the reference, in its own chunks
        pooled += helpers.pool_reference(geom[:, :, d0:d0 + 16],
                                         whole_product(depth[:, d0:d0 + 16], context, 2),
                                         [128, 128, 1])
    torch.testing.assert_close(out, pooled, rtol=1e-5, atol=1e-4)


def test_npu_chunks_respect_grid_elements() -> None:
    """A 1000x1000 grid leaves room for 100 channels and one sample per call."""
    batch_step, point_step, channel_step = npu_pooling.pooling_chunks(4, 10 ** 6, 256, 1000,
                                                                     1000, 1)
    assert channel_step == 100 and batch_step == 1 and point_step == 100_000
    assert batch_step * 1000 * 1000 * channel_step <= npu_pooling.NPU_POOLING_MAX_ELEMENTS
