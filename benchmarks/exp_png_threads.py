"""PNG decoding of several images side by side: which decoder, on the engine's threads.

    python benchmarks/exp_png_threads.py

For W1's lone image, W2's eight frames and a W4 burst of 64 images: the wall time to decode them
all and stage their RGB pixels in pinned memory (what the GPU engine does before the vision tower),
on a pool of min(n, 16) threads, through
- Pillow (`load_image_or_pixels(fast_png=False)` then `staged_rgb`),
- pyspng (libspng; holds the GIL),
- imagecodecs' libspng (releases the GIL), then a copy to pinned memory,
- imagecodecs' libspng decoding straight into a pinned buffer (`out=`),
- Wuffs (pywuffs, releases the GIL), then a copy to pinned memory.
Medians of 9 after a warm-up. Needs torch (pinned memory), Pillow, pyspng, imagecodecs and pywuffs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_latency import make_png  # noqa: E402

from phivision.processing import png  # noqa: E402
from phivision.processing.image import staged_rgb  # noqa: E402
from phivision.processing.loading import load_image_or_pixels  # noqa: E402

SETS = {"W1": [(1344, 1344)], "W2": [(1280, 720)] * 8, "W4": [(672, 672)] * 64}


def pinned_copy(pixels: np.ndarray) -> torch.Tensor:
    staged = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    staged.numpy()[...] = pixels
    return staged


def main() -> None:
    import imagecodecs
    import pyspng
    import pywuffs  # noqa: F401 - png.py's Wuffs decoder needs it

    pin = torch.cuda.is_available()
    print("cpus", os.cpu_count(), "imagecodecs", imagecodecs.__version__, "pinned", pin)

    def ic_into(data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
        staged = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        imagecodecs.spng_decode(data, out=staged.numpy())
        return staged

    for name, sizes in SETS.items():
        datas = [make_png(w, h, seed) for seed, (w, h) in enumerate(sizes)]
        shapes = [(h, w, 3) for w, h in sizes]
        ways = {
            "pillow": lambda d, s: staged_rgb(load_image_or_pixels(d, fast_png=False), pin_memory=pin),
            "pyspng": lambda d, s: pinned_copy(pyspng.load(d)),
            "imagecodecs": lambda d, s: pinned_copy(imagecodecs.spng_decode(d)),
            "imagecodecs out=": ic_into,
            "pywuffs": lambda d, s: pinned_copy(png._wuffs_decoder(2)(d)),
        }
        reference = [staged_rgb(load_image_or_pixels(d, fast_png=False), pin_memory=False).numpy() for d in datas]
        row = []
        with ThreadPoolExecutor(min(len(datas), 16)) as pool:
            for way, fn in ways.items():
                def run():
                    if len(datas) == 1:
                        return [fn(datas[0], shapes[0])]
                    return list(pool.map(fn, datas, shapes))

                same = all(np.array_equal(out.numpy(), ref) for out, ref in zip(run(), reference))
                times = []
                for _ in range(9):
                    t0 = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - t0) * 1e3)
                row.append(f"{way} {statistics.median(times):.1f} ms{'' if same else ' (PIXELS DIFFER)'}")
        print(f"{name} ({len(datas)} x {sizes[0][0]}x{sizes[0][1]}): " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
