"""Start-up of a BEVDepth process (bevdepth.utils.device.start) in the order the NPU stack needs,
core binding of whole training processes, and head targets built from the loader's host boxes.

Checked:
  - import order: torch_npu, then at once mx_driving (whose import registers its kernel package in
    ASCEND_CUSTOM_OPP_PATH, mx_driving/__init__.py _set_env), then the first device call, then
    transfer_to_npu and allow_internal_format; with --device npu and with automatic selection.
    Import hooks record it; the stand-ins do what torch_npu and mx_driving do at import and offer
    the torch.npu calls the device module makes (torch_npu/npu/__init__.py);
  - a missing mx_driving stops start-up with the release to install;
  - core binding (BEVDEPTH_NPU_BIND_CORES=1) in real Lightning DDP with two CPU processes: every
    thread of each rank, including one started before binding, is on the rank's share of the
    cores; evaluation is never bound; nothing is bound by default; the process group is ended
    when the run is over (a gloo group left to the interpreter's exit can abort the process);
  - CPU_AFFINITY_CONF is chosen from the installed torch_npu's version (2.1.0.post6: 1,
    2.1.0.post10: 2, older: binding by the process itself), an exported value is kept, and it
    is set before start-up's first torch.npu call (torch_npu reads it when it initialises a
    device: NPUAffinityController.cpp, from npu_sys_ctrl.cpp, at the release tag);
  - training_step hands the loader's very box tensors (host) to get_targets with the device, and
    the targets equal those built from boxes on the device.
Run:
    PYTHONPATH=. python -m pytest tests/integration/test_npu_startup.py -q
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import List

import pytest

from tests.integration import _bevdepth_helpers as helpers

helpers.require_env()
torch = pytest.importorskip("torch")

from bevdepth.utils import core_binding, device  # noqa: E402

PROBE = Path(__file__).resolve().parent / "scripts" / "lightning_probe.py"


@pytest.fixture(autouse=True)
def _affinity_conf_restored(monkeypatch):
    """Start-up sets CPU_AFFINITY_CONF in this process (os.environ.setdefault); set once here
    so that monkeypatch restores what was there before, and later tests do not inherit it."""
    monkeypatch.setenv("CPU_AFFINITY_CONF", "")
    monkeypatch.delenv("CPU_AFFINITY_CONF")


# ---------------------------------------------------------------- import order

class _Config:
    def __init__(self, events: List[str]) -> None:
        object.__setattr__(self, "_events", events)

    def __setattr__(self, name, value):
        self._events.append(f"npu.config.{name}={value}")
        object.__setattr__(self, name, value)


class _TorchNpu(types.SimpleNamespace):
    """``torch.npu`` as torch_npu registers it, recording every call (device work)."""

    def __init__(self, events: List[str]) -> None:
        super().__init__()
        self.config = _Config(events)
        self.affinity_at_calls: List = []   # CPU_AFFINITY_CONF when each call was made
        for name, result in (("is_available", True), ("device_count", 8), ("current_device", 0),
                             ("set_device", None), ("synchronize", None)):
            setattr(self, name, self._recorder(events, name, result))

    def _recorder(self, events, name, result):
        def call(*args, **kwargs):
            events.append(f"npu.{name}")
            self.affinity_at_calls.append((name, os.environ.get("CPU_AFFINITY_CONF")))
            return result
        return call


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hooks for torch_npu (and its transfer_to_npu, optim) and mx_driving."""

    NAMES = ("torch_npu", "torch_npu.contrib", "torch_npu.contrib.transfer_to_npu",
             "torch_npu.optim", "mx_driving")

    def __init__(self, events: List[str], with_mx_driving: bool = True) -> None:
        self.events = events
        self.with_mx_driving = with_mx_driving

    def find_spec(self, name, path=None, target=None):
        if name not in self.NAMES or (name == "mx_driving" and not self.with_mx_driving):
            return None
        return importlib.machinery.ModuleSpec(
            name, self, is_package=name in ("torch_npu", "torch_npu.contrib"))

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        self.events.append(f"import {name}")
        if name == "torch_npu":
            torch.npu = _TorchNpu(self.events)
        elif name == "mx_driving":
            # mx_driving/__init__.py, _set_env: its kernels become visible to CANN
            path = os.environ.get("ASCEND_CUSTOM_OPP_PATH")
            os.environ["ASCEND_CUSTOM_OPP_PATH"] = "mx_driving/packages/vendors/customize" + (
                ":" + path if path else "")
            module.npu_voxel_pooling_train = lambda *args: None


@pytest.fixture
def npu_stand_ins(monkeypatch):
    def install(with_mx_driving=True):
        events: List[str] = []
        finder = _StandIns(events, with_mx_driving)
        monkeypatch.setattr(sys, "meta_path", [finder] + sys.meta_path)
        for name in _StandIns.NAMES:
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(torch, "npu", None, raising=False)
        monkeypatch.setattr(device, "_selected", None)
        monkeypatch.setattr(device, "_runtime_ready", False)
        monkeypatch.setattr(device, "_mx_driving_error", None)
        monkeypatch.delenv("ASCEND_CUSTOM_OPP_PATH", raising=False)
        monkeypatch.delenv(device.ENV_VAR, raising=False)
        monkeypatch.delenv(device.OLD_ENV_VAR, raising=False)
        return events
    yield install
    for name in _StandIns.NAMES:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["npu", None])
def test_mx_driving_is_imported_right_after_torch_npu(npu_stand_ins, name) -> None:
    events = npu_stand_ins()
    assert device.start(name) == device.NPU
    assert events[:2] == ["import torch_npu", "import mx_driving"], events
    first_device_call = next(i for i, e in enumerate(events) if e.startswith("npu."))
    assert first_device_call == 2
    assert events.index("import torch_npu.contrib.transfer_to_npu") > first_device_call
    assert events[-1] == "npu.config.allow_internal_format=False"
    assert "mx_driving" in os.environ["ASCEND_CUSTOM_OPP_PATH"]


def test_missing_mx_driving_stops_start_up_naming_the_release(npu_stand_ins) -> None:
    events = npu_stand_ins(with_mx_driving=False)
    with pytest.raises(RuntimeError, match="mx_driving cannot be imported.*branch_v7.0.RC1"):
        device.start("npu")
    assert "import torch_npu.contrib.transfer_to_npu" not in events


# ---------------------------------------------------------------- core binding

def run_probe(out: Path, *args: str, env=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items()
                if k not in (core_binding.BIND_ENV_VAR, core_binding.ALLOWED_CORES_ENV_VAR,
                             core_binding.OLD_BIND_ENV_VAR,
                             core_binding.OLD_ALLOWED_CORES_ENV_VAR)}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(PROBE), str(out), *args], env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:]


def affinities(out: Path, fn: str):
    """rank -> {thread id: cores} as the probe recorded them."""
    return {int(p.stem.rsplit("_", 1)[1]): json.loads(p.read_text())
            for p in out.glob(f"affinity_{fn}_*.json")}


needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                     reason="needs 2 cores for 2 ranks")


@pytest.mark.slow
@needs_two_cores
def test_training_binds_every_thread_of_each_rank(tmp_path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    run_probe(tmp_path, "--ddp", "2", env={core_binding.BIND_ENV_VAR: "1"})
    fit = affinities(tmp_path, "fit")
    assert sorted(fit) == [0, 1]
    half = len(allowed) // 2
    shares = {0: allowed[:half], 1: allowed[half:2 * half]}
    for rank, threads in fit.items():
        assert len(threads) >= 2, threads  # the main thread and the one started before binding
        assert all(cores == shares[rank] for cores in threads.values()), (rank, threads)


@pytest.mark.slow
@needs_two_cores
def test_evaluation_and_default_runs_are_not_bound(tmp_path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    run_probe(tmp_path / "eval", "--ddp", "2", "--evaluate",
              env={core_binding.BIND_ENV_VAR: "1"})
    run_probe(tmp_path / "free", "--ddp", "2")
    for threads in [*affinities(tmp_path / "eval", "validate").values(),
                    *affinities(tmp_path / "free", "fit").values()]:
        assert all(cores == allowed for cores in threads.values()), threads


def test_a_gloo_process_group_is_ended_once_and_only_if_started(tmp_path) -> None:
    """What an experiment's command line and the probe call when the run is over: a gloo group
    left to the interpreter's exit can abort a finished process (status -6). The two-rank case,
    where destroying without the barrier first deadlocked, is the probe's."""
    from torch import distributed as dist
    from bevdepth.utils import torch_dist
    torch_dist.end_gloo_process_group()  # none started: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        dist.all_reduce(torch.ones(3))
        torch_dist.end_gloo_process_group()
        assert not dist.is_initialized()
        torch_dist.end_gloo_process_group()  # a second call is harmless
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cores_for_rank_splits_the_allowed_cores() -> None:
    cores_for_rank = core_binding.cores_for_rank
    assert cores_for_rank({0, 1, 2, 3, 4, 5, 6, 7}, 0, 4) == [0, 1]
    assert cores_for_rank({0, 1, 2, 3, 4, 5, 6, 7}, 3, 4) == [6, 7]
    assert cores_for_rank({4, 6, 8, 10}, 1, 2) == [8, 10]   # taskset-restricted
    assert cores_for_rank({0}, 1, 2) == []                 # fewer cores than ranks


def test_bad_binding_value_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv(core_binding.BIND_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="BEVDEPTH_NPU_BIND_CORES='yes'"):
        core_binding.binding_requested()
    monkeypatch.delenv(core_binding.BIND_ENV_VAR)
    monkeypatch.setenv(core_binding.OLD_BIND_ENV_VAR, "1")   # the earlier name still works
    with pytest.warns(UserWarning, match="old name of BEVDEPTH_NPU_BIND_CORES"):
        assert core_binding.binding_requested() is (hasattr(os, "sched_setaffinity"))


def _fake_torch_npu(root: Path, version: str) -> None:
    """A torch_npu distribution of ``version`` (only its metadata is read, never imported)."""
    (root / "torch_npu").mkdir(parents=True)
    (root / "torch_npu" / "__init__.py").write_text("raise ImportError('not for import')\n")
    info = root / f"torch_npu-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch_npu\nVersion: {version}\n")


@pytest.mark.parametrize("version,mode", [("2.1.0.post4", None), ("2.1.0.post6", "1"),
                                          ("2.1.0.post8", "1"), ("2.1.0.post10", "2"),
                                          ("2.1.0.post12.dev20250101", "2"), ("2.4.0", "2")])
def test_cpu_affinity_conf_follows_the_torch_npu_version(tmp_path, monkeypatch, version,
                                                         mode) -> None:
    _fake_torch_npu(tmp_path, version)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CPU_AFFINITY_CONF", raising=False)
    monkeypatch.delenv(device.ENV_VAR, raising=False)
    assert core_binding.torch_npu_affinity_mode() == mode
    described = core_binding.request_torch_npu_binding(True)   # npu or automatic
    assert os.environ.get("CPU_AFFINITY_CONF") == mode
    assert described == (f"torch_npu CPU_AFFINITY_CONF={mode}" if mode else None)
    monkeypatch.delenv("CPU_AFFINITY_CONF", raising=False)
    assert core_binding.request_torch_npu_binding(False) is None  # a CPU run binds itself
    if mode:
        monkeypatch.setenv("CPU_AFFINITY_CONF", "1,npu0:0-3")
        assert core_binding.request_torch_npu_binding(True) == \
            "torch_npu CPU_AFFINITY_CONF=1,npu0:0-3"


@pytest.mark.parametrize("name", ["npu", None])
def test_core_binding_is_set_before_the_first_device_call(npu_stand_ins, tmp_path, monkeypatch,
                                                          name) -> None:
    """torch_npu reads CPU_AFFINITY_CONF when it initialises a device, a queue thread or an
    HCCL group (NPUAffinityController.cpp's parseCPUAffinityConf, from npu_sys_ctrl.cpp,
    NPUQueue.cpp and ProcessGroupHCCL.cpp at v7.0.0-pytorch2.1.0), not at import: every
    torch.npu call of start-up, the first included, must already see it."""
    _fake_torch_npu(tmp_path, "2.1.0.post12")   # the version the binding mode follows
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CPU_AFFINITY_CONF", raising=False)
    monkeypatch.setenv(core_binding.BIND_ENV_VAR, "1")
    events = npu_stand_ins()
    assert device.start(name, bind=True) == device.NPU
    calls = torch.npu.affinity_at_calls
    assert calls and events.index("import torch_npu") < events.index(f"npu.{calls[0][0]}")
    assert all(value == "2" for _, value in calls), calls


# ---------------------------------------------------------------- targets from host boxes

def test_training_step_builds_targets_from_the_loaders_host_boxes(tmp_path, monkeypatch) -> None:
    from bevdepth.exps.nuscenes.smoke import bev_depth_lss_r18_smoke_2key as smoke
    monkeypatch.chdir(tmp_path)
    module = smoke.BEVDepthLightningModel(default_root_dir=str(tmp_path), data_root=str(tmp_path))
    batch = helpers.training_batch(final_dim=smoke.final_dim)
    seen = {}
    head_targets = module.model.head.get_targets

    def spy(boxes, labels, target_device=None):
        seen.update(boxes=boxes, labels=labels, target_device=target_device)
        return head_targets(boxes, labels, target_device)

    monkeypatch.setattr(module.model.head, "get_targets", spy)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module.training_step(batch)
    assert seen["boxes"][0] is batch[4][0] and seen["labels"][0] is batch[5][0]
    assert seen["target_device"] == module.device
    from_host = head_targets(batch[4], batch[5], module.device)
    from_device = head_targets([b.to(module.device) for b in batch[4]],
                               [label.to(module.device) for label in batch[5]])
    for host, dev in zip(from_host, from_device):
        assert all(torch.equal(h, d) for h, d in zip(host, dev))
