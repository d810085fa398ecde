"""GPU check of the fast path's pieces: Triton kernels against their PyTorch references, the paged
runner against the dense forward, and the captured decode step's time at the real shapes.

    python benchmarks/gpu_kernel_check.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from phivision.config import ModelConfig
from phivision.generation.runner import ModelRunner, RunnerConfig
from phivision.kernels.fused import add_layer_norm, add_rms_norm, layer_norm, quick_gelu, rms_norm, rope_qk_, silu_mul
from phivision.kernels.gemv import gemv
from phivision.kernels.paged_attention import (
    decode_scratch,
    decode_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    qkv_rope_write_kv,
    rope_and_write_kv_,
    write_kv,
)
from phivision.weights import build_meta_model

ROOT = Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.to(a.device)
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def check_kernels(shared: Path) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    dev = "cuda"
    for heads, kv_heads, dim, block, lens in [(32, 32, 96, 64, [2534]), (32, 32, 96, 64, [1, 63, 64, 65, 800, 6100, 17]),
                                             (8, 2, 128, 16, [5, 300, 33])]:
        num_blocks = sum(math.ceil(n / block) for n in lens) + 4
        k_pool = torch.randn(num_blocks, kv_heads, block, dim, device=dev, dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        perm = torch.randperm(num_blocks - 1, device=dev) + 1
        tables, at = [], 0
        width = max(math.ceil(n / block) for n in lens)
        for n in lens:
            need = math.ceil(n / block)
            tables.append(torch.nn.functional.pad(perm[at : at + need], (0, width - need)))
            at += need
        tables = torch.stack(tables).to(torch.int32)
        ctx = torch.tensor(lens, device=dev, dtype=torch.int32)
        qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * dim, device=dev, dtype=torch.bfloat16)
        ref = paged_decode_attention_reference(qkv, k_pool, v_pool, tables, ctx, heads, dim)
        for splits in (1, 3, 8, 16):
            out = paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, heads, dim, splits, fused_combine=False)
            name = f"decode H{heads}/{kv_heads} D{dim} blk{block} lens{lens[:3]} splits{splits}"
            rows.append({"check": name, "rel_err": rel(out, ref)})
            # the splits combined by the last program of each head: as close to the reference, and the
            # same bits launch after launch (the split counts reset themselves)
            scratch = decode_scratch(len(lens), heads, splits, dim, dev)
            fused = [paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, heads, dim, splits, scratch, fused_combine=True)
                     for _ in range(3)]
            same = all(torch.equal(fused[0], f) for f in fused[1:])
            rows.append({"check": f"{name} fused combine (repeatable: {same}, max diff to unfused "
                                  f"{(fused[0].float() - out.float()).abs().max().item():.1e})",
                         "rel_err": rel(fused[0], ref) + float(not same)})
            # block numbers read before the PDL wait (any count, 0 = none): the same arithmetic, the same bits
            from phivision.kernels import paged_attention as pa

            outs = []
            for preload in (0, 1, 2, 8):
                pa.DECODE_PRELOAD_BLOCKS = preload
                outs.append(paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, heads, dim, splits, scratch))
            pa.DECODE_PRELOAD_BLOCKS = 8
            rows.append({"check": f"{name} preloaded block numbers 0/1/2/8 equal",
                         "rel_err": float(not all(torch.equal(outs[0], o) for o in outs[1:]))})
    # cache write
    k_pool = torch.zeros(10, 4, 16, 96, device=dev, dtype=torch.bfloat16)
    v_pool = torch.zeros_like(k_pool)
    k2, v2 = k_pool.clone(), v_pool.clone()
    qkv = torch.randn(6, 12 * 96, device=dev, dtype=torch.bfloat16)
    slots = torch.tensor([5, 17, -1, 100, 101, 159], device=dev)
    write_kv(qkv, k_pool, v_pool, slots, 4, 4, 96)
    write_kv(qkv.cpu(), k2_cpu := k2.cpu(), v2_cpu := v2.cpu(), slots.cpu(), 4, 4, 96)
    rows.append({"check": "write_kv exact", "rel_err": float(not (torch.equal(k_pool.cpu(), k2_cpu) and torch.equal(v_pool.cpu(), v2_cpu)))})
    # fused element-wise ops: the Triton kernels against the PyTorch references run on the CPU
    x = torch.randn(7, 3072, device=dev, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(3072, device=dev, dtype=torch.bfloat16)
    rows.append({"check": "rms_norm", "rel_err": rel(rms_norm(x, w, 1e-5), rms_norm(x.cpu(), w.cpu(), 1e-5))})
    (y, h), (yc, hc) = add_rms_norm(x, r, w, 1e-5), add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-5)
    rows.append({"check": "add_rms_norm", "rel_err": max(rel(y, yc), rel(h, hc))})
    gu = torch.randn(7, 16384, device=dev, dtype=torch.bfloat16)
    rows.append({"check": "silu_mul", "rel_err": rel(silu_mul(gu), silu_mul(gu.cpu()))})
    # the vision tower's LayerNorms against PyTorch's add and layer_norm on the same device
    norm = torch.nn.LayerNorm(1024, eps=1e-5).to(dev, torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    xv, rv = torch.randn(3, 577, 1024, device=dev, dtype=torch.bfloat16) * 3, torch.randn(3, 577, 1024, device=dev, dtype=torch.bfloat16)
    ln, ln_ref = layer_norm(xv, norm), norm(xv)
    rows.append({"check": f"layer_norm (unequal elements {(ln != ln_ref).float().mean().item():.1e})", "rel_err": rel(ln, ln_ref)})
    (y, h), h_ref = add_layer_norm(xv, rv, norm), rv + xv
    rows.append({"check": f"add_layer_norm (sums equal {torch.equal(h, h_ref)}, unequal outputs "
                          f"{(y != norm(h_ref)).float().mean().item():.1e})",
                 "rel_err": max(rel(y, norm(h_ref)), float(not torch.equal(h, h_ref)))})
    # batch-1 products: the gated one equals silu_mul then the plain one, bit for bit; with and
    # without programmatic dependent launch the results are the same bits
    for dtype in (torch.bfloat16, torch.float16):
        gu1 = torch.randn(16384, device=dev, dtype=dtype)
        down = torch.randn(3072, 8192, device=dev, dtype=dtype) * 0.02
        plain = gemv(silu_mul(gu1[None])[0], down, pdl=False)
        rows.append({"check": f"gated gemv == gemv(silu_mul) {dtype}", "rel_err": float(not torch.equal(gemv(gu1, down, gated=True), plain))})
        rows.append({"check": f"gated gemv pdl == no pdl {dtype}",
                     "rel_err": float(not torch.equal(gemv(gu1, down, gated=True), gemv(gu1, down, gated=True, pdl=False)))})
        rows.append({"check": f"gemv vs float32 matmul {dtype}", "rel_err": rel(plain, down.float() @ silu_mul(gu1[None])[0].float())})
        # float32 output (the logits): the product rounded to the dtype, then widened
        x1 = gu1[:8192]
        rows.append({"check": f"gemv out_dtype float32 == gemv().float() {dtype}",
                     "rel_err": float(not torch.equal(gemv(x1, down, out_dtype=torch.float32), gemv(x1, down).float()))})
    # a decode step's embeddings and rotary rows in one kernel against the reference lookup (CPU)
    from phivision.kernels.fused import decode_inputs
    from phivision.model.rope import LongRopeEmbedding

    text = ModelConfig.from_dict(json.loads((shared / "spec" / "phi35v-config.json").read_text())).text
    rope = LongRopeEmbedding(text).to(dev)
    tables = rope.tables(8192, torch.bfloat16)
    positions = torch.tensor([[0], [2533], [4095], [4096], [8191]], device=dev)
    use_long = positions[:, 0] + 1 > text.original_max_position_embeddings
    ids = torch.tensor([[5], [-3], [32000], [0], [17]], device=dev)
    embed = torch.randn(32064, 3072, device=dev, dtype=torch.bfloat16)
    got = decode_inputs(ids, positions, use_long, embed, tables)
    cpu_tables = type(tables)(tables.cos.cpu(), tables.sin.cpu(), tables.short_rows)
    want = decode_inputs(ids.cpu(), positions.cpu(), use_long.cpu(), embed.cpu(), cpu_tables)
    computed = rope(positions, torch.bfloat16, use_long)
    exact = all(torch.equal(g.cpu(), w) for g, w in zip(got, want)) and all(torch.equal(g, c) for g, c in zip(got[1:], computed))
    rows.append({"check": "decode_inputs == lookup on CPU == rotary computed", "rel_err": float(not exact)})
    for dtype in (torch.bfloat16, torch.float16):
        act = torch.randn(3, 577, 4096, device=dev, dtype=dtype) * 4
        fused, unfused = quick_gelu(act), act * torch.sigmoid(1.702 * act)  # the reference's ops, same device
        rows.append({"check": f"quick_gelu {dtype} (unequal elements {(fused != unfused).float().mean().item():.1e})",
                     "rel_err": rel(fused, unfused)})
    # the vision tower's patch embedding: a matrix product on CUDA against the convolution
    from phivision.config import VisionConfig
    from phivision.model.vision import ClipEmbeddings
    emb = ClipEmbeddings(VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)).to(dev, torch.bfloat16)
    torch.nn.init.normal_(emb.patch_embedding.weight, std=0.02)
    pixels = torch.randn(5, 3, 336, 336, device=dev)
    conv = emb.patch_embedding(pixels.to(torch.bfloat16)).flatten(2).transpose(1, 2) + emb.position_embedding.weight[None, 1:]
    rows.append({"check": "patch embedding matmul vs conv", "rel_err": rel(emb(pixels)[:, 1:], conv)})
    qkv = torch.randn(9, 96 * 96, device=dev, dtype=torch.bfloat16)
    cos, sin = torch.randn(9, 96, device=dev, dtype=torch.bfloat16), torch.randn(9, 96, device=dev, dtype=torch.bfloat16)
    a, b = qkv.clone(), qkv.cpu()
    rope_qk_(a, cos, sin, 32, 32, 96)
    rope_qk_(b, cos.cpu(), sin.cpu(), 32, 32, 96)
    rows.append({"check": "rope_qk_", "rel_err": rel(a, b)})
    k1, v1 = torch.zeros(4, 32, 16, 96, device=dev, dtype=torch.bfloat16), torch.zeros(4, 32, 16, 96, device=dev, dtype=torch.bfloat16)
    qkv3 = torch.randn(9, 96 * 96, device=dev, dtype=torch.bfloat16)
    slots = torch.tensor([0, 3, -1, 17, 18, 40, 63, 5, 9], device=dev)
    c1, c2 = qkv3.clone(), qkv3.clone()
    k2, v2 = k1.clone(), v1.clone()
    rope_and_write_kv_(c1, cos, sin, k1, v1, slots, 32, 32, 96)
    rope_qk_(c2, cos, sin, 32, 32, 96)
    write_kv(c2, k2, v2, slots, 32, 32, 96)
    rows.append({"check": "rope_and_write_kv_ vs rope_qk_+write_kv", "rel_err": rel(c1, c2) + rel(k1, k2) + rel(v1, v2)})
    # batch-1 fused qkv product + rotary + cache write against the product then rope_and_write_kv_
    for dtype in (torch.bfloat16, torch.float16):
        x1 = torch.randn(1, 3072, device=dev, dtype=dtype)
        wqkv = torch.randn(96 * 96, 3072, device=dev, dtype=dtype) * 0.02
        cos1, sin1 = torch.randn(96, device=dev, dtype=dtype), torch.randn(96, device=dev, dtype=dtype)
        pools = [torch.zeros(4, 32, 16, 96, device=dev, dtype=dtype) for _ in range(4)]
        slot = torch.tensor([37], device=dev)
        fused = qkv_rope_write_kv(x1, wqkv, cos1, sin1, pools[0], pools[1], slot, 32, 32, 96)
        plain = torch.nn.functional.linear(x1, wqkv)
        rope_and_write_kv_(plain, cos1[None], sin1[None], pools[2], pools[3], slot, 32, 32, 96)
        # the cache holds exactly the fused output's k and v
        k_row = pools[0][37 // 16, :, 37 % 16].reshape(-1)
        v_row = pools[1][37 // 16, :, 37 % 16].reshape(-1)
        exact = torch.equal(k_row, fused[0, 3072:6144]) and torch.equal(v_row, fused[0, 6144:])
        rows.append({"check": f"qkv_rope_write_kv vs linear+rope_and_write_kv_ {dtype} (cache = output: {exact})",
                     "rel_err": rel(fused, plain) + rel(pools[0], pools[2]) + rel(pools[1], pools[3]) + float(not exact)})
    return rows


def bench_decode_kernel() -> list[dict]:
    """Achieved bandwidth of the paged decode kernel alone, over a sweep of its launch settings."""
    import triton.testing

    rows = []
    heads, dim, block = 32, 96, 64
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, context in [(1, 2534), (1, 8192), (64, 800)]:
        per_seq = math.ceil(context / block)
        k_pool = torch.randn(batch * per_seq + 1, heads, block, dim, device="cuda", dtype=torch.bfloat16)
        v_pool = torch.randn_like(k_pool)
        tables = (torch.arange(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq) + 1)
        ctx = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        qkv = torch.randn(batch, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * batch * context * heads * dim * 2
        for per_sm in (8, 16):
            splits = decode_splits(batch, heads, sms, per_sm)
            for warps in (2, 4):
                for stages in (2, 3):
                    fn = lambda: paged_decode_attention(qkv, k_pool, v_pool, tables, ctx, heads, dim, splits,  # noqa: E731
                                                        num_warps=warps, num_stages=stages)
                    ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
                    rows.append({"batch": batch, "context": context, "splits": splits, "warps": warps, "stages": stages,
                                 "us": ms * 1e3, "tb_s": kv_bytes / (ms * 1e-3) / 1e12})
        del k_pool, v_pool
    return rows


def bench_linears() -> list[dict]:
    """Batch-1 matrix-vector products of the decoder's shapes: cuBLAS and our kernel over a sweep."""
    import triton.testing

    rows = []
    for out_f, in_f, name in [(9216, 3072, "qkv"), (3072, 3072, "o"), (16384, 3072, "gate_up"), (3072, 8192, "down"),
                              (32064, 3072, "lm_head")]:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), w.float())[0]
        ms = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=20, rep=100, return_mode="median")
        rows.append({"linear": name, "impl": "cublas", "us": ms * 1e3, "tb_s": w.numel() * 2 / (ms * 1e-3) / 1e12,
                     "rel_err": rel(torch.nn.functional.linear(x, w)[0], ref)})
        for bn in (4, 8, 16):
            for bk in (256, 512, 1024):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        if bn * bk > 8192:
                            continue
                        fn = lambda: gemv(x[0], w, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)  # noqa: E731
                        err = rel(fn(), ref)
                        ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
                        rows.append({"linear": name, "impl": f"gemv n{bn} k{bk} w{warps} s{stages}", "us": ms * 1e3,
                                     "tb_s": w.numel() * 2 / (ms * 1e-3) / 1e12, "rel_err": err})
    return rows


def random_real_model(shared: Path) -> torch.nn.Module:
    config = ModelConfig.from_dict(json.loads((shared / "spec" / "phi35v-config.json").read_text()))
    model = build_meta_model(config).to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    model.reset_buffers("cuda")
    return model.eval()


def block_tables(runner: ModelRunner, batch: int, tokens: int) -> list[list[int]]:
    """Block tables for `batch` sequences of up to `tokens` tokens each: consecutive blocks from 1."""
    per_seq = math.ceil(tokens / runner.config.block_size)
    return [[1 + i * per_seq + j for j in range(per_seq)] for i in range(batch)]


def time_decode(runner: ModelRunner, batch: int, context: int, steps: int = 50) -> float:
    tables = block_tables(runner, batch, context + steps + 1)
    lens = [context] * batch
    for _ in range(3):
        runner.decode([100] * batch, lens, tables)
    torch.cuda.synchronize()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        logits = runner.decode([100] * batch, [n + step for n in lens], tables)
        logits.argmax(-1).tolist()  # the sync a real engine pays to read the tokens
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graph_only(runner: ModelRunner, batch: int, context: int, steps: int = 50) -> float:
    """The captured step replayed back to back with the same inputs and no host work between: the
    GPU's own time per step. time_decode minus this is the host's turnaround (inputs, copy, launch,
    reading the tokens back), in which the GPU waits."""
    tables = block_tables(runner, batch, context + 1)
    runner.decode([100] * batch, [context] * batch, tables)
    graph = runner._graph_for(batch).graph
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="correctness checks only, no sweeps or step timings")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the kernel launch-setting sweeps")
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["kernels"] = check_kernels(args.shared)
    if args.quick:
        for row in report["kernels"]:
            print(f"{row['check']:70} rel_err {row['rel_err']:.2e}")
        return
    report["decode_kernel_sweep"] = [] if args.no_sweeps else bench_decode_kernel()
    report["linears"] = [] if args.no_sweeps else bench_linears()
    model = random_real_model(args.shared)
    t0 = time.perf_counter()
    runner = ModelRunner(model, RunnerConfig(num_blocks=2 * 64 * 16 + 8, block_size=64, max_num_seqs=64, max_model_len=8192))
    report["graph_capture_s"] = time.perf_counter() - t0
    shapes = {f"B{batch}_ctx{context}": (batch, context)
              for batch, context in [(1, 2534), (1, 6100), (1, 8192 - 64), (8, 2534), (64, 800)]
              if batch * math.ceil((context + 60) / 64) + 1 <= runner.config.num_blocks}

    def step_ms(timer) -> dict[str, float]:
        return {key: timer(runner, batch, context) * 1e3 for key, (batch, context) in shapes.items()}

    timings = report["decode_step_ms"] = step_ms(time_decode)
    report["decode_graph_only_ms"] = step_ms(time_graph_only)
    # The same steps captured with the splits combined by a second kernel (kernels/paged_attention.py),
    # then without programmatic dependent launch.
    from phivision.kernels import paged_attention as pa

    pa.DECODE_FUSED_COMBINE = False
    runner.capture_graphs()
    report["decode_step_ms_combine_kernel"] = step_ms(time_decode)
    pa.DECODE_FUSED_COMBINE = True
    import os

    from phivision.kernels import _pdl_supported

    os.environ["PHIVISION_PDL"] = "0"
    _pdl_supported.cache_clear()
    runner.capture_graphs()
    report["decode_step_ms_no_pdl"] = step_ms(time_decode)
    os.environ.pop("PHIVISION_PDL")
    _pdl_supported.cache_clear()
    weight_bytes = 2 * sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in ("embed_tokens", "vision_tower", "projector")))
    report["decoder_weight_bytes"] = weight_bytes
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    for row in report["kernels"]:
        print(f"{row['check']:70} rel_err {row['rel_err']:.2e}")
    print(f"graph capture {report['graph_capture_s']:.1f} s; decoder weights {weight_bytes / 1e9:.2f} GB")
    best = {}
    for row in report["decode_kernel_sweep"]:
        key = (row["batch"], row["context"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    for row in report["decode_kernel_sweep"]:
        default_splits = decode_splits(row["batch"], 32, 132)
        if (row["splits"], row["warps"], row["stages"]) == (default_splits, 2, 3 if default_splits == 1 else 2):
            print(f"decode kernel default B{row['batch']} ctx{row['context']}: {row['us']:.1f} us {row['tb_s']:.2f} TB/s")
    for (b, c), row in best.items():
        print(f"decode kernel best    B{b} ctx{c}: {row['us']:.1f} us {row['tb_s']:.2f} TB/s splits {row['splits']} "
              f"warps {row['warps']} stages {row['stages']}")
    for name in ("qkv", "o", "gate_up", "down", "lm_head") if report["linears"] else ():
        sel = [r for r in report["linears"] if r["linear"] == name]
        cublas = next(r for r in sel if r["impl"] == "cublas")
        best_row = min((r for r in sel if r["impl"] != "cublas"), key=lambda r: r["us"])
        default = next((r for r in sel if r["impl"] == "gemv n8 k512 w4 s4"), None)
        print(f"linear {name:8} cublas {cublas['us']:6.1f} us {cublas['tb_s']:.2f} TB/s | best {best_row['impl']} "
              f"{best_row['us']:6.1f} us {best_row['tb_s']:.2f} TB/s err {best_row['rel_err']:.1e} | default "
              f"{default['us'] if default else float('nan'):6.1f} us")
    for key, ms in timings.items():
        off = report["decode_step_ms_no_pdl"][key]
        print(f"decode step {key:16} {ms:7.3f} ms  ({1e3 / ms:7.1f} steps/s); graph alone "
              f"{report['decode_graph_only_ms'][key]:7.3f} ms; combine kernel "
              f"{report['decode_step_ms_combine_kernel'][key]:7.3f} ms; without PDL {off:7.3f} ms")


if __name__ == "__main__":
    main()
