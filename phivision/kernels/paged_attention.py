"""Attention over a paged KV cache: cache writes, decode (one query per sequence), and prefill.

Pool layout, per layer: keys and values of shape (num_blocks, H_kv, block_size, D), so one head's
block is one contiguous tile (coalesced loads). A sequence's block table lists its blocks in order;
token t lives in block block_table[t // block_size] at offset t % block_size ("slot" =
block * block_size + offset).

Decode is memory-bound: every step reads each sequence's whole cache once. With few sequences
(batch 1) there are too few (sequence, head) pairs to fill the GPU, so the context is split into
`num_splits` parts handled by separate programs and combined by a second small kernel
(flash-decoding). The split count is fixed per launch shape so the step can be captured in a
CUDA graph; each program works out its share from the sequence's length at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from . import pdl_launch, triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _write_kv_kernel(QKV, K_POOL, V_POOL, SLOTS, stride_tok, k_offset, v_offset,
                         stride_kb, stride_kh, stride_kt,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tok = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(SLOTS + tok)
        if slot >= 0:
            block = slot // BLOCK_SIZE
            offset = slot % BLOCK_SIZE
            d = tl.arange(0, BLOCK_D)
            mask = d < HEAD_DIM
            src = QKV + tok * stride_tok + head * HEAD_DIM + d
            dst = block * stride_kb + head * stride_kh + offset * stride_kt + d
            tl.store(K_POOL + dst, tl.load(src + k_offset, mask=mask), mask=mask)
            tl.store(V_POOL + dst, tl.load(src + v_offset, mask=mask), mask=mask)

    @triton.jit
    def _rope_write_kv_kernel(QKV, COS, SIN, K_POOL, V_POOL, SLOTS, stride_tok, stride_cs,
                              stride_kb, stride_kh, stride_kt, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # One program per (token, group of BLOCK_HEADS heads) over the q, k and v heads: q and k are
        # rotated in place (NeoX halves, each product rounded like the reference); k and v also go to
        # the token's slot. Heads run along the tile's first axis, the half-dimension along the second.
        tok = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        i = tl.arange(0, BLOCK_HALF)
        num_total = NUM_HEADS + 2 * NUM_KV_HEADS
        mask = (heads < num_total)[:, None] & (i < HALF)[None, :]
        base = QKV + tok * stride_tok + heads[:, None] * HEAD_DIM + i[None, :]
        a = tl.load(base, mask=mask, other=0.0)
        b = tl.load(base + HALF, mask=mask, other=0.0)
        cos_a = tl.load(COS + tok * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        cos_b = tl.load(COS + tok * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        sin_a = tl.load(SIN + tok * stride_cs + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        sin_b = tl.load(SIN + tok * stride_cs + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        a_rot = ((af * cos_a).to(a.dtype).to(tl.float32) + (-bf * sin_a).to(a.dtype).to(tl.float32)).to(a.dtype)
        b_rot = ((bf * cos_b).to(a.dtype).to(tl.float32) + (af * sin_b).to(a.dtype).to(tl.float32)).to(a.dtype)
        rotated = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None]  # v heads are not rotated
        a = tl.where(rotated, a_rot, a)
        b = tl.where(rotated, b_rot, b)
        tl.store(base, a, mask=mask & rotated)
        tl.store(base + HALF, b, mask=mask & rotated)
        slot = tl.load(SLOTS + tok)
        if slot >= 0:
            is_k = (heads >= NUM_HEADS) & (heads < NUM_HEADS + NUM_KV_HEADS)
            is_v = heads >= NUM_HEADS + NUM_KV_HEADS
            kv_head = tl.where(is_k, heads - NUM_HEADS, heads - NUM_HEADS - NUM_KV_HEADS)
            dst = (slot // BLOCK_SIZE) * stride_kb + kv_head[:, None] * stride_kh + (slot % BLOCK_SIZE) * stride_kt + i[None, :]
            tl.store(K_POOL + dst, a, mask=mask & is_k[:, None])
            tl.store(K_POOL + dst + HALF, b, mask=mask & is_k[:, None])
            tl.store(V_POOL + dst, a, mask=mask & is_v[:, None])
            tl.store(V_POOL + dst + HALF, b, mask=mask & is_v[:, None])

    @triton.jit
    def _qkv_rope_gemv_kernel(X, W, QKV, COS, SIN, K_POOL, V_POOL, SLOTS, K, stride_wn,
                              stride_kb, stride_kh, stride_kt, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                              HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAIRS: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                              USE_PDL: tl.constexpr):
        # Batch-1 decode: the qkv projection of one token, its rotary and its cache write in one
        # kernel (one launch less per layer than the product followed by _rope_write_kv_kernel).
        # Each program computes PAIRS output dims of one head together with the PAIRS dims HALF
        # further on, the pairs the NeoX rotation mixes, so it can rotate them in registers.
        pid = tl.program_id(0)
        head = pid // (HALF // PAIRS)
        dims = (pid % (HALF // PAIRS)) * PAIRS + tl.arange(0, PAIRS)  # this program's dims of the first half
        rows_a = head * HEAD_DIM + dims
        rows_b = rows_a + HALF
        cols = tl.arange(0, BLOCK_K)
        col_mask = cols < K
        # Weights do not depend on earlier kernels: the first tiles are requested before the wait.
        wa = tl.load(W + rows_a[:, None] * stride_wn + cols[None, :], mask=col_mask[None, :], other=0.0)
        wb = tl.load(W + rows_b[:, None] * stride_wn + cols[None, :], mask=col_mask[None, :], other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x = tl.load(X + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc_a = wa.to(tl.float32) * x[None, :]
        acc_b = wb.to(tl.float32) * x[None, :]
        for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
            col_mask = (k + cols) < K
            wa = tl.load(W + rows_a[:, None] * stride_wn + (k + cols)[None, :], mask=col_mask[None, :], other=0.0)
            wb = tl.load(W + rows_b[:, None] * stride_wn + (k + cols)[None, :], mask=col_mask[None, :], other=0.0)
            x = tl.load(X + k + cols, mask=col_mask, other=0.0).to(tl.float32)
            acc_a += wa.to(tl.float32) * x[None, :]
            acc_b += wb.to(tl.float32) * x[None, :]
        dtype = QKV.dtype.element_ty
        a = tl.sum(acc_a, axis=1).to(dtype)  # the projection's output, rounded as the product's
        b = tl.sum(acc_b, axis=1).to(dtype)
        if head < NUM_HEADS + NUM_KV_HEADS:  # q and k heads are rotated, v heads are not
            cos_a = tl.load(COS + dims).to(tl.float32)
            cos_b = tl.load(COS + HALF + dims).to(tl.float32)
            sin_a = tl.load(SIN + dims).to(tl.float32)
            sin_b = tl.load(SIN + HALF + dims).to(tl.float32)
            af = a.to(tl.float32)
            bf = b.to(tl.float32)
            # x*cos + rotate_half(x)*sin, each product rounded first (as _rope_write_kv_kernel).
            a = ((af * cos_a).to(dtype).to(tl.float32) + (-bf * sin_a).to(dtype).to(tl.float32)).to(dtype)
            b = ((bf * cos_b).to(dtype).to(tl.float32) + (af * sin_b).to(dtype).to(tl.float32)).to(dtype)
        tl.store(QKV + rows_a, a)
        tl.store(QKV + rows_b, b)
        slot = tl.load(SLOTS)
        if (head >= NUM_HEADS) & (slot >= 0):
            is_v = head >= NUM_HEADS + NUM_KV_HEADS
            kv_head = tl.where(is_v, head - NUM_HEADS - NUM_KV_HEADS, head - NUM_HEADS)
            dst = (slot // BLOCK_SIZE) * stride_kb + kv_head * stride_kh + (slot % BLOCK_SIZE) * stride_kt + dims
            if is_v:
                tl.store(V_POOL + dst, a)
                tl.store(V_POOL + dst + HALF, b)
            else:
                tl.store(K_POOL + dst, a)
                tl.store(K_POOL + dst + HALF, b)

    @triton.jit
    def _split_blocks(CONTEXT_LENS, seq, split, NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """(context length, first block, end block) of this split of sequence `seq`'s cached blocks:
        the blocks are shared out evenly at run time, so one launch shape serves every length."""
        context = tl.load(CONTEXT_LENS + seq)
        num_blocks = tl.cdiv(context, BLOCK_SIZE)
        per_split = tl.cdiv(num_blocks, NUM_SPLITS)
        first = split * per_split
        return context, first, tl.minimum(first + per_split, num_blocks)

    @triton.jit
    def _attend_tile(ka, kb, va, vb, valid, qa, qb, m, l, acc_a, acc_b):
        """One block of keys/values (in two head parts) folded into the running softmax state."""
        scores = tl.sum(ka.to(tl.float32) * qa[None, :], axis=1) + tl.sum(kb.to(tl.float32) * qb[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)
        acc_a = acc_a * alpha + tl.sum(p[:, None] * va.to(tl.float32), axis=0)
        acc_b = acc_b * alpha + tl.sum(p[:, None] * vb.to(tl.float32), axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        return m_new, l, acc_a, acc_b

    @triton.jit
    def _combine_splits(ACC, M, L, OUT, acc_off, ml_off, out_off, stride_acc_s, NUM_SPLITS: tl.constexpr,
                        SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr):
        """The normalised output of one (sequence, head) from its splits' partial states. Loads go
        around L1 (.cg): the partial states were written by other programs."""
        s = tl.arange(0, SPLITS_P2)
        s_mask = s < NUM_SPLITS
        da = tl.arange(0, D_A)
        db = D_A + tl.arange(0, D_B)
        b_mask = db < HEAD_DIM
        m = tl.load(M + ml_off + s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(L + ml_off + s, mask=s_mask, other=0.0, cache_modifier=".cg")
        m_max = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)  # empty splits weigh nothing
        rows = ACC + acc_off + s[:, None] * stride_acc_s
        acc_a = tl.load(rows + da[None, :], mask=s_mask[:, None], other=0.0, cache_modifier=".cg")
        acc_b = tl.load(rows + db[None, :], mask=s_mask[:, None] & b_mask[None, :], other=0.0, cache_modifier=".cg")
        denom = tl.sum(w * l, axis=0)
        out = OUT + out_off
        tl.store(out + da, (tl.sum(w[:, None] * acc_a, axis=0) / denom).to(OUT.dtype.element_ty))
        tl.store(out + db, (tl.sum(w[:, None] * acc_b, axis=0) / denom).to(OUT.dtype.element_ty), mask=b_mask)

    @triton.jit
    def _decode_split_kernel(QKV, K_POOL, V_POOL, BLOCK_TABLES, CONTEXT_LENS, ACC, M, L, COUNTS, OUT,
                             stride_tok, stride_kb, stride_kh, stride_kt, stride_bt,
                             stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h, stride_out_b,
                             sm_scale, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, KV_GROUP: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
                             NUM_STAGES: tl.constexpr, FUSED_COMBINE: tl.constexpr, PRELOAD: tl.constexpr,
                             USE_PDL: tl.constexpr):
        # One program per (sequence, head, split of the context). The head is loaded as two
        # power-of-two parts (96 = 64 + 32): a single 128-wide tile masked to 96 wasted a quarter of
        # each load and ran 10-17% slower (benchmarks/exp_decode_kernels.py). With one split the
        # program writes the normalised output itself; with several, either a second kernel combines
        # the splits or (FUSED_COMBINE) the last program of each head to finish does, found by
        # counting finished programs in COUNTS (which it then resets to zero for the next launch).
        # (Requesting the split's first block before the PDL wait was tried: with that tile held in
        # registers the step took 2.80 ms instead of 2.68 at 2.5K context, 3.56 instead of 3.23 at
        # 8K, on an H200.)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv_head = head // KV_GROUP
        t = tl.arange(0, BLOCK_SIZE)
        da = tl.arange(0, D_A)
        db = D_A + tl.arange(0, D_B)
        b_mask = db < HEAD_DIM
        # The lengths and block tables reach the device by copies queued before the step's first
        # kernel, and no kernel writes them: they are read before the wait, so that once the qkv
        # product is done the first key/value loads go out at once, not two dependent reads later.
        # The split's first PRELOAD block numbers are held in registers; any further ones are read
        # in the loop. (PRELOAD 0: everything read after the wait, as before, for comparisons.)
        table = BLOCK_TABLES + seq * stride_bt
        if PRELOAD > 0:
            context, first, last = _split_blocks(CONTEXT_LENS, seq, split, NUM_SPLITS, BLOCK_SIZE)
            j = tl.arange(0, PRELOAD)
            preloaded = tl.load(table + first + j, mask=first + j < last, other=0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if PRELOAD == 0:
            context, first, last = _split_blocks(CONTEXT_LENS, seq, split, NUM_SPLITS, BLOCK_SIZE)
        q_ptr = QKV + seq * stride_tok + head * HEAD_DIM
        qa = tl.load(q_ptr + da).to(tl.float32) * sm_scale
        qb = tl.load(q_ptr + db, mask=b_mask, other=0.0).to(tl.float32) * sm_scale
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc_a = tl.zeros([D_A], tl.float32)
        acc_b = tl.zeros([D_B], tl.float32)
        for i in tl.range(first, last, num_stages=NUM_STAGES):
            if PRELOAD > 0:
                k = i - first
                later = tl.load(table + i, mask=k >= PRELOAD, other=0)  # predicated off within the preloaded ones
                block = tl.where(k < PRELOAD, tl.sum(tl.where(j == k, preloaded, 0), axis=0), later)
            else:
                block = tl.load(table + i)
            valid = (i * BLOCK_SIZE + t) < context
            base = block * stride_kb + kv_head * stride_kh + t[:, None] * stride_kt
            # All four tiles requested before any arithmetic.
            ka = tl.load(K_POOL + base + da[None, :], mask=valid[:, None], other=0.0)
            kb = tl.load(K_POOL + base + db[None, :], mask=valid[:, None] & b_mask[None, :], other=0.0)
            va = tl.load(V_POOL + base + da[None, :], mask=valid[:, None], other=0.0)
            vb = tl.load(V_POOL + base + db[None, :], mask=valid[:, None] & b_mask[None, :], other=0.0)
            m, l, acc_a, acc_b = _attend_tile(ka, kb, va, vb, valid, qa, qb, m, l, acc_a, acc_b)
        if NUM_SPLITS == 1:
            out = OUT + seq * stride_out_b + head * HEAD_DIM
            tl.store(out + da, (acc_a / l).to(OUT.dtype.element_ty))
            tl.store(out + db, (acc_b / l).to(OUT.dtype.element_ty), mask=b_mask)
        else:
            acc_off = seq * stride_acc_b + head * stride_acc_h
            ml_off = seq * stride_ml_b + head * stride_ml_h
            acc = ACC + acc_off + split * stride_acc_s
            tl.store(acc + da, acc_a)
            tl.store(acc + db, acc_b, mask=b_mask)
            tl.store(M + ml_off + split, m)
            tl.store(L + ml_off + split, l)
            if FUSED_COMBINE:
                # Every thread's stores are done before the count is raised (release); the last
                # program's reads come after it saw the final count (acquire).
                tl.debug_barrier()
                counter = COUNTS + seq * tl.num_programs(1) + head
                done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
                tl.debug_barrier()
                if done == NUM_SPLITS - 1:
                    _combine_splits(ACC, M, L, OUT, acc_off, ml_off, seq * stride_out_b + head * HEAD_DIM, stride_acc_s,
                                    NUM_SPLITS, SPLITS_P2, HEAD_DIM, D_A, D_B)
                    tl.store(counter, 0)

    @triton.jit
    def _decode_combine_kernel(ACC, M, L, OUT, stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h,
                               stride_out_b, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                               HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, USE_PDL: tl.constexpr):
        # The splits combined by a second kernel, one program per (sequence, head): what
        # FUSED_COMBINE replaces, kept for comparisons.
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0)
        head = tl.program_id(1)
        _combine_splits(ACC, M, L, OUT, seq * stride_acc_b + head * stride_acc_h, seq * stride_ml_b + head * stride_ml_h,
                        seq * stride_out_b + head * HEAD_DIM, stride_acc_s, NUM_SPLITS, SPLITS_P2, HEAD_DIM, D_A, D_B)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def write_kv(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
             num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Copies the k and v heads of each token of a fused (N, (H + 2*H_kv) * D) qkv buffer to its slot
    (slot -1 = skip, for padded rows)."""
    n = qkv.shape[0]
    block_size = k_pool.shape[2]
    if not _use_triton(qkv):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        kv = qkv[keep, num_heads * head_dim :].view(-1, 2, num_kv_heads, head_dim)  # (n, 2, H_kv, D)
        blocks, offsets = slots // block_size, slots % block_size
        k_pool[blocks, :, offsets] = kv[:, 0]
        v_pool[blocks, :, offsets] = kv[:, 1]
        return
    _write_kv_kernel[(n, num_kv_heads)](
        qkv, k_pool, v_pool, slot_mapping, qkv.stride(0), num_heads * head_dim, (num_heads + num_kv_heads) * head_dim,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), **pdl_launch(qkv),
    )


# Tuning of the decode kernel (swept on an H200 by benchmarks/sweep_decode_attention.py and
# benchmarks/exp_decode_kernels.py, see benchmarks/RESULTS.md): about 24 splits at batch 1 (6
# programs per SM on 132 SMs; 24 splits were the best or within 3% of it over 2.5K-8K tokens of
# context), 2 warps, and 3 pipeline stages once one split per sequence fills the GPU (batch 64).
DECODE_PROGRAMS_PER_SM = 6
DECODE_MAX_SPLITS = 64
DECODE_NUM_WARPS = 2
DECODE_NUM_STAGES = None  # 3 with one split, 2 with several
# Combine the splits in the decode kernel's last program per head instead of a second kernel (see
# _decode_split_kernel): on an H200 the captured batch-1 step took 2.745 ms against 2.837 at 2.5K
# context, 3.11 against 3.29 at 6.1K (benchmarks/RESULTS.md, 2026-12-03 second session).
DECODE_FUSED_COMBINE = True
# Block numbers of each split read before the PDL wait (a power of two, or 0 for none; see
# _decode_split_kernel).
DECODE_PRELOAD_BLOCKS = 8


def _head_parts(head_dim: int) -> tuple[int, int]:
    """Two power-of-two widths covering a head (96 -> 64 + 32; 128 -> 64 + 64; 112 -> 64 + 64, the
    second masked), so that the tiles of common head sizes load without masked columns."""
    if head_dim & (head_dim - 1) == 0:
        return max(1, head_dim // 2), max(1, head_dim // 2)
    first = 1 << (head_dim.bit_length() - 1)
    return first, triton.next_power_of_2(head_dim - first)


def decode_splits(num_seqs: int, num_heads: int, num_sms: int, programs_per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """Enough context splits that (sequences x heads x splits) gives every SM several programs."""
    return max(1, min(DECODE_MAX_SPLITS, math.ceil(programs_per_sm * num_sms / max(1, num_seqs * num_heads))))


def rope_and_write_kv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Rotates the q and k heads of a fused (N, (H + 2*H_kv) * D) qkv buffer in place (cos/sin (N, D))
    and copies each token's k and v heads to its slot (-1 = skip), in one launch on CUDA."""
    if not _use_triton(qkv):
        from .fused import rope_qk_

        rope_qk_(qkv, cos, sin, num_heads, num_kv_heads, head_dim)
        write_kv(qkv, k_pool, v_pool, slot_mapping, num_heads, num_kv_heads, head_dim)
        return
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    half = head_dim // 2
    block_heads = 32  # 32 heads x 64 lanes per program: one program covers a third of a token's 96 heads
    _rope_write_kv_kernel[(qkv.shape[0], triton.cdiv(num_heads + 2 * num_kv_heads, block_heads))](
        qkv, cos, sin, k_pool, v_pool, slot_mapping, qkv.stride(0), cos.stride(0),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        BLOCK_SIZE=k_pool.shape[2], HALF=half, HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HEADS=block_heads, **pdl_launch(qkv),
    )


# Batch-1 qkv product settings (8 dim pairs per program: 576 programs for Phi-3's 96 heads of 96;
# 16 output rows and 256-wide tiles were within 1% of the best plain product on an H200).
QKV_ROPE_BLOCK_K = 256
QKV_ROPE_NUM_WARPS = 4
QKV_ROPE_NUM_STAGES = 3


def qkv_rope_write_kv(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                      head_dim: int) -> torch.Tensor:
    """One token: qkv = x @ weight.T with q and k rotated (cos/sin (D,)) and k, v written to the
    token's slot (-1 = skip) -> (1, (H + 2*H_kv) * D). On the CPU (and where the fused kernel does
    not apply): the product, then rope_and_write_kv_."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    half = head_dim // 2
    pairs = min(8, half & -half)  # a power of two dividing half
    if not (_use_triton(x) and x.numel() == x.shape[-1] and head_dim % 2 == 0 and weight.stride(-1) == 1
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)):
        qkv = torch.nn.functional.linear(x.reshape(1, -1), weight)
        rope_and_write_kv_(qkv, cos.reshape(1, -1), sin.reshape(1, -1), k_pool, v_pool, slot_mapping,
                           num_heads, num_kv_heads, head_dim)
        return qkv
    qkv = torch.empty((1, width), dtype=x.dtype, device=x.device)
    grid = ((num_heads + 2 * num_kv_heads) * (half // pairs),)
    _qkv_rope_gemv_kernel[grid](
        x.reshape(-1), weight, qkv, cos.reshape(-1), sin.reshape(-1), k_pool, v_pool, slot_mapping, weight.shape[1],
        weight.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half, PAIRS=pairs, BLOCK_SIZE=k_pool.shape[2],
        BLOCK_K=QKV_ROPE_BLOCK_K, NUM_STAGES=QKV_ROPE_NUM_STAGES, num_warps=QKV_ROPE_NUM_WARPS, **pdl_launch(x),
    )
    return qkv


def paged_decode_attention(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, num_heads: int, head_dim: int, num_splits: int,
                           scratch: tuple[torch.Tensor, ...] | None = None,
                           num_warps: int = DECODE_NUM_WARPS, num_stages: int | None = DECODE_NUM_STAGES,
                           fused_combine: bool | None = None) -> torch.Tensor:
    """One query per sequence (rows of qkv) over its cached context -> (B, H * D).

    The query's own key/value must already be in the pool (write_kv first). `scratch` lets a
    CUDA graph keep its split buffers (decode_scratch). `fused_combine` defaults to
    DECODE_FUSED_COMBINE.
    """
    num_seqs = qkv.shape[0]
    num_kv_heads = k_pool.shape[1]
    if not _use_triton(qkv):
        return paged_decode_attention_reference(qkv, k_pool, v_pool, block_tables, context_lens, num_heads, head_dim)
    if scratch is None:
        scratch = decode_scratch(num_seqs, num_heads, num_splits, head_dim, qkv.device)
    acc, m, l, counts = scratch
    if num_stages is None:
        num_stages = 3 if num_splits == 1 else 2
    fused_combine = (DECODE_FUSED_COMBINE if fused_combine is None else fused_combine) and num_splits > 1
    out = torch.empty((num_seqs, num_heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    part_a, part_b = _head_parts(head_dim)
    launch = pdl_launch(qkv)
    splits_p2 = triton.next_power_of_2(num_splits)
    # A compile-time constant from the launch shape only (the table's width and the split count),
    # so a graph and the prefill's last rows, with the same tables, run one variant.
    per_split = -(-block_tables.shape[1] // num_splits)
    preload = min(DECODE_PRELOAD_BLOCKS, triton.next_power_of_2(per_split)) if DECODE_PRELOAD_BLOCKS > 0 else 0
    _decode_split_kernel[(num_seqs, num_heads, num_splits)](
        qkv, k_pool, v_pool, block_tables, context_lens, acc, m, l, counts, out,
        qkv.stride(0), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), out.stride(0),
        1.0 / math.sqrt(head_dim), NUM_SPLITS=num_splits, SPLITS_P2=splits_p2, KV_GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=k_pool.shape[2], HEAD_DIM=head_dim, D_A=part_a, D_B=part_b, NUM_STAGES=num_stages,
        FUSED_COMBINE=fused_combine, PRELOAD=preload, num_warps=num_warps, **launch,
    )
    if num_splits > 1 and not fused_combine:
        _decode_combine_kernel[(num_seqs, num_heads)](
            acc, m, l, out, acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1), out.stride(0),
            NUM_SPLITS=num_splits, SPLITS_P2=splits_p2, HEAD_DIM=head_dim, D_A=part_a, D_B=part_b, **launch,
        )
    return out


def decode_scratch(num_seqs: int, num_heads: int, num_splits: int, head_dim: int,
                   device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The decode kernel's split buffers: partial outputs acc (B, H, S, D) f32, running max m and
    sum l (B, H, S) f32, and per-head counts of finished splits (B, H) int32, zero between launches."""
    return (
        torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=device),
        torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=device),
        torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=device),
        torch.zeros((num_seqs, num_heads), dtype=torch.int32, device=device),
    )


def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached keys (or values) -> (H_kv, length, D)."""
    blocks = pool[block_table[: math.ceil(length / pool.shape[2])]]  # (n, H_kv, block, D)
    return blocks.permute(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :length]


def paged_decode_attention_reference(qkv, k_pool, v_pool, block_tables, context_lens, num_heads, head_dim) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's keys/values and attend (the check for the kernel)."""
    out = []
    group = num_heads // k_pool.shape[1]
    for row, length in enumerate(context_lens.tolist()):
        q = qkv[row, : num_heads * head_dim].view(num_heads, 1, head_dim)  # (H, 1, D)
        k = gather_kv(k_pool, block_tables[row], length).repeat_interleave(group, dim=0)  # (H, S, D)
        v = gather_kv(v_pool, block_tables[row], length).repeat_interleave(group, dim=0)
        scores = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(head_dim)  # (H, 1, S)
        out.append((scores.softmax(-1) @ v.float()).to(qkv.dtype).reshape(num_heads * head_dim))
    return torch.stack(out)


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_table: torch.Tensor, start: int) -> torch.Tensor:
    """One sequence's chunk of T queries at positions [start, start+T) -> (1, H, T, D).

    q/k/v (1, H, T, D) are the chunk's own (already rotated; k/v already written to the pool). A
    chunk that starts the sequence attends to itself causally (fused SDPA kernels); a later chunk
    also reads the cached part from the pool.
    """
    num_heads, num_new = q.shape[1], q.shape[2]
    group = num_heads // k_pool.shape[1]
    if start == 0:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    total = start + num_new
    keys = gather_kv(k_pool, block_table, total).repeat_interleave(group, dim=0)[None]  # (1, H, S, D)
    values = gather_kv(v_pool, block_table, total).repeat_interleave(group, dim=0)[None]
    if q.is_cuda:
        # Query i sits at position start + i: causal aligned to the last key, which the flash and
        # memory-efficient kernels take without a materialised (T, S) mask.
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(num_new, total))
    query_pos = torch.arange(start, total, device=q.device)[:, None]
    mask = torch.arange(total, device=q.device)[None, :] <= query_pos  # (T, S)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                            lengths: list[int]) -> torch.Tensor:
    """Causal self-attention of several sequences packed one after another: q/k/v (T, H, D) (rows
    may be strided, the last dimension contiguous), sequence i being rows [c_i, c_i + lengths[i]).
    -> (T, H, D).

    On CUDA in half precision, one variable-length flash kernel runs them all (`cu_seqlens`, int32
    (N + 1,) on the device, are the c_i and T): a prefill step of ten ~800-token requests spent
    0.53 ms a layer in ten SDPA calls and their concatenation, 0.21 ms in one packed call, with
    bit-identical results (H200, bf16). Elsewhere, SDPA per sequence (the reference)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and cu_seqlens is not None:
        longest = max(lengths)
        # The kernel behind torch.nn.attention.varlen.varlen_attn, whose causal argument changed
        # between torch releases; this operator's did not.
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, longest, longest, 0.0, True, False)[0]
    outs, offset = [], 0
    for length in lengths:
        part = slice(offset, offset + length)
        out = F.scaled_dot_product_attention(q[part].transpose(0, 1), k[part].transpose(0, 1), v[part].transpose(0, 1),
                                             is_causal=True)  # (H, t, D)
        outs.append(out.transpose(0, 1))
        offset += length
    return torch.cat(outs, dim=0)
