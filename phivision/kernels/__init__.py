"""Triton kernels for the CUDA fast path, each with a PyTorch reference used on the CPU and in tests.

Triton is imported only where it is installed (it ships with CUDA builds of PyTorch); CPU-only
installs never import it.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
