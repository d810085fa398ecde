"""Where request preparation and prefill steps spend their time (torch.profiler), engine only.

    python benchmarks/profile_prefill.py --model CKPT_DIR [--sections steps,prep,prefill,vision,w3]

steps: timed W4-style adds and steps; prep: a profile of preparing 32 W4 requests; prefill: a profile
of one prefill step of 10 W4 requests; vision: wall and GPU time of preparing n W4 requests for
several n (each a new crop count, as a server sees them); w3: W3's 8K-token prefill, timed and profiled;
w1, w2: the workload's time to first token in its parts (CPU half, vision half, prefill), then a profile of its preparation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import WORKLOADS, make_png, w3_ids, workload_inputs  # noqa: E402
from w4_engine_only import QUESTION  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig, PromptRequest  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--sections", default="steps,prep,prefill,vision,w3,w1,w2")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
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
    if "steps" in sections:
        timed_steps("10 image requests", batch(0))
        timed_steps("10 text requests", batch(100, text_only=True))
        timed_steps("1 image request", batch(200, n=1))
    from torch.profiler import ProfilerActivity, profile

    if "vision" in sections:
        # Each n is a crop count the tower has not seen (5 crops a request): the first-call costs a
        # server pays for every new batch size are in these figures.
        for n in (1, 3, 7, 13, 19, 32, 32):
            reqs = batch(1000 + 50 * n, n=n)
            prepared = engine.prepare_prompts(reqs)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            engine.add_prepared(prepared)
            t1 = time.perf_counter()
            end.record()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"vision: {n:2d} requests ({5 * n} crops): add_prepared returns after {1e3 * (t1 - t0):.1f} ms, "
                  f"wall {1e3 * (t2 - t0):.1f} ms, GPU {start.elapsed_time(end):.1f} ms", flush=True)
            while engine.has_unfinished():
                engine.step()

    if "w3" in sections:
        ids = w3_ids(processor)
        w3 = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=len(ids) + 128, kv_cache_tokens=len(ids) + 128,
                                                   enable_prefix_caching=False, max_num_batched_tokens=16384,
                                                   prefill_chunk_size=16384))
        for attempt in range(3):
            w3.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            w3.step()
            torch.cuda.synchronize()
            print(f"W3 prefill step ({len(ids)} tokens, one chunk), run {attempt}: {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)
            while w3.has_unfinished():
                w3.step()
        w3.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            w3.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22), flush=True)
        while w3.has_unfinished():
            w3.step()
        del w3
        torch.cuda.empty_cache()
    for name in ("W1", "W2"):
        if name.lower() not in sections:
            continue
        prompt, images = workload_inputs(name, processor)
        w2 = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=6500, kv_cache_tokens=6500,
                                                   enable_prefix_caching=False))
        request = PromptRequest(prompt, images, SamplingParams(max_new_tokens=1, ignore_eos=True), WORKLOADS[name]["num_crops"])
        for attempt in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prepared = w2.prepare_prompts([request])
            t1 = time.perf_counter()
            w2.add_prepared(prepared, use_image_cache=False)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            w2.step()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            print(f"{name} run {attempt}: CPU half {1e3 * (t1 - t0):.1f} ms (decoding {1e3 * prepared[0].load_s:.1f}), "
                  f"vision half {1e3 * (t2 - t1):.1f} ms, prefill {1e3 * (t3 - t2):.1f} ms", flush=True)
            while w2.has_unfinished():
                w2.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            w2.add_prompts([request], use_image_cache=False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
        while w2.has_unfinished():
            w2.step()
        del w2
        torch.cuda.empty_cache()
    if not sections & {"prep", "prefill"}:
        return

    # Preparation (image decoding, preprocessing, vision tower) of 32 requests at once.
    if "prep" not in sections:
        return _profile_prefill_step(engine, batch, profile, ProfilerActivity)
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
    if "prefill" in sections:
        _profile_prefill_step(engine, batch, profile, ProfilerActivity)


def _profile_prefill_step(engine, batch, profile, ProfilerActivity) -> None:
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
