"""Where the GPU waits during W1's (or W2's) time to first token: one traced run of add_prompt and
the first step, after warm-up runs; prints the largest gaps between GPU work with the host
operations running during each.

    python benchmarks/exp_ttft_trace.py --model CKPT_DIR [--workload W1] [--trace out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import WORKLOADS, workload_inputs  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def first_token(engine: Engine, prompt, images, crops: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    request_id = engine.add_prompt(prompt, images, SamplingParams(max_new_tokens=1, ignore_eos=True), num_crops=crops,
                                   use_image_cache=False)
    while engine.has_unfinished():
        if any(out.request_id == request_id and out.token_id is not None for out in engine.step()):
            break
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished():
        engine.step()
    return elapsed


def gaps(trace: dict, top: int = 15) -> None:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation", "python_function")]
    start = min(e["ts"] for e in events)
    busy = sum(e["dur"] for e in gpu)
    print(f"trace: host start to last GPU work {(gpu[-1]['ts'] + gpu[-1]['dur'] - start) / 1e3:.2f} ms; "
          f"first GPU work at {(gpu[0]['ts'] - start) / 1e3:.2f} ms; GPU busy {busy / 1e3:.2f} ms")
    found = []
    end = gpu[0]["ts"] + gpu[0]["dur"]
    for e in gpu[1:]:
        if e["ts"] - end > 30:
            found.append((e["ts"] - end, end, e))
        end = max(end, e["ts"] + e["dur"])
    print(f"gaps over 30 us: {len(found)}, {sum(g for g, _, _ in found) / 1e3:.2f} ms in all")
    for gap, begin, after in sorted(found, key=lambda g: -g[0])[:top]:
        during = sorted({h["name"][:40] for h in host if h["ts"] < begin + gap and h["ts"] + h["dur"] > begin
                         and h["dur"] < 0.9 * 1e6})
        print(f"  {gap / 1e3:6.2f} ms at {(begin - start) / 1e3:7.2f} ms, before {after['name'][:50]!r}; host: "
              + ", ".join(during[:12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--trace", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, device="cuda", dtype=torch.bfloat16, progress=False)
    processor = Processor.from_pretrained(args.model, num_crops=4)
    crops = WORKLOADS[args.workload]["num_crops"]
    prompt, images = workload_inputs(args.workload, processor)
    engine = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=7000, kv_cache_tokens=7000,
                                                   enable_prefix_caching=False))
    print("untraced TTFT ms:", [round(first_token(engine, prompt, images, crops), 1) for _ in range(4)])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        traced = first_token(engine, prompt, images, crops)
    print(f"traced TTFT {traced:.1f} ms")
    path = args.trace or Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    gaps(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
