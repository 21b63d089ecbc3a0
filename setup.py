"""Installs the helper package ``bevdepth_npu`` and its console command ``bevdepth-npu``.

    pip install -e .

The helper needs the standard library, git and filelock (the lock on a run directory of
``bevdepth-npu run``; torch depends on it too); ``summarize`` draws its plot with matplotlib when
it is installed (the environment built by ``bevdepth-npu env`` has both).
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
version = {}
exec((ROOT / "bevdepth_npu" / "__init__.py").read_text(), version)

setup(
    name="bevdepth-npu",
    version=version["__version__"],
    description="BEVDepth on Ascend NPU, CUDA and CPU: pinned upstreams, patches, environment, "
                "synthetic nuScenes and run summaries",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bevdepth_npu", "bevdepth_npu.*"]),
    python_requires=">=3.8,<3.12",
    install_requires=["filelock"],
    extras_require={"plot": ["matplotlib"]},
    entry_points={"console_scripts": ["bevdepth-npu = bevdepth_npu.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
)
