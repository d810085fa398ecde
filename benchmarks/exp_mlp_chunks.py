"""Experiment: the prefill's and the vision tower's MLP blocks run over row chunks, so that the
widest tensor (the decoder's [gate | up] product, 16,384 wide; the vision fc1 output, 4,096 wide)
is written and read back while still in L2 (50 MB on an H100) instead of through HBM.

    python benchmarks/exp_mlp_chunks.py [--chunks 1,2,3,4,6,8] [--out FILE.json]

Per shape: the GPU time of product, activation (our Triton kernel), product over all rows at once,
then over 2, 3, ... row chunks (each block captured in a CUDA graph and replayed); whether each
chunked output equals the unchunked one bit for bit (cuBLAS may pick another algorithm for fewer
rows); and, for reference, the parts of the unchunked block timed alone. Random bf16 inputs on one
GPU, weights at the real shapes.

Result (2026-12-07, H100, RESULTS.md): slower at every chunk count (by 1-25%): the smaller products
lose more than the activation's HBM traffic costs (0.04-0.13 ms a block). The engine's version of
the idea, W1-W3 with it, is `results/2026-12-07-h100-s14-b-mlp-row-chunks.patch` (not kept).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from phivision.kernels.fused import quick_gelu, silu_mul

# (name, rows, input width, intermediate width (the product's output), activation)
SHAPES = [("decoder W1", 2533, 3072, 16384, "silu"), ("decoder W2", 6093, 3072, 16384, "silu"),
          ("decoder W3", 8196, 3072, 16384, "silu"), ("vision W1 (17 crops)", 17 * 577, 1024, 4096, "gelu"),
          ("vision W2 (40 crops)", 40 * 577, 1024, 4096, "gelu")]


def mlp_parts(w1, b1, w2, b2, act: str):
    """The block's three steps as the model runs them: first product, activation, and the second
    product written into a given output (the decoder's have no biases)."""
    if act == "silu":
        return (lambda rows: torch.mm(rows, w1.t())), silu_mul, (lambda a, out: torch.mm(a, w2.t(), out=out))
    return (lambda rows: F.linear(rows, w1, b1)), quick_gelu, (lambda a, out: torch.addmm(b2, a, w2.t(), out=out))


def block_fn(x, w1, b1, w2, b2, act: str, chunks: int):
    rows = x.shape[0]
    step = math.ceil(rows / chunks)
    out = torch.empty((rows, w2.shape[0]), dtype=x.dtype, device=x.device)
    first, activation, second = mlp_parts(w1, b1, w2, b2, act)

    def run():
        for start in range(0, rows, step):
            second(activation(first(x[start : start + step])), out[start : start + step])
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", default="1,2,3,4,6,8")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chunk_counts = [int(c) for c in args.chunks.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for name, rows, width, inner, act in SHAPES:
        x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        out_w = inner // 2 if act == "silu" else inner  # silu_mul halves [gate | up]
        w1 = torch.randn(inner, width, device="cuda", dtype=torch.bfloat16, generator=gen) * width ** -0.5
        w2 = torch.randn(width, out_w, device="cuda", dtype=torch.bfloat16, generator=gen) * out_w ** -0.5
        b1 = b2 = None
        if act == "gelu":
            b1 = torch.randn(inner, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            b2 = torch.randn(width, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        reference = block_fn(x, w1, b1, w2, b2, act, 1)().clone()
        result = {"shape": name, "rows": rows, "ms": {}, "bit_equal": {}}
        for chunks in chunk_counts:
            fn = block_fn(x, w1, b1, w2, b2, act, chunks)
            result["bit_equal"][chunks] = bool(torch.equal(fn(), reference))
            result["ms"][chunks] = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
        first, activation, second = mlp_parts(w1, b1, w2, b2, act)
        mid = first(x)
        a = activation(mid)
        out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
        steps = {"first product": lambda: first(x), "activation": lambda: activation(mid), "second product": lambda: second(a, out)}
        result["parts_ms"] = {key: triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") for key, fn in steps.items()}
        rows_out.append(result)
        base = result["ms"][chunk_counts[0]]
        print(f"{name:22} " + " ".join(f"{c}: {ms:.3f} ms ({ms / base:.3f}{'' if result['bit_equal'][c] else ', differs'})"
                                         for c, ms in result["ms"].items())
              + " | parts " + " ".join(f"{k} {v:.3f}" for k, v in result["parts_ms"].items()), flush=True)
        del x, w1, w2, mid, a, out
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
