"""How long W2's image preprocessing on the GPU holds up the vision tower: the time from having the
eight decoded frames (staged in pinned memory, as the engine's decoding threads leave them) to
their pixel values being ready on the GPU, for the eight frames together (what the engine does
now) and for one frame (what would remain after the last frame if each frame were uploaded and
preprocessed as soon as it was decoded).

    python benchmarks/exp_preprocess_gpu.py [--runs 20]

Each figure is the median wall time of a call followed by a synchronisation, the GPU idle before
it; the uploads alone are timed too (pinned host to device copies of the staged frames).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_latency import make_png  # noqa: E402

from phivision.processing.image import preprocess_images, staged_rgb  # noqa: E402
from phivision.processing.loading import load_image_or_pixels  # noqa: E402


def wall_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs + 2):
        torch.cuda.synchronize()
        time.sleep(0.01)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--num-crops", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda")
    images = [load_image_or_pixels(make_png(1280, 720, seed), side_by_side=True) for seed in range(8)]

    def staged() -> list[torch.Tensor]:
        return [staged_rgb(image, pin_memory=True) for image in images]

    rows = []
    for count in (8, 1):
        frames = staged()[:count]
        rows.append((f"{count} frame(s): uploads only",
                     wall_ms(lambda: [f.to(device, non_blocking=True) for f in frames], args.runs)))
        rows.append((f"{count} frame(s): preprocess_images",
                     wall_ms(lambda: preprocess_images(images[:count], args.num_crops, device=device, staged=frames),
                             args.runs)))
    for name, ms in rows:
        print(f"{name:40s} {ms:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
