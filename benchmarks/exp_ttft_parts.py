"""Experiment: W1's and W2's time to first token in its parts, untraced, from CUDA events and host
clocks taken at the engine's seams (no profiler, whose per-operation host cost hides the gaps).
First run 2026-12-07, seventeenth session (benchmarks/RESULTS.md).

    python benchmarks/exp_ttft_parts.py [--workloads W1,W2] [--runs 6] [--checkpoint DIR] [--out FILE.json]

Random real-shape weights, as bench_latency.py builds them; an engine sized as bench_latency.py
sizes it. Each run starts from an idle, synchronised GPU; an event recorded then marks time zero.
Seams (wrapped functions, each recording a CUDA event and the host clock):
- `preprocess_images` entered: the host has decoded, staged and tokenised; the GPU's first work
  (the upload) is issued next. The GPU is idle until here, so its event fires when recorded.
- `encode_images` returned: its event fires when the GPU has finished the vision tower.
- `prefill_many` entered / returned: the host reaches the prefill (in GPU order after the vision
  tower) and has queued all of it; the returned event fires when the GPU has finished it.
- the first token read on the host;
- host clocks only: each image decoded and staged, the prompt tokenised, `encode_images` entered.
Prints the median of each part over the runs after the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_latency import ROOT, WORKLOADS, workload_inputs  # benchmarks/, beside this script
from make_checkpoint import bench_checkpoint
from phivision.generation import engine as engine_module
from phivision.generation import image_cache
from phivision.generation.engine import Engine, EngineConfig
from phivision.generation.sampling import SamplingParams
from phivision.processing.prompt import Processor
from phivision.weights import load_model


class Seams:
    """CUDA events and host times recorded at named points of one run."""

    def __init__(self):
        self.events: dict[str, torch.cuda.Event] = {}
        self.host: dict[str, list[float]] = {}

    def mark(self, name: str, gpu: bool = True) -> None:
        """The host time at every pass (several images: several threads); a CUDA event at the first."""
        now = time.perf_counter()
        if gpu and name not in self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events[name] = event
        self.host.setdefault(name, []).append(now)

    def parts(self) -> dict[str, float]:
        torch.cuda.synchronize()
        zero, t0 = self.events["start"], self.host["start"][0]
        gpu = {f"gpu_{k}": zero.elapsed_time(e) for k, e in self.events.items() if k != "start"}
        host = {f"host_{k}": (max(t) - t0) * 1e3 for k, t in self.host.items() if k != "start"}
        return gpu | host


def wrap(seams_of, obj, name: str, before: str | None, after: str | None, gpu: bool = True):
    """Replaces obj.name by a function that marks `before` and `after` around it; returns the original."""
    inner = getattr(obj, name)

    def wrapped(*args, **kwargs):
        if before:
            seams_of().mark(before, gpu)
        out = inner(*args, **kwargs)
        if after:
            seams_of().mark(after, gpu)
        return out

    setattr(obj, name, wrapped)
    return inner


def run(model, processor: Processor, name: str, runs: int) -> dict:
    spec = WORKLOADS[name]
    prompt, images = workload_inputs(name, processor)
    probe = Processor(processor.tokenizer, num_crops=spec["num_crops"])(prompt, images)
    needed = probe["input_ids"].shape[1] + 64
    engine = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=needed, kv_cache_tokens=needed,
                                                   enable_prefix_caching=False))
    current = [Seams()]
    seams_of = lambda: current[0]  # noqa: E731
    originals = [(image_cache, "preprocess_images", wrap(seams_of, image_cache, "preprocess_images", "upload_issued", None))]
    # Host-only seams of the CPU half (the engine module's own names; several images mark once each).
    for function, before, after in (("load_image_or_pixels", None, "decoded"), ("staged_rgb", None, "staged"),
                                    ("tokenize_prompt", "tokenize_entered", "tokenized"), ("encode_images", "encode_entered", None)):
        originals.append((engine_module, function, wrap(seams_of, engine_module, function, before, after, gpu=False)))
    wrap(seams_of, model, "encode_images", None, "vision_done")
    wrap(seams_of, engine.runner, "prefill_many", "prefill_entered", "prefill_done")
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    rows = []
    try:
        for _ in range(runs):
            torch.cuda.synchronize()
            time.sleep(0.3)
            current[0] = seams = Seams()
            seams.mark("start")
            request_id = engine.add_prompt(prompt, images, params, num_crops=spec["num_crops"], use_image_cache=False)
            seams.mark("added")
            info = engine.request_info(request_id)
            load_ms = info.load_s * 1e3
            while engine.has_unfinished():
                if any(out.request_id == request_id and out.token_id is not None for out in engine.step()):
                    seams.mark("first_token", gpu=False)
                    break
            while engine.has_unfinished():
                engine.step()
            rows.append(seams.parts() | {"host_image_decode": load_ms})
    finally:
        for obj, name, inner in originals:
            setattr(obj, name, inner)
        model.__dict__.pop("encode_images", None)  # the instance's wrapper; the class's method again
    timed = rows[1:]
    median = {key: statistics.median(r[key] for r in timed) for key in timed[0]}
    del engine
    torch.cuda.empty_cache()
    return {"median": median, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--checkpoint", type=Path, default=None, help="as bench_latency.py's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with bench_checkpoint(args.shared, args.checkpoint) as ckpt:
        model = load_model(str(ckpt), device="cuda", dtype=torch.bfloat16, progress=False)
        processor = Processor.from_pretrained(str(ckpt), num_crops=4)
    for name in args.workloads.split(","):
        report[name] = run(model, processor, name, args.runs)
        m = report[name]["median"]
        print(f"{name} host: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in sorted(m.items(), key=lambda kv: kv[1])
                                          if k.startswith("host_")) + " ms", flush=True)
        print(f"{name}: decode {m['host_image_decode']:.2f} | GPU's first work issued at {m['gpu_upload_issued']:.2f} "
              f"(host {m['host_upload_issued']:.2f}) | vision done {m['gpu_vision_done']:.2f} | prefill entered: host "
              f"{m['host_prefill_entered']:.2f}, GPU {m['gpu_prefill_entered']:.2f} | prefill queued (host) "
              f"{m['host_prefill_done']:.2f} | prefill done (GPU) {m['gpu_prefill_done']:.2f} | add_prompt returned "
              f"{m['host_added']:.2f} | first token (host) {m['host_first_token']:.2f} ms", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
