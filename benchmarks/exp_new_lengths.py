"""Prefill of prompts of lengths the engine has not seen, with and without the cuDNN buckets; and
the host's PNG decoding of W1/W2's images through Pillow and through libspng.

    python benchmarks/exp_new_lengths.py --model CKPT_DIR [--buckets 256,512] [--out results.json]

Prefill: flash, then cuDNN with each bucket size of --buckets (default: the runner's own); for each
setting a fresh engine (its set-up time, which builds the cuDNN plans, is
reported), then one text prompt of each length in LENGTHS, each length new to the process except
the repeats at the end; the time from adding the request to its first token (GPU synchronised).
Decoding: `load_image_or_pixels` of each workload's PNG bytes, the median of 15, with pyspng and with it
hidden (Pillow), plus the pinned staging copy the GPU engine makes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import WORKLOADS, make_png  # noqa: E402

from phivision.generation import runner  # noqa: E402
from phivision.generation.engine import Engine, EngineConfig  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing import png  # noqa: E402
from phivision.processing.image import staged_rgb  # noqa: E402
from phivision.processing.loading import load_image_or_pixels  # noqa: E402
from phivision.weights import load_model  # noqa: E402

LENGTHS = (2531, 3377, 4100, 5222, 6077, 7001, 8190, 8211, 6077, 8190)  # the last two repeat


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def prefill_times(model, cudnn_prefill: bool) -> dict:
    t0 = time.perf_counter()
    engine = Engine(model, None, EngineConfig(max_num_seqs=1, max_model_len=8400, kv_cache_tokens=8400,
                                              enable_prefix_caching=False, cudnn_prefill=cudnn_prefill))
    setup_s = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    rng = np.random.default_rng(0)
    warm = engine.add_request(rng.integers(1000, 29000, size=1500).tolist(), params)  # not a length measured below
    while engine.has_unfinished():
        engine.step()
    times = []
    for length in LENGTHS:
        ids = rng.integers(1000, 29000, size=length).tolist()
        t0 = sync_time()
        engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        times.append((length, (sync_time() - t0) * 1e3))
    del engine, warm
    torch.cuda.empty_cache()
    return {"setup_s": setup_s, "prefill_ms": times}


def decode_times(runs: int = 15) -> dict:
    out = {}
    for name in ("W1", "W2"):
        width, height = WORKLOADS[name]["images"][0]
        data = make_png(width, height, 0)
        row = {}
        for decoder in ("libspng", "pillow"):
            if decoder == "libspng" and not png.available():
                continue
            saved = png.pyspng, png.imagecodecs
            if decoder == "pillow":
                png.pyspng = png.imagecodecs = None
            try:
                times, staged_times = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    image = load_image_or_pixels(data)
                    t1 = time.perf_counter()
                    staged_rgb(image, pin_memory=True)
                    staged_times.append((time.perf_counter() - t1) * 1e3)
                    times.append((t1 - t0) * 1e3)
            finally:
                png.pyspng, png.imagecodecs = saved
            row[decoder] = {"decode_ms": statistics.median(times), "stage_ms": statistics.median(staged_times)}
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--buckets", default=str(runner.CUDNN_PREFILL_BUCKET),
                        help="comma-separated cuDNN bucket sizes to try (the runner's constant, patched here)")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": decode_times()}
    for name, row in report["decode"].items():
        print(name, " ".join(f"{k}: decode {v['decode_ms']:.2f} ms + staging {v['stage_ms']:.2f} ms" for k, v in row.items()))
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    settings = [("cudnn_prefill=False", False, None)]
    settings += [(f"cudnn_prefill=True bucket={size}", True, int(size)) for size in args.buckets.split(",")]
    for label, setting, bucket in settings:
        if bucket is not None:
            runner.CUDNN_PREFILL_BUCKET = bucket  # read by runner._bucket at each call
        report[label] = result = prefill_times(model, setting)
        print(f"{label}: engine set-up {result['setup_s']:.2f} s; prefill ms by length:",
              " ".join(f"{n}:{ms:.1f}" for n, ms in result["prefill_ms"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
