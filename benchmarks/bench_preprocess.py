"""Image preprocessing speed: phivision.processing.image.preprocess_image vs the reference's approach.

The reference (`Phi3VImageProcessor`, spec §4) is re-created below in its own straightforward,
unvectorised way, without torchvision or transformers: convert("RGB") (a copy even for RGB
images), transpose portrait images, one PIL bilinear resize, white padding (numpy), transpose
back, permute + contiguous, float / 255, clone, - mean, / std, bicubic global view, crops by a
slicing loop, torch.cat with the global view and the zero padding, torch.stack into a batch of one. Both sides get the same decoded PIL image, so
decoding is not timed. The script checks that both produce identical pixel values before timing.

Usage:  python benchmarks/bench_preprocess.py [--runs 15] [--block 5] [--size 4032x3024] [--num-crops 16 4]
Torch threads are left at their default (the number of cores) unless --threads is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phivision.processing.image import CLIP_MEAN, CLIP_STD, preprocess_image  # noqa: E402


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth structure, edges and sensor-like noise (not flat, not pure noise)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    base = np.stack([np.sin(6 * x + 3 * y), np.cos(4 * y - 2 * x), np.sin(9 * x * y)], axis=-1) * 90 + 128
    base[(x > 0.3) & (x < 0.5) & (y > 0.2) & (y < 0.7)] *= 0.4  # a hard-edged object
    noisy = base + rng.normal(0.0, 10.0, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def reference_preprocess(image: Image.Image, num_crops: int) -> torch.Tensor:
    """The reference's per-image steps done its straightforward way (spec §4); returns (1, N+1, 3, 336, 336).

    Same operations and order as Phi3VImageProcessor; only the library calls differ where the
    reference goes through torchvision (pad: numpy instead of ImageOps.expand; crops: a slicing
    loop instead of reshape/permute/contiguous; both copy the same amount of data).
    """
    if image.mode != "RGB":  # transformers' convert_to_rgb
        image = image.convert("RGB")
    image = image.convert("RGB")  # the processor converts again: a full copy for RGB input
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)  # torchvision resize on a PIL image
    target = int(np.ceil(new_h / 336) * 336)
    top = int((target - new_h) / 2)
    pixels = np.pad(np.array(image), ((top, target - new_h - top), (0, 0), (0, 0)), constant_values=255)
    if transposed:
        pixels = pixels.transpose(1, 0, 2)
    # ToTensor: HWC uint8 -> CHW float / 255; Normalize: clone, - mean, / std
    hd = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)
    hd = hd.clone()
    hd.sub_(torch.as_tensor(CLIP_MEAN, dtype=hd.dtype).view(-1, 1, 1)).div_(torch.as_tensor(CLIP_STD, dtype=hd.dtype).view(-1, 1, 1))
    global_view = F.interpolate(hd.unsqueeze(0).float(), size=(336, 336), mode="bicubic").to(hd.dtype)
    h, w = hd.shape[1:]
    crops = [hd[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336] for r in range(h // 336) for c in range(w // 336)]
    stacked = torch.cat([global_view, torch.stack(crops)], dim=0)
    if stacked.shape[0] < num_crops + 1:
        pad = torch.zeros(num_crops + 1 - stacked.shape[0], 3, 336, 336, dtype=stacked.dtype)
        stacked = torch.cat([stacked, pad], dim=0)
    return torch.stack([stacked], dim=0)


def alternating_times(first, second, runs: int, block: int) -> tuple[list[float], list[float]]:
    """Milliseconds per run of each function, in alternating blocks of `block` runs.

    Alternating spreads slow phases of a shared machine over both sides; blocks (rather than
    strict alternation) let each side run in its own steady state, as it would when preprocessing
    many images in a row, instead of inheriting the other's freshly freed memory.
    """
    times: tuple[list[float], list[float]] = ([], [])
    while len(times[1]) < runs:
        for fn, bucket in ((first, times[0]), (second, times[1])):
            fn()  # warm-up of this block
            for _ in range(min(block, runs - len(bucket))):
                start = time.perf_counter()
                fn()
                bucket.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4032x3024", help="WIDTHxHEIGHT of the synthetic photo")
    parser.add_argument("--num-crops", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per side and setting (median reported)")
    parser.add_argument("--block", type=int, default=5, help="runs in a row of one side before switching to the other")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    image = photo_like(width, height)

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Pillow {PIL.__version__}, numpy {np.__version__}")
    print(
        f"image: {width}x{height} RGB, synthetic photo-like (seed 0); median of {args.runs} runs per side, "
        f"in alternating blocks of {args.block}, each block after a warm-up run\n"
    )
    print(f"{'num_crops':>9} | {'HD size':>9} | {'reference ms':>12} | {'phivision ms':>12} | {'speed-up':>8} | best of runs (ref / ours)")
    print("-" * 92)
    for num_crops in args.num_crops:
        ours = preprocess_image(image, num_crops)
        expected = reference_preprocess(image, num_crops)[0]
        if not torch.equal(ours.pixel_values, expected):
            raise SystemExit(f"num_crops={num_crops}: outputs differ (max abs diff {(ours.pixel_values - expected).abs().max()})")
        ref_times, our_times = alternating_times(
            lambda: reference_preprocess(image, num_crops), lambda: preprocess_image(image, num_crops), args.runs, args.block
        )
        ref_ms, our_ms = statistics.median(ref_times), statistics.median(our_times)
        hd = f"{ours.image_size[0]}x{ours.image_size[1]}"
        print(
            f"{num_crops:>9} | {hd:>9} | {ref_ms:>12.1f} | {our_ms:>12.1f} | {ref_ms / our_ms:>7.2f}x | "
            f"{min(ref_times):.1f} / {min(our_times):.1f} ms ({min(ref_times) / min(our_times):.2f}x)"
        )
    print("\nreference = the reference's steps re-created in this file; both produce identical pixel values (checked).")


if __name__ == "__main__":
    main()
