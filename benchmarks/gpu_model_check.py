"""GPU check of the model issue: golden cases in bf16/fp16, and the real shapes with random weights.

Run on a CUDA machine with a copy of ../shared at SHARED (default ../shared):

    python benchmarks/gpu_model_check.py --shared ../shared --out results.json

Part 1 runs every golden tiny-model case in float32, bfloat16 and float16 on the GPU and reports
argmax agreement with the reference's float32 logits and whether the 24 greedy tokens match (where
they differ, the float32 margin between the two best tokens at that step says whether the
difference is rounding). Part 2 writes a random-weight checkpoint with the real Phi-3.5-vision
shapes as two safetensors shards, loads it through our loader, and runs one greedy generation of
workload W1 (one 1344x1344 image, num_crops 16, 256 new tokens), reporting load time, peak GPU
memory and timings.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from phivision.generation.generate import TokenGenerator
from phivision.generation.sampling import SamplingParams
from phivision.processing.prompt import Processor
from phivision.weights import load_model, write_random_checkpoint

W1_PROMPT = "Describe this image in detail, including the main subject, actions, and setting."


def golden_cases(shared: Path, device: str) -> list[dict]:
    tiny = shared / "golden" / "tiny-model"
    manifest = json.loads((tiny / "manifest.json").read_text())
    logits_file = load_file(str(tiny / "logits.safetensors"))
    ckpt = tiny / "checkpoint"
    processor = Processor.from_pretrained(str(ckpt))
    images_dir = shared / "golden" / "processor"
    rows = []
    fp32_logits = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_model(str(ckpt), device=device, dtype=dtype)
        for case in manifest["cases"]:
            images = [str(images_dir / p) for p in case["images"]]
            inputs = Processor.from_pretrained(str(ckpt), num_crops=case["num_crops"])(case["prompt"], images or None)
            assert inputs["input_ids"][0].tolist() == case["expected"]["input_ids"], case["id"]
            with torch.inference_mode():
                logits = model(
                    inputs["input_ids"].to(device),
                    pixel_values=None if inputs.get("pixel_values") is None else inputs["pixel_values"].to(device, dtype),
                    image_sizes=None if inputs.get("image_sizes") is None else inputs["image_sizes"].to(device),
                )[0].float()
            ref_argmax = logits_file[f"{case['id']}__argmax"].to(device)
            agree = (logits.argmax(-1) == ref_argmax).float().mean().item()
            if dtype == torch.float32:
                fp32_logits[case["id"]] = logits
            # Where the argmax differs from the reference, how close were the two best tokens in float32?
            top2 = fp32_logits[case["id"]].topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1])[logits.argmax(-1) != ref_argmax]
            max_margin = margins.max().item() if margins.numel() else None
            gen = TokenGenerator(
                model,
                inputs["input_ids"],
                inputs["attention_mask"],
                SamplingParams(max_new_tokens=24),
                stop_token_ids=[32000],
                pad_token_id=32000,
                pixel_values=None if inputs.get("pixel_values") is None else inputs["pixel_values"].to(device, dtype),
                image_sizes=inputs.get("image_sizes"),
            )
            tokens = [step[0] for step in gen]
            expected = case["expected"]["greedy_new_tokens"]
            first_diff = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "case": case["id"],
                    "positions": logits.shape[0],
                    "argmax_agreement": round(agree, 5),
                    "mismatches": int(margins.numel()),
                    "max_fp32_margin_at_mismatch": max_margin,
                    "greedy_identical": tokens == expected,
                    "first_greedy_diff": first_diff,
                    "tokens": tokens,
                }
            )
        del model
        torch.cuda.empty_cache()
    # Where a low-precision run diverges, measure the float32 margin at that step with the fp32 model.
    model = load_model(str(ckpt), device=device, dtype=torch.float32)
    for row in rows:
        if row["first_greedy_diff"] is None:
            continue
        case = next(c for c in manifest["cases"] if c["id"] == row["case"])
        images = [str(images_dir / p) for p in case["images"]]
        inputs = Processor.from_pretrained(str(ckpt), num_crops=case["num_crops"])(case["prompt"], images or None)
        prefix = case["expected"]["greedy_new_tokens"][: row["first_greedy_diff"]]
        ids = torch.cat([inputs["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1).to(device)
        with torch.inference_mode():
            last = model(
                ids,
                pixel_values=None if inputs.get("pixel_values") is None else inputs["pixel_values"].to(device),
                image_sizes=None if inputs.get("image_sizes") is None else inputs["image_sizes"].to(device),
            )[0, -1].float()
        top2 = last.topk(2).values
        row["fp32_margin_at_diff"] = round((top2[0] - top2[1]).item(), 6)
    return rows


def w1_image_png(size: int = 1344, seed: int = 0) -> bytes:
    """A deterministic photo-like image: smooth colour gradients plus seeded noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def real_shapes(shared: Path, device: str, workdir: Path) -> dict:
    config = json.loads((shared / "spec" / "phi35v-config.json").read_text())
    ckpt = workdir / "phi35v-random"
    t0 = time.perf_counter()
    write_random_checkpoint(config, ckpt, dtype=torch.bfloat16, num_shards=2, seed=0)
    write_s = time.perf_counter() - t0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shared / "tokenizer" / name, ckpt / name)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"num_crops": 4, "num_img_tokens": 144}))
    shard_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_model(str(ckpt), device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated() / 2**30

    processor = Processor.from_pretrained(str(ckpt), num_crops=16)
    prompt = f"<|user|>\n<|image_1|>\n{W1_PROMPT}<|end|>\n<|assistant|>\n"
    png = w1_image_png()
    results = {}
    for attempt in ("warmup", "timed"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        inputs = processor(prompt, [png])
        gen = TokenGenerator(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            SamplingParams(max_new_tokens=256, ignore_eos=True),
            stop_token_ids=[],
            pad_token_id=32000,
            pixel_values=inputs["pixel_values"].to(device, torch.bfloat16),
            image_sizes=inputs["image_sizes"],
        )
        ttft = None
        tokens = []
        for step in gen:
            tokens.append(step[0])
            if ttft is None:
                torch.cuda.synchronize()
                ttft = time.perf_counter() - t0
        torch.cuda.synchronize()
        e2e = time.perf_counter() - t0
        results[attempt] = {
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": len(tokens),
            "ttft_ms": round(ttft * 1e3, 2),
            "decode_tok_s": round((len(tokens) - 1) / (e2e - ttft), 2),
            "e2e_s": round(e2e, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "first_tokens": tokens[:8],
        }
    return {
        "checkpoint_bytes": shard_bytes,
        "num_shards": len(list(ckpt.glob("*.safetensors"))),
        "write_s": round(write_s, 2),
        "load_s": round(load_s, 2),
        "load_peak_gib": round(load_peak, 3),
        "w1": results["timed"],
        "w1_warmup": results["warmup"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    device = "cuda"
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["golden"] = golden_cases(args.shared, device)
    if not args.skip_real:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            report["real_shapes"] = real_shapes(args.shared, device, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(f"device {report['device']}  torch {report['torch']}")
    print(f"{'dtype':9} {'case':38} {'argmax':>8} {'max margin':>10} {'greedy':>7} {'diff@':>6} {'fp32 margin':>11}")
    for row in report["golden"]:
        margin = row["max_fp32_margin_at_mismatch"]
        print(
            f"{row['dtype']:9} {row['case']:38} {row['argmax_agreement']:8.4f} {margin if margin is None else round(margin, 4)!s:>10} "
            f"{str(row['greedy_identical']):>7} {str(row['first_greedy_diff']):>6} {str(row.get('fp32_margin_at_diff', '')):>11}"
        )
    for dtype in ("bfloat16", "float16"):
        sel = [r for r in report["golden"] if r["dtype"] == dtype]
        agree = sum(r["argmax_agreement"] * r["positions"] for r in sel) / sum(r["positions"] for r in sel)
        print(f"{dtype}: argmax agreement over all {sum(r['positions'] for r in sel)} positions {agree:.4f}")
    if "real_shapes" in report:
        r = report["real_shapes"]
        print(
            f"real shapes: {r['checkpoint_bytes'] / 1e9:.2f} GB in {r['num_shards']} shards, load {r['load_s']} s, "
            f"load peak {r['load_peak_gib']} GiB"
        )
        print(f"W1 greedy: {json.dumps(r['w1'])}")


if __name__ == "__main__":
    main()
