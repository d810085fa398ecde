"""CLIP patch features -> image tokens in the decoder's width (spec §6.3-6.4).

Per image: 2x2 merge of every crop's patch grid, the sub-image crops re-assembled into one canvas
with a `sub_GN` vector ending every canvas row, then one `glb_GN`, then the global view laid out
the same way ("sub_glb" order). All images' tokens then go through Linear -> GELU(erf) -> Linear.
Attribute names are the checkpoint's (glb_GN, sub_GN, img_projection.0 / .2).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ProjectorConfig


def merge_2x2(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, grid*grid, C) patch features -> (N, grid/2, grid/2, 4C).

    Cell (i, j) is the concatenation of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    """
    num_crops, _, channels = features.shape
    half = grid // 2
    x = features.reshape(num_crops, half, 2, half, 2, channels)  # (N, i, di, j, dj, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, i, j, di, dj, C)
    return x.reshape(num_crops, half, half, 4 * channels)  # (N, g, g, 4C)


def add_row_separators(canvas: torch.Tensor, separator: torch.Tensor) -> torch.Tensor:
    """(R, W, 4C) canvas -> (R * (W+1), 4C): `separator` (4C,) appended after every row, then flattened."""
    rows, _, channels = canvas.shape
    column = separator.reshape(1, 1, channels).expand(rows, 1, channels)  # (R, 1, 4C)
    return torch.cat([canvas, column], dim=1).reshape(-1, channels)  # (R * (W+1), 4C)


class ImageProjector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        merged = config.merged_dim
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.img_projection = nn.Sequential(
            nn.Linear(merged, config.hidden_size),
            nn.GELU(),  # exact (erf) form
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def layout(self, crop_features: torch.Tensor, grid_rows: int, grid_cols: int) -> torch.Tensor:
        """One image's (1 + rows*cols, P, C) features (global view first, then tiles row-major) -> (tokens, 4C)."""
        patches_per_side = int(round(crop_features.shape[1] ** 0.5))
        merged = merge_2x2(crop_features, patches_per_side)  # (1 + r*c, g, g, 4C)
        cells, channels = merged.shape[1], merged.shape[-1]
        sub_gn = self.sub_GN.reshape(channels)
        glb_gn = self.glb_GN.reshape(1, channels)

        tiles = merged[1:].reshape(grid_rows, grid_cols, cells, cells, channels)  # (r, c, g, g, 4C)
        tiles = tiles.permute(0, 2, 1, 3, 4)  # (r, g, c, g, 4C): canvas row = tile row * g + cell row
        canvas = tiles.reshape(grid_rows * cells, grid_cols * cells, channels)  # (r*g, c*g, 4C)
        sub_tokens = add_row_separators(canvas, sub_gn)  # (r*g * (c*g + 1), 4C)
        global_tokens = add_row_separators(merged[0], sub_gn)  # (g * (g + 1), 4C)
        return torch.cat([sub_tokens, glb_gn, global_tokens], dim=0)  # (tokens, 4C)

    def forward(self, merged_tokens: torch.Tensor) -> torch.Tensor:
        """(tokens, 4C) -> (tokens, hidden)."""
        return self.img_projection(merged_tokens.to(self.glb_GN.dtype))
