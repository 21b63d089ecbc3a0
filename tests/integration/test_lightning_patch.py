"""lightning.patch in real Lightning 1.6.5: torch 2.x schedulers are accepted by Trainer.fit;
native AMP picks its device type from the run; DDP core binding (PL_BIND_CORES=1) binds each
rank to its share of the cores for training and never for evaluation.

Run: python -m pytest tests/integration/test_lightning_patch.py  (in the `bevdepth-npu env` venv)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pl = pytest.importorskip("pytorch_lightning", reason="needs the environment: bevdepth-npu env")
torch = pytest.importorskip("torch", reason="needs the environment: bevdepth-npu env")

PROBE = Path(__file__).resolve().parent / "scripts" / "lightning_probe.py"
pytestmark = pytest.mark.skipif(
    not (Path(pl.__file__).parent / "utilities" / "npu.py").is_file(),
    reason="the installed pytorch_lightning is not patched: bevdepth-npu apply lightning")


def run_probe(out: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k != "PL_BIND_CORES"}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(PROBE), str(out), *args], env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:]
    return proc


def test_trainer_fit_accepts_torch2_multisteplr(tmp_path):
    run_probe(tmp_path)
    # MultiStepLR([1]) with gamma 0.1 stepped after each of 2 epochs: lr 1e-2 -> 1e-3
    assert json.loads((tmp_path / "lr.json").read_text()) == pytest.approx(1e-3)


def test_amp_device_type_follows_the_device(monkeypatch):
    from pytorch_lightning.utilities import npu
    assert npu.amp_device_type() == "cuda"   # no NPU here: CUDA autocast, as upstream
    assert isinstance(npu.grad_scaler("cuda"), torch.cuda.amp.GradScaler)

    class FakeNpu:                            # what torch_npu registers as torch.npu
        @staticmethod
        def is_available():
            return True
    monkeypatch.setattr(torch, "npu", FakeNpu, raising=False)
    assert npu.amp_device_type() == "npu"


def test_accelerator_connector_asks_the_npu_module_for_the_amp_device():
    src = Path(pl.__file__).parent / "trainer" / "connectors" / "accelerator_connector.py"
    assert 'else amp_device_type()' in src.read_text()


def test_cores_for_rank_splits_the_allowed_cores():
    from pytorch_lightning.utilities.cpu_binding import cores_for_rank
    assert cores_for_rank({0, 1, 2, 3, 4, 5, 6, 7}, 0, 4) == [0, 1]
    assert cores_for_rank({0, 1, 2, 3, 4, 5, 6, 7}, 3, 4) == [6, 7]
    assert cores_for_rank({4, 6, 8, 10}, 1, 2) == [8, 10]     # taskset-restricted, uneven ids
    assert cores_for_rank({0}, 1, 2) == []                   # fewer cores than ranks


def test_bad_binding_value_is_a_clear_error(monkeypatch):
    from pytorch_lightning.utilities import cpu_binding
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    monkeypatch.setenv("PL_BIND_CORES", "yes")
    with pytest.raises(MisconfigurationException, match="PL_BIND_CORES"):
        cpu_binding.binding_requested()


def _affinities(out: Path, fn: str):
    return {int(p.stem.rsplit("_", 1)[1]): json.loads(p.read_text())
            for p in out.glob(f"affinity_{fn}_*.json")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 ranks")
def test_ddp_binding_on_for_fit_off_for_validate(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    run_probe(tmp_path / "bound", "--ddp", "2", env={"PL_BIND_CORES": "1"})
    fit = _affinities(tmp_path / "bound", "fit")
    assert sorted(fit) == [0, 1]
    half = len(allowed) // 2
    assert fit[0] == allowed[:half] and fit[1] == allowed[half:2 * half]
    validate = _affinities(tmp_path / "bound", "validate")
    assert validate == {0: allowed, 1: allowed}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 ranks")
def test_ddp_binding_off_by_default(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    run_probe(tmp_path / "free", "--ddp", "2")
    assert _affinities(tmp_path / "free", "fit") == {0: allowed, 1: allowed}
