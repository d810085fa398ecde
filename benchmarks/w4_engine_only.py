"""W4 without HTTP: the same 64 requests handed straight to the Engine (add_prompts, then steps).

    python benchmarks/w4_engine_only.py --model CKPT_DIR [--requests 64] [--new-tokens 128] [--off SWITCH,...]

Splits the serving benchmark's time between the engine and the HTTP layer: what the engine alone
reaches on the same requests is the ceiling for the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import make_png  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig, PromptRequest  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402

QUESTION = "<|user|>\n<|image_1|>\nWhat is shown in picture {i}? Describe the houses, the trees and the sky, and say what time of day it is.<|end|>\n<|assistant|>\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-tokens", type=int, default=65536,
                        help="KV pool size in tokens; 0: sized from the GPU's memory, as `phivision serve` does by default")
    parser.add_argument("--off", default="", help="comma-separated EngineConfig switches to turn off (e.g. prefill_last_rows_only)")
    args = parser.parse_args()
    switches = {name: False for name in filter(None, args.off.split(","))}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(args.model, device=device, dtype=dtype, progress=False)
    processor = Processor.from_pretrained(args.model, num_crops=4)
    engine = Engine(model, processor, EngineConfig(max_num_seqs=64, kv_cache_tokens=args.kv_cache_tokens or None, **switches))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    report = {}
    for label, seed_base in (("warm-up", 1000), ("run", 0)):
        pngs = [make_png(672, 672, seed_base + i) for i in range(args.requests)]
        engine.image_cache.clear()
        time0, steps0 = dict(engine.time_s), dict(engine.num_steps)
        start = time.perf_counter()
        ids = engine.add_prompts([PromptRequest(QUESTION.format(i=i), [png], params, 4) for i, png in enumerate(pngs)])
        added = time.perf_counter()
        first: dict[str, float] = {}
        tokens = 0
        prefill_ms = []  # each step that prefilled, as the host saw it (its wall time)
        while engine.has_unfinished():
            prefills, step_start = engine.num_steps["prefill"], time.perf_counter()
            for out in engine.step():
                if out.token_id is not None:
                    tokens += 1
                    first.setdefault(out.request_id, time.perf_counter())
            if engine.num_steps["prefill"] != prefills:
                prefill_ms.append(round((time.perf_counter() - step_start) * 1e3, 1))
        end = time.perf_counter()
        ttfts = sorted((first[r] - start) * 1e3 for r in ids)
        report[label] = {
            "output_tok_s": tokens / (end - start), "e2e_s": end - start, "add_s": added - start,
            "ttft_ms_mean": sum(ttfts) / len(ttfts), "ttft_ms_max": ttfts[-1],
            "engine_time_s": {k: engine.time_s[k] - time0[k] for k in engine.time_s},
            "steps": {k: engine.num_steps[k] - steps0[k] for k in engine.num_steps},
            "prefill_step_ms": prefill_ms, "kv_blocks": engine.block_manager.num_blocks,
        }
        print(label, json.dumps(report[label]), flush=True)


if __name__ == "__main__":
    main()
