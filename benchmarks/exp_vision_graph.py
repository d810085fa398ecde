"""Experiment: the CLIP vision tower eager vs captured in a CUDA graph, per crop count and SDPA backend.

    python benchmarks/exp_vision_graph.py --model CKPT_DIR [--crops 5 17 40 160] [--backends default ...] [--out FILE]

For each crop count: the eager tower's wall time and its GPU time (events), the graphed tower's
replay time, and the capture cost, with flash attention and with cuDNN attention (a plan per
shape is paid once, at capture). CUDA only: an experiment to decide whether the engine should
capture the tower, and with which attention kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phivision.generation.vision_graphs import VisionTowerGraphs  # noqa: E402
from phivision.weights import load_model  # noqa: E402

from gpu_timing import capture  # noqa: E402  (benchmarks/, beside this script)

# "default": PyTorch's own choice among all backends; "cudnn-first": cuDNN, else flash / efficient.
BACKENDS = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "cudnn-first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}


def tower_layers(tower, pixels: torch.Tensor, backend: str) -> torch.Tensor:
    """The tower's forward with the SDPA backend chosen here (the package's forward pins flash)."""
    backends = BACKENDS[backend]
    context = contextlib.nullcontext() if backends is None else sdpa_kernel(backends, set_priority=backend == "cudnn-first")
    with context:
        return tower(pixels, plan_per_shape=True)  # plan_per_shape: the forward leaves the backend to us


def timed(call, runs: int = 10) -> tuple[float, float]:
    """(median wall ms, median GPU ms) of call() over runs, each synchronised."""
    walls, gpus = [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        walls.append(1e3 * (time.perf_counter() - t0))
        gpus.append(start.elapsed_time(end))
    walls.sort()
    gpus.sort()
    return walls[len(walls) // 2], gpus[len(gpus) // 2]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--crops", type=int, nargs="+", default=[5, 17, 40, 160])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    tower = model.vision_tower
    rows = []
    for n in args.crops:
        pixels = torch.randn(n, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        for backend in args.backends:
            for _ in range(3):
                reference = tower_layers(tower, pixels, backend)
            eager_wall, eager_gpu = timed(lambda: tower_layers(tower, pixels, backend))
            t0 = time.perf_counter()
            graph, out = capture(lambda: tower_layers(tower, pixels, backend))
            torch.cuda.synchronize()
            capture_ms = 1e3 * (time.perf_counter() - t0)
            graph_wall, graph_gpu = timed(graph.replay)
            error = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            row = dict(crops=n, backend=backend, eager_wall_ms=eager_wall, eager_gpu_ms=eager_gpu,
                       graph_wall_ms=graph_wall, graph_gpu_ms=graph_gpu, capture_ms=capture_ms, max_rel_diff=error)
            rows.append(row)
            print(f"{n:4d} crops {backend:6s}: eager wall {eager_wall:7.2f} ms (GPU {eager_gpu:7.2f}), graph {graph_wall:7.2f} ms "
                  f"(GPU {graph_gpu:7.2f}), capture {capture_ms:6.1f} ms, diff {error:.1e}", flush=True)
            del graph, out
    # The package's graphs: exact buckets and a padded one (37 crops in the 40-crop graph) against eager.
    graphs = VisionTowerGraphs(tower, 160)
    for n in (17, 37):
        pixels = torch.randn(n, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        eager = tower(pixels).float()
        replayed = graphs(pixels).float()
        error = ((replayed - eager).abs().max() / eager.abs().max()).item()
        wall, gpu = timed(lambda: graphs(pixels))
        rows.append(dict(crops=n, backend="package graphs", graph_wall_ms=wall, graph_gpu_ms=gpu, max_rel_diff=error))
        print(f"package VisionTowerGraphs, {n} crops: {wall:.2f} ms (GPU {gpu:.2f}), max rel diff to eager {error:.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
