"""Batch-1 latency benchmark: workloads W1-W3 of ../shared/bench/WORKLOADS.md on one CUDA GPU.

    python benchmarks/bench_latency.py --out benchmarks/results/DATE-DEVICE.json [--skip-baseline]

Real Phi-3.5-vision shapes (../shared/spec/phi35v-config.json; the stand-in tokenizer from
../shared/tokenizer; `--shared` points elsewhere) with random bf16 weights, written as a two-shard checkpoint and loaded
through our loader. Random weights never emit an end token, so every run generates exactly the
workload's token count. Images are made deterministically and handed over as PNG bytes: the
time to first token includes decoding, preprocessing, the vision tower and prefill.

In the same run: the ceilings (device-to-device copy bandwidth, bf16 matmul rate), the floors
derived from them, and the plain Hugging Face transformers baseline (Phi3ForCausalLM +
CLIPVisionModel with the same shapes, sdpa, `generate` with its default cache).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from phivision.generation.engine import Engine, EngineConfig
from phivision.generation.sampling import SamplingParams
from phivision.kernels import flash4
from phivision.processing import png
from phivision.processing.prompt import Processor
from phivision.weights import load_model

from make_checkpoint import bench_checkpoint  # this folder: the script's own (sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
KV_BYTES_PER_TOKEN = 32 * 2 * 3072 * 2  # layers x (k, v) x hidden x bf16 = 384 KiB

WORKLOADS = {
    "W1": dict(images=[(1344, 1344)], num_crops=16, new_tokens=256,
               text="Describe this image in detail, including the main subject, actions, and setting."),
    "W2": dict(images=[(1280, 720)] * 8, num_crops=4, new_tokens=256, text="Summarize what happens in these frames."),
    "W3": dict(images=[], num_crops=4, new_tokens=64, text_tokens=8192),
    # One request of the serving load (bench_serving.py sends 64 of them at once through the HTTP API;
    # its baseline is this single request, run one after another).
    "W4": dict(images=[(672, 672)], num_crops=4, new_tokens=128,
               text="Look at this picture carefully and describe the houses, the trees, the sky and the sun, "
                    "then tell me what time of day it probably is."),
}


def make_png(width: int, height: int, seed: int) -> bytes:
    """A deterministic drawn scene (sky gradient, ground, sun, houses, trees) as PNG bytes.

    A drawing rather than noise: it compresses like a real picture, so PNG decoding costs what it
    would for a photo-like input instead of dominating the time to first token.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    sky = (np.array([70, 130, 220]) * (1 - y) + np.array([200, 225, 255]) * y).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).copy())
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.55, 0.7))
    draw.rectangle([0, horizon, width, height], fill=(60, 150, 70))
    r = int(min(width, height) * 0.08)
    cx, cy = int(width * rng.uniform(0.6, 0.9)), int(horizon * 0.3)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 220, 60))
    for _ in range(6):
        x0 = int(rng.uniform(0, width * 0.9))
        w, h = int(width * rng.uniform(0.05, 0.12)), int(height * rng.uniform(0.08, 0.18))
        colour = tuple(int(c) for c in rng.integers(80, 230, 3))
        draw.rectangle([x0, horizon - h, x0 + w, horizon], fill=colour)
        draw.polygon([(x0 - w // 8, horizon - h), (x0 + w // 2, horizon - h - h // 2), (x0 + w + w // 8, horizon - h)],
                     fill=(150, 40, 40))
        tx = int(rng.uniform(0, width))
        draw.rectangle([tx, horizon - h // 2, tx + w // 6, horizon], fill=(100, 70, 30))
        draw.ellipse([tx - w // 3, horizon - h, tx + w // 3 + w // 6, horizon - h // 3], fill=(30, 110, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


# ------------------------------------------------------------------ ceilings and floors


def measure_ceilings() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        t0 = sync_time()
        dst.copy_(src)
        times.append(sync_time() - t0)
    copy_bw = 2 * n / statistics.median(times)  # bytes read + written
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        t0 = sync_time()
        a @ b
        times.append(sync_time() - t0)
    matmul = 2 * 8192**3 / statistics.median(times)
    torch.cuda.empty_cache()
    return {"copy_bytes_s": copy_bw, "matmul_flop_s": matmul}


def floors(model, prompt_tokens: int, new_tokens: int, num_crops_run: int, ceilings: dict) -> dict:
    text_params = sum(p.numel() for n, p in model.language_model.named_parameters() if "embed_tokens" not in n)
    text_params += model.lm_head.weight.numel()
    vision_params = sum(p.numel() for p in model.vision_tower.parameters())
    weight_bytes = text_params * 2
    cfg = model.config.text
    attn_flops = 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * prompt_tokens * prompt_tokens / 2  # causal qk + pv
    prefill_flops = 2 * text_params * prompt_tokens + attn_flops + 2 * vision_params * 577 * num_crops_run
    mid_context = prompt_tokens + new_tokens / 2
    decode_s = (weight_bytes + KV_BYTES_PER_TOKEN * mid_context) / ceilings["copy_bytes_s"]
    ttft_s = prefill_flops / ceilings["matmul_flop_s"]
    # Memory floor: every weight once plus the KV cache of the whole sequence.
    all_bytes = 2 * sum(p.numel() for p in model.parameters())
    peak_gib = (all_bytes + KV_BYTES_PER_TOKEN * (prompt_tokens + new_tokens)) / 2**30
    return {"ttft_ms": ttft_s * 1e3, "decode_tok_s": 1 / decode_s, "e2e_s": ttft_s + decode_s * (new_tokens - 1),
            "peak_gib": peak_gib}


# ------------------------------------------------------------------ ours


def w3_ids(processor: Processor) -> list[int]:
    """One user turn of 8192 random text tokens, in the chat format."""
    rng = np.random.default_rng(3)
    body = rng.integers(1000, 29000, size=WORKLOADS["W3"]["text_tokens"]).tolist()
    user, end, assistant = (processor.tokenizer.token_to_id(t) for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    return [processor.tokenizer.bos_token_id, user, *body, end, assistant]


def workload_inputs(name: str, processor: Processor):
    spec = WORKLOADS[name]
    images = [make_png(w, h, seed) for seed, (w, h) in enumerate(spec["images"])]
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(len(images)))
    return f"<|user|>\n{tags}{spec['text']}<|end|>\n<|assistant|>\n", images


def run_ours(model, processor: Processor, name: str, prefill_chunk: int | None = None, idle_s: float = 0.0,
             **engine_settings) -> dict:
    """A fresh engine sized for the workload (the KV pool holds exactly its tokens), five runs, each
    after idle_s seconds of an idle GPU (0: back to back)."""
    spec = WORKLOADS[name]
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
    if name == "W3":
        prompt_len = len(w3_ids(processor))
    else:
        prompt, images = workload_inputs(name, processor)
        probe = Processor(processor.tokenizer, num_crops=spec["num_crops"])(prompt, images)
        prompt_len = probe["input_ids"].shape[1]
    needed = prompt_len + spec["new_tokens"] + 64
    torch.cuda.empty_cache()
    chunking = {} if prefill_chunk is None else {"max_num_batched_tokens": prefill_chunk, "prefill_chunk_size": prefill_chunk}
    engine = Engine(model, processor, EngineConfig(max_num_seqs=1, max_model_len=needed, kv_cache_tokens=needed,
                                                   enable_prefix_caching=False, **chunking, **engine_settings))
    results = []
    for _ in range(5):  # first run warms up; the median of the others is reported
        torch.cuda.reset_peak_memory_stats()
        time.sleep(idle_s)  # > 0: a request reaching an idle GPU rather than one right after the last run's decoding
        t0 = sync_time()
        if name == "W3":
            request_id = engine.add_request(w3_ids(processor), params)
        else:
            request_id = engine.add_prompt(prompt, images, params, num_crops=spec["num_crops"], use_image_cache=False)
        info = engine.request_info(request_id)
        # No synchronisation here: a request has none between its vision work and its prefill, and one
        # would leave the GPU idle while the host schedules the prefill (runs before 2026-12-03's
        # fourth session had it, and a prepare_ms with the vision work waited for).
        added = time.perf_counter()
        first = None
        count = 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == request_id and out.token_id is not None:
                    count += 1
                    if first is None:
                        first = sync_time()
        end = sync_time()
        results.append({
            "prompt_tokens": info.num_prompt_tokens,
            "crops_run": info.num_crops_run,
            "new_tokens": count,
            "ttft_ms": (first - t0) * 1e3,
            "add_host_ms": (added - t0) * 1e3,  # host: decoding, tokenising, vision work queued (not waited for)
            "image_decode_ms": info.load_s * 1e3,
            "decode_tok_s": (count - 1) / (end - first),
            "e2e_s": end - t0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        })
    timed = results[1:]
    out = {key: statistics.median(r[key] for r in timed) for key in timed[0]} | {"runs": results, "engine_setup_s": engine.setup_s}
    del engine
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------ baseline


def run_baseline(config: dict, processor: Processor, names: list[str]) -> dict:
    """Plain transformers with the same shapes: CLIP tower for the crops, Phi-3 decoder for the text."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    rope = config["rope_scaling"]
    common = dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], max_position_embeddings=config["max_position_embeddings"],
        original_max_position_embeddings=config["original_max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        pad_token_id=32000, bos_token_id=1, eos_token_id=32000,
    )
    longrope = {"rope_type": "longrope", "long_factor": rope["long_factor"], "short_factor": rope["short_factor"]}
    try:  # transformers 5 names it rope_parameters, 4.x rope_scaling
        phi_cfg = Phi3Config(**common, rope_parameters={**longrope, "rope_theta": config["rope_theta"]})
    except TypeError:
        phi_cfg = Phi3Config(**common, rope_scaling={**longrope, "type": "longrope"})
    phi_cfg._attn_implementation = "sdpa"
    clip_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, projection_dim=768)
    clip_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = Phi3ForCausalLM(phi_cfg).to(torch.bfloat16).eval()
        clip = CLIPVisionModel(clip_cfg).to(torch.bfloat16).eval()
        projector = torch.nn.Sequential(torch.nn.Linear(4096, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 3072)).to(torch.bfloat16)
    out = {"transformers": transformers.__version__}
    for name in names:
        spec = WORKLOADS[name]
        prompt, images = workload_inputs(name, processor) if name != "W3" else ("", [])
        proc = Processor(processor.tokenizer, num_crops=spec["num_crops"])
        runs = []
        for new_tokens in (2, spec["new_tokens"]):  # a short warm-up, then the timed run
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                t0 = sync_time()
                if name == "W3":
                    ids = torch.tensor([w3_ids(processor)], device="cuda")
                else:
                    inputs = proc(prompt, images or None)
                    ids = inputs["input_ids"].cuda()
                embeds = lm.get_input_embeddings()(ids.clamp(min=0))
                if images:
                    pv = inputs["pixel_values"].cuda().to(torch.bfloat16)
                    crops = pv.flatten(0, 1)  # every slot, padding included, like the reference
                    hidden = clip(crops, output_hidden_states=True).hidden_states[-2][:, 1:]  # (N, 576, 1024)
                    merged = hidden.reshape(-1, 12, 2, 12, 2, 1024).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4096)
                    feats = projector(merged)
                    positions = (ids[0] < 0).nonzero().squeeze(1)
                    # The row separators (sub_GN/glb_GN) are not modelled here: repeat features to fill.
                    feats = feats.repeat(-(-positions.numel() // feats.shape[0]), 1)[: positions.numel()]
                    embeds[0, positions] = feats
                mask = torch.ones(ids.shape, dtype=torch.long, device="cuda")
                t_vision = sync_time()
                lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=1, do_sample=False)
                t1 = sync_time()
                lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False)
                t2 = sync_time()
            # TTFT: preprocessing + vision + prefill + first token. The full call repeats the prefill:
            # its decode time is the call less one prefill.
            prefill = t1 - t_vision
            decode_time = (t2 - t1) - prefill
            runs.append({"prompt_tokens": ids.shape[1], "ttft_ms": (t1 - t0) * 1e3,
                         "decode_tok_s": (new_tokens - 1) / decode_time, "e2e_s": (t_vision - t0) + (t2 - t1),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        out[name] = runs[-1]
        print(f"baseline {name}: {json.dumps(runs[-1])}", flush=True)
    del lm, clip
    torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def switched_off(switch: str):
    """A switch of `--ab-off` turned off: pywuffs hidden from png.py (libspng decodes the PNGs), or
    the EngineConfig keyword to pass."""
    if switch != "pywuffs":
        yield {switch: False}
        return
    saved, png.pywuffs = png.pywuffs, None
    try:
        yield {}
    finally:
        png.pywuffs = saved


def main() -> None:
    parser = argparse.ArgumentParser(description="phivision batch-1 latency benchmark (W1-W3)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="folder of the random checkpoint: reused if an earlier run wrote it, else written there "
                             "and kept (default: a temporary folder)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="max_num_batched_tokens and prefill_chunk_size of our engine (default: EngineConfig's)")
    parser.add_argument("--idle-s", type=float, default=0.0,
                        help="seconds the GPU idles before each run (default 0: back to back, each run starting right "
                             "after the previous one's decoding)")
    parser.add_argument("--ab-off", default="",
                        help="comma-separated EngineConfig switches (lookahead_decode, cudnn_prefill, flash4_prefill), "
                             "or pywuffs (PNGs decoded by libspng instead of Wuffs): also run each workload with each one "
                             "off, before it (keys no_<switch>)")
    args = parser.parse_args()
    names = args.workloads.split(",")
    config = json.loads((args.shared / "spec" / "phi35v-config.json").read_text())
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
              "settings": "batch 1, greedy, end-of-sequence ignored, random bf16 weights at the real shapes, CUDA graphs on"}
    report["prefill_chunk"] = args.prefill_chunk  # None: EngineConfig's default
    report["idle_s"] = args.idle_s
    # Which kernel a prompt's attention runs on by default (EngineConfig.flash4_prefill's rule)
    report["prefill_attention"] = (f"flash-attn-4 {importlib.metadata.version('flash-attn-4')}" if flash4.installed()
                                   else "SDPA (cuDNN in length buckets)")
    report["ceilings"] = measure_ceilings()
    with bench_checkpoint(args.shared, args.checkpoint) as ckpt:
        t0 = time.perf_counter()
        model = load_model(str(ckpt), device="cuda", dtype=torch.bfloat16, progress=False)
        report["load_s"] = time.perf_counter() - t0
        processor = Processor.from_pretrained(str(ckpt), num_crops=4)
        floors_out = {}
        for name in names:
            for switch in filter(None, args.ab_off.split(",")):
                with switched_off(switch) as engine_switch:
                    report.setdefault(f"no_{switch}", {})[name] = off = run_ours(model, processor, name, args.prefill_chunk,
                                                                                 args.idle_s, **engine_switch)
                print(f"ours {name}, {switch} off: ttft {off['ttft_ms']:.1f} ms, decode {off['decode_tok_s']:.1f} tok/s",
                      flush=True)
            report[name] = run_ours(model, processor, name, args.prefill_chunk, args.idle_s)
            print(f"ours {name}: " + json.dumps({k: v for k, v in report[name].items() if k != "runs"}, default=float), flush=True)
            floors_out[name] = floors(model, int(report[name]["prompt_tokens"]), WORKLOADS[name]["new_tokens"],
                                      int(report[name]["crops_run"]), report["ceilings"])
        report["floors"] = floors_out
        del model
        torch.cuda.empty_cache()
        if args.out:
            args.out.write_text(json.dumps(report, indent=1, default=float))
        if not args.skip_baseline:
            try:
                report["baseline"] = run_baseline(config, processor, names)
            except Exception as exc:  # the baseline's failure must not lose our figures
                report["baseline_error"] = repr(exc)
                print(f"baseline failed: {exc!r}", flush=True)

    text = json.dumps(report, indent=1, default=float)
    if args.out:
        args.out.write_text(text)
    c = report["ceilings"]
    print(f"device {report['device']}  torch {report['torch']}  copy {c['copy_bytes_s'] / 1e12:.2f} TB/s  "
          f"matmul {c['matmul_flop_s'] / 1e12:.0f} TFLOP/s  load {report['load_s']:.1f} s")
    print(f"{'':4} {'figure':13} {'ours':>9} {'floor':>9} {'base':>9} {'floor/ours':>10} {'ours/base':>9}")
    for name in names:
        ours, floor, base = report[name], report["floors"][name], report.get("baseline", {}).get(name, {})
        for key in ("ttft_ms", "decode_tok_s", "e2e_s", "peak_gib"):
            o, f, b = ours[key], floor.get(key), base.get(key)
            if key == "decode_tok_s":  # higher is better: ours / floor and ours / baseline
                r_floor, r_base = (o / f if f else None), (o / b if b else None)
            else:
                r_floor, r_base = (f / o if f else None), (b / o if b else None)
            fmt = lambda v: "-" if v is None else f"{v:9.2f}"  # noqa: E731
            print(f"{name:4} {key:13} {fmt(o)} {fmt(f)} {fmt(b)} {fmt(r_floor):>10} {fmt(r_base):>9}")


if __name__ == "__main__":
    main()
