"""lightning.patch in real Lightning 1.6.5: torch 2.x schedulers are accepted by Trainer.fit;
native AMP picks its device type from the run. That the patched Lightning binds no cores itself
(the patch used to, in DDPStrategy.setup) is shown by behaviour in test_npu_startup.py: a DDP
run without BEVDEPTH_NPU_BIND_CORES leaves every thread of both ranks on every core.

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
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("BEVDEPTH_NPU_BIND_CORES", "BEVDEPTH_NPU_ALLOWED_CORES",
                              "BEVDEPTH_BIND_CORES", "BEVDEPTH_ALLOWED_CORES")}
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
