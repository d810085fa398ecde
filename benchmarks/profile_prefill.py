"""Where request preparation and prefill steps spend their time (torch.profiler), engine only.

    python benchmarks/profile_prefill.py --model CKPT_DIR [--sections steps,vision,w3,w1,w2,prep,prefill]

host: the host's part of W1/W2's preparation (decoding, canvases, threads); steps: timed W4-style adds and steps; vision: wall and GPU time of preparing n W4 requests for
several n (each a new crop count, as a server sees them); w3: W3's 8K-token prefill, timed and
profiled; w1, w2: the workload's time to first token in its parts (CPU half, vision half, prefill),
then a profile of its preparation and of its prefill step; prep: a profile of preparing 32 W4 requests; prefill: a profile of
one prefill step of 10 W4 requests.

Meant for a CUDA machine with a real-shape checkpoint (`make_checkpoint.py`); without CUDA it runs
on the CPU, e.g. on the tiny golden checkpoint as a check of the script itself (w1-w3 need a
context that holds their prompts: the real 128K, not the tiny model's 2048).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import WORKLOADS, make_png, w3_ids, workload_inputs  # noqa: E402
from w4_engine_only import QUESTION  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig, PromptRequest  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402

CUDA = torch.cuda.is_available()
ACTIVITIES = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
SECTIONS = ("host", "steps", "vision", "w3", "w1", "w2", "prep", "prefill")
TRACE_DIR: Path | None = None  # --trace: each profiled call also writes a Chrome trace there
ONE_TOKEN = SamplingParams(max_new_tokens=1, ignore_eos=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def w4_requests(seed: int, n: int = 10, text_only: bool = False) -> list[PromptRequest]:
    """n distinct W4-shaped requests (a 672x672 PNG + a ~30-token question), or ~800-token text ones."""
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    if text_only:
        return [PromptRequest("<|user|>\n" + "word " * 790 + f"{seed + i}<|end|>\n<|assistant|>\n", [], params)
                for i in range(n)]
    return [PromptRequest(QUESTION.format(i=seed + i), [make_png(672, 672, seed + i)], params, 4) for i in range(n)]


def print_profile(prof, sort_by: str, rows: int) -> None:
    key = sort_by if CUDA or not sort_by.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def profiled_call(label: str, call, cuda_rows: int, cpu_rows: int) -> None:
    """Runs call() once under the profiler; prints its wall time, GPU kernel time and both tables."""
    sync()
    with profile(activities=ACTIVITIES) as prof:
        t0 = time.perf_counter()
        call()
        sync()
        wall = time.perf_counter() - t0
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    if TRACE_DIR is not None:
        TRACE_DIR.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(TRACE_DIR / (label.replace(" ", "_").replace("/", "-") + ".json")))
    print(f"{label}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu_ms:.1f} ms", flush=True)
    print_profile(prof, "cuda_time_total", cuda_rows)
    print_profile(prof, "cpu_time_total", cpu_rows)


def timed_steps(engine: Engine, label: str, requests: list[PromptRequest]) -> None:
    sync()
    t0 = time.perf_counter()
    engine.add_prompts(requests)
    sync()
    t1 = time.perf_counter()
    kinds = []
    while engine.has_unfinished():
        s0 = time.perf_counter()
        engine.step()
        sync()
        kinds.append((engine._last_kind, round((time.perf_counter() - s0) * 1e3, 1)))
    print(f"{label}: add {1e3 * (t1 - t0):.1f} ms; steps (kind, ms): {kinds}", flush=True)


def section_host(engine: Engine) -> None:
    """The host's part of W1's and W2's preparation, piece by piece: PNG decoding and HD canvases,
    one image after another and on one thread per image, then the engine's whole CPU half."""
    from concurrent.futures import ThreadPoolExecutor

    from phivision.processing.image import hd_transform
    from phivision.processing.loading import load_image

    def best(call, runs: int = 5) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    import PIL
    from PIL import features

    print(f"Pillow {PIL.__version__}, zlib-ng {features.version('zlib_ng') if 'zlib_ng' in features.get_supported_features() else None}, "
          f"zlib {features.version('zlib')}", flush=True)
    for name in ("W1", "W2"):
        prompt, images = workload_inputs(name, engine.processor)
        crops = WORKLOADS[name]["num_crops"]
        decoded = [load_image(data) for data in images]
        serial_decode = best(lambda: [load_image(data) for data in images])
        serial_canvas = best(lambda: [hd_transform(image, crops, 1) for image in decoded])
        with ThreadPoolExecutor(len(images)) as pool:
            threaded_decode = best(lambda: list(pool.map(load_image, images)))
            threaded_both = best(lambda: list(pool.map(lambda d: hd_transform(load_image(d), crops, 1), images)))
            # When each image's decode ends, from the start of all: whether a vision tower started
            # per image as it arrives would find work early.
            for _ in range(3):
                t0 = time.perf_counter()
                futures = [pool.submit(lambda d: (load_image(d), time.perf_counter())[1], data) for data in images]
                ends = sorted(1e3 * (f.result() - t0) for f in futures)
                print(f"host {name}: each image's decode ends at (ms) {[round(e, 1) for e in ends]}", flush=True)
        request = PromptRequest(prompt, images, ONE_TOKEN, crops)
        prepare = best(lambda: engine.prepare_prompts([request]))
        print(f"host {name} ({len(images)} images): decode {serial_decode:.1f} ms one after another, "
              f"{threaded_decode:.1f} ms on {len(images)} threads; canvases {serial_canvas:.1f} ms one after "
              f"another; decode + canvas on {len(images)} threads {threaded_both:.1f} ms; "
              f"prepare_prompts {prepare:.1f} ms (best of 5)", flush=True)


def section_steps(engine: Engine) -> None:
    timed_steps(engine, "10 image requests", w4_requests(0))
    timed_steps(engine, "10 text requests", w4_requests(100, text_only=True))
    timed_steps(engine, "1 image request", w4_requests(200, n=1))


def section_vision(engine: Engine) -> None:
    """Each n is a crop count the tower has not seen (5 crops a request): the first-call costs a
    server pays for every new batch size are in these figures. The last n repeats (all cached)."""
    for n in (1, 3, 7, 13, 19, 32, 32):
        prepared = engine.prepare_prompts(w4_requests(1000 + 50 * n, n=n))
        sync()
        t0 = time.perf_counter()
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        engine.add_prepared(prepared)
        t1 = time.perf_counter()
        if CUDA:
            end.record()
        sync()
        t2 = time.perf_counter()
        gpu = f", GPU {start.elapsed_time(end):.1f} ms" if CUDA else ""
        print(f"vision: {n:2d} requests ({5 * n} crops): add_prepared returns after {1e3 * (t1 - t0):.1f} ms, "
              f"wall {1e3 * (t2 - t0):.1f} ms{gpu}", flush=True)
        drain(engine)


def section_w3(model, processor: Processor) -> None:
    ids = w3_ids(processor)
    room = len(ids) + 128
    engine = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=room, kv_cache_tokens=room,
                                                   enable_prefix_caching=False))
    for attempt in range(3):
        engine.add_request(ids, ONE_TOKEN)
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        print(f"W3 prefill step ({len(ids)} tokens, one chunk), run {attempt}: {1e3 * (time.perf_counter() - t0):.1f} ms",
              flush=True)
        drain(engine)
    engine.add_request(ids, ONE_TOKEN)
    profiled_call(f"W3 prefill step ({len(ids)} tokens)", engine.step, 22, 12)
    drain(engine)


def section_ttft_parts(model, processor: Processor, name: str) -> None:
    """W1 or W2 at batch 1: the CPU half (decoding, tokens), the vision half (resize on the GPU included), the prefill."""
    prompt, images = workload_inputs(name, processor)
    engine = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=6500, kv_cache_tokens=6500,
                                                   enable_prefix_caching=False))
    request = PromptRequest(prompt, images, ONE_TOKEN, WORKLOADS[name]["num_crops"])
    for attempt in range(3):
        sync()
        t0 = time.perf_counter()
        prepared = engine.prepare_prompts([request])
        t1 = time.perf_counter()
        engine.add_prepared(prepared, use_image_cache=False)
        sync()
        t2 = time.perf_counter()
        engine.step()
        sync()
        t3 = time.perf_counter()
        print(f"{name} run {attempt}: CPU half {1e3 * (t1 - t0):.1f} ms (decoding {1e3 * prepared[0].load_s:.1f}), "
              f"vision half {1e3 * (t2 - t1):.1f} ms, prefill {1e3 * (t3 - t2):.1f} ms", flush=True)
        drain(engine)
    profiled_call(f"{name} add_prompts", lambda: engine.add_prompts([request], use_image_cache=False), 15, 25)
    sync()
    # The prefill step alone (the request's vision work already done): where its GPU time goes.
    profiled_call(f"{name} prefill step", engine.step, 25, 10)
    drain(engine)


def section_prep(engine: Engine) -> None:
    """Preparation (image decoding, preprocessing, vision tower) of 32 requests at once."""
    requests = w4_requests(700, n=32)
    profiled_call("add_prompts of 32 image requests", lambda: engine.add_prompts(requests), 15, 15)
    drain(engine)


def section_prefill(engine: Engine) -> None:
    engine.add_prompts(w4_requests(300))
    profiled_call("prefill step of 10 image requests", engine.step, 18, 12)
    drain(engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of each profiled call into this folder")
    args = parser.parse_args()
    global TRACE_DIR
    TRACE_DIR = args.trace
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    device = "cuda" if CUDA else "cpu"
    model = load_model(args.model, device=device, dtype=torch.bfloat16 if CUDA else torch.float32, progress=False)
    processor = Processor.from_pretrained(args.model, num_crops=4)
    engine = Engine(model, processor, EngineConfig(max_num_seqs=64, kv_cache_tokens=65536))
    timed_steps(engine, "warm-up images", w4_requests(500))
    for name in SECTIONS:  # in this order, whatever the order asked
        if name not in sections:
            continue
        if name in ("host", "steps", "vision", "prep", "prefill"):
            {"host": section_host, "steps": section_steps, "vision": section_vision, "prep": section_prep, "prefill": section_prefill}[name](engine)
        elif name == "w3":
            section_w3(model, processor)
        else:
            section_ttft_parts(model, processor, name.upper())
        if CUDA:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
