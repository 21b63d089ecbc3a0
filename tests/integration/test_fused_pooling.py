"""The one-pass CPU kernels and fused pooling (``--pooling fused``) of the patched tree, on CPU.

Checked:
  - the product path's numba kernels equal the sparse-matrix pooling they replace bit for bit
    (fp32 and float64), whatever the thread count and however many blocks of cells split the work;
    the gather is exact;
  - voxel_pooling_fused on CPU (numba) equals pooling the whole product bit for bit, its depth
    and context gradients within 1e-5 relative (measured about 1e-7); the torch implementation
    that serves CUDA (run here on CPU tensors) in small depth chunks likewise; gradcheck of both
    in float64; fp16 / bf16 inputs pooled in float32 and returned in their dtype; no point in the
    grid, odd channel counts; without gradients on CUDA the inference entry serves;
  - BaseLSSFPN: pooling must be product or fused; use_da keeps product and warns;
  - the experiments' --pooling option (default product), its way into the backbone of every
    family (BEVDepth, BEVStereo, fusion; the depth aggregation experiments keep product), and
    the R50 2key model's training step with fused: the same losses bit for bit and the same
    gradients within 1e-5 as with product; BEVStereo and fusion train a step fused.
(The NPU branch, bev_pool_v3 through DrivingSDK's wrapper, is in test_npu_contract.py; parity
with upstream under fused in test_parity.py.)
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_fused_pooling.py -q
"""
from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth.exps import base_cli  # noqa: E402
from bevdepth.exps.nuscenes import base_exp  # noqa: E402
from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN  # noqa: E402
from bevdepth.ops import voxel_pooling as vp  # noqa: E402
from bevdepth.ops.voxel_pooling import cpu_kernels  # noqa: E402
from bevdepth.utils import device  # noqa: E402

SMALL_DIM = helpers.SMALL_DIM
R50_2KEY = "mv.bev_depth_lss_r50_256x704_128x128_24e_2key"


@pytest.fixture
def threads():
    """Set torch's (and so the kernels') thread count; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def product_path(geom, depth, context, grid):
    """What the backbone does with pooling=product: the product, channels last, pooled."""
    batch = geom.shape[0]
    product = depth.unsqueeze(1) * context.unsqueeze(2)
    product = product.view(batch, -1, *product.shape[1:]).permute(0, 1, 3, 4, 5, 2)
    return vp.voxel_pooling(geom, product.contiguous(), grid)


def sparse_matmul_pooling(geom, features, grid):
    """The pure-PyTorch CPU pooling the numba kernels replace: a COO matrix of ones, one column
    per point, times the features."""
    grid_x, grid_y, grid_z = grid
    batch, points, channels = features.shape
    x, y, z = geom[..., 0].long(), geom[..., 1].long(), geom[..., 2].long()
    inside = (x >= 0) & (x < grid_x) & (y >= 0) & (y < grid_y) & (z >= 0) & (z < grid_z)
    cells = grid_x * grid_y
    rows = (y * grid_x + x + torch.arange(batch).view(batch, 1) * cells)
    rows = rows.masked_fill(~inside, batch * cells).view(-1)
    matrix = torch.sparse_coo_tensor(torch.stack((rows, torch.arange(rows.numel()))),
                                     features.new_ones(rows.numel()),
                                     (batch * cells + 1, rows.numel()))
    out = torch.sparse.mm(matrix, features.reshape(-1, channels))[:batch * cells]
    return out.view(batch, grid_y, grid_x, channels).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- the product path's kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_cpu_kernels_equal_the_sparse_matmul_bit_for_bit(threads, dtype, num_threads) -> None:
    threads(num_threads)
    gen = torch.Generator().manual_seed(1)
    grid = (24, 20, 2)
    geom = torch.stack([torch.randint(-3, 27, (3, 40_000), generator=gen),
                        torch.randint(-3, 23, (3, 40_000), generator=gen),
                        torch.randint(-1, 3, (3, 40_000), generator=gen)], -1).int()
    features = torch.randn(3, 40_000, 80, generator=gen).to(dtype)
    out = vp.voxel_pooling(geom, features, grid, backend=device.CPU)
    assert torch.equal(out, sparse_matmul_pooling(geom, features, grid))
    features.requires_grad_(True)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    vp.voxel_pooling(geom, features, grid).backward(grad_out)
    assert torch.equal(features.grad, helpers.gather_reference(geom, grad_out, grid))


@pytest.mark.parametrize("blocks", [3, 7])
def test_more_cell_blocks_than_threads_keep_the_order(monkeypatch, blocks) -> None:
    """The forwards split the cells into blocks, each a task that reads every point: any number
    of blocks, more than the threads or not, gives the sums of one pass in point order."""
    monkeypatch.setattr(cpu_kernels, "_cell_blocks", lambda num_rows: np.linspace(
        0, num_rows, blocks + 1).round().astype(np.int64))
    gen = torch.Generator().manual_seed(11)
    grid = (12, 10, 1)
    geom = torch.stack([torch.randint(-2, 14, (2, 5_000), generator=gen),
                        torch.randint(-2, 12, (2, 5_000), generator=gen),
                        torch.randint(-1, 2, (2, 5_000), generator=gen)], -1).int()
    features = torch.randn(2, 5_000, 24, generator=gen)
    out = vp.voxel_pooling(geom, features, grid, backend=device.CPU)
    assert torch.equal(out, sparse_matmul_pooling(geom, features, grid))
    geom, depth, context = helpers.lss_case(1, 3, 7, 4, 5, 24, seed=12, grid=grid)
    fused = vp.voxel_pooling_fused(geom, depth, context, grid)
    assert torch.equal(fused, product_path(geom, depth, context, grid))


THREADS_PROBE = """
import torch
torch.set_num_threads(1)
from bevdepth.ops import voxel_pooling as vp
geom = torch.randint(0, 8, (1, 2, 3, 4, 5, 3), dtype=torch.int32)
depth = torch.rand(2, 3, 4, 5, requires_grad=True)
context = torch.rand(2, 8, 4, 5, requires_grad=True)
features = torch.rand(1, 2, 3, 4, 5, 8, requires_grad=True)
vp.voxel_pooling(geom, features, (8, 8, 1)).sum().backward()
vp.voxel_pooling_fused(geom, depth, context, (8, 8, 1)).sum().backward()
print(torch.get_num_threads())
"""


def test_the_kernels_leave_torchs_thread_count_alone() -> None:
    """Numba's OpenMP pool, started by the first parallel kernel of a process, sets the
    process's OpenMP thread count to all cores; the kernels put torch's back (here 1, as a DDP
    rank or OMP_NUM_THREADS=1 sets it), so that later operators neither oversubscribe the
    cores nor compute differently from the first call's."""
    env = dict(helpers.subprocess_env(), NUMBA_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", THREADS_PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1", proc.stdout


def test_cell_rows_number_cells_per_sample_and_drop_outside_points() -> None:
    geom = torch.tensor([[[0, 0, 0], [3, 1, 0], [4, 0, 0], [0, 2, 0], [0, 0, 1], [-1, 0, 0]],
                         [[3, 1, 0], [0, 0, 0], [1, 1, -1], [2, 1, 0], [0, 0, 0], [0, 0, 0]]],
                        dtype=torch.int32)
    rows = cpu_kernels.cell_rows(geom, (4, 2, 1))
    assert rows.dtype == torch.int32
    assert rows.tolist() == [0, 7, -1, -1, -1, -1, 15, 8, -1, 14, 8, 8]


# ---------------------------------------------------------------- fused pooling on CPU


def test_fused_cpu_equals_the_product_path() -> None:
    geom, depth, context = helpers.lss_case(2, 6, 28, 8, 11, 80, seed=2)
    grid = (32, 32, 1)
    depth.requires_grad_(True)
    context.requires_grad_(True)
    expected = product_path(geom, depth, context, grid)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad(expected, (depth, context), grad_out)
    out = vp.voxel_pooling_fused(geom, depth, context, grid)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert torch.equal(out, expected)  # same products, same summation order
    got = torch.autograd.grad(out, (depth, context), grad_out)
    for name, g, w in zip(("depth", "context"), got, want):
        assert helpers.relative_error(g, w) <= 1e-5, name


def test_fused_cpu_results_do_not_depend_on_the_thread_count(threads) -> None:
    """Threads split the channels (forward) and the pixels (backward): the order holds."""
    geom, depth, context = helpers.lss_case(1, 6, 20, 8, 11, 80, seed=10)
    depth.requires_grad_(True)
    context.requires_grad_(True)
    grad_out = torch.randn(1, 80, 32, 32, generator=torch.Generator().manual_seed(4))
    results = []
    for count in (1, 2):
        threads(count)
        out = vp.voxel_pooling_fused(geom, depth, context, (32, 32, 1))
        results.append((out, *torch.autograd.grad(out, (depth, context), grad_out)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("chunk_elements", [1, 3000, 10 ** 9])
def test_fused_torch_implementation_equals_the_product_path(chunk_elements) -> None:
    """The CUDA backend, run on CPU tensors: the product a few depth bins at a time."""
    geom, depth, context = helpers.lss_case(2, 3, 9, 4, 5, 6, seed=4)
    grid = (32, 32, 1)
    depth.requires_grad_(True)
    context.requires_grad_(True)
    expected = product_path(geom, depth, context, grid)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    want = torch.autograd.grad(expected, (depth, context), grad_out)
    out = vp.voxel_pooling_fused(geom, depth, context, grid, backend=device.CUDA,
                                 max_chunk_elements=chunk_elements)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(out, (depth, context), grad_out)
    for g, w in zip(got, want):
        assert helpers.relative_error(g, w) <= 1e-5


@pytest.mark.parametrize("backend", [device.CPU, device.CUDA])
def test_fused_gradcheck_float64(backend) -> None:
    geom, depth, context = helpers.lss_case(1, 2, 5, 3, 4, 3, seed=6, grid=(6, 5, 1),
                                    dtype=torch.float64)
    depth.requires_grad_(True)
    context.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda d, c: vp.voxel_pooling_fused(geom, d, c, (6, 5, 1), backend=backend,
                                            max_chunk_elements=30), (depth, context))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_fused_half_inputs_pool_in_float32(dtype, tol) -> None:
    geom, depth, context = helpers.lss_case(2, 2, 10, 4, 6, 16, seed=7, dtype=dtype)
    depth.requires_grad_(True)
    context.requires_grad_(True)
    out = vp.voxel_pooling_fused(geom, depth, context, (32, 32, 1))
    assert out.dtype == dtype
    expected = product_path(geom, depth.detach().double(), context.detach().double(),
                            (32, 32, 1))
    assert helpers.relative_error(out, expected) < tol
    out.float().sum().backward()
    assert depth.grad.dtype == context.grad.dtype == dtype


def test_fused_without_a_point_in_the_grid_and_odd_channels() -> None:
    geom, depth, context = helpers.lss_case(1, 2, 4, 3, 5, 5, seed=8)
    geom[..., 1] = 40  # every point beyond y
    depth.requires_grad_(True)
    context.requires_grad_(True)
    for backend in (device.CPU, device.CUDA):
        out = vp.voxel_pooling_fused(geom, depth, context, (32, 32, 1), backend=backend)
        assert out.shape == (1, 5, 32, 32) and not out.any()
        grad_depth, grad_context = torch.autograd.grad(out.sum(), (depth, context))
        assert not grad_depth.any() and not grad_context.any()


def test_fused_without_gradients_on_cuda_takes_the_inference_entry(monkeypatch) -> None:
    geom, depth, context = helpers.lss_case(1, 2, 4, 3, 5, 8, seed=9)
    calls = []
    inference = vp.fused.voxel_pooling_inference

    def recording(*args, **kwargs):
        calls.append(args[4])
        return inference(*args, **kwargs)

    monkeypatch.setattr(vp.fused, "voxel_pooling_inference", recording)
    with torch.no_grad():
        out = vp.voxel_pooling_fused(geom, depth, context, (32, 32, 1), backend=device.CUDA)
    assert calls == [device.CUDA]
    torch.testing.assert_close(out, product_path(geom, depth, context, (32, 32, 1)))


# ---------------------------------------------------------------- the backbone and the option


def smoke_backbone_conf(**overrides):
    from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
    conf = copy.deepcopy(smoke.backbone_conf)
    conf.update(overrides)
    return conf


def test_backbone_pooling_modes() -> None:
    with pytest.raises(ValueError, match="pooling='sparse': use one of product, fused"):
        BaseLSSFPN(**smoke_backbone_conf(pooling="sparse"))
    assert BaseLSSFPN(**smoke_backbone_conf()).pooling == "product"
    assert BaseLSSFPN(**smoke_backbone_conf(pooling="fused")).pooling == "fused"
    with pytest.warns(UserWarning, match="use_da.*keeps pooling=product"):
        backbone = BaseLSSFPN(**smoke_backbone_conf(pooling="fused", use_da=True))
    assert backbone.pooling == "product"


def exp_module(name: str):
    return importlib.import_module(f"bevdepth.exps.nuscenes.{name}")


def build(name: str, tmp_path: Path, **kwargs):
    torch.manual_seed(0)
    cls = exp_module(name).BEVDepthLightningModel
    return cls(default_root_dir=str(tmp_path / "outputs"), **helpers.small_confs(), **kwargs)


def test_cli_pooling_option(tmp_path: Path) -> None:
    cls = exp_module(R50_2KEY).BEVDepthLightningModel
    parser = base_cli.build_parser(cls, "test_exp")
    assert parser.parse_args([]).pooling == "product"
    args = parser.parse_args(["--pooling", "fused"])
    assert args.pooling == "fused"
    with pytest.raises(SystemExit):
        parser.parse_args(["--pooling", "sparse"])
    kwargs = dict(vars(args), gpus=1, default_root_dir=str(tmp_path / "outputs"))
    kwargs.update(helpers.small_confs())
    module = cls(**kwargs)
    assert module.model.backbone.pooling == "fused"
    assert "pooling" not in base_exp.backbone_conf  # the module-level conf is untouched


@pytest.mark.parametrize("name,expected", [
    ("mv.bev_stereo_lss_r50_256x704_128x128_24e_2key", "fused"),
    ("fusion.bev_depth_fusion_lss_r50_256x704_128x128_24e_2key", "fused"),
    ("mv.bev_depth_lss_r50_256x704_128x128_20e_cbgs_2key_da", "product"),
    ("mv.bev_stereo_lss_r50_256x704_128x128_20e_cbgs_2key_da", "product"),
])
def test_every_family_takes_the_option(name, expected, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = build(name, tmp_path, pooling="fused")
    assert module.model.backbone.pooling == expected
    said = any("keeps pooling=product" in str(w.message) for w in caught)
    assert said == (expected == "product")


def training_step(module, batch):
    module.log = lambda *args, **kwargs: None
    module.train()
    module.zero_grad(set_to_none=True)
    loss = module.training_step(copy.deepcopy(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.slow
def test_fused_r50_step_equals_the_product_step(tmp_path: Path) -> None:
    batch = helpers.training_batch(SMALL_DIM, num_sweeps=2, num_boxes=10, seed=3)
    product = build(R50_2KEY, tmp_path)
    fused = build(R50_2KEY, tmp_path, pooling="fused")
    fused.load_state_dict(product.state_dict())
    torch.manual_seed(11)
    loss_product, grads_product = training_step(product, batch)
    torch.manual_seed(11)
    loss_fused, grads_fused = training_step(fused, batch)
    assert torch.equal(loss_fused, loss_product)  # the forward is the same, bit for bit
    assert sorted(grads_fused) == sorted(grads_product) and len(grads_fused) > 300
    names = sorted(grads_product)
    got = torch.cat([grads_fused[n].double().flatten() for n in names])
    want = torch.cat([grads_product[n].double().flatten() for n in names])
    assert helpers.norm_relative_error(got, want) <= 1e-5
    product.eval()
    fused.eval()
    with torch.no_grad():
        want_preds = helpers.flatten_preds(product.model(batch[0], batch[1]))
        got_preds = helpers.flatten_preds(fused.model(batch[0], batch[1]))
    for name in want_preds:
        assert helpers.relative_error(got_preds[name], want_preds[name]) <= 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("name,fusion", [("mv.bev_stereo_lss_r50_256x704_128x128_24e_2key", False),
                                         ("fusion.bev_depth_fusion_lss_r50_256x704_128x128_24e",
                                          True)])
def test_stereo_and_fusion_train_fused(name, fusion, tmp_path: Path) -> None:
    module = build(name, tmp_path, pooling="fused")
    frames = 1 + len(module.key_idxes) + len(module.sweep_idxes)
    batch = list(helpers.training_batch(SMALL_DIM, num_sweeps=frames, num_boxes=10, seed=4))
    if fusion:
        batch[6] = batch[6].unsqueeze(1).repeat(1, frames, 1, 1, 1)
    loss, grads = training_step(module, tuple(batch))
    assert torch.isfinite(loss) and len(grads) > 100
    assert all(torch.isfinite(g).all() for g in grads.values())
