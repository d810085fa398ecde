"""The CLIP vision tower replayed from CUDA graphs, one per crop-count bucket.

Eagerly, small batches are bound by kernel launches (~330 for the tower's 23 layers): 5 crops take
8.0 ms eagerly and 4.7 replayed (H200). A graph replays all launches at once, and since each shape is
captured once, attention may use cuDNN's kernel, which plans per shape but runs faster.

A batch of n crops runs in the smallest bucket b >= n (every count up to 32, then multiples of 8):
the b - n spare crops hold stale pixels, and since attention never mixes crops, nothing of them
reaches the real ones. Buckets are captured when first needed, so an engine that only ever sees
17-crop batches holds the memory of 17 crops' activations, not of the largest batch. A server
captures them all at start instead (`capture_all`, ~17 s on an H200): a capture in the middle of a
burst of requests holds up every running request (W4 with lazy captures reached 2,849 output
tokens/s, and 3,310 with all captured at start, on two H200s of the same kind).

All graphs share one input buffer, one output buffer and one memory pool, which grows to the
largest bucket captured (the engine reserves a full vision batch's activations for it when it
sizes the KV pool). Graphs are replayed one at a time on one stream, which is what makes sharing
the pool safe.
"""

from __future__ import annotations

import torch
from torch import nn

DENSE_BUCKETS_UP_TO = 32
BUCKET_STEP = 8


def crop_buckets(max_crops: int) -> list[int]:
    """The crop counts that get a graph: 1..32, then every multiple of 8 up to max_crops (included)."""
    dense = list(range(1, min(max_crops, DENSE_BUCKETS_UP_TO) + 1))
    steps = list(range(DENSE_BUCKETS_UP_TO + BUCKET_STEP, max_crops + 1, BUCKET_STEP))
    return sorted({*dense, *steps, max_crops})


def bucket_for(num_crops: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds num_crops, or None when it is over the largest."""
    for bucket in buckets:
        if bucket >= num_crops:
            return bucket
    return None


class VisionTowerGraphs:
    """A drop-in for `tower(crops)` on CUDA: (N, 3, S, S) crops -> (N, P, C) features.

    The result is a view of a buffer that the next call overwrites: use it (or copy it) first.
    Batches over `max_crops` run eagerly.
    """

    def __init__(self, tower: nn.Module, max_crops: int):
        param = next(tower.parameters())
        if param.device.type != "cuda":
            raise ValueError("vision-tower CUDA graphs need the tower on a CUDA device")
        config = tower.config
        size = config.image_size
        patches = (size // config.patch_size) ** 2
        self.tower = tower
        self.buckets = crop_buckets(max_crops)
        self.pixels = torch.zeros((max_crops, config.num_channels, size, size), dtype=param.dtype, device=param.device)
        self.features = torch.empty((max_crops, patches, config.hidden_size), dtype=param.dtype, device=param.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @torch.inference_mode()
    def capture(self, bucket: int) -> torch.cuda.CUDAGraph:
        pixels, features = self.pixels[:bucket], self.features[:bucket]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            features.copy_(self.tower(pixels, plan_per_shape=True))  # warm-up outside the capture (plans, workspaces)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other threads may touch CUDA (memory statistics) during a capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            features.copy_(self.tower(pixels, plan_per_shape=True))
        self.graphs[bucket] = graph
        return graph

    def capture_all(self) -> None:
        """Captures every bucket not captured yet, largest first (its pool then holds the others)."""
        for bucket in sorted(self.buckets, reverse=True):
            if bucket not in self.graphs:
                self.capture(bucket)
        torch.cuda.synchronize()

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        num = crops.shape[0]
        bucket = bucket_for(num, self.buckets)
        if bucket is None:
            return self.tower(crops)
        graph = self.graphs.get(bucket) or self.capture(bucket)
        self.pixels[:num].copy_(crops)
        graph.replay()
        return self.features[:num]  # (N, P, C)
