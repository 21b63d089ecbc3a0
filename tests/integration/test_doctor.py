"""``bevdepth-npu doctor``: every check runs for real on CPU in the environment; broken
environments fail with their cause; the NPU branch runs through the DrivingSDK contract.

Checked:
  - `doctor --device cpu --data-root DIR --full --json F` on the synthetic nuScenes: exit 0, a
    line per check, the JSON record, nothing left behind in the working directory;
  - broken environments, each one FAIL that names the cause (exit 1): Lightning's patch reverted
    (a pristine copy first on the path), a foreign torch version (its metadata first on the
    path), mmcv without its compiled ops (a copy without _ext), a missing info file, a truncated
    camera image (named by --full);
  - the NPU checks over the DrivingSDK wrapper and its CPU double: where the op lives (v7, v6,
    none), pooling in fp32 / fp16 / bf16 passes, and a dispatch that hands bf16 to the op (what
    the port did before) is a FAIL with aclnn's cause; the CANN version from its install record;
  - --pooling fused: the fused-pooling check passes on CPU and over the bev_pool_v3 wrapper and
    its double (naming where the op lives), and fails when the dispatch hands fp16 or a channel
    count that is not a multiple of 8 to the op.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_doctor.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth_npu.doctor import compute, report, stack  # noqa: E402
from tests.integration import mx_driving_double as double  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def doctor(*args: str, cwd: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = helpers.subprocess_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "bevdepth_npu", "doctor", "--device", "cpu",
                           *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def lines(proc: subprocess.CompletedProcess) -> Dict[str, str]:
    """check name -> its line."""
    found = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (report.PASS, report.FAIL, report.SKIP):
            found[parts[1]] = line
    return found


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("doctor") / "nuscenes"
    bevdepth_root = helpers.patched_root()
    for command in ([sys.executable, "-m", "bevdepth_npu", "synth", "--out", str(root),
                     "--scenes", "2", "--samples-per-scene", "3", "--quiet"],
                    [sys.executable, "scripts/gen_info.py", "--data-root", str(root),
                     "--version", "v1.0-mini"]):
        proc = subprocess.run(command, cwd=bevdepth_root, env=helpers.subprocess_env(),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


@pytest.mark.slow
def test_every_check_passes_on_cpu_and_leaves_only_the_json(synth_root, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = doctor("--data-root", str(synth_root), "--full", "--json", "out/doctor.json",
                  cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    for name in ("stack.torch", "stack.mmcv", "stack.lightning", "patch.bevdepth",
                 "patch.lightning", "patch.mmdetection3d", "device.start",
                 "compute.pooling.float32", "compute.pooling.float16", "compute.pooling.bfloat16",
                 "compute.geometry", "compute.optimizer", "compute.smoke_step", "dist.collective",
                 "data.info_files", "data.sample", "data.depth_gt", "data.every_file"):
        assert found.get(name, "").startswith("PASS"), (name, proc.stdout)
    assert found["compute.grad_scaler"].startswith("SKIP")
    assert "mmcv - INFO" not in proc.stdout + proc.stderr  # the init dump stays off the console
    record = json.loads((work / "out" / "doctor.json").read_text())
    assert record["ok"] is True and record["device"] == "cpu"
    assert {c["name"] for c in record["checks"]} >= set(found)
    assert sorted(p.name for p in work.rglob("*")) == ["doctor.json", "out"]


@pytest.mark.slow
def test_quick_mode_skips_the_model_step_and_the_collective(tmp_path) -> None:
    proc = doctor("--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert "compute.pooling.bfloat16" in found and "compute.smoke_step" not in found
    assert "dist.collective" not in found


@pytest.mark.slow
def test_pooling_fused_adds_the_fused_check(tmp_path) -> None:
    proc = doctor("--quick", "--pooling", "fused", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lines(proc)
    assert found.get("compute.pooling.fused", "").startswith("PASS"), proc.stdout
    assert "context grad" in found["compute.pooling.fused"]
    assert "compute.pooling.fused" not in lines(doctor("--quick", cwd=tmp_path))


def _fails_with(proc: subprocess.CompletedProcess, name: str, *words: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = lines(proc).get(name, "")
    assert line.startswith("FAIL"), (name, proc.stdout)
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.mark.slow
def test_reverted_lightning_patch_fails(tmp_path) -> None:
    import pytorch_lightning
    shadow = tmp_path / "site"
    shutil.copytree(Path(pytorch_lightning.__file__).parent, shadow / "pytorch_lightning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    revert = subprocess.run([sys.executable, "-m", "bevdepth_npu", "apply", "lightning",
                             "--revert", "--into", str(shadow / "pytorch_lightning")],
                            cwd=REPO, capture_output=True, text=True)
    assert revert.returncode == 0, revert.stderr
    proc = doctor("--quick", cwd=tmp_path, pythonpath=str(shadow))
    _fails_with(proc, "patch.lightning", "pristine: the patch is not applied")


@pytest.mark.slow
def test_foreign_torch_version_fails(tmp_path) -> None:
    info = tmp_path / "site" / "torch-2.2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.2.0\n")
    proc = doctor("--quick", cwd=tmp_path, pythonpath=str(tmp_path / "site"))
    _fails_with(proc, "stack.torch", "torch 2.2.0 is installed; the pin is 2.1.0")


@pytest.mark.slow
def test_mmcv_without_its_ops_fails(tmp_path) -> None:
    import mmcv
    shadow = tmp_path / "site"
    shutil.copytree(Path(mmcv.__file__).parent, shadow / "mmcv",
                    ignore=shutil.ignore_patterns("__pycache__", "_ext*.so"))
    proc = doctor("--quick", cwd=tmp_path, pythonpath=str(shadow))
    _fails_with(proc, "stack.mmcv", "compiled ops do not load")


@pytest.mark.slow
def test_missing_info_file_and_truncated_image_fail(synth_root, tmp_path) -> None:
    root = tmp_path / "nuscenes"
    shutil.copytree(synth_root, root)
    (root / "nuscenes_infos_val.pkl").unlink()
    proc = doctor("--quick", "--data-root", str(root), cwd=tmp_path)
    _fails_with(proc, "data.info_files", str(root / "nuscenes_infos_val.pkl"), "is missing")
    shutil.copy(synth_root / "nuscenes_infos_val.pkl", root)
    image = next((root / "samples" / "CAM_BACK").iterdir())
    image.write_bytes(image.read_bytes()[:2000])
    proc = doctor("--quick", "--data-root", str(root), "--full", "--json", "d.json",
                  cwd=tmp_path)
    _fails_with(proc, "data.every_file", "1 of", str(image), "truncated")
    record = json.loads((tmp_path / "d.json").read_text())
    (bad,) = [c for c in record["checks"] if c["name"] == "data.every_file"]
    assert [path for path, _ in bad["files"]] == [str(image)]


# ---------------------------------------------------------------- the NPU branch, by contract

@pytest.fixture
def npu_double(monkeypatch):
    """DrivingSDK's wrapper over the double as mx_driving; torch_npu's import left out (the
    double needs none)."""
    from bevdepth.utils import device

    def install(layout="v7"):
        mx = double.install(monkeypatch, layout)
        monkeypatch.setattr(device, "import_npu_stack", lambda: None)
        return mx
    return install


@pytest.mark.parametrize("layout,where", [("v7", "mx_driving.npu_voxel_pooling_train"),
                                          ("v6", "mx_driving.point.npu_voxel_pooling_train")])
def test_npu_op_location_is_reported(npu_double, layout, where) -> None:
    npu_double(layout)
    assert stack.check_mx_driving().endswith(f"voxel pooling at {where}")


def test_npu_release_without_the_op_fails_naming_the_release(npu_double) -> None:
    npu_double("none")
    with pytest.raises(report.Fail) as failed:
        stack.check_mx_driving()
    assert "has no npu_voxel_pooling_train" in failed.value.cause
    assert "branch_v7.0.RC1" in failed.value.hint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_npu_pooling_checks_pass_through_the_wrapper(npu_double, dtype) -> None:
    mx = npu_double()
    detail = compute.check_pooling(compute.Target("npu", double.to_npu), dtype)
    assert "backward exact" in detail
    assert len([c for c in mx.calls if c[0] == "forward"]) == 2  # N=120,000: two chunks


def test_npu_pooling_check_catches_bf16_handed_to_the_op(npu_double, monkeypatch) -> None:
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    mx = npu_double()
    monkeypatch.setattr(npu_pooling, "voxel_pooling", lambda geom, features, grid:
                        mx.npu_voxel_pooling_train(geom.int(), features, list(grid)))
    with pytest.raises(RuntimeError, match="input_features has dtype torch.bfloat16"):
        compute.check_pooling(compute.Target("npu", double.to_npu), torch.bfloat16)
    result = report.Report(stream=open(os.devnull, "w")).run(
        "compute.pooling.bfloat16",
        lambda: compute.check_pooling(compute.Target("npu", double.to_npu), torch.bfloat16))
    assert result.status == report.FAIL and "aclnnVoxelPoolingTrain" in result.detail


def test_cann_version_comes_from_the_install_record(tmp_path, monkeypatch) -> None:
    import platform
    record = tmp_path / "latest" / f"{platform.machine()}-linux" / "ascend_toolkit_install.info"
    record.parent.mkdir(parents=True)
    record.write_text("package_name=Ascend-cann-toolkit\nversion=8.1.RC1\narch=x\n")
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", str(tmp_path / "latest"))
    assert stack.check_cann().startswith("8.1.RC1")


def test_npu_fused_pooling_check_passes_through_the_wrapper(npu_double) -> None:
    mx = npu_double()
    detail = compute.check_fused_pooling(compute.Target("npu", double.to_npu))
    assert "(mx_driving.bev_pool_v3)" in detail
    assert [c[0] for c in mx.calls] == ["bev_pool_v3", "bev_pool_v3_backward"]


@pytest.mark.parametrize("wrong,cause", [
    ("fp16", "aclnnBEVPoolV3: depth has dtype torch.float16"),
    ("channels not a multiple of 8", "The channel of feature must be multiple of 8"),
    ("channels over 360", "C=368 > 360"),
])
def test_npu_fused_pooling_check_catches_a_wrong_call(npu_double, monkeypatch, wrong,
                                                      cause) -> None:
    """A dispatch that hands the op half precision, or a channel count it does not take,
    fails the check with the op's cause."""
    from bevdepth.ops.voxel_pooling import npu as npu_pooling
    npu_double()
    if wrong == "fp16":
        op, where = npu_pooling.fused_op()
        monkeypatch.setattr(npu_pooling, "fused_op", lambda: (
            lambda depth, feat, *rest: op(depth.half(), feat.half(), *rest), where))
    elif wrong == "channels not a multiple of 8":
        monkeypatch.setattr(npu_pooling, "NPU_FUSED_CHANNEL_MULTIPLE", 1)  # no padding
        monkeypatch.setitem(compute.FUSED_SHAPE, "channels", 76)
    else:
        monkeypatch.setattr(npu_pooling, "NPU_FUSED_MAX_CHANNELS", 400)  # no split at 360
        monkeypatch.setitem(compute.FUSED_SHAPE, "channels", 368)
    result = report.Report(stream=open(os.devnull, "w")).run(
        "compute.pooling.fused",
        lambda: compute.check_fused_pooling(compute.Target("npu", double.to_npu)))
    assert result.status == report.FAIL and cause in result.detail, result.detail
