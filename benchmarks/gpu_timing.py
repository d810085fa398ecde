"""GPU time of a call, from CUDA events: the timing loop the experiment scripts share."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_gpu_ms(fn: Callable[[], object], rounds: int, calls_per_round: int = 1, warmup: int = 1) -> float:
    """Median over `rounds` of the GPU time of `calls_per_round` back-to-back calls of fn(), per
    call (ms), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls_per_round):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_round)
    return statistics.median(times)
