"""A preallocated dense KV cache: one (B, H_kv, max_len, D) key and value tensor per layer.

Slots are shared by every row: slot s of row b holds the token at column s of that row's
(left-padded) sequence, so one integer `length` describes the whole batch. The cache knows no
model logic: attention calls `update` to write a call's new keys/values at
[length, length + T) and read back [0, length + T); the model calls `advance(T)` once per
forward, after every layer has written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseKVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.batch = batch
        self.num_heads = num_heads
        self.max_len = max_len
        self.head_dim = head_dim
        self.length = 0  # slots filled, the same for every row

    @classmethod
    def for_model(cls, config, *, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> "DenseKVCache":
        """Sized for a ModelConfig's decoder (its layer count, KV heads and head size)."""
        text = config.text
        return cls(text.num_hidden_layers, batch, text.num_key_value_heads, max_len, text.head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def check_room(self, num_new: int) -> None:
        """Raises before any layer writes when `num_new` more slots do not fit."""
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} slots; {self.length} are used and {num_new} more do not fit"
            )

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes (B, H_kv, T, D) keys/values at slots [length, length+T); returns the views of slots [0, length+T)."""
        num_new = keys.shape[2]
        end = self.length + num_new
        self.keys[layer_idx, :, :, self.length : end] = keys
        self.values[layer_idx, :, :, self.length : end] = values
        # (B, H_kv, length + T, D) views; the last dimension stays contiguous for fused kernels.
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, num_new: int) -> None:
        """Marks `num_new` more slots as filled (once per forward call, after every layer wrote them)."""
        self.check_room(num_new)
        self.length += num_new

    def reset(self) -> None:
        """Empties the cache (its memory is kept and overwritten by the next prefill)."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Forgets every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} filled slots to {length}")
        self.length = length


class PagedKVCache:
    """The KV pool of the batched engine: per layer, keys and values of (num_blocks, H_kv, block_size, D).

    Which block belongs to which sequence is the block manager's business (plain integers); a
    `PagedBatch` carries one forward call's view of it (slots to write, block tables to read).
    Block 0 is never handed out: padded rows of a captured CUDA graph point at it.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        # Zeros, not empty: padded graph rows read block 0, and garbage there could be NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @classmethod
    def for_model(cls, config, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str) -> "PagedKVCache":
        text = config.text
        return cls(text.num_hidden_layers, num_blocks, text.num_key_value_heads, block_size, text.head_dim, dtype, device)

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        text = config.text
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * block_size * itemsize


class PagedBatch:
    """One forward call over the paged pool: the model's `cache` argument on the engine's path.

    decode: B sequences, one new token each (input (B, 1)); they attend to `context_lens` tokens
    through `block_tables`. prefill: chunks of one or more sequences packed into one row (input
    (1, T)); `segments[i] = (offset, length, start)` says that tokens [offset, offset + length) of
    the row are sequence i's positions [start, start + length), its blocks in `block_tables[i]`.
    The projections, norms and MLPs run on all chunks at once; attention runs per chunk (in one
    packed call when every chunk starts its sequence). New
    keys/values go to `slot_mapping` (one slot per new token, -1 = skip).
    `long_rope` fixes each row's LongRoPE factor set (the scheduler's rule, spec §6.8): a chunk of
    a long prompt already uses the long factors.
    Masking comes from the block tables and lengths, so the model builds no dense mask.
    """

    paged = True

    def __init__(self, pool: PagedKVCache, *, kind: str, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 long_rope: torch.Tensor, context_lens: torch.Tensor | None = None, start: int = 0,
                 segments: list[tuple[int, int, int]] | None = None, cu_seqlens: torch.Tensor | None = None,
                 pad_to: int | None = None, num_splits: int = 1, scratch: tuple[torch.Tensor, ...] | None = None,
                 last_rows_only: bool = False, rope_tables=None, flash4: bool = False):
        if kind not in ("decode", "prefill"):
            raise ValueError(f"kind must be 'decode' or 'prefill', got {kind!r}")
        if last_rows_only and (kind != "prefill" or context_lens is None):
            raise ValueError("last_rows_only is for a prefill, with context_lens = each segment's start + length")
        self.pool = pool
        self.kind = kind
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.long_rope = long_rope  # (B,) bool: which LongRoPE factor set each row's keys use
        self.start = start
        self.segments = segments  # prefill only; None = one sequence starting at `start`
        # prefill, when there are several segments and one or more start their sequences: int32 (N + 1,)
        # segment offsets and T on the device, for one packed attention call instead of one per segment
        self.cu_seqlens = cu_seqlens
        # prefill of one sequence from its start: its attention runs on this many rows, the ones past
        # the prompt zero (a length bucket, so that cuDNN reuses the bucket's plan; see ModelRunner)
        self.pad_to = pad_to
        self.num_splits = num_splits
        self.scratch = scratch
        # prefill: the model computes the last layer's outputs at each segment's last row only (the
        # others' keys and values still go to the pool), those rows attending like decode queries
        # over `context_lens` (int32 (N,), each segment's start + length) with `num_splits` splits
        self.last_rows_only = last_rows_only
        # decode: a model.rope.RopeTables, from which the step's rotary rows are looked up (with its
        # embeddings, in one kernel) instead of computed; None = computed
        self.rope_tables = rope_tables
        # prefill of one sequence from its start (no padding): its attention through FlashAttention-4's
        # kernels (kernels/flash4.py), which run the decoder's head of 96 unpadded
        self.flash4 = flash4

    def last_columns(self) -> list[int]:
        """The column of each segment's last token in the packed row (prefill)."""
        return [offset + length - 1 for offset, length, _ in self.segments or [(0, 0, self.start)]]

    def project_attend(self, layer_idx: int, x: torch.Tensor, qkv_weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, hidden) normed inputs -> (B, T, H * D) attention output: the qkv projection, rotary,
        cache write and attention. A decode step of one sequence does the first three in one kernel.

        `keep` (S,) (a prefill with last_rows_only: the columns `last_columns()`, on the device):
        every column is projected, rotated and written to the pool, and only the kept columns
        attend -> (1, S, H * D)."""
        from ..kernels.gemv import linear
        from ..kernels.paged_attention import paged_decode_attention, qkv_rope_write_kv, rope_and_write_kv_

        if keep is not None:
            if not self.last_rows_only:
                raise ValueError("project_attend with keep needs a prefill batch built with last_rows_only")
            num_new = x.shape[1]
            flat = linear(x, qkv_weight).reshape(num_new, -1)  # (T, (H + 2*H_kv) * D)
            k_pool, v_pool = self.pool.keys[layer_idx], self.pool.values[layer_idx]
            rope_and_write_kv_(flat, cos.reshape(num_new, -1), sin.reshape(num_new, -1), k_pool, v_pool, self.slot_mapping,
                               num_heads, num_kv_heads, head_dim)
            # Each kept row is its segment's last token: one query over all of the segment's keys,
            # now in the pool, which is what the decode kernel computes.
            out = paged_decode_attention(flat[keep], k_pool, v_pool, self.block_tables, self.context_lens, num_heads,
                                         head_dim, self.num_splits)  # (S, H*D)
            return out.view(1, -1, num_heads * head_dim)

        if self.kind == "decode" and x.shape[0] * x.shape[1] == 1 and x.is_cuda:
            k_pool, v_pool = self.pool.keys[layer_idx], self.pool.values[layer_idx]
            flat = qkv_rope_write_kv(x, qkv_weight, cos, sin, k_pool, v_pool, self.slot_mapping,
                                     num_heads, num_kv_heads, head_dim)  # (1, (H + 2*H_kv) * D), rotated
            out = paged_decode_attention(flat, k_pool, v_pool, self.block_tables, self.context_lens, num_heads, head_dim,
                                         self.num_splits, self.scratch)  # (1, H*D)
            return out.view(1, 1, num_heads * head_dim)
        if self.pad_to is not None:
            return self._attend_padded(layer_idx, x, qkv_weight, cos, sin, num_heads, head_dim)
        return self.attend_qkv(layer_idx, linear(x, qkv_weight), cos, sin, num_heads, num_kv_heads, head_dim)

    def _attend_padded(self, layer_idx: int, x: torch.Tensor, qkv_weight: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
        """One prompt from its start (no grouped heads), its attention on `pad_to` rows: the
        projection is written into a (pad_to, width) buffer whose rows past the prompt are zero, so
        the attention call has the bucket's shape. Causal masking keeps those rows, at the end, out
        of every real row's attention; their own outputs are dropped."""
        from ..kernels.paged_attention import rope_and_write_kv_

        num_new = x.shape[1]
        qkv = x.new_empty((self.pad_to, qkv_weight.shape[0]))  # (T_pad, 3 * H * D)
        qkv[num_new:].zero_()  # (finite: a masked key still multiplies its value by 0)
        torch.mm(x.reshape(num_new, -1), qkv_weight.t(), out=qkv[:num_new])
        rope_and_write_kv_(qkv[:num_new], cos.reshape(num_new, -1), sin.reshape(num_new, -1), self.pool.keys[layer_idx],
                           self.pool.values[layer_idx], self.slot_mapping, num_heads, num_heads, head_dim)
        out = padded_causal_attention(qkv, num_heads, head_dim)  # (1, H, T_pad, D)
        return out[:, :, :num_new].transpose(1, 2).reshape(1, num_new, num_heads * head_dim)

    def attend_qkv(self, layer_idx: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """(B, T, (H + 2*H_kv) * D) un-rotated projections -> (B, T, H * D) attention output."""
        from ..kernels.flash4 import causal_self_attention
        from ..kernels.paged_attention import (packed_causal_attention, paged_decode_attention, paged_prefill_attention,
                                              rope_and_write_kv_)

        batch, num_new, width = qkv.shape
        flat = qkv.reshape(batch * num_new, width)  # (N, width), N = B*T tokens
        k_pool, v_pool = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        rope_and_write_kv_(flat, cos.reshape(batch * num_new, -1), sin.reshape(batch * num_new, -1), k_pool, v_pool,
                           self.slot_mapping, num_heads, num_kv_heads, head_dim)
        if self.kind == "decode":
            out = paged_decode_attention(flat, k_pool, v_pool, self.block_tables, self.context_lens, num_heads, head_dim,
                                         self.num_splits, self.scratch)  # (B, H*D)
            return out.view(batch, 1, num_heads * head_dim)
        if self.flash4:  # one prompt from its start: FA4 reads the rotated rows as they are
            return causal_self_attention(flat, num_heads, num_kv_heads, head_dim).view(1, num_new, num_heads * head_dim)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(1, num_new, num_heads, head_dim).transpose(1, 2)  # (1, H, T, D)
        k = k.view(1, num_new, num_kv_heads, head_dim).transpose(1, 2)  # (1, H_kv, T, D)
        v = v.view(1, num_new, num_kv_heads, head_dim).transpose(1, 2)
        segments = self.segments or [(0, num_new, self.start)]
        if self.cu_seqlens is not None and num_heads == num_kv_heads:
            # Several chunks in one call, each attending to itself as if it started its sequence. That
            # is the whole answer for a chunk that does start its sequence; a chunk that continues one
            # (the step's token budget split its prompt) also attends to its cached part, so its rows
            # are then computed again over the pool and replaced.
            out = packed_causal_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), self.cu_seqlens,
                                          [length for _, length, _ in segments])  # (T, H, D)
            for row, (offset, length, start) in enumerate(segments):
                if start:
                    part = slice(offset, offset + length)
                    out[part] = paged_prefill_attention(q[:, :, part], k[:, :, part], v[:, :, part], k_pool, v_pool,
                                                        self.block_tables[row], start)[0].transpose(0, 1)  # (t, H, D)
            return out.reshape(1, num_new, q_size)
        outs = [
            paged_prefill_attention(q[:, :, offset : offset + length], k[:, :, offset : offset + length],
                                    v[:, :, offset : offset + length], k_pool, v_pool, self.block_tables[row], start)
            for row, (offset, length, start) in enumerate(segments)
        ]  # each (1, H, t_i, D)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, H, T, D)
        return out.transpose(1, 2).reshape(1, num_new, q_size)


def padded_causal_attention(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Causal self-attention over a whole (T_pad, 3 * H * D) q/k/v buffer -> (1, H, T_pad, D). The
    views, and so the strides cuDNN keys its plans on, are the same for a padded prefill and for
    the runner's building of each bucket's plan at start."""
    q, k, v = (part.view(1, qkv.shape[0], num_heads, head_dim).transpose(1, 2)
               for part in qkv.split(num_heads * head_dim, dim=-1))  # each (1, H, T_pad, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
