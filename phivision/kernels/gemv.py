"""Matrix-vector products for batch-1 decoding.

Decoding one token reads every weight once, so the step is as fast as the weight reads. cuBLAS
reaches about 1.8 TB/s of an H100's 3.0 on these shapes at M = 1 (measured, see
benchmarks/RESULTS.md); this kernel streams each weight row block with several loads in flight.
Launched with PDL (see kernels/__init__.py) it requests its first weight tile before waiting for
the previous kernel: the 129 products of a decode step in a row, captured in a CUDA graph, took
1.84 ms instead of 2.04 on an H200 (4.05 TB/s of weights against 3.64).
`gated_linear` also takes the MLP's SiLU gate: it reads [gate | up] and forms up * silu(gate) per
tile, with the same rounding as `silu_mul`, so the step has one kernel less per layer.
Inputs with more than one row go to `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pdl_launch, triton_available
from .fused import silu_mul

# Launch settings, picked on an H100 by benchmarks/gpu_kernel_check.py (still the best of those
# tried in a chain of a decode step's products on an H200, benchmarks/exp_decode_kernels.py).
GEMV_BLOCK_N = 4
GEMV_BLOCK_K = 1024
GEMV_NUM_WARPS = 4
GEMV_NUM_STAGES = 3

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_x_tile(X, k, cols, K, GATED: tl.constexpr):
        """Columns [k, k + BLOCK_K) of the input vector in float32; GATED: up * silu(gate) of a
        [gate | up] vector of 2K, rounded like the reference (silu, then the product, each to the dtype)."""
        col_mask = (k + cols) < K
        if GATED:
            gate = tl.load(X + k + cols, mask=col_mask, other=0.0)
            up = tl.load(X + K + k + cols, mask=col_mask, other=0.0)
            g = gate.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
            x = (up.to(tl.float32) * act.to(tl.float32)).to(gate.dtype).to(tl.float32)
        else:
            x = tl.load(X + k + cols, mask=col_mask, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _gemv_kernel(X, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)
        # The first weight tile does not depend on any earlier kernel: requested before the wait.
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = w.to(tl.float32) * _gemv_x_tile(X, 0, cols, K, GATED)[None, :]
        for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
            col_mask = (k + cols) < K
            w = tl.load(W + rows[:, None] * stride_wn + (k + cols)[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * _gemv_x_tile(X, k, cols, K, GATED)[None, :]
        y = tl.sum(acc, axis=1)
        # Rounded to the input's dtype first, as the product's output; a float32 Y (the logits) then
        # holds that value exactly, without a separate cast kernel.
        tl.store(Y + rows, y.to(X.dtype.element_ty).to(Y.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, gated: bool = False, out_dtype: torch.dtype | None = None,
         block_n: int = GEMV_BLOCK_N, block_k: int = GEMV_BLOCK_K, num_warps: int = GEMV_NUM_WARPS,
         num_stages: int = GEMV_NUM_STAGES, pdl: bool = True) -> torch.Tensor:
    """x (K,) contiguous, weight (N, K) row-major -> (N,) in x's dtype, accumulated in float32.
    gated: x is [gate | up] (2K,) and the product is weight @ (up * silu(gate)).
    out_dtype: the result stored in that dtype, after rounding to x's (= the product, then a cast)."""
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k):
        raise ValueError(f"gemv: input of {x.numel()} for a weight of {n}x{k} (gated={gated})")
    y = torch.empty(n, dtype=out_dtype or x.dtype, device=x.device)
    launch = pdl_launch(x) if pdl else {"USE_PDL": False}
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             NUM_STAGES=num_stages, GATED=gated, num_warps=num_warps, **launch)
    return y


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and triton_available()
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
    )


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight.T without bias, then cast to out_dtype if given; one-row half-precision inputs on
    CUDA use the Triton kernel (which writes out_dtype itself: one kernel less for the logits)."""
    if _gemv_applies(x, weight):
        return gemv(x.reshape(-1).contiguous(), weight, out_dtype=out_dtype).view(*x.shape[:-1], weight.shape[0])
    y = F.linear(x, weight)
    return y if out_dtype is None else y.to(out_dtype)


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu_mul(gate_up), weight): for one row on CUDA, one kernel that forms the gated input itself."""
    if _gemv_applies(gate_up, weight):
        return gemv(gate_up.reshape(-1).contiguous(), weight, gated=True).view(*gate_up.shape[:-1], weight.shape[0])
    return F.linear(silu_mul(gate_up), weight)
