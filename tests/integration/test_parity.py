"""Parity of the patched BEVDepth model with pristine upstream, on CPU.

The pristine checkout (``bevdepth-npu fetch bevdepth``) runs in a subprocess
(_bevdepth_helpers/upstream_runner.py: upstream's CUDA pooling replaced by a reference, ``.cuda()``
mapped to the CPU, nothing else changed) and saves what it computes; the patched tree, imported
from the bevdepth-npu env, computes the same here. Checked:
  - get_geometry equals upstream's within 1e-5 relative, fp32 and float64;
  - BEVDepthHead.get_targets gives identical targets;
  - upstream's state dict loads into the patched 2key R50 model with strict=True;
  - from those weights (random init with a fixed seed, no pretrained download), one fp32
    inference forward gives the same head outputs and one fp32 training step (batch 1, two key
    frames, 128x352 images) the same detection and depth losses and gradients (1e-4 relative),
    with the experiments' --pooling product and --pooling fused alike.
Both sides run on one CPU thread: with two, upstream's own float32 gradients differ by 4e-5 to
1.2e-4 (norm) between two identical runs (measured), as large as the tolerance; on one thread
two upstream runs, and the port against upstream, measured exactly equal.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_parity.py -q
"""
from __future__ import annotations

import copy
import os
import types
from pathlib import Path
from typing import Dict

import pytest

from tests.conftest import require_source
from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth.exps.nuscenes import base_exp  # noqa: E402
from bevdepth.exps.nuscenes.mv import \
    bev_depth_lss_r50_256x704_128x128_24e_2key as exp_2key  # noqa: E402
from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN  # noqa: E402
from bevdepth.layers.heads.bev_depth_head import BEVDepthHead  # noqa: E402

FINAL_DIM = (128, 352)  # half of the recipe's 256x704: same code path, a quarter of the time
GEOMETRY_CASES = {
    "fp32_b1": dict(batch=1, dtype=torch.float32, seed=1),
    "fp32_b8": dict(batch=8, dtype=torch.float32, seed=2),
    "fp64_b2": dict(batch=2, dtype=torch.float64, seed=3),
}
D_BOUND = [2.0, 58.0, 0.5]


def geometry_inputs() -> Dict[str, dict]:
    cases = {}
    for key, case in GEOMETRY_CASES.items():
        cases[key] = dict(final_dim=(256, 704), downsample_factor=16, d_bound=D_BOUND,
                          dtype=case["dtype"],
                          mats=helpers.camera_mats(case["batch"], 1, (256, 704), case["seed"],
                                                   dtype=case["dtype"]))
    return cases


def target_inputs():
    sizes = [(30, 4), (0, 5), (7, 6), (120, 7)]  # one sample without boxes
    boxes, labels = [], []
    for num_boxes, seed in sizes:
        b, lab = helpers.gt_boxes(num_boxes, seed)
        boxes.append(b)
        labels.append(lab)
    return boxes, labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread here and in the upstream subprocess: a fixed order of every sum."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict:
    source = require_source("bevdepth")
    work = tmp_path_factory.mktemp("parity")
    inputs = dict(
        geometry=geometry_inputs(),
        targets=target_inputs(),
        model=dict(seed=7, forward_seed=11, root_dir=str(work / "upstream_outputs"),
                   backbone_overrides=dict(final_dim=FINAL_DIM),
                   batch=helpers.training_batch(FINAL_DIM, num_sweeps=2, seed=5)),
    )
    torch.save(inputs, work / "inputs.pt")
    helpers.run_upstream(source, work / "inputs.pt", work / "outputs.pt",
                         ["geometry", "targets", "model"])
    outputs = torch.load(work / "outputs.pt")
    assert str(Path(outputs["bevdepth_file"]).resolve()).startswith(str(source.resolve()))
    outputs["inputs"] = inputs
    outputs["work"] = work
    return outputs


def patched_geometry(case: dict):
    owner = types.SimpleNamespace(final_dim=case["final_dim"],
                                  downsample_factor=case["downsample_factor"],
                                  d_bound=case["d_bound"])
    owner.frustum = BaseLSSFPN.create_frustum(owner).to(case["dtype"])
    mats = case["mats"]
    return owner.frustum, BaseLSSFPN.get_geometry(owner, mats["sensor2ego_mats"][:, 0],
                                                  mats["intrin_mats"][:, 0],
                                                  mats["ida_mats"][:, 0], mats["bda_mat"])


@pytest.mark.parametrize("key", sorted(GEOMETRY_CASES))
def test_get_geometry_matches_upstream(upstream: dict, key: str) -> None:
    case = upstream["inputs"]["geometry"][key]
    frustum, points = patched_geometry(case)
    expected = upstream[f"geometry.{key}"]
    assert torch.equal(frustum, upstream[f"frustum.{key}"])
    assert points.dtype == expected.dtype == case["dtype"]
    assert points.shape == expected.shape == (GEOMETRY_CASES[key]["batch"], 6, 112, 16, 44, 3)
    assert helpers.relative_error(points, expected) <= 1e-5
    # Realistic matrices: most frustum points land in the 102.4 m BEV square.
    inside = (expected[..., :2].abs() < 51.2).all(-1).double().mean().item()
    assert inside > 0.5


def test_get_geometry_bda_none_matches_composition() -> None:
    """Without bda the composed matrix is sensor2ego . intrin^-1 alone."""
    case = geometry_inputs()["fp64_b2"]
    frustum, with_eye = patched_geometry(case)
    owner = types.SimpleNamespace(frustum=frustum)
    mats = case["mats"]
    without = BaseLSSFPN.get_geometry(owner, mats["sensor2ego_mats"][:, 0],
                                      mats["intrin_mats"][:, 0], mats["ida_mats"][:, 0], None)
    eye = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    with_identity = BaseLSSFPN.get_geometry(owner, mats["sensor2ego_mats"][:, 0],
                                            mats["intrin_mats"][:, 0], mats["ida_mats"][:, 0],
                                            eye)
    assert helpers.relative_error(without, with_identity) <= 1e-12
    assert helpers.relative_error(without, with_eye) > 1e-3  # bda does something


def test_head_targets_identical_to_upstream(upstream: dict) -> None:
    head = BEVDepthHead(**copy.deepcopy(base_exp.head_conf))
    boxes, labels = upstream["inputs"]["targets"]
    targets = head.get_targets(boxes, labels)
    expected = upstream["targets"]
    names = ("heatmaps", "anno_boxes", "inds", "masks")
    for name, got, want in zip(names, targets, expected):
        assert len(got) == len(want) == 6, name
        for task, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype, (name, task, g.dtype, w.dtype)
            assert g.device == w.device
            assert torch.equal(g, w), (name, task)
    assert sum(int(m.sum()) for m in targets[3]) > 20  # boxes were drawn


@pytest.fixture(scope="module", params=["product", "fused"])
def patched_model(upstream: dict, request):
    backbone_conf = copy.deepcopy(base_exp.backbone_conf)
    backbone_conf.update(final_dim=FINAL_DIM)
    backbone_conf["img_backbone_conf"]["init_cfg"] = None
    torch.manual_seed(1234)  # a different random init: the state dict must overwrite it all
    module = exp_2key.BEVDepthLightningModel(backbone_conf=backbone_conf,
                                             head_conf=copy.deepcopy(base_exp.head_conf),
                                             default_root_dir=str(upstream["work"] / "patched"),
                                             pooling=request.param)
    assert module.model.backbone.pooling == request.param
    module.load_state_dict(upstream["state_dict"], strict=True)
    return module


def test_upstream_state_dict_loads_strictly(patched_model, upstream: dict) -> None:
    state = patched_model.state_dict()
    assert sorted(state) == sorted(upstream["state_dict"])
    for name, value in upstream["state_dict"].items():
        assert state[name].shape == value.shape, name
        assert torch.equal(state[name], value), name


def test_training_step_matches_upstream(patched_model, upstream: dict) -> None:
    module = patched_model
    module.load_state_dict(upstream["state_dict"], strict=True)
    logged = {}
    module.log = lambda name, value, *args, **kwargs: logged.__setitem__(name, value.detach())
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(upstream["inputs"]["model"]["forward_seed"])
    loss = module.training_step(copy.deepcopy(upstream["inputs"]["model"]["batch"]))
    loss.backward()
    for name, value in (("loss", loss.detach()), ("detection_loss", logged["detection_loss"]),
                        ("depth_loss", logged["depth_loss"])):
        error = helpers.relative_error(value, upstream[name])
        assert error <= 1e-4, (name, value, upstream[name])
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(upstream["grads"])
    assert len(grads) > 300
    expected = upstream["grads"]
    everything = torch.cat([expected[n].double().flatten() for n in sorted(expected)])
    got = torch.cat([grads[n].double().flatten() for n in sorted(expected)])
    assert helpers.norm_relative_error(got, everything) <= 1e-4
    # Per tensor, relative to its own norm; a gradient that is zero in exact arithmetic (a conv
    # bias right before BatchNorm) holds only rounding noise and is measured against 1e-3 of
    # the whole gradient's norm instead.
    floor = 1e-3 * torch.linalg.vector_norm(everything).item()
    worst = max((torch.linalg.vector_norm(grads[n].double() - expected[n].double()).item() /
                 max(torch.linalg.vector_norm(expected[n].double()).item(), floor), n)
                for n in grads)
    assert worst[0] <= 1e-4, worst


def test_inference_forward_matches_upstream(patched_model, upstream: dict) -> None:
    module = patched_model
    module.load_state_dict(upstream["state_dict"], strict=True)
    module.eval()
    batch = copy.deepcopy(upstream["inputs"]["model"]["batch"])
    with torch.no_grad():
        preds = helpers.flatten_preds(module.model(batch[0], batch[1]))
    expected = upstream["eval_preds"]
    assert sorted(preds) == sorted(expected)
    for name in preds:
        assert helpers.relative_error(preds[name], expected[name]) <= 1e-4, name
