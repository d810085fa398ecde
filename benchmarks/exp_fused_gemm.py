"""The MLP products with their activation fused in (a Triton product, here) against cuBLAS plus
the separate activation kernel, per shape and launch configuration.

    python benchmarks/exp_fused_gemm.py [--out FILE]

Shapes: the decoder's gate_up product with its SiLU gate at W1's, W2's and W3's prompt lengths
(x rows x 3,072 by 16,384 x 3,072), and the vision tower's fc1 with quick-GELU at W1's 17 and W2's
40 crops (rows of 577 x 1,024 by 4,096 x 1,024, with bias). For each: the time of F.linear then
fused.silu_mul / fused.quick_gelu (the engine before), of each configuration of the fused kernel,
the share of outputs equal to the unfused result's bit for bit and the largest difference
relative to its largest value. CUDA only; median of 7 timings of 10 calls each, after a warm-up.

The idea: the decoder's MLP writes gate_up = x @ W.T (rows x 16,384) and a second kernel reads it
back to form up * silu(gate); CLIP's MLP writes fc1's output (rows x 4,096) and quick-GELU reads it
back. Here one product computes the activation on its tile before storing it: the gate and up
halves of a tile are accumulated side by side (two accumulators over the same rows of x). Its
rounding is the reference's (the product rounded first, bias added in float32 before that, then
each of the activation's ops rounded). Measured on an H200 (RESULTS.md, ninth session): the
outputs are bit-equal to the unfused path's, but this product runs at 320-590 TFLOP/s against
cuBLAS's 650-770, so the fused kernel takes 1.13-1.35 times as long as cuBLAS plus the separate
activation.
Not kept in the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_timing import median_gpu_ms  # benchmarks/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phivision.kernels import fused  # noqa: E402


@triton.jit
def _gemm_act_kernel(X, W, BIAS, OUT, M, N, K, stride_xm, stride_wn, stride_om, up_offset,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    # ACT 0: quick_gelu(x @ W.T + bias), W (N, K). ACT 1: up * silu(gate) with gate = x @ W[:N].T
    # and up = x @ W[up_offset : up_offset + N].T (the checkpoint's [gate | up] rows).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Tiles in groups of GROUP_M row blocks, so consecutive programs share x's and W's tiles in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    # Rows past M and columns past N read (wrapped) real data instead of masking every load;
    # their results are never stored.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]  # (BM, BK)
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]  # (BN, BK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT == 1:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):  # K % BLOCK_K == 0 (the shapes here)
        x = tl.load(x_ptrs)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs)), acc)
        if ACT == 1:
            acc_up = tl.dot(x, tl.trans(tl.load(w_ptrs + up_offset * stride_wn)), acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = OUT.dtype.element_ty
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if ACT == 0:
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        h = acc.to(dtype).to(tl.float32)
        # The reference's x * sigmoid(1.702 * x) rounds after each of its three ops (fused.quick_gelu).
        scaled = (1.702 * h).to(dtype).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-scaled))).to(dtype).to(tl.float32)
        out = (h * gate).to(dtype)
    else:
        g = acc.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # silu, rounded (fused.silu_mul)
        out = (acc_up.to(dtype).to(tl.float32) * act).to(dtype)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_om + cols[None, :], out,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the fused product (tile sizes, warps, pipeline stages)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, act: int, up_offset: int,
            config: GemmConfig) -> torch.Tensor:
    m, k = x2.shape
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _gemm_act_kernel[grid](x2, weight, bias if bias is not None else weight, out, m, n, k, x2.stride(0),
                           weight.stride(0), out.stride(0), up_offset, ACT=act, HAS_BIAS=bias is not None,
                           BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                           GROUP_M=config.group_m, NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    return out


SILU_SHAPES = {"W1 gate_up": 2533, "W2 gate_up": 6093, "W3 gate_up": 8196}
GELU_SHAPES = {"W1 fc1": 17 * 577, "W2 fc1": 40 * 577}
SILU_CONFIGS = [GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 64, 64, 8, 4, 4),
                GemmConfig(128, 64, 64, 8, 8, 4), GemmConfig(64, 128, 64, 8, 4, 4), GemmConfig(128, 128, 32, 8, 8, 4),
                GemmConfig(256, 64, 64, 8, 8, 3), GemmConfig(128, 128, 64, 16, 8, 3)]
GELU_CONFIGS = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4), GemmConfig(128, 128, 64, 8, 8, 4),
                GemmConfig(128, 128, 64, 8, 4, 4), GemmConfig(256, 128, 64, 8, 8, 3), GemmConfig(128, 256, 32, 8, 8, 4),
                GemmConfig(128, 128, 128, 8, 8, 3), GemmConfig(128, 256, 64, 16, 8, 3)]


def gpu_ms(call) -> float:
    """Median of 7 timings of 10 back-to-back calls, per call (ms), after 3 untimed calls."""
    return median_gpu_ms(call, rounds=7, calls_per_round=10, warmup=3)


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    equal = (out == ref).float().mean().item()
    diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return equal, diff


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    rows = []
    cases = [(name, m, 3072, 16384, False, SILU_CONFIGS) for name, m in SILU_SHAPES.items()]
    cases += [(name, m, 1024, 4096, True, GELU_CONFIGS) for name, m in GELU_SHAPES.items()]
    for name, m, k, n, gelu, configs in cases:
        x = torch.randn(m, k, device=dev, dtype=dtype)
        w = (torch.randn(n, k, device=dev) / k**0.5).to(dtype)
        b = torch.randn(n, device=dev, dtype=dtype) * 0.1 if gelu else None
        if gelu:
            def unfused():
                return fused.quick_gelu(F.linear(x, w, b))

            def product():
                return F.linear(x, w, b)

            def fused_with(config):
                return lambda: _launch(x, w, b, n, 0, 0, config)
        else:
            def unfused():
                return fused.silu_mul(F.linear(x, w))

            def product():
                return F.linear(x, w)

            def fused_with(config):
                return lambda: _launch(x, w, None, n // 2, 1, n // 2, config)
        flops = 2 * m * k * n
        ref = unfused()
        base = gpu_ms(unfused)
        mm = gpu_ms(product)
        print(f"{name} ({m} x {k} by {n} x {k}): cuBLAS + activation {base:.3f} ms (product alone {mm:.3f} ms, "
              f"{flops / mm / 1e9:.0f} TFLOP/s)", flush=True)
        row = dict(name=name, m=m, k=k, n=n, unfused_ms=base, product_ms=mm, configs=[])
        for config in configs:
            try:
                call = fused_with(config)
                equal, diff = compare(call(), ref)
                ms = gpu_ms(call)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
                print(f"  {config}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            row["configs"].append(dict(config=config.__dict__, ms=ms, equal=equal, max_rel_diff=diff))
            print(f"  {config.block_m}x{config.block_n}x{config.block_k} g{config.group_m} w{config.num_warps} "
                  f"s{config.num_stages}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s, {base / ms:.3f}x), "
                  f"equal {equal:.5f}, diff {diff:.1e}", flush=True)
        rows.append(row)
    print("\nbest per shape:")
    for row in rows:
        if row["configs"]:
            best = min(row["configs"], key=lambda c: c["ms"])
            print(f"  {row['name']:11s} unfused {row['unfused_ms']:.3f} ms, fused {best['ms']:.3f} ms "
                  f"({row['unfused_ms'] / best['ms']:.3f}x) with {best['config']}")
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
