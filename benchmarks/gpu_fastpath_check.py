"""Correctness of the CUDA fast path (paged engine, Triton kernels, CUDA graphs).

    python benchmarks/gpu_fastpath_check.py [--shared ../shared] [--out fastpath.json]

1. The golden tiny-model cases through the engine in bf16 and fp16: greedy tokens against the
   reference's, and the prefill's argmax at every position through the paged path.
2. Real Phi-3.5-vision shapes with random weights: the fast path's logits (bf16, paged prefill of
   a W1 prompt, then 32 captured decode steps) against the plain float32 path on the same weights
   (dense forward over the same tokens), as ||fast - ref|| / ||ref|| per position.
3. No Triton compile in the middle of serving: after the engine's start (graph capture) and one
   warm-up request, steps that prefill 1 to 64 prompts at once compile no new variant of the decode
   kernel (which the prefill's last rows run); new variants of every kernel are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import make_png  # noqa: E402
from gpu_kernel_check import random_real_model  # noqa: E402

from phivision.generation.engine import Engine, EngineConfig  # noqa: E402
from phivision.generation.image_cache import encode_images  # noqa: E402
from phivision.generation.kv_cache import PagedBatch  # noqa: E402
from phivision.generation.runner import ModelRunner, PrefillChunk, RunnerConfig  # noqa: E402
from phivision.generation.sampling import SamplingParams  # noqa: E402
from phivision.processing.loading import load_image  # noqa: E402
from phivision.processing.prompt import Processor  # noqa: E402
from phivision.weights import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def golden_through_engine(shared: Path) -> list[dict]:
    tiny = shared / "golden" / "tiny-model"
    manifest = json.loads((tiny / "manifest.json").read_text())
    argmax = load_file(str(tiny / "logits.safetensors"))
    images_dir = shared / "golden" / "processor"
    processor = Processor.from_pretrained(str(tiny / "checkpoint"))
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        model = load_model(str(tiny / "checkpoint"), device="cuda", dtype=dtype, progress=False)
        engine = Engine(model, processor, EngineConfig(max_num_seqs=8, block_size=64, kv_cache_tokens=8192,
                                                       max_num_batched_tokens=1024, prefill_chunk_size=512))
        params = SamplingParams(max_new_tokens=24, stop_token_ids=(32000,))
        ids = [engine.add_prompt(c["prompt"], [str(images_dir / p) for p in c["images"]], params, num_crops=c["num_crops"])
               for c in manifest["cases"]]
        tokens = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                if out.token_id is not None:
                    tokens[out.request_id].append(out.token_id)
        runner = engine.runner
        for case, rid in zip(manifest["cases"], ids):
            # The prefill's logits at every position through the paged path (one chunk, fresh blocks).
            prompt_ids = case["expected"]["input_ids"]
            images = [load_image(str(images_dir / p)) for p in case["images"]]
            feats, _, _ = encode_images(model, images, case["num_crops"], None)
            table = list(range(1, math.ceil(len(prompt_ids) / 64) + 1))
            batch = PagedBatch(runner.pool, kind="prefill",
                               slot_mapping=torch.tensor(runner.slots(table, 0, len(prompt_ids)), device="cuda"),
                               block_tables=torch.tensor([table], dtype=torch.int32, device="cuda"),
                               long_rope=torch.tensor([len(prompt_ids) > model.config.text.original_max_position_embeddings],
                                                      device="cuda"))
            with torch.inference_mode():
                logits = model(torch.tensor([prompt_ids], device="cuda"), positions=torch.arange(len(prompt_ids), device="cuda")[None],
                               cache=batch, image_features=feats or None)[0]
            ref = argmax[f"{case['id']}__argmax"].cuda()
            expected = case["expected"]["greedy_new_tokens"]
            got = tokens[rid]
            rows.append({"dtype": str(dtype).removeprefix("torch."), "case": case["id"], "positions": len(prompt_ids),
                         "argmax_agreement": (logits.argmax(-1) == ref).float().mean().item(),
                         "greedy_identical": got == expected,
                         "first_greedy_diff": next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)})
        del engine, model
        torch.cuda.empty_cache()
    return rows


def real_shapes_vs_fp32(shared: Path, steps: int = 32) -> dict:
    fast = random_real_model(shared)  # bf16
    tok_dir = shared / "tokenizer"
    processor = Processor.from_pretrained(str(tok_dir), num_crops=16)
    prompt = "<|user|>\n<|image_1|>\nDescribe this image in detail, including the main subject, actions, and setting.<|end|>\n<|assistant|>\n"
    image = load_image(make_png(1344, 1344, 0))
    inputs = processor(prompt, [image])
    ids = inputs["input_ids"][0].tolist()
    long = len(ids) > fast.config.text.original_max_position_embeddings
    # As the engine runs it on CUDA: the prompt's attention through cuDNN, padded to its length bucket.
    runner = ModelRunner(fast, RunnerConfig(num_blocks=64, block_size=64, max_num_seqs=1, max_model_len=4096,
                                            cudnn_prefill=True, max_prefill_tokens=4096))
    assert runner._padded_length([PrefillChunk(ids, 0, [], None)]) is not None
    feats_fast, _, _ = encode_images(fast, [image], 16, None)
    table = list(range(1, math.ceil((len(ids) + steps + 1) / 64) + 1))
    fast_logits = [runner.prefill(ids, 0, table, feats_fast, long).float().clone()]
    generated = []
    for step in range(steps):
        generated.append(int(fast_logits[-1].argmax()))
        fast_logits.append(runner.decode([generated[-1]], [len(ids) + step + 1], [table])[0].float().clone())
    fast_logits = torch.stack(fast_logits[:steps])  # positions len(ids)-1 .. len(ids)+steps-2
    del runner
    # The same weights in float32 through the plain path (dense attention, no cache, PyTorch ops).
    ref_model = fast.float()
    ref_model.reset_buffers("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        feats_ref = ref_model.encode_images(inputs["pixel_values"].cuda(), inputs["image_sizes"].cuda())
        full = torch.tensor([ids + generated[: steps - 1]], device="cuda")
        ref = ref_model(full, image_features=feats_ref)[0, len(ids) - 1 :].float()  # (steps, V)
    errors = ((fast_logits - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    return {"prompt_tokens": len(ids), "decode_steps": steps, "max_rel_err": max(errors), "prefill_rel_err": errors[0],
            "rel_err_per_position": errors, "argmax_agreement": (fast_logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def device_resize_exact(shared: Path) -> list[dict]:
    """The GPU path's HD image (resize as integer tensor ops on CUDA) against hd_transform (PIL on the
    host), byte for byte: the golden processor images and photo-sized random ones."""
    import numpy as np
    from PIL import Image

    from phivision.processing.image import hd_canvas_on, hd_transform

    images = []
    for path in sorted((shared / "golden" / "processor" / "images").glob("*.png")):
        with Image.open(path) as image:
            image.load()
            images.append((path.name, image.copy()))
    rng = np.random.default_rng(0)
    for height, width in ((720, 1280), (3024, 4032), (4032, 3024), (1000, 333), (5, 2000)):
        images.append((f"random_{width}x{height}", Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))))
    rows = []
    for name, image in images:
        for num_crops in (4, 16):
            ours = hd_canvas_on(image, num_crops, torch.device("cuda")).cpu().numpy()
            rows.append({"image": name, "num_crops": num_crops, "exact": bool(np.array_equal(ours, hd_transform(image, num_crops)))})
    return rows


def triton_variants() -> dict[str, int]:
    """Compiled variants of each of our Triton kernels so far, over all devices (Triton's in-memory
    cache per kernel: one entry per specialization and constexpr combination)."""
    from phivision.kernels import fused, gemv, paged_attention

    counts = {}
    for module in (fused, gemv, paged_attention):
        for name, obj in vars(module).items():
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict):
                counts[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = sum(len(c[0]) for c in caches.values())
    return counts


def compiles_mid_serving(shared: Path) -> dict:
    """Kernel variants compiled after start-up and a one-request warm-up, while steps prefill 1 to
    64 text prompts at once (the prefill's last rows run the decode kernel with the split count of
    the graph their number of rows falls in, at every graph size)."""
    tiny = shared / "golden" / "tiny-model" / "checkpoint"
    model = load_model(str(tiny), device="cuda", dtype=torch.bfloat16, progress=False)
    processor = Processor.from_pretrained(str(tiny))
    engine = Engine(model, processor, EngineConfig(max_num_seqs=64, block_size=64, kv_cache_tokens=64 * 256,
                                                   max_num_batched_tokens=64 * 96))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def serve(count: int, length: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(count):
            engine.add_request(torch.randint(100, 30000, (length,), generator=gen).tolist(), params)
        while engine.has_unfinished():
            engine.step()

    serve(1, 50, 0)  # the warm-up request
    before = triton_variants()
    for count in (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64):
        serve(count, 40 + count, count)
    after = triton_variants()
    new = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    del engine, model
    torch.cuda.empty_cache()
    return {"kernels": len(after), "new_variants": new,
            "decode_kernel_new": new.get("paged_attention._decode_split_kernel", 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["device_resize"] = device_resize_exact(args.shared)
    report["golden_engine"] = golden_through_engine(args.shared)
    report["real_shapes_vs_fp32"] = real_shapes_vs_fp32(args.shared)
    report["compiles_mid_serving"] = compiles_mid_serving(args.shared)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    exact = [row for row in report["device_resize"] if row["exact"]]
    print(f"GPU resize + padding equal to hd_transform: {len(exact)}/{len(report['device_resize'])} "
          f"(images x num_crops); not equal: {[r for r in report['device_resize'] if not r['exact']]}")
    for row in report["golden_engine"]:
        print(f"{row['dtype']:9} {row['case']:38} argmax {row['argmax_agreement']:.4f} greedy {row['greedy_identical']!s:5} "
              f"diff@{row['first_greedy_diff']}")
    for dtype in ("bfloat16", "float16"):
        sel = [r for r in report["golden_engine"] if r["dtype"] == dtype]
        agree = sum(r["argmax_agreement"] * r["positions"] for r in sel) / sum(r["positions"] for r in sel)
        print(f"{dtype}: engine prefill argmax agreement over all positions {agree:.4f}")
    r = report["real_shapes_vs_fp32"]
    print(f"real shapes W1 prompt ({r['prompt_tokens']} tokens) + {r['decode_steps']} decode steps: "
          f"max relative logit error {r['max_rel_err']:.2e} (prefill {r['prefill_rel_err']:.2e}), "
          f"argmax agreement {r['argmax_agreement']:.3f}")
    c = report["compiles_mid_serving"]
    print(f"Triton variants compiled after the warm-up, prefilling 1-64 prompts a step: decode kernel "
          f"{c['decode_kernel_new']}, all ({c['kernels']} kernels): {c['new_variants'] or 'none'}")
    if not c["kernels"]:
        raise SystemExit("no Triton kernel cache found (a Triton whose JITFunction keeps no device_caches?)")
    if c["decode_kernel_new"]:
        raise SystemExit("the decode kernel compiled a new variant in the middle of serving")


if __name__ == "__main__":
    main()
