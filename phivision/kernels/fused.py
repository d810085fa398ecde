"""Small fused kernels: the decoder's RMSNorm (with the residual add), SiLU-gate and rotary, a decode
step's inputs (embedding and rotary rows); the vision tower's LayerNorm (with the residual add) and
quick-GELU.

At batch 1 a decode step is ~30 tiny element-wise launches per layer when written in plain
PyTorch; inside a CUDA graph each still costs microseconds. These Triton kernels do each job in
one launch and reproduce the reference's rounding order (every intermediate the reference rounds
to the activation dtype is rounded here too), so they are numerically the same function.
Each op has a PyTorch reference used on the CPU and by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pdl_launch, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Y, H_OUT, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # h = x + residual, rounded to the activation dtype like the reference's add.
            x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(H_OUT + row * stride_h + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * inv).to(x.dtype)
        w = tl.load(W + cols, mask=mask, other=0.0)
        tl.store(Y + row * stride_y + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=mask)

    @triton.jit
    def _layer_norm_kernel(X, R, W, B, Y, H_OUT, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                           HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit: rows x stride passes 2^31 for big crop batches
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # h = residual + x, rounded to the activation dtype like the reference's add.
            x = tl.load(R + row * stride_r + cols, mask=mask, other=0.0) + x
            tl.store(H_OUT + row * stride_h + cols, x, mask=mask)
        # In float32 as PyTorch's kernel: (x - mean) * rstd * weight + bias, rounded once.
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / n_cols
        centred = tl.where(mask, xf - mean, 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (centred * rstd * w + b).to(x.dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, stride_gu, stride_out, n_cols, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(GU + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        tl.store(OUT + row * stride_out + cols, (up.to(tl.float32) * act.to(tl.float32)).to(gate.dtype), mask=mask)

    @triton.jit
    def _quick_gelu_kernel(X, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: big batches pass 2^31
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        # The reference's x * sigmoid(1.702 * x) rounds after each of its three ops: so do we.
        scaled = (1.702 * xf).to(x.dtype).to(tl.float32)
        gate = (1.0 / (1.0 + tl.exp(-scaled))).to(x.dtype).to(tl.float32)
        tl.store(OUT + offs, (xf * gate).to(x.dtype), mask=mask)

    @triton.jit
    def _decode_inputs_kernel(IDS, POS, LONG, EMB, COS_T, SIN_T, X, COS, SIN, stride_ids, stride_pos, stride_emb, stride_x,
                              stride_t, stride_cs, hidden, head_dim, short_rows, last_row,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
        # One program per row: the token's embedding row and its position's rotary rows, copied.
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        token = tl.maximum(tl.load(IDS + row * stride_ids), 0)  # as the embedding's clamp: placeholders look up 0
        h = tl.arange(0, BLOCK_H)
        tl.store(X + row * stride_x + h, tl.load(EMB + token * stride_emb + h, mask=h < hidden), mask=h < hidden)
        pos = tl.load(POS + row * stride_pos)
        at = tl.where(tl.load(LONG + row) != 0, pos + short_rows, pos)
        at = tl.minimum(tl.maximum(at, 0), last_row)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        tl.store(COS + row * stride_cs + d, tl.load(COS_T + at * stride_t + d, mask=d_mask), mask=d_mask)
        tl.store(SIN + row * stride_cs + d, tl.load(SIN_T + at * stride_t + d, mask=d_mask), mask=d_mask)

    @triton.jit
    def _rope_kernel(QKV, COS, SIN, stride_tok, stride_cs, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_HALF: tl.constexpr):
        # One program per (token, head) of the q and k heads, rotated in place (NeoX halves).
        tok = tl.program_id(0)
        head = tl.program_id(1)
        i = tl.arange(0, BLOCK_HALF)
        mask = i < HALF
        base = QKV + tok * stride_tok + head * HEAD_DIM
        a = tl.load(base + i, mask=mask, other=0.0)
        b = tl.load(base + HALF + i, mask=mask, other=0.0)
        cos_a = tl.load(COS + tok * stride_cs + i, mask=mask, other=0.0).to(tl.float32)
        cos_b = tl.load(COS + tok * stride_cs + HALF + i, mask=mask, other=0.0).to(tl.float32)
        sin_a = tl.load(SIN + tok * stride_cs + i, mask=mask, other=0.0).to(tl.float32)
        sin_b = tl.load(SIN + tok * stride_cs + HALF + i, mask=mask, other=0.0).to(tl.float32)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        # out = x*cos + rotate_half(x)*sin with rotate_half([a, b]) = [-b, a]; each product rounded first.
        out_a = (af * cos_a).to(a.dtype).to(tl.float32) + (-bf * sin_a).to(a.dtype).to(tl.float32)
        out_b = (bf * cos_b).to(a.dtype).to(tl.float32) + (af * sin_b).to(a.dtype).to(tl.float32)
        tl.store(base + i, out_a.to(a.dtype), mask=mask)
        tl.store(base + HALF + i, out_b.to(a.dtype), mask=mask)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32, cast back to x's dtype, then scaled (the reference's order)."""
    if not _use_triton(x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty_like(x2)
    n = x2.shape[-1]
    _rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, y, y, x2.stride(0), 0, y.stride(0), 0, n, eps,
                                    HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(n), **pdl_launch(x2))
    return y.view_as(x)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    if not _use_triton(x):
        h = residual + x
        return rms_norm(h, weight, eps), h
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    y, h = torch.empty_like(x2), torch.empty_like(x2)
    n = x2.shape[-1]
    _rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, y, h, x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n, eps,
                                    HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(n), **pdl_launch(x2))
    return y.view_as(x), h.view_as(x)


def _layer_norm_launch(x2: torch.Tensor, r2: torch.Tensor | None, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if r2 is not None else y
    n = x2.shape[-1]
    _layer_norm_kernel[(x2.shape[0],)](x2, x2 if r2 is None else r2, norm.weight, norm.bias, y, h, x2.stride(0),
                                       0 if r2 is None else r2.stride(0), y.stride(0), h.stride(0), n, norm.eps,
                                       HAS_RESIDUAL=r2 is not None, BLOCK=triton.next_power_of_2(n), num_warps=4)
    return y, h


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm(x)`. On CUDA one Triton pass: PyTorch's kernel took 25 us for W1's 9,809 vision-tower
    rows of 1,024 on an H200 (1.6 TB/s of the 4.1 the copy reaches), ~2.5x what reading and
    writing them needs."""
    if not _use_triton(x) or not x.is_contiguous() or norm.weight is None or norm.bias is None:
        return norm(x)
    y, _ = _layer_norm_launch(x.reshape(-1, x.shape[-1]), None, norm)
    return y.view_as(x)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x) in one pass over the rows: the pre-LN block's residual add
    and the next LayerNorm, which PyTorch runs as two kernels (13.8 + 25 us at W1's vision rows;
    22 us this way). The sums are PyTorch's bit for bit; the LayerNorm's float32 sums run in
    another order than PyTorch's, so ~5e-6 of its outputs land one bf16 step apart
    (benchmarks/gpu_kernel_check.py, exp_vision_layernorm.py)."""
    if not _use_triton(x) or not (x.is_contiguous() and residual.is_contiguous()) or norm.weight is None or norm.bias is None:
        h = residual + x
        return norm(h), h
    width = x.shape[-1]
    y, h = _layer_norm_launch(x.reshape(-1, width), residual.reshape(-1, width), norm)
    return y.view_as(x), h.view_as(x)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """up * silu(gate) for [gate | up] along the last axis."""
    if not _use_triton(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return up * F.silu(gate)
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    n = gu.shape[-1] // 2
    out = torch.empty((gu.shape[0], n), dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, gu.stride(0), out.stride(0), n, BLOCK=block, **pdl_launch(gu))
    return out.view(*gate_up.shape[:-1], n)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 * x), CLIP's activation. Unfused it is three passes over the vision MLP's
    widest tensor (N crops x 577 x 4096): ~32 ms of the 138 ms of GPU time that 160 crops took on an
    H200 (`profile_prefill.py`)."""
    if not _use_triton(x) or not x.is_contiguous():
        return x * torch.sigmoid(1.702 * x)
    out = torch.empty_like(x)
    n = x.numel()
    block = 2048
    _quick_gelu_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block)
    return out


def decode_inputs(input_ids: torch.Tensor, positions: torch.Tensor, use_long: torch.Tensor, embed_weight: torch.Tensor,
                  tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's embeddings and rotary rows: input_ids, positions (B, 1), use_long (B,) bool,
    `tables` a model.rope.RopeTables -> embeds (B, 1, hidden), cos, sin (B, 1, D).

    The same values as the embedding (with its clamp of placeholder ids to 0) and LongRopeEmbedding
    compute, in one kernel on CUDA instead of ~12 small ones (a clamp, the lookup, and ten
    element-wise steps of the rotary), which in a captured batch-1 step run one after another
    without PDL. Rows are clamped into the tables (a position past them is a caller's bug; the
    runner's positions stay below max_model_len)."""
    batch = input_ids.shape[0]
    last_row = tables.cos.shape[0] - 1
    if not _use_triton(input_ids):
        rows = tables.rows(positions, use_long[:, None]).clamp(0, last_row)  # (B, 1)
        return F.embedding(input_ids.clamp(min=0), embed_weight), tables.cos[rows], tables.sin[rows]
    hidden, head_dim = embed_weight.shape[1], tables.cos.shape[1]
    embeds = torch.empty((batch, 1, hidden), dtype=embed_weight.dtype, device=input_ids.device)
    cos = torch.empty((batch, 1, head_dim), dtype=tables.cos.dtype, device=input_ids.device)
    sin = torch.empty_like(cos)
    _decode_inputs_kernel[(batch,)](
        input_ids, positions, use_long, embed_weight, tables.cos, tables.sin, embeds, cos, sin, input_ids.stride(0),
        positions.stride(0), embed_weight.stride(0), embeds.stride(0), tables.cos.stride(0), cos.stride(0), hidden,
        head_dim, tables.short_rows, last_row, BLOCK_H=triton.next_power_of_2(hidden),
        BLOCK_D=triton.next_power_of_2(head_dim), **pdl_launch(input_ids),
    )
    return embeds, cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last axis (NeoX layout: first half, second half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Rotates the q and k heads of a fused (N, (H + 2*H_kv) * D) qkv buffer in place; cos/sin (N, D)."""
    if not _use_triton(qkv):
        n = qkv.shape[0]
        qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(n, num_heads + num_kv_heads, head_dim)
        qk.copy_(qk * cos[:, None] + rotate_half(qk) * sin[:, None])
        return
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    half = head_dim // 2
    _rope_kernel[(qkv.shape[0], num_heads + num_kv_heads)](
        qkv, cos, sin, qkv.stride(0), cos.stride(0), HALF=half, HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(half)
    )
