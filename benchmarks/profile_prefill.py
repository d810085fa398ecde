"""Where W4-style request preparation and prefill steps spend their time (torch.profiler), engine only.

    python benchmarks/profile_prefill.py --model CKPT_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import make_png  # noqa: E402
from w4_engine_only import QUESTION  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig, PromptRequest  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    processor = Processor.from_pretrained(args.model, num_crops=4)
    engine = Engine(model, processor, EngineConfig(max_num_seqs=64, kv_cache_tokens=65536))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def batch(seed, n=10, text_only=False):
        reqs = []
        for i in range(n):
            if text_only:
                reqs.append(PromptRequest("<|user|>\n" + "word " * 790 + f"{seed + i}<|end|>\n<|assistant|>\n", [], params))
            else:
                reqs.append(PromptRequest(QUESTION.format(i=seed + i), [make_png(672, 672, seed + i)], params, 4))
        return reqs

    def timed_steps(label, reqs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_prompts(reqs)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        kinds = []
        while engine.has_unfinished():
            s0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            kinds.append((engine._last_kind, round((time.perf_counter() - s0) * 1e3, 1)))
        print(f"{label}: add {1e3 * (t1 - t0):.1f} ms; steps (kind, ms): {kinds}", flush=True)

    timed_steps("warm-up images", batch(500))
    timed_steps("10 image requests", batch(0))
    timed_steps("10 text requests", batch(100, text_only=True))
    timed_steps("1 image request", batch(200, n=1))
    from torch.profiler import ProfilerActivity, profile

    # Preparation (image decoding, preprocessing, vision tower) of 32 requests at once.
    reqs = batch(700, n=32)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.add_prompts(reqs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"add_prompts of 32 image requests: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_ms:.1f} ms", flush=True)
    print(events.table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=15), flush=True)
    while engine.has_unfinished():
        engine.step()

    reqs = batch(300)
    engine.add_prompts(reqs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"prefill step of 10 image requests: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_ms:.1f} ms", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
    while engine.has_unfinished():
        engine.step()


if __name__ == "__main__":
    main()
