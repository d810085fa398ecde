"""Launch-setting sweep of the paged decode-attention kernel (splits, warps, stages) at the
workloads' batch sizes and contexts, on the current GPU: the data behind the defaults in
phivision/kernels/paged_attention.py.

    python benchmarks/sweep_decode_attention.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton.testing

from phivision.kernels.paged_attention import paged_decode_attention

HEADS, DIM, BLOCK = 32, 96, 64  # Phi-3-mini: 32 KV heads of 96, the engine's block size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for batch, context in [(1, 2534), (1, 6100), (1, 8192), (8, 2534), (64, 800)]:
        per_seq = math.ceil(context / BLOCK)
        k_pool = torch.randn(batch * per_seq + 1, HEADS, BLOCK, DIM, device="cuda", dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        # Blocks of a sequence scattered over the pool, as after a server has run a while.
        order = torch.randperm(batch * per_seq, device="cuda").to(torch.int32) + 1
        tables = order.view(batch, per_seq)
        ctx = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        qkv = torch.randn(batch, 3 * HEADS * DIM, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * batch * context * HEADS * DIM * 2
        best = None
        for splits in sorted({8, 16, 24, 33, 48, 64} if batch == 1 else {1, 2, 4}):
            for warps in (1, 2, 4):
                for stages in (1, 2, 3):
                    fn = lambda: paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, HEADS, DIM, splits,  # noqa: E731
                                                        num_warps=warps, num_stages=stages)
                    us = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
                    row = {"batch": batch, "context": context, "splits": splits, "warps": warps, "stages": stages,
                           "us": us, "tb_s": kv_bytes / (us * 1e-6) / 1e12}
                    rows.append(row)
                    if best is None or us < best["us"]:
                        best = row
        print(f"B{batch} ctx{context}: best {best['us']:.1f} us ({best['tb_s']:.2f} TB/s) splits {best['splits']} "
              f"warps {best['warps']} stages {best['stages']}", flush=True)
        for splits in sorted({r["splits"] for r in rows if r["batch"] == batch and r["context"] == context}):
            mine = [r for r in rows if (r["batch"], r["context"], r["splits"]) == (batch, context, splits)]
            top = min(mine, key=lambda r: r["us"])
            print(f"    splits {splits:3}: {top['us']:7.1f} us (warps {top['warps']} stages {top['stages']})", flush=True)
        del k_pool, v_pool
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
