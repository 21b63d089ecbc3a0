"""Does the stack install from wheels on another platform? Asks the package registry.

    python -m bevdepth_npu.wheel_resolution [--arch aarch64] [--python-version 3.11] [--json]

Atlas 800T A2 servers usually have Kunpeng (aarch64) CPUs. This resolves ``requirements.txt``
plus torch 2.1.0 and torchvision 0.16.0 (and the packages installed without their requirements)
for CPython on that architecture with pip's own resolver (``pip install --dry-run --report`` with
``--platform``, binary wheels only), for every manylinux tag a current Kunpeng server's glibc
accepts (manylinux2014 = 2_17 up to 2_28; openEuler 22.03 has glibc 2.34). A package without
such a wheel is named, its sdist looked at (pure Python: no C/C++/Cython/Fortran sources and no
``ext_modules``) and its own requirements resolved in its place. Unpinned requirements can
change the answer, so the result carries the date it was asked; it is kept in
``<cache>/checks/wheel-resolution-<arch>-cp<XY>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from bevdepth_npu import envbuild, paths
from bevdepth_npu.errors import UserError
from bevdepth_npu.fsutil import atomic_write_text

MANYLINUX = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_28")
COMPILED_SUFFIXES = (".c", ".cc", ".cpp", ".cxx", ".pyx", ".f", ".f90", ".cu")
_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


def _requirement_lines() -> List[str]:
    reqs = []
    for line in (paths.REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs + [envbuild.TORCH, envbuild.TORCHVISION]


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, 1)[0].strip().lower().replace("_", "-")


def _platform_args(arch: str, python_version: str) -> List[str]:
    args = ["--only-binary", ":all:", "--python-version", python_version,
            "--implementation", "cp", "--abi", f"cp{python_version.replace('.', '')}"]
    for tag in MANYLINUX:
        args += ["--platform", f"{tag}_{arch}"]
    return args


def _pip(args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _sdist_facts(req: str, where: Path) -> Dict[str, object]:
    """The sdist of a requirement that has no wheel: pure Python or not, its requirements."""
    proc = _pip(["download", "--no-deps", "--no-binary", ":all:", "-d", str(where), req])
    found = sorted(where.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = proc.stdout.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return {"sdist": f"none ({tail[0]})", "pure_python": False, "requires": []}
    sdist = [p for p in found if _name(p.name.rsplit("-", 1)[0]) == _name(req)] or found
    with tarfile.open(sdist[0]) as tf:
        names = tf.getnames()
        compiled = [n for n in names if n.endswith(COMPILED_SUFFIXES)]
        setup = next((n for n in names if n.count("/") == 1 and n.endswith("/setup.py")), None)
        ext = bool(setup) and b"ext_modules" in tf.extractfile(setup).read()
        requires_txt = next((n for n in names if n.endswith(".egg-info/requires.txt")), None)
        requires: List[str] = []
        if requires_txt:
            for line in tf.extractfile(requires_txt).read().decode().splitlines():
                if line.startswith("["):
                    break  # extras follow
                if line.strip():
                    requires.append(line.strip())
    return {"sdist": sdist[0].name, "pure_python": not compiled and not ext,
            "compiled_sources": compiled[:5], "requires": requires}


def resolve(arch: str = "aarch64", python_version: str = "3.11") -> dict:
    """Resolve the stack for ``arch``/CPython ``python_version``; see the module docstring."""
    reqs = _requirement_lines()
    source_only: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bevdepth-npu-resolve-") as tmp:
        for _ in range(20):
            report = Path(tmp) / "report.json"
            proc = _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                         str(report), "--target", str(Path(tmp) / "target"),
                         *_platform_args(arch, python_version), *reqs])
            out = proc.stdout.decode(errors="replace")
            if proc.returncode == 0:
                break
            missing = _NO_MATCH.search(out)
            if not missing:
                raise UserError(f"resolving for {arch} failed: {out.strip().splitlines()[-1:]}")
            name = _name(missing.group(1))
            req = next((r for r in reqs if _name(r) == name), missing.group(1))
            facts = _sdist_facts(req, Path(tmp) / "sdists")
            source_only[name] = dict(facts, requirement=req)
            reqs = [r for r in reqs if _name(r) != name] + \
                [r for r in facts["requires"] if _name(r) not in {_name(x) for x in reqs}]
        else:
            raise UserError("resolution did not settle after 20 packages without wheels")
        installed = json.loads(report.read_text())["install"]
        # installed without their requirements by `bevdepth-npu env`, so resolved alone
        proc = _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps",
                     "--report", str(report), "--target", str(Path(tmp) / "target"),
                     *_platform_args(arch, python_version), *envbuild.NO_DEPS])
        if proc.returncode != 0:
            raise UserError(f"resolving {', '.join(envbuild.NO_DEPS)} for {arch} failed: "
                            + proc.stdout.decode(errors="replace").strip().splitlines()[-1])
        installed += json.loads(report.read_text())["install"]
    wheels = []
    for item in installed:
        url = item["download_info"]["url"]
        filename = url.rsplit("/", 1)[-1]
        tags = filename[:-4].split("-")[-3:] if filename.endswith(".whl") else ["sdist"]
        wheels.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                       "file": filename,
                       "kind": "pure" if tags[-1] == "any" else
                       ("binary" if arch in tags[-1] else "other")})
    return {
        "date": datetime.date.today().isoformat(),
        "arch": arch,
        "python": python_version,
        "platforms": [f"{tag}_{arch}" for tag in MANYLINUX],
        "wheels": sorted(wheels, key=lambda w: w["name"].lower()),
        "source_only": source_only,
    }


def record(result: dict) -> Path:
    """Keep the answer with its date in the cache (``checks/``), one file per platform."""
    path = paths.cache_dir() / "checks" / \
        f"wheel-resolution-{result['arch']}-cp{result['python'].replace('.', '')}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path


def describe(result: dict) -> str:
    binary = [w for w in result["wheels"] if w["kind"] == "binary"]
    pure = [w for w in result["wheels"] if w["kind"] == "pure"]
    lines = [f"{result['date']}: the stack for CPython {result['python']} on {result['arch']} "
             f"({', '.join(result['platforms'])}): {len(binary)} binary wheels, {len(pure)} "
             f"pure-Python wheels"]
    for w in result["wheels"]:
        if w["kind"] == "other":
            lines.append(f"  unexpected file {w['file']}")
    for name, facts in sorted(result["source_only"].items()):
        kind = "pure-Python sdist" if facts["pure_python"] else "sdist with compiled code"
        lines.append(f"  builds from source: {facts['requirement']} ({kind} {facts['sdist']})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="aarch64", help="machine architecture (default aarch64)")
    p.add_argument("--python-version", default="3.11", help="CPython version (default 3.11)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    result = resolve(args.arch, args.python_version)
    record(result)
    print(json.dumps(result, indent=1) if args.json else describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
