"""Matrix-vector products for batch-1 decoding.

Decoding one token reads every weight once, so the step is as fast as the weight reads. cuBLAS
reaches about 1.8 TB/s of an H100's 3.0 on these shapes at M = 1 (measured, see
benchmarks/RESULTS.md); this kernel streams each weight row block with several loads in flight.
Inputs with more than one row go to `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_available

# Launch settings per weight shape class, picked on an H100 by benchmarks/gpu_kernel_check.py.
GEMV_BLOCK_N = 4
GEMV_BLOCK_K = 1024
GEMV_NUM_WARPS = 4
GEMV_NUM_STAGES = 3

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(X, W, Y, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NUM_STAGES: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            col_mask = (k + cols) < K
            w = tl.load(W + rows[:, None] * stride_wn + (k + cols)[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)
            x = tl.load(X + k + cols, mask=col_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, *, block_n: int = GEMV_BLOCK_N, block_k: int = GEMV_BLOCK_K,
         num_warps: int = GEMV_NUM_WARPS, num_stages: int = GEMV_NUM_STAGES) -> torch.Tensor:
    """x (K,) contiguous, weight (N, K) row-major -> (N,) in x's dtype, accumulated in float32."""
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, y, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                             NUM_STAGES=num_stages, num_warps=num_warps)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without bias; one-row half-precision inputs on CUDA use the Triton kernel."""
    if (
        x.is_cuda
        and triton_available()
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.stride(-1) == 1
    ):
        return gemv(x.reshape(-1).contiguous(), weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
