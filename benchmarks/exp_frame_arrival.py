"""When each of W2's eight frames is ready, decoded the engine's way: does the vision tower have to
wait for the last frame, or could it start on the first ones?

    python benchmarks/exp_frame_arrival.py [--runs 15] [--pause 0.3]

Decodes W2's eight 1280x720 PNGs (`bench_latency.make_png`) on a persistent pool of the engine's
size, as `Engine.prepare_prompts` does (`load_image_or_pixels(side_by_side=True)`, then `staged_rgb`
into pinned memory on a GPU machine), and prints, over the runs after a warm-up, the median time
at which the 1st, 2nd, ... 8th frame was ready, and the minor page faults per run (getrusage).
`--pause` sleeps between runs (the engine decodes a request's frames once, then spends ~0.8 s on
the GPU). Run it with and without `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the
environment to see what glibc's returning of freed blocks costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_latency import make_png  # noqa: E402

from phivision.generation.engine import MAX_PREPARE_THREADS  # noqa: E402
from phivision.processing.image import staged_rgb  # noqa: E402
from phivision.processing.loading import load_image_or_pixels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args()
    pin = torch.cuda.is_available()
    datas = [make_png(1280, 720, seed) for seed in range(args.frames)]
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"cpus {os.cpu_count()} threads {MAX_PREPARE_THREADS} pinned {pin} env {env or 'default'}", flush=True)
    pool = ThreadPoolExecutor(MAX_PREPARE_THREADS)

    def load(data: bytes, start: float) -> float:
        staged_rgb(load_image_or_pixels(data, side_by_side=True), pin_memory=pin)
        return time.perf_counter() - start

    ready, faults = [], []
    for run in range(args.runs + 2):
        time.sleep(args.pause)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        done = sorted(f.result() for f in [pool.submit(load, data, start) for data in datas])
        if run >= 2:  # the first two warm the pool, the pinned-memory cache and the decoders
            ready.append(done)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    ranks = [statistics.median(run[k] for run in ready) * 1e3 for k in range(args.frames)]
    print("frame ready (ms, median of runs): " + " ".join(f"{t:.2f}" for t in ranks), flush=True)
    print(f"minor page faults per run: median {statistics.median(faults):.0f}, min {min(faults)}, max {max(faults)}")


if __name__ == "__main__":
    main()
