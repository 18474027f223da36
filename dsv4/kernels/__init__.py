"""Triton kernels behind `dsv4.ops` (each primitive's PyTorch twin lives there).

This package never imports `dsv4`: each module takes plain tensors and returns plain tensors, so a
kernel can be read, tested and benchmarked on its own. The default kernels use only portable Triton
(`tl.dot`, no Hopper-only instructions) so they run on Ampere, Ada and Hopper GPUs. On a CPU they run
under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use at tiny sizes.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
