"""Run pristine upstream BEVDepth code on CPU and save what it computes (parity tests' oracle).

    python upstream_runner.py SOURCE INPUTS.pt OUTPUTS.pt TASK [TASK ...]

SOURCE is the pristine checkout (``bevdepth-npu fetch bevdepth``); INPUTS.pt is written by
tests/integration/test_parity.py. Tasks:
  geometry  BaseLSSFPN.get_geometry on the given matrices (fp32 and float64)
  targets   BEVDepthHead.get_targets of the R50 recipe on the given boxes
  model     build the 2key R50 Lightning model with a fixed seed, save its state dict, one
            inference forward (head outputs) and one training step (losses, gradients)

Upstream needs CUDA; to run it here, and only here, this script (1) maps ``.cuda()`` and
``device='cuda'`` to the CPU and (2) replaces the two compiled voxel-pooling extensions with an
index_put_ reference (tests/integration/_bevdepth_helpers.pool_reference). Nothing else of
upstream is changed.
"""
from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch

HELPERS = Path(__file__).resolve().parent


def load_helpers():
    spec = importlib.util.spec_from_file_location("_bevdepth_helpers", HELPERS / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install_cpu_shims(helpers) -> None:
    """Let CUDA-only upstream code run on a CPU-only torch."""

    def to_cpu(device):
        return "cpu" if device is not None and "cuda" in str(device) else device

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    new_zeros = torch.Tensor.new_zeros

    def new_zeros_cpu(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_cpu(kwargs["device"])
        return new_zeros(self, *args, **kwargs)

    torch.Tensor.new_zeros = new_zeros_cpu
    tensor = torch.tensor

    def tensor_cpu(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_cpu(kwargs["device"])
        return tensor(*args, **kwargs)

    torch.tensor = tensor_cpu

    def voxel_pooling_train(geom_xyz, features, voxel_num):
        batch = features.shape[0]
        return helpers.pool_reference(geom_xyz.reshape(batch, -1, 3),
                                      features.reshape(batch, -1, features.shape[-1]),
                                      [int(v) for v in voxel_num])

    def voxel_pooling_inference(geom_xyz, depth, context, voxel_num):
        product = depth.unsqueeze(1) * context.unsqueeze(2)  # (B*cams, C, D, H, W)
        batch, cams = geom_xyz.shape[:2]
        product = product.reshape(batch, cams, *product.shape[1:]).permute(0, 1, 3, 4, 5, 2)
        return voxel_pooling_train(geom_xyz, product, voxel_num)

    for name, func in (("voxel_pooling_train", voxel_pooling_train),
                       ("voxel_pooling_inference", voxel_pooling_inference)):
        module = types.ModuleType(f"bevdepth.ops.{name}")
        setattr(module, name, func)
        sys.modules[module.__name__] = module


def import_pristine(source: Path) -> None:
    """Make ``bevdepth`` the pristine checkout's package, whatever else is on sys.path (the
    patched tree may be installed in this environment)."""
    package_dir = source / "bevdepth"
    spec = importlib.machinery.ModuleSpec("bevdepth", None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(package_dir)]
    sys.modules["bevdepth"] = package
    ops = importlib.machinery.ModuleSpec("bevdepth.ops", None, is_package=True)
    ops_module = importlib.util.module_from_spec(ops)
    ops_module.__path__ = [str(package_dir / "ops")]
    sys.modules["bevdepth.ops"] = ops_module


def task_geometry(inputs, outputs) -> None:
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN
    for key, case in inputs["geometry"].items():
        frustum_owner = types.SimpleNamespace(final_dim=case["final_dim"],
                                              downsample_factor=case["downsample_factor"],
                                              d_bound=case["d_bound"])
        frustum = BaseLSSFPN.create_frustum(frustum_owner).to(case["dtype"])
        owner = types.SimpleNamespace(frustum=frustum)
        mats = case["mats"]
        outputs[f"geometry.{key}"] = BaseLSSFPN.get_geometry(
            owner, mats["sensor2ego_mats"][:, 0], mats["intrin_mats"][:, 0],
            mats["ida_mats"][:, 0], mats["bda_mat"])
        outputs[f"frustum.{key}"] = frustum


def task_targets(inputs, outputs) -> None:
    from bevdepth.exps.nuscenes import base_exp
    from bevdepth.layers.heads.bev_depth_head import BEVDepthHead
    head_conf = copy.deepcopy(base_exp.head_conf)
    head = BEVDepthHead(**head_conf)
    boxes, labels = inputs["targets"]
    outputs["targets"] = head.get_targets(boxes, labels)


def task_model(inputs, outputs) -> None:
    from bevdepth.exps.nuscenes import base_exp
    from bevdepth.exps.nuscenes.mv import bev_depth_lss_r50_256x704_128x128_24e_2key as exp
    spec = inputs["model"]
    backbone_conf = copy.deepcopy(base_exp.backbone_conf)
    backbone_conf.update(spec["backbone_overrides"])
    backbone_conf["img_backbone_conf"]["init_cfg"] = None
    torch.manual_seed(spec["seed"])
    module = exp.BEVDepthLightningModel(backbone_conf=backbone_conf,
                                        head_conf=copy.deepcopy(base_exp.head_conf),
                                        default_root_dir=spec["root_dir"])
    outputs["state_dict"] = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    batch = copy.deepcopy(spec["batch"])
    with torch.no_grad():
        preds = module.model(batch[0], batch[1])
    outputs["eval_preds"] = load_helpers().flatten_preds(preds)
    logged = {}
    module.log = lambda name, value, *args, **kwargs: logged.__setitem__(name, value.detach())
    module.train()
    torch.manual_seed(spec["forward_seed"])
    loss = module.training_step(copy.deepcopy(spec["batch"]))
    loss.backward()
    outputs["loss"] = loss.detach()
    outputs["detection_loss"] = logged["detection_loss"]
    outputs["depth_loss"] = logged["depth_loss"]
    outputs["grads"] = {name: p.grad.clone() for name, p in module.named_parameters()
                        if p.grad is not None}


def main(argv) -> int:
    source, inputs_path, outputs_path, *tasks = argv
    helpers = load_helpers()
    import_pristine(Path(source))
    install_cpu_shims(helpers)
    import bevdepth.layers.backbones.base_lss_fpn as lss
    assert str(Path(lss.__file__).resolve()).startswith(str(Path(source).resolve())), lss.__file__
    inputs = torch.load(inputs_path)
    outputs = {"bevdepth_file": lss.__file__}
    for task in tasks:
        {"geometry": task_geometry, "targets": task_targets, "model": task_model}[task](
            inputs, outputs)
    tmp = f"{outputs_path}.tmp"
    torch.save(outputs, tmp)
    Path(tmp).replace(outputs_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
