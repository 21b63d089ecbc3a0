"""The model half of bevdepth.patch: device layer, recipe flags, pretrained weights, experiment
families, EMA and the -p (predict) mode, on CPU against the patched tree in the bevdepth-npu env.

Checked:
  - bevdepth/utils/device.py: selection (BEVDEPTH_NPU_DEVICE, its old name BEVDEPTH_DEVICE,
    --device, automatic), fp32 regions under
    autocast, the optimizer, DDP backend and Lightning 1.6.5 arguments for CPU (precision 16
    falls back to 32 with one warning), tensor moves; that no file of the patched tree but the
    device module and the NPU pooling module (bevdepth/ops/voxel_pooling/npu.py) imports
    torch_npu / mx_driving, and no other calls .cuda() or names the cuda device;
  - the CLI: --learning_rate, --weight_decay, --data_root, --num_workers, --device, --pretrained
    and the classic --max_epoch parse with upstream's defaults (lr 2e-4/64 per sample, weight
    decay 1e-7 for the R50 256x704 recipes including 2key, 24 epochs, clip 5, precision 16); the
    optimizer gets lr per sample x batch x devices and MultiStepLR [19, 23];
  - offline without the ImageNet weights the run stops at start naming resnet50-0676ba61.pth and
    where to put it (no URLError traceback); --pretrained PATH replaces the download;
  - the depth loss, a masked sum without host syncs, equals upstream's boolean-mask version
    (values and gradients), stays finite where a background prediction is exactly 1, and is
    0 without foreground;
  - every experiment module imports; each family (BEVDepth 1 and 2 key frames, depth aggregation,
    BEVStereo, MatrixVT, fusion) runs one training step and one inference forward on CPU;
  - the EMA callback works without CUDA and its checkpoint loads strictly;
  - `-p` predicts upstream's sample scene and writes the nuScenes submission JSON.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_bevdepth_model.py -q
"""
from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import List
from urllib.error import URLError

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from bevdepth.exps import base_cli  # noqa: E402
from bevdepth.exps.nuscenes import base_exp  # noqa: E402
from bevdepth.utils import device, pretrained  # noqa: E402

TREE = helpers.patched_root()
SMALL_DIM = helpers.SMALL_DIM
EXPERIMENTS = sorted(
    str(p.relative_to(TREE)).replace(os.sep, ".")[:-3]
    for p in (TREE / "bevdepth" / "exps" / "nuscenes").rglob("*.py")
    if p.name != "__init__.py" and p.name != "base_exp.py")


@pytest.fixture
def fresh_device(monkeypatch):
    """The device module with no remembered choice (restored afterwards)."""
    monkeypatch.setattr(device, "_selected", None)
    monkeypatch.setattr(device, "_warned_precision", False)
    monkeypatch.delenv(device.ENV_VAR, raising=False)
    monkeypatch.delenv(device.OLD_ENV_VAR, raising=False)
    return device


# ---------------------------------------------------------------- device layer


def test_automatic_selection_is_cpu_here(fresh_device) -> None:
    assert not torch.cuda.is_available()
    assert fresh_device.device_type() == "cpu"
    assert fresh_device.current() == torch.device("cpu")
    assert fresh_device.device_count() == 1
    assert fresh_device.ddp_backend() == "gloo"
    assert fresh_device.index_dtype() == torch.int64
    assert "torch_npu" not in sys.modules and "mx_driving" not in sys.modules


def test_environment_variable_and_flag(fresh_device, monkeypatch) -> None:
    monkeypatch.setenv(device.ENV_VAR, "CPU")
    assert fresh_device.device_type() == "cpu"
    monkeypatch.setattr(device, "_selected", None)
    monkeypatch.setenv(device.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="BEVDEPTH_NPU_DEVICE='tpu'"):
        fresh_device.device_type()
    monkeypatch.setattr(device, "_selected", None)
    monkeypatch.setenv(device.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="BEVDEPTH_NPU_DEVICE=cuda"):
        fresh_device.device_type()
    with pytest.raises(RuntimeError, match="--device=npu"):
        fresh_device.select("npu")
    assert fresh_device.select("cpu") == "cpu"
    assert fresh_device.device_type() == "cpu"  # the flag wins over the environment


def test_the_old_variable_name_is_read_with_a_warning(fresh_device, monkeypatch) -> None:
    monkeypatch.setenv(device.OLD_ENV_VAR, "cpu")
    with pytest.warns(UserWarning, match="BEVDEPTH_DEVICE is an old name of BEVDEPTH_NPU_DEVICE"):
        assert fresh_device.device_type() == "cpu"


def test_both_sides_name_the_devices_and_variables_alike() -> None:
    """The patched tree cannot import bevdepth_npu; its device module spells the device names
    and the variables itself, and they must be the helper's (bevdepth_npu/devices.py,
    envvars.py), or the run layer and the experiment would decide differently."""
    from bevdepth.utils import core_binding
    from bevdepth_npu import devices, envvars
    assert device.DEVICE_TYPES == devices.DEVICES
    assert (device.ENV_VAR, device.OLD_ENV_VAR) == (envvars.DEVICE, "BEVDEPTH_DEVICE")
    assert core_binding.BIND_ENV_VAR == envvars.BIND_CORES
    assert core_binding.ALLOWED_CORES_ENV_VAR == envvars.ALLOWED_CORES
    old = {v.name: v.old_name for v in envvars.VARIABLES}
    assert old[envvars.DEVICE] == device.OLD_ENV_VAR
    assert old[envvars.BIND_CORES] == core_binding.OLD_BIND_ENV_VAR
    assert old[envvars.ALLOWED_CORES] == core_binding.OLD_ALLOWED_CORES_ENV_VAR


def test_setup_runtime_is_explicit_and_idempotent(fresh_device, monkeypatch) -> None:
    monkeypatch.setattr(device, "_runtime_ready", False)
    fresh_device.select("cpu")
    fresh_device.setup_runtime()
    fresh_device.setup_runtime()
    assert device._runtime_ready


def test_autocast_keeps_regions_fp32(fresh_device) -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)

    @device.autocast(False)
    def decorated(x, y):
        return x @ y

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with device.autocast(enabled=False):
            assert (a @ b).dtype == torch.float32
        assert decorated(a, b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16  # restored after the region
    with device.autocast(dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_optimizer_and_trainer_arguments(fresh_device) -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = fresh_device.adamw(params, lr=3e-4, weight_decay=1e-7)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["weight_decay"] == 1e-7
    with pytest.warns(UserWarning, match="precision 32"):
        kwargs = fresh_device.trainer_kwargs(1, 16)
    assert kwargs["accelerator"] == "cpu" and kwargs["precision"] == 32
    assert kwargs["devices"] == 1 and kwargs["gpus"] is None and kwargs["strategy"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh_device.trainer_kwargs(1, 16)  # said once
    kwargs = fresh_device.trainer_kwargs(2, 32)
    assert kwargs["strategy"].process_group_backend == "gloo"
    trainer = pl.Trainer(**fresh_device.trainer_kwargs(1, 16), logger=False,
                         enable_checkpointing=False, max_epochs=1)
    assert trainer.precision == 32 and trainer.num_devices == 1


def test_to_device_moves_nested_structures(fresh_device) -> None:
    batch = (torch.zeros(2), {"a": torch.ones(1), "b": [torch.ones(3)]}, [torch.zeros(1)], "x")
    moved = fresh_device.to_device(batch, torch.device("cpu"))
    assert isinstance(moved, tuple) and moved[3] == "x"
    assert isinstance(moved[1], dict) and isinstance(moved[1]["b"], list)
    assert torch.equal(moved[1]["b"][0], batch[1]["b"][0])


def python_files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


# The only modules that may import torch_npu or mx_driving (lazily, inside functions): the
# device module, and the NPU pooling module that calls DrivingSDK's kernels.
NPU_MODULES = (Path("bevdepth/utils/device.py"), Path("bevdepth/ops/voxel_pooling/npu.py"))


def test_device_specifics_only_in_device_module() -> None:
    allowed_cuda = {TREE / "bevdepth" / "ops" / "voxel_pooling_train",
                    TREE / "bevdepth" / "ops" / "voxel_pooling_inference"}
    offenders = []
    for path in python_files(TREE / "bevdepth") + python_files(TREE / "test"):
        rel = path.relative_to(TREE)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("torch_npu", "mx_driving") for n in names):
                    if rel not in NPU_MODULES:
                        offenders.append(f"{rel}:{node.lineno} imports torch_npu/mx_driving")
            if path.parent in allowed_cuda or rel == Path("bevdepth/utils/device.py"):
                continue
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "cuda"):
                offenders.append(f"{rel}:{node.lineno} calls .cuda()")
            if isinstance(node, ast.Constant) and node.value in ("cuda", "npu"):
                offenders.append(f"{rel}:{node.lineno} names {node.value!r}")
    assert offenders == []
    for module in NPU_MODULES:
        top_level = ast.parse((TREE / module).read_text()).body
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom))
                       and any(a.name.split(".")[0] in ("torch_npu", "mx_driving")
                               for a in n.names)
                       for n in top_level), f"{module}: torch_npu / mx_driving must be lazy"


# ---------------------------------------------------------------- CLI and recipe


def parse(model_class, *argv):
    parser = base_cli.build_parser(model_class, "test_exp")
    return parser.parse_args(list(argv))


def exp_module(name: str):
    return importlib.import_module(f"bevdepth.exps.nuscenes.{name}")


def test_cli_defaults_equal_upstream() -> None:
    args = parse(base_exp.BEVDepthLightningModel)
    assert args.learning_rate == 2e-4 / 64
    assert args.weight_decay == 1e-7
    assert args.data_root == "data/nuScenes"
    assert args.num_workers == 4
    assert args.device is None and args.pretrained is None
    assert args.max_epochs == 24 and args.gradient_clip_val == 5 and args.precision == 16
    assert args.seed == 0 and not args.evaluate and not args.predict


def test_cli_flags_and_classic_max_epoch() -> None:
    args = parse(base_exp.BEVDepthLightningModel, "--max_epoch", "3", "--learning_rate", "1e-5",
                 "--weight_decay", "1e-3", "--data_root", "/data/nusc", "--num_workers", "2",
                 "--device", "cpu", "--pretrained", "/w/r50.pth", "-b", "4")
    assert args.max_epochs == 3
    assert (args.learning_rate, args.weight_decay) == (1e-5, 1e-3)
    assert (args.data_root, args.num_workers, args.device) == ("/data/nusc", 2, "cpu")
    assert args.pretrained == "/w/r50.pth" and args.batch_size_per_device == 4
    assert parse(base_exp.BEVDepthLightningModel, "--max_epochs", "5").max_epochs == 5
    with pytest.raises(SystemExit):
        parse(base_exp.BEVDepthLightningModel, "--device", "tpu")


@pytest.mark.parametrize("name,lr_per_sample,weight_decay", [
    ("mv.bev_depth_lss_r50_256x704_128x128_24e_2key", 2e-4 / 64, 1e-7),
    ("mv.bev_depth_lss_r50_256x704_128x128_24e_2key_ema", 2e-4 / 64, 1e-7),
    ("mv.bev_depth_lss_r50_512x1408_128x128_24e_2key", 2e-4 / 64, 1e-3),
    ("mv.bev_stereo_lss_r50_256x704_128x128_20e_cbgs_2key_da", 2e-4 / 32, 1e-2),
])
def test_experiment_defaults_are_upstream_values(name, lr_per_sample, weight_decay) -> None:
    args = parse(exp_module(name).BEVDepthLightningModel)
    assert args.learning_rate == lr_per_sample and args.weight_decay == weight_decay


def test_count_devices() -> None:
    assert base_cli.count_devices(None, None) == 1
    assert base_cli.count_devices(None, 8) == 8
    assert base_cli.count_devices(None, "0,1,2") == 3
    assert base_cli.count_devices(4, 8) == 4
    assert base_cli.count_devices([0, 1], None) == 2


def build(cls, tmp_path: Path, **kwargs):
    torch.manual_seed(0)
    return cls(default_root_dir=str(tmp_path / "outputs"), **helpers.small_confs(), **kwargs)


@pytest.mark.slow
def test_optimizer_recipe(tmp_path: Path) -> None:
    cls = exp_module("mv.bev_depth_lss_r50_256x704_128x128_24e_2key").BEVDepthLightningModel
    args = parse(cls, "--gpus", "8", "-b", "8")
    kwargs = dict(vars(args), gpus=base_cli.count_devices(args.devices, args.gpus))
    kwargs.update(helpers.small_confs())
    kwargs["default_root_dir"] = str(tmp_path / "outputs")
    module = cls(**kwargs)
    (optimizer, ), (scheduler, ) = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == pytest.approx(2e-4 / 64 * 8 * 8)
    assert optimizer.defaults["weight_decay"] == 1e-7
    assert sorted(scheduler.milestones) == [19, 23]
    assert module.num_workers == 4 and module.data_root == "data/nuScenes"


# ---------------------------------------------------------------- pretrained weights


def test_torchvision_resnet50_resolves_to_v1_file() -> None:
    url = pretrained.torchvision_checkpoint_url("resnet50")
    assert url.endswith("/resnet50-0676ba61.pth")


def test_offline_without_weights_names_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(pretrained.PretrainedWeightsError) as info:
        pretrained.resolve_backbone_weights(base_exp.backbone_conf)
    message = str(info.value)
    expected_dir = tmp_path / "torch" / "hub" / "checkpoints"
    assert "resnet50-0676ba61.pth" in message and str(expected_dir) in message
    assert "--pretrained" in message and "TORCH_HOME" in message
    with pytest.raises(pretrained.PretrainedWeightsError):
        base_exp.BEVDepthLightningModel(default_root_dir=str(tmp_path / "outputs"))


def test_cached_or_given_weights_need_no_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must not download"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert pretrained.resolve_backbone_weights(base_exp.backbone_conf) is base_exp.backbone_conf
    given = tmp_path / "r50.pth"
    given.write_bytes(b"weights")
    conf = pretrained.resolve_backbone_weights(base_exp.backbone_conf, str(given))
    assert conf["img_backbone_conf"]["init_cfg"]["checkpoint"] == str(given)
    assert base_exp.backbone_conf["img_backbone_conf"]["init_cfg"]["checkpoint"] == \
        "torchvision://resnet50"  # the shared config is not modified
    with pytest.raises(pretrained.PretrainedWeightsError, match="no such file"):
        pretrained.resolve_backbone_weights(base_exp.backbone_conf, str(tmp_path / "missing"))


OFFLINE_DRIVER = """
import runpy, sys, torch
from urllib.error import URLError
def no_network(url, dst, *args, **kwargs):
    raise URLError('[Errno -3] Temporary failure in name resolution')
torch.hub.download_url_to_file = no_network
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module('bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key',
                 run_name='__main__')
"""


@pytest.mark.slow
def test_cli_stops_at_start_without_weights(tmp_path: Path) -> None:
    env = helpers.subprocess_env()
    env["TORCH_HOME"] = str(tmp_path / "torch")
    proc = subprocess.run([sys.executable, "-c", OFFLINE_DRIVER, "exp", "--device", "cpu",
                           "--data_root", str(tmp_path / "nodata")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "resnet50-0676ba61.pth" in proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- experiment families


def _upstream_depth_loss(depth_labels, depth_preds):
    """Upstream's get_depth_loss after the downsampling (BEVDepth d78c7b5, base_exp.py)."""
    fg_mask = torch.max(depth_labels, dim=1).values > 0.0
    return 3.0 * (torch.nn.functional.binary_cross_entropy(
        depth_preds[fg_mask], depth_labels[fg_mask], reduction='none').sum() /
        max(1.0, fg_mask.sum()))


@pytest.mark.parametrize("foreground", [0.3, 0.0])
def test_depth_loss_equals_upstreams_without_reading_the_count(foreground) -> None:
    # the port sums over all rows with the background weighted 0 (no boolean-mask indexing,
    # no max(1.0, count) on the host); background rows whose prediction is exactly 1 (log(1-p)
    # = -inf unclamped) must not turn the loss or its gradient into nan
    bins, rows = 12, 400
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, bins, 10, 20, generator=gen) * 4
    logits[:, 5, :2] = 300.0  # softmax gives exactly 1.0 there
    labels = torch.zeros(rows, bins)
    fg = torch.rand(rows, generator=gen) < foreground
    labels[fg, torch.randint(0, bins, (rows,), generator=gen)[fg]] = 1.0
    model = types.SimpleNamespace(depth_channels=bins, get_downsampled_gt_depth=lambda x: x)
    losses, grads = [], []
    port = base_exp.BEVDepthLightningModel.get_depth_loss
    for loss_of in (lambda lab, pred: port(model, lab, pred),
                    lambda lab, pred: _upstream_depth_loss(
                        lab, pred.permute(0, 2, 3, 1).reshape(-1, bins))):
        preds = logits.softmax(1).requires_grad_()
        loss = loss_of(labels, preds)
        loss.backward()
        losses.append(loss.detach())
        grads.append(preds.grad)
    assert torch.isfinite(losses[0]) and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)
    if not fg.any():
        assert losses[0] == 0 and not grads[0].any()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_module_imports(name: str) -> None:
    module = importlib.import_module(name)
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, base_exp.BEVDepthLightningModel)]
    assert classes, f"{name} defines no BEVDepthLightningModel"


def family_batch(module, fusion: bool, seed: int = 0):
    frames = 1 + len(module.key_idxes) + len(module.sweep_idxes)
    imgs, mats, timestamps, metas, boxes, labels, depth = helpers.training_batch(
        SMALL_DIM, num_sweeps=frames, num_boxes=10, seed=seed)
    if fusion:
        depth = depth.unsqueeze(1).repeat(1, frames, 1, 1, 1)
    return (imgs, mats, timestamps, metas, boxes, labels, depth)


FAMILIES = [
    ("mv.bev_depth_lss_r50_256x704_128x128_24e_ema", "BEVDepthLightningModel", False),
    ("mv.bev_depth_lss_r50_256x704_128x128_24e_2key", "BEVDepthLightningModel", False),
    ("mv.bev_depth_lss_r50_256x704_128x128_20e_cbgs_2key_da", "BEVDepthLightningModel", False),
    ("mv.bev_stereo_lss_r50_256x704_128x128_24e_2key", "BEVDepthLightningModel", False),
    ("mv.bev_stereo_lss_r50_256x704_128x128_24e_key4", "BEVDepthLightningModel", False),
    ("mv.bev_stereo_lss_r50_256x704_128x128_20e_cbgs_2key_da", "BEVDepthLightningModel",
     False),
    ("MatrixVT.matrixvt_bev_depth_lss_r50_256x704_128x128_24e_ema", "MatrixVT_Exp", False),
    ("fusion.bev_depth_fusion_lss_r50_256x704_128x128_24e", "BEVDepthLightningModel", True),
    ("fusion.bev_depth_fusion_lss_r50_256x704_128x128_24e_2key", "BEVDepthLightningModel",
     True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,class_name,fusion", FAMILIES)
def test_family_trains_and_infers_on_cpu(name, class_name, fusion, tmp_path: Path) -> None:
    cls = getattr(exp_module(name), class_name)
    module = build(cls, tmp_path)
    batch = family_batch(module, fusion)
    logged = {}
    module.log = lambda key, value, *args, **kwargs: logged.__setitem__(key, value.detach())
    module.train()
    loss = module.training_step(copy.deepcopy(batch))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert len(grads) > 100 and all(torch.isfinite(g).all() for g in grads)
    assert "detection_loss" in logged
    module.eval()
    with torch.no_grad():
        preds = module.model(*([batch[0], batch[1]] + ([batch[6]] if fusion else [])))
    flat = helpers.flatten_preds(preds)
    assert flat["task0.heatmap"].shape[-2:] == (128, 128)
    assert all(torch.isfinite(v).all() for v in flat.values())


@pytest.mark.slow
def test_high_resolution_variants_build(tmp_path: Path) -> None:
    for name, dim in (("mv.bev_depth_lss_r50_512x1408_128x128_24e_2key", (512, 1408)),
                      ("mv.bev_depth_lss_r50_640x1600_128x128_24e_2key", (640, 1600))):
        module = build(exp_module(name).BEVDepthLightningModel, tmp_path)
        assert tuple(module.model.backbone.final_dim) == dim
        (optimizer, ), _ = module.configure_optimizers()
        assert optimizer.defaults["weight_decay"] == 1e-3


@pytest.mark.slow
def test_ema_callback_on_cpu(tmp_path: Path) -> None:
    from bevdepth.callbacks.ema import EMACallback
    cls = exp_module("mv.bev_depth_lss_r50_256x704_128x128_24e_ema").BEVDepthLightningModel
    module = build(cls, tmp_path)
    trainer = types.SimpleNamespace(model=module, current_epoch=0, global_step=1,
                                    log_dir=str(tmp_path))
    callback = EMACallback(len_updates=10)
    callback.on_fit_start(trainer, module)
    name, param = next(iter(module.model.named_parameters()))
    before = trainer.ema_model.ema.state_dict()[name].clone()
    with torch.no_grad():
        param.add_(1.0)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    after = trainer.ema_model.ema.state_dict()[name]
    assert not torch.equal(before, after) and not torch.equal(after, param)
    # The average is the callback's checkpoint state (no <epoch>.pth side files any more; the
    # resume, DDP and evaluation of EMA runs are in test_ema.py), and loads strictly.
    state = callback.state_dict()
    assert state["updates"] == 11 and not list(tmp_path.glob("*.pth"))
    fresh = build(cls, tmp_path)
    fresh.model.load_state_dict(state["ema_state_dict"], strict=True)


# ---------------------------------------------------------------- -p (predict) mode


def sample_data_root(tmp_path: Path) -> Path:
    """Upstream's one-sample scene (test/data/nuscenes) as a test split."""
    source = TREE / "test" / "data" / "nuscenes"
    root = tmp_path / "nuScenes"
    root.mkdir()
    os.symlink(source / "samples", root / "samples")
    for split in ("test", "val", "train"):
        shutil.copy(source / "infos.pkl", root / f"nuscenes_infos_{split}.pkl")
    return root


@pytest.mark.slow
def test_predict_mode_writes_submission_json(tmp_path: Path) -> None:
    import torchvision
    root = sample_data_root(tmp_path)
    exp_name = "mv.bev_depth_lss_r50_256x704_128x128_24e_2key"
    cls = exp_module(exp_name).BEVDepthLightningModel
    confs = helpers.small_confs((256, 704))
    torch.manual_seed(0)
    module = cls(default_root_dir=str(tmp_path / "build"), **confs)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ckpt = ckpt_dir / "epoch=0.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__,
                "epoch": 0, "global_step": 0}, ckpt)
    weights = tmp_path / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    env = helpers.subprocess_env()
    env["TORCH_HOME"] = str(tmp_path / "torch")
    proc = subprocess.run(
        [sys.executable, "-m", f"bevdepth.exps.nuscenes.{exp_name}", "-p", "--ckpt_path",
         str(ckpt), "--data_root", str(root), "--device", "cpu", "-b", "1", "--num_workers",
         "0", "--pretrained", str(weights), "--default_root_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "precision 32" in proc.stderr  # precision 16 fell back on CPU, said once
    results = json.loads((ckpt_dir / "results_nusc.json").read_text())
    token = sample_token(root)
    assert list(results["results"]) == [token]
    assert results["meta"]["use_camera"] is True
    for box in results["results"][token]:
        assert box["sample_token"] == token and len(box["translation"]) == 3


def sample_token(root: Path) -> str:
    import pickle
    with open(root / "nuscenes_infos_test.pkl", "rb") as f:
        return pickle.load(f)[0]["sample_token"]
