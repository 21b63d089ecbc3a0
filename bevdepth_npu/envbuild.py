"""``bevdepth-npu env``: build or reuse one virtualenv with the whole patched stack.

    bevdepth-npu env [--device auto|cpu|cuda|npu] [--venv DIR] [--python EXE] [--rebuild STAGE]
                     [--mirror NAME=PATH_OR_URL]

Pins the cache lacks are fetched first (``bevdepth-npu fetch``, honouring ``--mirror`` and
BEVDEPTH_NPU_MIRRORS); offline without a mirror that stops with fetch's error. Stages, each
with a progress line, each skipped when what went into it is unchanged (recorded in
``<venv>/bevdepth-npu-env.json``): the venv itself; torch 2.1.0 + torchvision 0.16.0 (on npu:
checks the torch/torch_npu/mx_driving you installed, never installs CANN); requirements.txt;
mmcv-full from the pin + mmcv.patch (MMCV_WITH_OPS=1, FORCE_NPU=1 on npu); mmdet3d from the pin +
mmdetection3d.patch; lightning.patch into the venv's pytorch_lightning; the patched BEVDepth in
develop mode (CUDA extensions only where CUDA is present); this helper package. Wheels built from
pinned sources are cached under ``<cache>/wheels`` keyed by source commit, patch hash, torch,
Python and device (on npu also the torch_npu they were built against, a stand-in included: see
``mmcv_npu_build``), so a second environment, or a rebuilt one, takes seconds for them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from bevdepth_npu import devices, envvars, paths, pins, upstream
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write
from bevdepth_npu.patchfile import split

TORCH = f"torch=={pins.TORCH_VERSION}"
TORCHVISION = f"torchvision=={pins.TORCHVISION_VERSION}"
# requirements.txt's pin, installed with torch so that it is not replaced
NUMPY = f"numpy=={pins.NUMPY_VERSION}"
BUILD_TOOLS = ("setuptools==69.5.1", "wheel==0.43.0", "ninja==1.11.1.1")
# Installed without their own requirements (see requirements.txt for why)
NO_DEPS = ("lyft_dataset_sdk==0.0.8",)
STAMP = "bevdepth-npu-env.json"
IMPORT_CHECK = "import mmcv.ops, mmdet3d, pytorch_lightning, bevdepth"
# torch_npu, then mx_driving, in the order training imports them; prints where the op lives
# (mx_driving.npu_voxel_pooling_train from DrivingSDK v7.0.RC1, mx_driving.point.... in v6.0.0)
NPU_OP_CHECK = ("from bevdepth.utils import device\n"
                "from bevdepth.ops.voxel_pooling import npu\n"
                "error = device.import_npu_stack()\n"
                "if error: raise SystemExit(f'mx_driving cannot be imported ({error}); ' "
                "+ npu.NPU_POOLING_OP_RELEASE)\n"
                "print(npu.pooling_op()[1])")
log = upstream.log


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _patch_body_hash(pin: pins.Pin) -> str:
    path = paths.patch_file(pin)
    return _sha(split(path.read_bytes())[1]) if path.is_file() else "none"


# public names for the other builders of pinned wheels (the mmcv NPU build check)
sha = _sha
patch_body_hash = _patch_body_hash


class Env:
    def __init__(self, venv: Path, device: str, base_python: str, verbose: bool):
        self.venv = venv
        self.device = device
        self.base_python = base_python
        self.verbose = verbose
        self.python = str(venv / "bin" / "python")
        self.logs = venv / "bevdepth-npu-logs"
        self.stamp_path = venv / STAMP
        self.stamp: Dict[str, str] = {}
        if self.stamp_path.is_file():
            try:
                self.stamp = json.loads(self.stamp_path.read_text())
            except ValueError:
                self.stamp = {}

    # -------------------------------------------------------------- helpers
    def save_stamp(self) -> None:
        atomic_write(self.stamp_path, (json.dumps(self.stamp, indent=1, sort_keys=True) + "\n")
                     .encode())

    def sh(self, cmd: List[str], stage: str, env: Optional[Dict[str, str]] = None,
           cwd: Optional[Path] = None, progress: Optional[Callable[[], str]] = None) -> str:
        """Run ``cmd`` as a stage of the run layer's runner (``run_stage``: output to the
        stage's log, a heartbeat with ``progress``, the log's end shown on failure); a clear
        error on failure, else the log's text."""
        from bevdepth_npu.run.console import Console, Heartbeat
        from bevdepth_npu.run.stages import run_stage
        logfile = self.logs / f"{stage}.log"
        full_env = dict(os.environ)
        full_env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"})
        full_env.pop("PYTHONPATH", None)
        full_env.update(env or {})
        console = Console("bevdepth-npu", out=sys.stderr, err=sys.stderr,
                          prefix="[bevdepth-npu]")
        code = run_stage(console, stage, cmd, logfile, cwd or Path.cwd(), full_env,
                         Heartbeat(console, f"  {stage}", detail=progress))
        if code != 0:
            raise UserError(f"{stage}: `{' '.join(cmd[:6])} ...` failed (exit {code}); its log "
                            f"is {logfile} (last lines above)")
        return logfile.read_text(errors="replace")

    def pip(self, args: List[str], stage: str, **kw) -> None:
        self.sh([self.python, "-m", "pip", "install", "--no-input", *args], stage, **kw)

    def py(self, code: str) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        return subprocess.run([self.python, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, cwd=str(self.venv))

    def torch_version(self) -> str:
        proc = self.py("import torch; print(torch.__version__)")
        return proc.stdout.decode().strip().splitlines()[-1] if proc.returncode == 0 else "none"

    def python_tag(self) -> str:
        proc = self.py("import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
        return proc.stdout.decode().strip()

    # -------------------------------------------------------------- stages
    def stage_venv(self) -> None:
        if not (self.venv / "bin" / "python").exists():
            cmd = [self.base_python, "-m", "venv", str(self.venv)]
            if self.device == "npu":
                # torch, torch_npu and mx_driving come with the CANN setup of the machine
                cmd.insert(3, "--system-site-packages")
            self.venv.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise UserError(f"creating {self.venv} with {self.base_python} failed: "
                                f"{proc.stdout.decode().strip()}")
        self.pip(list(BUILD_TOOLS), "venv")

    def stage_torch(self) -> None:
        if self.device == "npu":
            self.stage_torch_npu()
            return
        self.pip([TORCH, TORCHVISION, NUMPY], "torch")

    def stage_torch_npu(self) -> None:
        """Check the torch and torch_npu of the CANN setup; torchvision without requirements."""
        # torch and torch_npu may warn on import (on stderr, merged here): read the marked line
        proc = self.py("import torch, torch_npu\n"
                       "print('bevdepth-npu-versions', torch.__version__, torch_npu.__version__)")
        out = proc.stdout.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0:
            raise UserError(
                "on npu this environment uses the torch and torch_npu of your CANN setup, "
                f"and {self.python} cannot import them:\n  " + (out[-1] if out else "")
                + "\nInstall CANN (8.0 or newer) and `source set_env.sh`, then install "
                  f"{TORCH} (the +cpu build from download.pytorch.org) and the torch_npu "
                  f"{pins.TORCH_VERSION} wheel that matches your CANN into the base Python, "
                  "and run this again (bevdepth-npu never installs CANN)")
        versions = [line.split()[1:] for line in out if line.startswith("bevdepth-npu-versions ")]
        torch_version, npu_version = versions[-1] if versions else ("?", "?")
        if not torch_version.startswith(pins.TORCH_VERSION):
            raise UserError(f"on npu torch {pins.TORCH_VERSION} is required; found torch "
                            f"{torch_version} (torch_npu {npu_version})")
        log(f"  torch: torch {torch_version}, torch_npu {npu_version} from the base Python")
        self.pip([TORCHVISION, "--no-deps"], "torch")
        # torchvision's other requirements (requests, imported by torchvision.datasets, is in
        # no other requirement of the stack), with torch held at the installed one
        proc = self.py("import importlib.metadata as m\n"
                       "print(*[r for r in m.requires('torchvision') or [] "
                       "if not r.startswith('torch') and 'extra ==' not in r], sep='\\n')")
        extra = [line.strip() for line in proc.stdout.decode().splitlines() if line.strip()]
        if proc.returncode != 0:
            raise UserError(f"reading torchvision's requirements failed: {extra[-1:]}")
        if extra:
            self.pip([*extra, NUMPY, "-c", str(self.constraints())], "torch")

    def constraints(self) -> Path:
        path = self.venv / "bevdepth-npu-constraints.txt"
        # without the local label (+cu121, +cpu): an installed 2.1.0+cpu satisfies torch==2.1.0
        path.write_text(f"torch=={self.torch_version().split('+')[0]}\n{TORCHVISION}\n")
        return path

    def stage_requirements(self) -> None:
        self.pip(["-r", str(paths.REPO_ROOT / "requirements.txt"),
                  "-c", str(self.constraints())], "requirements")
        self.pip(["--no-deps", *NO_DEPS], "requirements")

    def _wheel(self, pin: pins.Pin, stage: str, build_env: Dict[str, str],
               expected_objects: int = 0, built_over: str = "") -> None:
        """Build (or reuse) and install the wheel of ``pin``. ``built_over``: what the build
        compiles against beyond torch (on npu, ``torch_npu_identity``), in the key and in the
        wheel's stamp, so that a wheel built over a stand-in is never reused over the real
        library."""
        tree = sync_tree(pin)
        key = wheel_key(pin, self.torch_version(), self.python_tag(), self.device, build_env,
                        built_over)
        cache = paths.wheels_dir() / pin.name / key
        wheels = sorted(cache.glob("*.whl")) if cache.is_dir() else []
        if wheels and built_over:
            check_built_over(cache, built_over)
        if wheels:
            log(f"  {stage}: reusing cached wheel {wheels[0].name} ({key})")
        else:
            log(f"  {stage}: building a wheel from {tree} (cached afterwards as {key})")

            def progress() -> str:
                done = len(list((tree / "build").rglob("*.o"))) if (tree / "build").is_dir() else 0
                return f"{done}/{expected_objects} C++ files compiled" if expected_objects else ""

            paths.wheels_dir().mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{pin.name}-", dir=str(paths.wheels_dir())))
            try:
                self.sh([self.python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                         "-w", str(tmp), str(tree)], stage,
                        env=dict(build_env, MAX_JOBS=str(max(1, len(os.sched_getaffinity(0))))),
                        progress=progress if expected_objects else None)
                built = sorted(tmp.glob("*.whl"))
                if len(built) != 1:
                    raise UserError(f"{stage}: expected one wheel in {tmp}, found {built}")
                cache.parent.mkdir(parents=True, exist_ok=True)
                if built_over:
                    write_wheel_stamp(tmp, built_over)
                if cache.exists():
                    shutil.rmtree(cache)
                tmp.rename(cache)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
            wheels = sorted(cache.glob("*.whl"))
        self.pip(["--no-deps", "--force-reinstall", str(wheels[0])], stage)

    def stage_mmcv(self) -> None:
        env = {"MMCV_WITH_OPS": "1"}
        if self.device == "npu":
            self.stage_mmcv_npu()
            return
        if self.device == "cuda":
            env["FORCE_CUDA"] = "1"
        self._wheel(pins.get("mmcv"), "mmcv", env, expected_objects=73 if self.device == "cpu" else 0)

    def stage_mmcv_npu(self) -> None:
        """mmcv with FORCE_NPU=1 against the torch_npu this environment sees, keyed by it."""
        from bevdepth_npu import mmcv_npu_build
        over = torch_npu_identity(self.python)
        if "stand-in" in over:
            log(f"  mmcv: building over {over}: this is not a real Ascend server")
        self._wheel(pins.get("mmcv"), "mmcv", dict(mmcv_npu_build.BUILD_ENV),
                    expected_objects=NPU_MMCV_SOURCES, built_over=over)
        self.stamp["mmcv_built_over"] = over

    def stage_mmdet3d(self) -> None:
        self._wheel(pins.get("mmdetection3d"), "mmdet3d", {})

    def stage_lightning(self) -> None:
        proc = subprocess.run([self.python, "-m", "bevdepth_npu", "apply", "lightning"],
                              cwd=str(paths.REPO_ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            # an older lightning.patch (or a hand edit) is in there: start from the wheel again
            log("  lightning: installed files are not pristine 1.6.5; reinstalling the wheel")
            self.pip(["--no-deps", "--force-reinstall", pins.get("lightning").wheel], "lightning")
            proc = subprocess.run([self.python, "-m", "bevdepth_npu", "apply", "lightning"],
                                  cwd=str(paths.REPO_ROOT), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise UserError(f"lightning: {proc.stdout.decode().strip()}")
        log("  lightning: " + proc.stdout.decode().strip().splitlines()[-1].split("] ", 1)[-1])

    def stage_bevdepth(self) -> None:
        tree = sync_tree(pins.get("bevdepth"))
        env = {"FORCE_CUDA": "1"} if self.device == "cuda" else {}
        self.pip(["--no-deps", "--no-build-isolation", "-e", str(tree)], "bevdepth", env=env)

    def stage_helper(self) -> None:
        self.pip(["--no-deps", "-e", str(paths.REPO_ROOT)], "helper")

    def stage_verify(self) -> None:
        checks = [IMPORT_CHECK]
        if self.device == "npu":
            checks.append(NPU_OP_CHECK)
        for code in checks:
            proc = self.py(code)
            out = proc.stdout.decode().strip().splitlines()
            if proc.returncode != 0:
                hint = ""
                if code == NPU_OP_CHECK:
                    hint = ("\nmx_driving comes from Ascend DrivingSDK: build it for your CANN and "
                            "torch_npu (see its README) and pip install the wheel into the base "
                            "Python")
                raise UserError(f"`python -c \"{code}\"` fails in {self.venv}: "
                                f"{out[-1] if out else ''}{hint}")
            if code == NPU_OP_CHECK:
                log(f"  verify: mx_driving's voxel pooling is {out[-1]}")
        self.stamp["device"] = self.device


# what the pinned mmcv compiles with FORCE_NPU=1 (measured: bevdepth-npu npu-build)
NPU_MMCV_SOURCES = 101
WHEEL_STAMP = "bevdepth-npu-build.json"
# where torch_npu is and what it is, without importing it (the real one needs CANN to import);
# the mmcv NPU build check's stand-in carries a marker file
TORCH_NPU_IDENTITY = (
    "import importlib.util, json, pathlib, re\n"
    "spec = importlib.util.find_spec('torch_npu')\n"
    "pkg = pathlib.Path(spec.origin).parent if spec and spec.origin else None\n"
    "ver = pkg / 'version.py' if pkg else None\n"
    "m = re.search(r\"__version__ = '([^']+)'\", ver.read_text()) if ver and ver.is_file() "
    "else None\n"
    "marker = pkg / 'BEVDEPTH_NPU_STAND_IN' if pkg else None\n"
    "print(json.dumps({'found': bool(pkg), 'version': m.group(1) if m else '?', "
    "'stand_in': marker.read_text().strip() if marker and marker.is_file() else ''}))\n")


def wheel_key(pin: pins.Pin, torch_version: str, python_tag: str, device: str,
              build_env: Dict[str, str], built_over: str = "") -> str:
    """The cache key of a wheel built from a pinned source (``<cache>/wheels/<name>/<key>``)."""
    parts = [pin.commit, _patch_body_hash(pin), torch_version, python_tag, device,
             sorted(build_env.items())]
    return _sha(*parts, built_over) if built_over else _sha(*parts)


def torch_npu_label(version: str, stand_in: str = "") -> str:
    """How a torch_npu is named in keys and stamps; ``stand_in``: the stand-in's marker text."""
    label = f"torch_npu {version}"
    return f"{label} stand-in ({stand_in.strip()})" if stand_in.strip() else label


def torch_npu_identity(python: str) -> str:
    """``torch_npu 2.1.0.postN`` as ``python`` would import it; with the stand-in's marker text
    where it is the mmcv NPU build check's stand-in; ``torch_npu none`` where there is none."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # as the stages run the environment's Python
    proc = subprocess.run([python, "-c", TORCH_NPU_IDENTITY], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        return "torch_npu none"
    facts = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if not facts["found"]:
        return "torch_npu none"
    return torch_npu_label(facts["version"], facts["stand_in"])


def write_wheel_stamp(wheel_dir: Path, built_over: str) -> None:
    atomic_write(wheel_dir / WHEEL_STAMP, (json.dumps({"built_over": built_over}, indent=1)
                                           + "\n").encode())


def check_built_over(wheel_dir: Path, built_over: str) -> None:
    """A cached wheel is reused only over what it was built over (the key says so too; this
    catches a cache entry written by hand or by an older builder)."""
    stamp = wheel_dir / WHEEL_STAMP
    recorded = json.loads(stamp.read_text()).get("built_over") if stamp.is_file() else None
    if recorded != built_over:
        recorded = recorded or "an unrecorded torch_npu"
        raise UserError(f"the cached wheel in {wheel_dir} was built over {recorded}, not over "
                        f"{built_over}; move that directory away and run again")


def sync_tree(pin: pins.Pin) -> Path:
    """The working tree trees/NAME holding exactly the repository's patch (if there is one)."""
    from bevdepth_npu import patches
    tree = patches.ensure_tree(pin)
    if not paths.patch_file(pin).is_file():
        log(f"  {pin.name}: no {pin.patch} in the repository; using the pristine pin")
        return tree
    patches.apply(pin, tree, replace_stale=True)
    return tree


STAGES = ("venv", "torch", "requirements", "mmcv", "mmdet3d", "lightning", "bevdepth", "helper",
          "verify")


def stage_keys(env: Env) -> Dict[str, str]:
    req = (paths.REPO_ROOT / "requirements.txt").read_bytes()
    return {
        "venv": _sha(BUILD_TOOLS),
        "torch": torch_stage_key(env),
        "requirements": _sha(req, NO_DEPS),
        "mmcv": mmcv_stage_key(env),
        "mmdet3d": _sha(pins.get("mmdetection3d").commit,
                        _patch_body_hash(pins.get("mmdetection3d"))),
        "lightning": _sha(_patch_body_hash(pins.get("lightning"))),
        "bevdepth": _sha(pins.get("bevdepth").commit, _patch_body_hash(pins.get("bevdepth")),
                         env.device, paths.tree_dir("bevdepth")),
        "helper": _sha(paths.REPO_ROOT),
        "verify": "always",
    }


def torch_stage_key(env: Env) -> str:
    if env.device != "npu":
        return _sha(TORCH, TORCHVISION, env.device)
    # npu: torchvision's own requirements are installed too (requests was missing before)
    return _sha(TORCH, TORCHVISION, env.device, "torchvision requirements")


def mmcv_stage_key(env: Env) -> str:
    parts = (pins.get("mmcv").commit, _patch_body_hash(pins.get("mmcv")), env.device)
    if env.device != "npu":
        return _sha(*parts)
    # over another torch_npu (a stand-in replaced by the real one, a new release) mmcv is rebuilt
    return _sha(*parts, torch_npu_identity(env.base_python))


def fetch_missing(mirror_entries: Optional[List[str]] = None) -> None:
    """Fetch the pins the cache lacks (``bevdepth-npu fetch`` for just those), from the mirrors
    of ``--mirror`` entries and BEVDEPTH_NPU_MIRRORS; one error naming each that failed."""
    missing = [p for p in pins.PINS if not upstream.source_ready(p)]
    if not missing:
        return
    mirrors = upstream.mirrors_from(mirror_entries)
    log(f"env: fetching the pinned sources the cache {paths.cache_dir()} lacks: "
        f"{', '.join(p.name for p in missing)}")
    failures = []
    for pin in missing:
        try:
            upstream.fetch(pin, mirrors.get(pin.name))
        except UserError as exc:
            if not pin.patched:
                # a reference upstream serves tests only; the environment does not need it
                log(f"warning: {exc}; the tests that read {pin.name}'s sources will skip")
                continue
            failures.append(str(exc))
    if failures:
        raise UserError("the pinned sources are not in the cache and fetching them failed:\n  "
                        + "\n  ".join(failures))


def build(device: str = "auto", venv: Optional[Path] = None, python: Optional[str] = None,
          rebuild: Optional[List[str]] = None, verbose: bool = False,
          mirrors: Optional[List[str]] = None) -> Path:
    device = devices.choose(device)
    venv = (venv or paths.venv_dir(device)).expanduser().resolve()
    env = Env(venv, device, python or sys.executable, verbose)
    fetch_missing(mirrors)
    log(f"env: {device} environment in {venv}")
    t_all = time.monotonic()
    keys = stage_keys(env)
    forced = set(rebuild or [])
    if "all" in forced:
        forced = set(STAGES)
    changed = False
    for i, stage in enumerate(STAGES, 1):
        key = keys[stage]
        if stage != "verify" and not changed and stage not in forced \
                and env.stamp.get(stage) == key and (venv / "bin" / "python").exists():
            log(f"[{i}/{len(STAGES)}] {stage}: up to date")
            continue
        # a stage that changed invalidates the ones after it (they build on it)
        changed = changed or stage != "verify"
        t0 = time.monotonic()
        log(f"[{i}/{len(STAGES)}] {stage}: ...")
        getattr(env, f"stage_{stage}")()
        env.stamp[stage] = key
        env.save_stamp()
        log(f"[{i}/{len(STAGES)}] {stage}: done in {time.monotonic() - t0:.0f} s")
    log(f"env: ready in {time.monotonic() - t_all:.0f} s; activate with "
        f"`source {venv}/bin/activate`")
    return venv


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=devices.CHOICES, default="auto",
                   help=f"stack to build: auto ({envvars.DEVICE} if set, else npu if the Ascend "
                        "toolkit is set up, cuda if nvidia-smi answers, else cpu)")
    p.add_argument("--venv", type=Path, metavar="DIR",
                   help="where to build it (default: <cache>/venvs/<device>-py<X.Y>)")
    p.add_argument("--python", metavar="EXE",
                   help="base interpreter for a new venv (default: the one running this)")
    p.add_argument("--rebuild", action="append", choices=STAGES + ("all",), metavar="STAGE",
                   help="redo STAGE and the ones after it even if unchanged (repeatable; "
                        f"{', '.join(STAGES)}, all)")
    p.add_argument("--mirror", action="append", metavar="NAME=PATH_OR_URL",
                   help="where to fetch a pin the cache lacks, as for `bevdepth-npu fetch` "
                        f"(repeatable; also {upstream.MIRRORS_ENV}, comma separated)")
    p.add_argument("--print-python", action="store_true",
                   help="only print the environment's python path on stdout at the end")


def run(args: argparse.Namespace) -> int:
    venv = build(args.device, args.venv, args.python, args.rebuild, mirrors=args.mirror)
    if args.print_python:
        print(venv / "bin" / "python")
    return 0
