"""LongRoPE ("su") rotary position encoding of the Phi-3 decoder (spec §6.8).

Two sets of per-frequency rescaling factors exist: short (for sequences that fit the original
training context) and long. The reference picks ONE set per forward call from the largest
position in that call. We pick it per row from that row's largest position, which is the same
for a single sequence and gives each request of a batch the result it would get alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig


def longrope_inv_freq(factors: tuple[float, ...], head_dim: int, base: float) -> torch.Tensor:
    """inv_freq_i = 1 / (factor_i * base^(2i/D)), float32 (D/2,), evaluated in the reference's order."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last axis (NeoX layout: first half, second half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
    return x * cos + rotate_half(x) * sin


class LongRopeEmbedding(nn.Module):
    """Positions -> (cos, sin) tables, already multiplied by the attention factor."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.original_max_position_embeddings = config.original_max_position_embeddings
        self.attention_factor = config.rope_attention_factor
        self.register_buffer("inv_freq_short", torch.empty(config.head_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(config.head_dim // 2, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the frequency tables, on `device` (default: where they are; use after a meta-device build)."""
        device = self.inv_freq_short.device if device is None else torch.device(device)
        if device.type == "meta":
            return
        cfg = self.config
        self.inv_freq_short = longrope_inv_freq(cfg.rope_short_factor, cfg.head_dim, cfg.rope_theta).to(device)
        self.inv_freq_long = longrope_inv_freq(cfg.rope_long_factor, cfg.head_dim, cfg.rope_theta).to(device)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, use_long: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, D) in `dtype`.

        `use_long` (B,) bool overrides the per-call rule; a prompt prefilled in chunks needs it, since
        the factor set follows the whole prompt's length, not the chunk's.
        """
        if use_long is None:
            # A row uses the long factors iff its sequence so far is longer than the original context.
            use_long = positions.amax(dim=1) + 1 > self.original_max_position_embeddings  # (B,)
        inv_freq = torch.where(use_long[:, None], self.inv_freq_long, self.inv_freq_short)  # (B, D/2)
        # float32 angles; a product of one factor each, exactly what the reference's rank-1 matmul computes.
        angles = positions.float()[:, :, None] * inv_freq[:, None, :]  # (B, T, D/2)
        emb = torch.cat((angles, angles), dim=-1)  # (B, T, D)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    @torch.no_grad()
    def tables(self, max_positions: int, dtype: torch.dtype) -> "RopeTables":
        """(cos, sin) of every position below `max_positions`, with each factor set, for decode steps
        to look up instead of computing (see RopeTables). Computed by `forward` itself, element by
        element the same operations, so a looked-up row equals the computed one bit for bit."""
        device = self.inv_freq_short.device
        short_rows = min(max_positions, self.original_max_position_embeddings)
        long_rows = max_positions if max_positions > self.original_max_position_embeddings else 0
        parts = [self(torch.arange(short_rows, device=device)[None], dtype, torch.tensor([False], device=device))]
        if long_rows:
            parts.append(self(torch.arange(long_rows, device=device)[None], dtype, torch.tensor([True], device=device)))
        cos = torch.cat([c[0] for c, _ in parts])  # (short_rows + long_rows, D)
        sin = torch.cat([s[0] for _, s in parts])
        return RopeTables(cos, sin, short_rows)


class RopeTables:
    """Rotary rows looked up by position: rows [0, short_rows) hold positions 0.. with the short
    factors, rows from short_rows on positions 0.. with the long ones. A row with the short set is
    at most original_max_position_embeddings - 1 (the set is chosen by the sequence's length), so
    the short part stops there; the long part covers the whole context."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, short_rows: int):
        self.cos, self.sin, self.short_rows = cos, sin, short_rows

    def rows(self, positions: torch.Tensor, use_long: torch.Tensor) -> torch.Tensor:
        """Table row of each position (int64, any shape) under its factor set (bool, broadcast)."""
        return torch.where(use_long, positions + self.short_rows, positions)
