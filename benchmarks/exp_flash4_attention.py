"""FlashAttention-4's kernels (the optional `flash-attn-4` package) against the attention the engine
runs now, at the real shapes: the decoder's causal prefill attention (32 heads of 96) at W1's, W2's
and W3's prompt lengths, and the vision tower's attention (16 heads of 64, 577 tokens a crop) at
W1's and W2's crop counts. Random bf16 inputs on one GPU.

    python benchmarks/exp_flash4_attention.py [--json OUT.json]

For each shape and kernel: the first call's wall time (FA4 compiles there), the median GPU time of
one call (CUDA events, 5 rounds of 20 calls), the host time to queue one call while the GPU is busy,
the rate in TFLOP/s (causal: the half of the products that count), the largest difference from a
float32 reference on four heads, and whether a CUDA-graph capture of the call replays to the same
output, with the replay's GPU time (FA4's wrapper costs host time at every call; in a graph it does
not, so where the eager calls are host-bound the replay shows the kernel's own time). The engine's kernels are timed as it runs them: cuDNN padded to the 256-row bucket
for the decoder (the copy back to token-major rows included, which FA4 does not need), flash or
memory-efficient SDPA for the vision tower.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_timing import capture, median_gpu_ms  # benchmarks/, beside this script

try:
    from flash_attn.cute import flash_attn_func
except Exception as error:  # noqa: BLE001 - reported, the SDPA rows still run
    flash_attn_func, IMPORT_ERROR = None, f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None


def fa4(q, k, v, causal: bool):
    out = flash_attn_func(q, k, v, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def reference(q, k, v, causal: bool) -> torch.Tensor:
    """float32 SDPA (math) on the first four heads of (B, L, H, D) inputs -> (B, L, 4, D)."""
    views = [t[:, :, :4].float().transpose(1, 2) for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(*views, is_causal=causal)  # (B, 4, L, D)
    return out.transpose(1, 2)


def host_us(fn, calls: int = 20) -> float:
    """Host time to queue one call, behind a long product that keeps the GPU busy."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        big @ big
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return elapsed * 1e6


def graph_replay(fn) -> tuple[bool | str, float | None]:
    """Captures fn() in a CUDA graph: whether a replay writes what an eager call returns, and the
    median GPU time of a replay (no host time between the kernels)."""
    try:
        eager = fn().clone()
        graph, captured = capture(fn)
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        return bool(torch.equal(captured, eager)), median_gpu_ms(graph.replay, rounds=5, calls_per_round=20)
    except Exception as error:  # noqa: BLE001 - the answer is the error
        return f"{type(error).__name__}: {str(error)[:200]}", None


def run(name: str, kernels: dict, ref: torch.Tensor, flops: float, rows: list) -> None:
    for kernel, fn in kernels.items():
        row = {"shape": name, "kernel": kernel}
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - start
            row["ms"] = median_gpu_ms(fn, rounds=5, calls_per_round=20)
            row["tflops"] = flops / row["ms"] / 1e9
            row["host_us"] = host_us(fn)
            row["max_abs_err"] = (fn()[:, :, :4].float() - ref).abs().max().item()
            row["graph_replay_equal"], row["graph_ms"] = graph_replay(fn)
            print(f"{name:>20} {kernel:>22} {row['ms']:8.3f} ms {row['tflops']:5.0f} TFLOP/s  host {row['host_us']:6.1f} us  "
                  f"err {row['max_abs_err']:.2e}  first {row['first_call_s']:.2f} s  graph {row['graph_replay_equal']} "
                  f"{row['graph_ms'] or float('nan'):.3f} ms", flush=True)
            del out
        except Exception as error:  # noqa: BLE001 - one kernel failing leaves the others
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{name:>20} {kernel:>22} {row['error']}", flush=True)
        rows.append(row)


def causal_case(length: int, rows: list, heads: int = 32, head_dim: int = 96) -> None:
    """The engine's buffer: (T_pad, 3 * H * D) rotated projections, zero past the prompt."""
    width = heads * head_dim
    bucket = -(-length // 256) * 256
    padded = torch.zeros((bucket, 3 * width), dtype=torch.bfloat16, device="cuda")
    padded[:length].normal_()
    q, k, v = (part[:length].view(1, length, heads, head_dim) for part in padded.split(width, dim=-1))
    flops = 4.0 * heads * head_dim * length * (length + 1) / 2

    def cudnn_padded():
        views = [part.view(1, bucket, heads, head_dim).transpose(1, 2) for part in padded.split(width, dim=-1)]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(*views, is_causal=True)  # (1, H, T_pad, D)
        return out[:, :, :length].transpose(1, 2).reshape(1, length, heads, head_dim)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return out.transpose(1, 2).reshape(1, length, heads, head_dim)

    kernels = {f"cudnn (bucket {bucket})": cudnn_padded, "sdpa flash": flash}
    if flash_attn_func is not None:
        kernels["fa4"] = lambda: fa4(q, k, v, True)
    run(f"causal T={length}", kernels, reference(q, k, v, True), flops, rows)


def vision_case(crops: int, rows: list, length: int = 577, heads: int = 16, head_dim: int = 64) -> None:
    width = heads * head_dim
    qkv = torch.randn((crops, length, 3 * width), dtype=torch.bfloat16, device="cuda")
    q, k, v = (part.view(crops, length, heads, head_dim) for part in qkv.split(width, dim=-1))
    flops = 4.0 * heads * head_dim * length * length * crops

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    kernels = {"sdpa flash/efficient": sdpa}
    if flash_attn_func is not None:
        kernels["fa4"] = lambda: fa4(q, k, v, False)
    run(f"vision crops={crops}", kernels, reference(q, k, v, False), flops, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lengths", type=int, nargs="*", default=[2534, 6076, 8192, 1000])
    parser.add_argument("--crops", type=int, nargs="*", default=[17, 40])
    args = parser.parse_args()
    torch.manual_seed(0)
    print("flash-attn-4:", "imported" if flash_attn_func is not None else IMPORT_ERROR, flush=True)
    rows: list = []
    with torch.inference_mode():
        for length in args.lengths:
            causal_case(length, rows)
        for crops in args.crops:
            vision_case(crops, rows)
    print("\nshape                 kernel                       ms  TFLOP/s  graph ms  err")
    for row in rows:
        if "ms" in row:
            print(f"{row['shape']:<21} {row['kernel']:<24} {row['ms']:7.3f}  {row['tflops']:6.0f}  {row['graph_ms'] or float('nan'):8.3f}"
                  f"  {row['max_abs_err']:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "fa4_import": IMPORT_ERROR or "ok", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
