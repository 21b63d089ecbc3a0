"""bevdepth-npu: BEVDepth on Ascend NPU, CUDA and CPU from one patched tree.

The package fetches the pinned upstreams, applies and regenerates the four patches, builds the
environment, generates a synthetic nuScenes and summarises runs. Run ``bevdepth-npu --help``.
"""
__version__ = "0.1.0"
