"""The Phi-3-mini decoder: fused qkv / gate_up projections, RMSNorm, SiLU MLP, LongRoPE (spec §6.7-6.9).

Attribute names are the checkpoint's (`qkv_proj`, `gate_up_proj`, `input_layernorm`, ...) so the
weight table maps whole prefixes. Attention (`attention`, SDPA on CUDA) reads and writes a KV
cache object passed in as an argument: the seam a paged cache will reuse.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import TextConfig
from ..kernels.fused import add_rms_norm, rms_norm
from ..kernels.gemv import gated_linear, linear
from .rope import LongRopeEmbedding, apply_rotary


class KVCache(Protocol):
    """What attention needs from a cache (DenseKVCache is one)."""

    length: int

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class AttentionInputs:
    """Everything attention needs besides the hidden states, built once per forward call."""

    cos: torch.Tensor  # (B, T, D) already scaled by the LongRoPE attention factor
    sin: torch.Tensor  # (B, T, D)
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None with is_causal or when all keys are visible
    is_causal: bool


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    *,
    past_len: int,
    num_new: int,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for queries at slots [past_len, past_len + num_new) over keys at [0, past_len + num_new).

    A key is visible iff it is not after the query (by slot), the caller's attention_mask marks it
    real, and it lies within the sliding window (reference: q - k <= sliding_window). A padding query
    always sees itself, so that no softmax row is empty (an all-masked row would give NaN, and NaN
    values in padding slots would leak through 0 * NaN into real rows).
    """
    total = past_len + num_new
    window_binds = sliding_window is not None and total - 1 > sliding_window
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and not window_binds:
        if past_len == 0:
            return None, True
        if num_new == 1:
            return None, False  # one query after the cache sees every key
    query_slots = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    key_slots = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = key_slots <= query_slots  # (T, S)
    if window_binds:
        allowed = allowed & (query_slots - key_slots <= sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        real_keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        allowed = allowed & (real_keys | (key_slots == query_slots))  # (B, 1, T, S)
    return allowed, False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for (B, H, T, D) queries over (B, H, S, D) keys/values.

    On CUDA: PyTorch's fused SDPA kernels. On CPU: the reference's eager math (product, scale,
    mask, float32 softmax, product), because PyTorch's fused CPU kernel (blockwise online softmax)
    differs from it by up to 1.6e-4 on the tiny checkpoint's CLIP features, over the golden tolerance.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if is_causal:
        num_new, total = scores.shape[-2:]
        mask = torch.ones(num_new, total, dtype=torch.bool, device=q.device).tril(total - num_new)  # (T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, T, D)


def fused_sdpa_only(device: torch.device):
    """On CUDA, restricts SDPA to the flash / memory-efficient kernels, for callers whose shapes keep
    changing: cuDNN builds an execution plan for every new shape (1.8 ms of CPU per vision-layer call
    for a new crop count on an H200; seconds of W4 prefill). Elsewhere, no restriction."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


class RMSNorm(nn.Module):
    """Normalised in float32, cast back to the input dtype, then scaled (the reference's order)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Phi3Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # Rows of qkv_proj: q (H*D), then k (H_kv*D), then v (H_kv*D) (spec §3).
        self.qkv_proj = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: KVCache | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, hidden), or (B, S, hidden) at the columns `keep` (S,) when given
        (a paged prefill's last rows; every column's keys and values still go to the cache)."""
        batch, num_new, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if getattr(cache, "paged", False):
            # The engine's paged pool: fused projection / rotary / cache write and paged attention kernels.
            out = cache.project_attend(self.layer_idx, x, self.qkv_proj.weight, inputs.cos, inputs.sin, self.num_heads,
                                       self.num_kv_heads, self.head_dim, keep=keep)  # (B, T or S, H*D)
            return linear(out, self.o_proj.weight)
        if keep is not None:
            raise ValueError("attention computes selected rows only over a paged prefill")
        qkv = linear(x, self.qkv_proj.weight)  # (B, T, (H + 2*H_kv) * D)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, num_new, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D), S = cached + T
        if self.num_kv_heads != self.num_heads:
            repeats = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(repeats, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(repeats, dim=1)
        out = attention(q, k, v, inputs.mask, inputs.is_causal)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, num_new, q_size)  # (B, T, H*D)
        return linear(out, self.o_proj.weight)


class Phi3MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        # Rows of gate_up_proj: gate first, then up (spec §3).
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down(up * silu(gate)), gate first; at batch 1 on CUDA the gate is formed inside the down product.
        return gated_linear(linear(x, self.gate_up_proj.weight), self.down_proj.weight)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Phi3Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Phi3MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, inputs: AttentionInputs, cache: KVCache | None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual): the layer's input is x + residual.

        Carrying the residual lets each add run fused with the norm that follows it (this layer's
        two, the next layer's first); the sums and their rounding are the reference's
        h = x + attn(norm(x)); out = h + mlp(norm(h)). With `keep` (S,) the outputs are those of
        the columns it names only, (B, S, hidden); the other columns get their keys and values.
        """
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = x
            normed = rms_norm(x, norm1.weight, norm1.eps)
        else:
            normed, residual = add_rms_norm(x, residual, norm1.weight, norm1.eps)
        attn = self.self_attn(normed, inputs, cache, keep)  # (B, T or S, hidden)
        if keep is not None:
            residual = residual[:, keep]  # (B, S, hidden)
        normed, residual = add_rms_norm(attn, residual, norm2.weight, norm2.eps)
        return self.mlp(normed), residual


class Phi3Decoder(nn.Module):
    """Token embedding, decoder layers and the final norm (the lm_head lives with the full model)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = LongRopeEmbedding(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        keep: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden) embeddings -> (B, T, hidden) normed hidden states; writes T new slots into `cache`.

        `rope`: the (cos, sin) (B, T, D) of `positions` when the caller has them already (a decode
        step looks them up, kernels.fused.decode_inputs); else computed here.

        `keep` (S,), for a paged prefill whose batch asks for it (`PagedBatch.last_rows_only`): the
        columns whose hidden states the caller needs, each chunk's last. The result is then (B, S,
        hidden), and the last layer computes only the keys and values of the other columns: its
        attention, output product and MLP there would feed nothing (at W2's 6K-token prompt, ~3/4
        of a layer's work). Each kept row's arithmetic is the same as with every row computed.
        """
        num_new = inputs_embeds.shape[1]
        cos, sin = rope if rope is not None else self.rotary(positions, inputs_embeds.dtype, getattr(cache, "long_rope", None))
        if getattr(cache, "paged", False):
            mask, is_causal = None, False  # a paged batch masks through its block tables and lengths
        else:
            past_len = cache.length if cache is not None else 0
            mask, is_causal = build_attention_mask(
                attention_mask, past_len=past_len, num_new=num_new, sliding_window=self.config.sliding_window,
                device=inputs_embeds.device,
            )
        inputs = AttentionInputs(cos=cos, sin=sin, mask=mask, is_causal=is_causal)
        x, residual = inputs_embeds, None
        last = len(self.layers) - 1
        for idx, layer in enumerate(self.layers):
            x, residual = layer(x, residual, inputs, cache, keep if idx == last else None)
        normed, _ = add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return normed
