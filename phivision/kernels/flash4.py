"""A long prompt's causal self-attention through FlashAttention-4's kernels (the `flash-attn-4`
package, written in NVIDIA's CuTe DSL), when that optional package is installed: `pip install
"phivision[flash4]"`.

Why: the decoder's heads are 96 wide. The attention kernels PyTorch ships (cuDNN's, flash's) run
such a head as one of 128, so a quarter of their products is padding: W2's prompt attention ran at
~408 TFLOP/s against the GPU's ~780 for plain products (RESULTS.md, sixth and ninth sessions), ~18 ms
of its ~120 ms first token. FA4's Hopper kernel tiles a head of 96 as it is (192 x 128 tiles): on
an H100 at W2's 6,076 tokens, 0.39-0.41 ms a layer (550-577 TFLOP/s) against cuDNN's 0.54
(benchmarks/exp_flash4_attention.py). Its Python wrapper costs 120-330 us of host time a call, so
short prompts keep SDPA (runner.FLASH4_PREFILL_MIN_TOKENS).

The package is imported at first use (importing CuTe DSL takes seconds), and the kernels are
compiled for the GPU at their first call (2.7-3.7 s on two H100 hosts; the engine makes that call
when it starts) and cached by their compile-time settings (dtype, head size, causality), not by length.
They read the projection rows as the qkv product writes them: a query of head h is columns
[h*D, (h+1)*D) of its token's row, so neither side needs a transpose copy, and nothing is padded.
"""

from __future__ import annotations

import warnings

import torch

# Compute capability majors whose FA4 forward kernels exist in the package: Hopper (9) and
# Blackwell (10). Ampere's path there (8) is FlashAttention-2's loop, no faster than PyTorch's.
_MAJORS = (9, 10)
# FA4's entry point once imported (None: not yet, or not installed); tests put a stand-in here
_flash_attn_func = None
_import_tried = False


def _kernel():
    """FA4's flash_attn_func, imported on the first call; None when the package is missing or broken."""
    global _flash_attn_func, _import_tried
    if _flash_attn_func is None and not _import_tried:
        _import_tried = True
        try:
            from flash_attn.cute import flash_attn_func
        except Exception:  # noqa: BLE001 - optional; its import also fails without a CUDA-capable install
            flash_attn_func = None
        _flash_attn_func = flash_attn_func
    return _flash_attn_func


def installed() -> bool:
    return _kernel() is not None


def supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FA4's kernels run on this device, in this dtype, at this head size."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or not 8 <= head_dim <= 256:
        return False
    return torch.cuda.get_device_capability(device)[0] in _MAJORS and installed()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, L, H, D) queries over (B, L, H_kv, D) keys and values -> (B, L, H, D). The inputs may be
    strided views (rows of a projection), with the head size contiguous."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("flash-attn-4 is not installed: pip install 'phivision[flash4]'")
    out = kernel(q, k, v, causal=causal)
    return out[0] if isinstance(out, tuple) else out  # (out, lse)


def warm_up(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Runs the causal kernel once at this head shape, so that it is compiled (seconds) now rather
    than at the first prompt; raises what a broken install raises."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    with warnings.catch_warnings():
        # flash-attn-4 4.0.0b40's compile warns that CuTe DSL cannot convert one of its arguments
        # (aux_data, unused here): noise for our users, once per kernel
        warnings.filterwarnings("ignore", message="Argument aux_data", category=UserWarning)
        causal_self_attention(torch.zeros((256, width), dtype=dtype, device=device), num_heads, num_kv_heads, head_dim)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def causal_self_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """One sequence from its start: (T, (H + 2*H_kv) * D) rotated projections -> (T, H * D)."""
    num_new = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    out = attention(q.view(1, num_new, num_heads, head_dim), k.view(1, num_new, num_kv_heads, head_dim),
                    v.view(1, num_new, num_kv_heads, head_dim), causal=True)  # (1, T, H, D)
    return out.reshape(num_new, q_size)
