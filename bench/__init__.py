"""Benchmarks of the BEVDepth port against upstream: ``python -m bench``.

One module per benchmark, each with NAME, TITLE and ``run(ctx) -> harness.BenchResult``:
  geometry  get_geometry: upstream's 7-D matmul, an Ascend-style loop, the port (1 and 8 samples)
  pooling   voxel pooling forward/backward against a memory floor; chunked against unchunked
  data      data pipeline samples/s: precomputed depth against on-the-fly lidar projection
  train     training step time and peak memory: patched against upstream (smoke, R50)
  gpu       on CUDA: patched against upstream with its own kernels, batch 8, fp16
  ops       the op inventory's wall time (bevdepth-npu ops --exp smoke)
Shared machinery is in ``harness`` (timing, ratios, tables, JSON) and ``worker`` (the
subprocess each variant runs in). The modules import torch and bevdepth only inside functions,
so that ``--list`` and ``--help`` are quick and the workers choose which bevdepth to import.
"""
from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = ("geometry", "pooling", "data", "train", "gpu", "ops")

_MODULES = {"geometry": "bench.geometry", "pooling": "bench.pooling", "data": "bench.data",
            "train": "bench.train_step", "gpu": "bench.gpu", "ops": "bench.ops"}


def load(name: str) -> ModuleType:
    """The module of benchmark ``name``."""
    if name not in _MODULES:
        raise KeyError(f"no benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return importlib.import_module(_MODULES[name])
