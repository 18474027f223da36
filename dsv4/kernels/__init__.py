"""Triton kernels behind `dsv4.ops`; each has a plain-PyTorch twin there. Never imports `dsv4`."""
