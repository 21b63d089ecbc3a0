"""The pinned mmcv built with ``FORCE_NPU=1`` off the hardware, over the pinned torch_npu wheel.

    bevdepth-npu npu-build [--python EXE] [--only SOURCE ...] [--rebuild]

What the Ascend server's heaviest step does (``bevdepth-npu env --device npu`` builds mmcv with
``FORCE_NPU=1 MMCV_WITH_OPS=1`` through mmcv's own ``setup.py``), done here on the CPU: the patched
mmcv tree is copied aside and built by its ``setup.py bdist_wheel`` against the real
``NpuExtension``, headers and ``libtorch_npu.so`` of the torch-npu wheel pin (``bevdepth-npu
fetch torch-npu``), with torch 2.1.0 from ``--python`` (default: the Python running this).

torch_npu cannot be imported without CANN, and mmcv's ``setup.py`` imports
``torch_npu.utils.cpp_extension``, which imports ``torch_npu``. So the build sees a stand-in
package made of the wheel's own files except two (``stand_in``):

- ``include/``, ``lib/``, ``version.py`` and ``utils/cpp_extension.py``: the wheel's, unchanged
  (``NpuExtension`` finds the headers and the library next to the package's ``__init__.py``);
- ``__init__.py``: a stand-in. The wheel's loads ``torch_npu.npu`` and the ``_C`` extension, which
  need ``libtorch_npu.so``'s CANN libraries (``libhccl.so``, ``libascendcl.so``, ...);
- ``utils/__init__.py``: a stand-in. The wheel's imports ``torch_npu._C`` on its first line.
- a marker file, ``STAND_IN_MARKER``, that ``bevdepth-npu env`` reads (without importing
  torch_npu) so that a wheel built over the stand-in is never taken for a real server's: the
  library is byte-identical on both, so the cache key needs the marker, not just a hash.

Ninja stops at the first failure, so the build runs through a ``ninja`` shim that adds ``-k 0``
(keep going) and, for ``--only``, builds just the objects of the named sources. The result names
every source that failed with its first error (a header that only CANN ships shows as such),
whether ``_ext`` linked and what ``libtorch_npu.so`` left unresolved at link time. A passing full
build is cached by the hash of its inputs (mmcv commit, mmcv.patch body, the wheel's sha256,
torch, the compiler, Python, the stand-in's version) in ``<cache>/wheels/mmcv-npu-stand-in/``,
with the wheel it built.

What a build cannot prove: mmcv's NPU ops look their ``aclnn*`` kernels up at run time
(``dlsym`` in ``pytorch_npu_util.hpp``), so whether a CANN release provides them is settled only
on the hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bevdepth_npu import envvars, paths, pins, upstream
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write_text

# bumped when the stand-in or the check changes what a cached result means
STAND_IN_VERSION = "1"
STAND_IN_MARKER = "BEVDEPTH_NPU_STAND_IN"
RESULT = "result.json"
ONLY_ENV = envvars.NINJA_ONLY
STATUS_FILE_ENV = envvars.NINJA_STATUS
BUILD_ENV = {"FORCE_NPU": "1", "MMCV_WITH_OPS": "1"}
log = upstream.log

STAND_IN_INIT = '''"""Stand-in for torch_npu/__init__.py of the torch-npu {version} wheel, written by bevdepth-npu.

The wheel's own __init__.py imports torch_npu.npu and the _C extension, which load
libtorch_npu.so and with it CANN's libraries (libhccl.so, libascendcl.so, ...): without CANN it
cannot be imported. mmcv's setup.py needs only torch_npu.utils.cpp_extension (the wheel's own
file, next to this one) and the package's location. Nothing here runs an NPU.
"""
from torch_npu.version import __version__, git_version  # the wheel's version.py

STAND_IN = True
'''
STAND_IN_UTILS_INIT = '''"""Stand-in for torch_npu/utils/__init__.py of the torch-npu wheel, written by bevdepth-npu:
the wheel's imports torch_npu._C (CANN's libraries) on its first line; cpp_extension.py, the
wheel's own, needs nothing from it."""
'''

NINJA_SHIM = '''#!{python}
"""ninja for the mmcv NPU build check (bevdepth-npu): keep going past failures (-k 0); with
${only_env} build only the objects of the listed sources; record ninja's exit status."""
import json, os, re, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
real = next(os.path.join(d, "ninja") for d in os.environ["PATH"].split(os.pathsep)
            if d and os.path.abspath(d) != here and os.access(os.path.join(d, "ninja"), os.X_OK))
args = sys.argv[1:]
if "--version" in args:
    os.execv(real, [real] + args)
targets = []
only = [s for s in os.environ.get("{only_env}", "").split(",") if s]
if only and os.path.isfile("build.ninja"):
    for line in open("build.ninja"):
        m = re.match(r"build (.+?): compile (.+)$", line.rstrip())
        if m and any(m.group(2).replace("$:", ":").endswith("/" + s.lstrip("./")) for s in only):
            targets.append(m.group(1).replace("$:", ":"))
code = subprocess.call([real, "-k", "0"] + args + targets)
status = os.environ.get("{status_env}")
if status:
    with open(status, "w") as fh:
        json.dump({{"returncode": code, "targets": targets, "only": only}}, fh)
# a partial build must not go on to link: stop setup.py here
sys.exit(code if not only else (code or 3))
'''


# ----------------------------------------------------------------------------- the stand-in

def wheel_source() -> Path:
    """The unpacked torch-npu wheel pin, or an error saying how to get it."""
    pin = pins.get("torch-npu")
    if not upstream.source_ready(pin):
        raise upstream.missing_source(pin)
    return paths.source_dir(pin.name)


def stand_in(root: Path, wheel: Path) -> Path:
    """Write the stand-in package ``root/torch_npu`` over the unpacked wheel ``wheel``; return
    ``root`` (what goes on PYTHONPATH)."""
    pkg = root / "torch_npu"
    (pkg / "utils").mkdir(parents=True, exist_ok=True)
    for name in ("include", "lib"):
        link = pkg / name
        if not link.exists():
            link.symlink_to(wheel / name, target_is_directory=True)
    shutil.copyfile(wheel / "version.py", pkg / "version.py")
    shutil.copyfile(wheel / "utils" / "cpp_extension.py", pkg / "utils" / "cpp_extension.py")
    version = _wheel_version(wheel)
    (pkg / "__init__.py").write_text(STAND_IN_INIT.format(version=version))
    (pkg / "utils" / "__init__.py").write_text(STAND_IN_UTILS_INIT)
    (pkg / STAND_IN_MARKER).write_text(stand_in_marker_text(wheel))
    return root


def _wheel_version(wheel: Optional[Path] = None) -> str:
    text = ((wheel or wheel_source()) / "version.py").read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


def stand_in_marker_text(wheel: Optional[Path] = None) -> str:
    return (f"stand-in {STAND_IN_VERSION} over the torch-npu {_wheel_version(wheel)} wheel "
            f"(sha256 {upstream.expected_wheel_sha256(pins.get('torch-npu'))}); written by "
            f"bevdepth-npu for the mmcv NPU build check; it runs no NPU\n")


# ----------------------------------------------------------------------------- inputs and key

def _python_facts(python: str) -> Dict[str, str]:
    code = ("import json, sys, sysconfig, torch; print(json.dumps({'torch': torch.__version__, "
            "'python': f'cp{sys.version_info[0]}{sys.version_info[1]}', "
            "'cxx': sysconfig.get_config_var('CXX') or 'c++'}))")
    proc = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UserError(f"{python} cannot import torch, which the mmcv NPU build needs (torch "
                        f"2.1.0; `bevdepth-npu env --device cpu` builds such a Python): "
                        + proc.stdout.decode(errors="replace").strip().splitlines()[-1])
    facts = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # torch's BuildExtension compiles with $CXX, else c++
    cxx = os.environ.get("CXX") or "c++"
    ver = subprocess.run([cxx, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    facts["compiler"] = ver.stdout.decode(errors="replace").splitlines()[0] \
        if ver.returncode == 0 else f"{cxx}: not found"
    return facts


def inputs(python: str) -> Dict[str, str]:
    """Everything a build's outcome depends on, as recorded in its result and hashed for its
    key."""
    from bevdepth_npu import envbuild
    mmcv = pins.get("mmcv")
    facts = _python_facts(python)
    return {
        "mmcv_commit": mmcv.commit,
        "mmcv_patch_body": envbuild.patch_body_hash(mmcv),
        "torch_npu_wheel_sha256": upstream.expected_wheel_sha256(pins.get("torch-npu")) or "",
        "torch": facts["torch"],
        "python": facts["python"],
        "compiler": facts["compiler"],
        "torch_npu": f"stand-in {STAND_IN_VERSION}",
        "build_env": " ".join(f"{k}={v}" for k, v in sorted(BUILD_ENV.items())),
    }


def result_dir(key: str) -> Path:
    return paths.wheels_dir() / "mmcv-npu-stand-in" / key


def cached_result(python: str) -> Optional[dict]:
    from bevdepth_npu import envbuild
    key = envbuild.sha(*sorted(inputs(python).items()))
    path = result_dir(key) / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    result["log"] = str(result_dir(key) / "build.log")  # wherever this cache is seen from
    return result


# ----------------------------------------------------------------------------- the build

def _copy_tree(tree: Path, dest: Path) -> None:
    shutil.copytree(tree, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "*.so", "dist"))


def _shim(bin_dir: Path, python: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "ninja"
    shim.write_text(NINJA_SHIM.format(python=python, only_env=ONLY_ENV, status_env=STATUS_FILE_ENV))
    shim.chmod(0o755)


def _compile_targets(build_ninja: Path, root: Path) -> Dict[str, str]:
    """object path -> source path relative to the mmcv tree, from torch's build.ninja."""
    out = {}
    if not build_ninja.is_file():
        return out
    for line in build_ninja.read_text().splitlines():
        m = re.match(r"build (.+?): compile (.+)$", line)
        if m:
            src = m.group(2).replace("$:", ":")
            try:
                src = str(Path(os.path.normpath(src)).relative_to(root))
            except ValueError:
                pass
            # ninja names objects normalised in its FAILED lines (no "/./")
            out[os.path.normpath(m.group(1).replace("$:", ":"))] = src
    return out


def parse_failures(log_text: str, objects: Dict[str, str]) -> List[Dict[str, str]]:
    """Every ``FAILED: <object>`` of ninja's log with its source and the first compiler error
    after it."""
    failures = []
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"FAILED: (\S+)", line)
        if not m:
            continue
        obj = m.group(1)
        first = ""
        for later in lines[i + 1:]:
            if later.startswith("FAILED: ") or later.startswith("["):
                break
            if re.search(r"(fatal )?error: ", later):
                first = later.strip()
                break
        source = objects.get(os.path.normpath(obj), obj)
        missing = re.search(r"fatal error: (\S+): No such file or directory", first)
        failures.append({"source": source, "first_error": first or "(no error line)",
                         "missing_header": missing.group(1) if missing else ""})
    return failures


def _find_ext(work: Path) -> Optional[Path]:
    found = sorted(work.glob("build/lib*/mmcv/_ext*.so"))
    return found[0] if found else None


def _needed(so: Path) -> List[str]:
    proc = subprocess.run(["readelf", "-d", str(so)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", proc.stdout.decode())


def build(python: Optional[str] = None, only: Sequence[str] = (), tree: Optional[Path] = None,
          work: Optional[Path] = None, jobs: Optional[int] = None) -> dict:
    """Build mmcv with FORCE_NPU=1 over the stand-in; return the result (see the module
    docstring). ``only``: sources (relative to the mmcv tree) to compile, nothing linked.
    ``tree``: the mmcv tree to build (default: the patched tree, ``trees/mmcv``)."""
    from bevdepth_npu import envbuild
    python = python or sys.executable
    wheel = wheel_source()
    facts = inputs(python)
    tree = tree or envbuild.sync_tree(pins.get("mmcv"))
    own_work = work is None
    work = work or Path(tempfile.mkdtemp(prefix="mmcv-npu-build-"))
    src = work / "mmcv"
    _copy_tree(tree, src)
    stand_in(work / "stand-in", wheel)
    _shim(work / "bin", python)
    for rel in only:
        if not (src / rel).is_file():
            raise UserError(f"--only {rel}: no such source in {tree}")
    logfile = work / "build.log"
    status_file = work / "ninja-status.json"
    env = dict(os.environ, **BUILD_ENV)
    env.pop("PYTHONPATH", None)
    env.update({
        "PYTHONPATH": str(work / "stand-in"),
        "PATH": os.pathsep.join([str(work / "bin"), str(Path(python).parent),
                                 os.environ.get("PATH", "")]),
        "MAX_JOBS": str(jobs or max(1, len(os.sched_getaffinity(0)))),
        STATUS_FILE_ENV: str(status_file),
        ONLY_ENV: ",".join(only),
        "PYTHONNOUSERSITE": "1",
        "LC_ALL": "C",  # plain quotes in the compiler's messages
    })
    cmd = [python, "setup.py", "build_ext"] if only else \
        [python, "setup.py", "bdist_wheel", "-d", str(work / "dist")]
    t0 = time.monotonic()
    with open(logfile, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(cmd, cwd=str(src), env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t0
    text = logfile.read_text(errors="replace")
    ninja_files = sorted(src.glob("build/temp*/build.ninja"))
    objects = _compile_targets(ninja_files[0], src) if ninja_files else {}
    status = json.loads(status_file.read_text()) if status_file.is_file() else None
    failures = parse_failures(text, objects)
    for failure in failures:
        # paths relative to the mmcv tree, not to this build's scratch copy
        failure["first_error"] = failure["first_error"].replace(str(src) + "/", "")
    wanted = [o for o, s in objects.items() if not only or s in {str(Path(r)) for r in only}]
    compiled = sorted(objects[o] for o in wanted if Path(o).is_file())
    ext = _find_ext(src)
    wheels = sorted((work / "dist").glob("*.whl"))
    link_warnings = sorted(set(re.findall(r"warning: (\S+), needed by \S*libtorch_npu\.so, "
                                          r"not found", text)))
    result = {
        "inputs": facts,
        "only": list(only),
        "sources": len(wanted),
        "npu_sources": sum(1 for o in wanted if "/npu/" in objects[o]),
        "compiled": len(compiled),
        "failed": failures,
        "linked": bool(ext) and not only,
        "ext_needed": _needed(ext) if ext and not only else [],
        "link_unresolved_libraries": link_warnings,
        "wheel": wheels[0].name if wheels else "",
        "seconds": round(seconds, 1),
        "setup_py_exit": code,
        "ninja_ran": status is not None,
        "log": str(logfile),
    }
    result["passed"] = bool(status) and not failures and result["compiled"] == len(wanted) \
        and len(wanted) > 0 and (bool(only) or (code == 0 and result["linked"]))
    if not status:
        result["error"] = ("setup.py stopped before ninja ran; last lines of the log:\n  "
                           + "\n  ".join(text.splitlines()[-15:]))
    if result["passed"] and not only:
        _store(result, wheels[0], logfile)
    if own_work and result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
        result["log"] = ""
    return result


def _store(result: dict, wheel: Path, logfile: Path) -> None:
    """Cache a passing full build (result, wheel, log) under the hash of its inputs."""
    from bevdepth_npu import envbuild
    key = envbuild.sha(*sorted(result["inputs"].items()))
    final = result_dir(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=str(final.parent)))
    shutil.copy2(wheel, tmp / wheel.name)
    shutil.copy2(logfile, tmp / "build.log")
    stored = dict(result, key=key, log=str(final / "build.log"))
    atomic_write_text(tmp / RESULT, json.dumps(stored, indent=1, sort_keys=True) + "\n")
    if final.exists():
        final.rename(final.parent / f"{key}.old-{int(time.time())}")
    tmp.rename(final)
    result.update(key=key, log=str(final / "build.log"))
    publish_for_env(result, final / wheel.name)


def publish_for_env(result: dict, wheel: Path) -> Path:
    """Put the wheel where ``bevdepth-npu env --device npu`` over this stand-in looks for it
    (``wheels/mmcv/<key>``, the key and the stamp naming the stand-in): the end-to-end test of the
    npu environment then reuses this build. A real torch_npu has another key."""
    from bevdepth_npu import envbuild
    facts = result["inputs"]
    over = envbuild.torch_npu_label(_wheel_version(), stand_in_marker_text())
    key = envbuild.wheel_key(pins.get("mmcv"), facts["torch"], facts["python"], "npu",
                             BUILD_ENV, over)
    final = paths.wheels_dir() / "mmcv" / key
    if not (final / wheel.name).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=str(final.parent)))
        shutil.copy2(wheel, tmp / wheel.name)
        envbuild.write_wheel_stamp(tmp, over)
        if final.exists():
            final.rename(final.parent / f"{key}.old-{int(time.time())}")
        tmp.rename(final)
    return final


def check(python: Optional[str] = None, rebuild: bool = False) -> dict:
    """The full build's result: the cached one for these inputs, else a new build."""
    python = python or sys.executable
    if not rebuild:
        cached = cached_result(python)
        if cached:
            cached["cached"] = True
            return cached
    result = build(python)
    result["cached"] = False
    return result


def describe(result: dict) -> str:
    lines = []
    what = f"only {', '.join(result['only'])}" if result["only"] else "full build"
    lines.append(f"mmcv FORCE_NPU=1 over the torch_npu stand-in ({what}): "
                 f"{result['compiled']}/{result['sources']} sources compiled "
                 f"({result['npu_sources']} NPU), {result['seconds']} s"
                 + (" (cached result)" if result.get("cached") else ""))
    for failure in result["failed"]:
        extra = (f" (header {failure['missing_header']} is not in the wheel: only CANN ships it)"
                 if failure["missing_header"] else "")
        lines.append(f"  FAILED {failure['source']}: {failure['first_error']}{extra}")
    if not result["only"]:
        if result["linked"]:
            lines.append(f"  _ext linked; needs {', '.join(result['ext_needed'])}")
            if result["link_unresolved_libraries"]:
                lines.append("  libraries of libtorch_npu.so not found at link time (CANN's): "
                             + ", ".join(result["link_unresolved_libraries"]))
        else:
            lines.append("  _ext not linked")
    if result.get("error"):
        lines.append("  " + result["error"])
    lines.append(("PASS" if result["passed"] else "FAIL") +
                 (f"; log: {result['log']}" if result.get("log") else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", metavar="EXE",
                   help="a Python with torch 2.1.0, setuptools and ninja (default: this one; "
                        "the CPU environment's python of `bevdepth-npu env` has them)")
    p.add_argument("--only", action="append", default=[], metavar="SOURCE",
                   help="compile only this source (relative to the mmcv tree, repeatable); "
                        "nothing is linked or cached")
    p.add_argument("--rebuild", action="store_true",
                   help="build even when a passing result for the same inputs is cached")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if args.only:
        result = build(args.python, only=args.only)
    else:
        result = check(args.python, rebuild=args.rebuild)
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else describe(result))
    return 0 if result["passed"] else 1
