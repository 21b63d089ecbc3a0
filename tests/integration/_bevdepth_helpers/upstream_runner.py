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
index_put_ reference (bevdepth_npu/testing.py: install_cpu_shims, pool_reference). Nothing else
of upstream is changed.
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch

# Run as a script: the repository root holds bevdepth_npu (the patched environment may have
# another checkout's copy installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bevdepth_npu.testing import flatten_preds, import_pristine, install_cpu_shims  # noqa: E402


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
    outputs["eval_preds"] = flatten_preds(preds)
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
    import_pristine(Path(source))
    install_cpu_shims()
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
