"""GPU time of a call, from CUDA events: the timing loop the experiment scripts share."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


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


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn() captured in a CUDA graph, after one call on a side stream (the warm-up a capture needs:
    lazy initialisation, workspaces, plans): the graph, and what the captured call returned (its
    tensors are the ones each replay writes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
