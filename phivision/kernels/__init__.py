"""Triton kernels for the CUDA fast path, each with a PyTorch reference used on the CPU and in tests.

Triton is imported only where it is installed (it ships with CUDA builds of PyTorch); CPU-only
installs never import it.

Programmatic dependent launch (PDL, Hopper and newer): a decode step is ~320 short kernels in a
row, and without PDL each one is launched only after the previous has finished and flushed. Our
kernels, launched with PDL, are scheduled while the previous kernel's last programs still run; each
waits (`gdc_wait`) before reading anything an earlier kernel wrote, so the results are the same,
and the matrix-vector product requests its first weight tile before waiting (weights are never
written). Every program of every PDL kernel waits, unconditionally: a later kernel's wait covers
all kernels before it only because each of them waited for its own predecessor.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    if os.environ.get("PHIVISION_PDL", "1") == "0":  # escape hatch for comparisons and old drivers
        return False
    import torch
    import triton.language as tl

    if not hasattr(tl.extra.cuda, "gdc_wait"):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(tensor) -> dict:
    """Launch options for a Triton kernel with a USE_PDL flag, on the device of `tensor`:
    {"USE_PDL": True, "launch_pdl": True} where PDL is supported, else {"USE_PDL": False}."""
    if not tensor.is_cuda:
        return {"USE_PDL": False}
    import torch

    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if _pdl_supported(index):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
