"""Host-to-device copies that never make the host wait for the GPU.

A copy from pageable host memory may be staged by the driver in stream order, the host blocking
until the GPU has finished the work queued before it (the vision tower, a previous step). The
prefill path copies its inputs through pinned memory instead, so the host goes on queueing while
the GPU works. PyTorch's pinned-memory cache keeps each buffer alive until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`: through pinned memory and asynchronously on CUDA."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
