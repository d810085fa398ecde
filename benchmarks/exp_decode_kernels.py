"""Experiment: candidate decode kernels against the current ones, on the current GPU.

1. Paged decode attention: the package's kernel against a tensor-core variant (the query padded to
   16 rows for tl.dot). The first run of this script (results/2026-12-02-h200-s3-exp-decode-kernels.json)
   also had the kernel before (commit 5b2bccd: one 128-wide tile masked to head size 96), which the
   package's two-part kernel replaced.
2. Batch-1 matrix-vector products chained as in a decode step (32 x qkv, o, gate_up, down, then
   lm_head), captured in a CUDA graph, with and without programmatic dependent launch (each product
   loads its first weight tile before waiting for the previous kernel).

    python benchmarks/exp_decode_kernels.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl
import triton.testing

from phivision.kernels.paged_attention import (
    _decode_combine_kernel,
    _split_blocks,
    paged_decode_attention,
    paged_decode_attention_reference,
)

from gpu_timing import capture, median_gpu_ms  # benchmarks/, beside this script

HEADS, DIM, BLOCK = 32, 96, 64


@triton.jit
def _attn_dot(QKV, K_POOL, V_POOL, BLOCK_TABLES, CONTEXT_LENS, ACC, M, L, OUT,
              stride_tok, stride_kb, stride_kh, stride_kt, stride_bt,
              stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h, stride_out_b,
              sm_scale, NUM_SPLITS: tl.constexpr, KV_GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // KV_GROUP
    context, first, last = _split_blocks(CONTEXT_LENS, seq, split, NUM_SPLITS, BLOCK_SIZE)
    t = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    r = tl.arange(0, 16)
    q = tl.load(QKV + seq * stride_tok + head * HEAD_DIM + d, mask=d_mask, other=0.0)
    q16 = tl.broadcast_to(q[None, :], (16, BLOCK_D))
    m = tl.full([16], float("-inf"), tl.float32)
    l = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, BLOCK_D], tl.float32)
    for i in tl.range(first, last, num_stages=NUM_STAGES):
        block = tl.load(BLOCK_TABLES + seq * stride_bt + i)
        valid = (i * BLOCK_SIZE + t) < context
        tile = block * stride_kb + kv_head * stride_kh + t[:, None] * stride_kt + d[None, :]
        tmask = valid[:, None] & d_mask[None, :]
        k = tl.load(K_POOL + tile, mask=tmask, other=0.0)
        v = tl.load(V_POOL + tile, mask=tmask, other=0.0)
        s = tl.dot(q16, tl.trans(k)) * sm_scale  # (16, BLOCK_SIZE)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    row0 = (r == 0)[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = OUT + seq * stride_out_b + head * HEAD_DIM
        tl.store(out + r[:, None] * 0 + d[None, :], (acc / l[:, None]).to(OUT.dtype.element_ty), mask=row0)
    else:
        accp = ACC + seq * stride_acc_b + head * stride_acc_h + split * stride_acc_s
        tl.store(accp + r[:, None] * 0 + d[None, :], acc, mask=row0)
        tl.store(M + seq * stride_ml_b + head * stride_ml_h + split + r * 0, m, mask=r == 0)
        tl.store(L + seq * stride_ml_b + head * stride_ml_h + split + r * 0, l, mask=r == 0)


def attn_variant(kind, qkv, k_pool, v_pool, tables, ctx, splits, warps, stages):
    b = qkv.shape[0]
    acc = torch.empty((b, HEADS, splits, 128), dtype=torch.float32, device="cuda")
    m = torch.empty((b, HEADS, splits), dtype=torch.float32, device="cuda")
    l = torch.empty_like(m)
    out = torch.empty((b, HEADS * DIM), dtype=qkv.dtype, device="cuda")
    common = (qkv, k_pool, v_pool, tables, ctx, acc, m, l, out, qkv.stride(0), k_pool.stride(0), k_pool.stride(1),
              k_pool.stride(2), tables.stride(0), acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
              out.stride(0), 1.0 / math.sqrt(DIM))
    grid = (b, HEADS, splits)

    def run():
        _attn_dot[grid](*common, NUM_SPLITS=splits, KV_GROUP=1, BLOCK_SIZE=BLOCK, HEAD_DIM=DIM, BLOCK_D=128,
                        NUM_STAGES=stages, num_warps=warps)
        if splits > 1:
            _decode_combine_kernel[(b, HEADS)](acc, m, l, out, acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0),
                                               m.stride(1), out.stride(0), NUM_SPLITS=splits,
                                               SPLITS_P2=triton.next_power_of_2(splits), HEAD_DIM=DIM, D_A=64, D_B=32,
                                               USE_PDL=False)
        return out

    return run


def attention_sweep(rows: list) -> None:
    for batch, context in [(1, 2534), (1, 6100), (1, 8192), (64, 800)]:
        per_seq = math.ceil(context / BLOCK)
        k_pool = torch.randn(batch * per_seq + 1, HEADS, BLOCK, DIM, device="cuda", dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        order = torch.randperm(batch * per_seq, device="cuda").to(torch.int32) + 1
        tables = order.view(batch, per_seq).contiguous()
        ctx = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        qkv = torch.randn(batch, 3 * HEADS * DIM, device="cuda", dtype=torch.bfloat16)
        ref = paged_decode_attention_reference(qkv, k_pool, v_pool, tables, ctx, HEADS, DIM).float()
        kv_bytes = 2 * batch * context * HEADS * DIM * 2
        split_set = (24, 48, 64, 96, 128) if batch == 1 else (1, 2)
        for kind in ("current", "dot"):
            best = None
            for splits in split_set:
                for warps in (2, 4) if kind != "dot" else (4,):
                    for stages in (2, 3):
                        if kind == "current":
                            fn = lambda: paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, HEADS, DIM, splits,  # noqa: E731
                                                                num_warps=warps, num_stages=stages)
                        else:
                            fn = attn_variant(kind, qkv, k_pool, v_pool, tables, ctx, splits, warps, stages)
                        try:
                            out = fn().float()
                            err = ((out - ref).norm() / ref.norm()).item()
                            us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                        except Exception as exc:  # noqa: BLE001 - an experiment reports and goes on
                            print(f"  {kind} s{splits} w{warps} st{stages}: {type(exc).__name__}: {str(exc)[:200]}")
                            continue
                        row = {"part": "attention", "kind": kind, "batch": batch, "context": context, "splits": splits,
                               "warps": warps, "stages": stages, "us": us, "tb_s": kv_bytes / (us * 1e-6) / 1e12, "rel_err": err}
                        rows.append(row)
                        if best is None or us < best["us"]:
                            best = row
            if best:
                print(f"B{batch} ctx{context} {kind:8}: {best['us']:7.1f} us {best['tb_s']:.2f} TB/s "
                      f"(splits {best['splits']} warps {best['warps']} stages {best['stages']}, err {best['rel_err']:.1e})", flush=True)
        del k_pool, v_pool


@triton.jit
def _gemv(X, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
          USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    if USE_PDL:
        # The weights do not depend on the previous kernel: the first tile is requested before waiting.
        w0 = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        x0 = tl.load(X + cols, mask=cols < K, other=0.0)
        acc = w0.to(tl.float32) * x0.to(tl.float32)[None, :]
        for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
            col_mask = (k + cols) < K
            w = tl.load(W + rows[:, None] * stride_wn + (k + cols)[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            x = tl.load(X + k + cols, mask=col_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            col_mask = (k + cols) < K
            w = tl.load(W + rows[:, None] * stride_wn + (k + cols)[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            x = tl.load(X + k + cols, mask=col_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_mask)


def gemv_chain(rows: list) -> None:
    shapes = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}
    torch.manual_seed(0)
    layers = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01 for name, (n, k) in shapes.items()}
              for _ in range(32)]
    lm_head = torch.randn(32064, 3072, device="cuda", dtype=torch.bfloat16) * 0.01
    total_bytes = sum(w.numel() * 2 for layer in layers for w in layer.values()) + lm_head.numel() * 2
    x0 = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    configs = {
        "n4 k1024 w4 s3 (current)": {name: (4, 1024, 4, 3) for name in shapes} | {"lm_head": (4, 1024, 4, 3)},
        "per-shape": {"qkv": (8, 256, 4, 3), "o": (4, 1024, 4, 2), "gate_up": (8, 256, 4, 3), "down": (8, 512, 8, 4),
                      "lm_head": (4, 1024, 4, 2)},
        "n8 k512 w4 s3": {name: (8, 512, 4, 3) for name in shapes} | {"lm_head": (8, 512, 4, 3)},
        "n16 k256 w4 s4": {name: (16, 256, 4, 4) for name in shapes} | {"lm_head": (16, 256, 4, 4)},
    }

    def launch(x, w, cfg, pdl):
        n, k = w.shape
        bn, bk, warps, stages = cfg
        y = torch.empty(n, dtype=x.dtype, device=x.device)
        kwargs = {"launch_pdl": True} if pdl else {}
        _gemv[(triton.cdiv(n, bn),)](x, w, y, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=stages, USE_PDL=pdl,
                                     num_warps=warps, **kwargs)
        return y

    def step(cfg, pdl):
        x = x0
        for layer in layers:
            y = launch(x, layer["qkv"], cfg["qkv"], pdl)
            y = launch(y[:3072], layer["o"], cfg["o"], pdl)
            y = launch(y, layer["gate_up"], cfg["gate_up"], pdl)
            x = launch(y[:8192], layer["down"], cfg["down"], pdl)
        return launch(x, lm_head, cfg["lm_head"], pdl)

    for name, cfg in configs.items():
        for pdl in (False, True):
            try:
                ref = step(cfg, False)
                out = step(cfg, pdl)
                same = bool(torch.equal(out, ref))
                graph, gout = capture(lambda: step(cfg, pdl))
                graph.replay()
                torch.cuda.synchronize()
                same_graph = bool(torch.equal(gout, ref))
                ms = median_gpu_ms(graph.replay, rounds=25, warmup=5)  # 30 replays, the first 5 not counted
            except Exception as exc:  # noqa: BLE001
                print(f"gemv chain {name} pdl={pdl}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            row = {"part": "gemv_chain", "config": name, "pdl": pdl, "ms": ms, "tb_s": total_bytes / (ms * 1e-3) / 1e12,
                   "equal_eager": same, "equal_graph": same_graph}
            rows.append(row)
            print(f"gemv chain {name:26} pdl={pdl!s:5}: {ms:.3f} ms {row['tb_s']:.2f} TB/s "
                  f"(equal eager {same}, graph {same_graph})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="gemv,attention")
    args = parser.parse_args()
    rows: list = []
    if "gemv" in args.parts:
        gemv_chain(rows)
    if "attention" in args.parts:
        attention_sweep(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
