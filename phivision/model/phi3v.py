"""Phi-3(.5)-vision: vision tower + projector + decoder + lm_head, and the glue between them (spec §6).

Deliberate differences from the reference:
* Image g's features go to the placeholder runs whose id is -g (the reference fills placeholders
  with all images' features in order of appearance, whatever the tag number), and a repeated tag
  reuses that image's features (the reference crashes). Run lengths are validated.
* Zero-padding crops are not run through CLIP (the reference runs and then discards them).
* The caller's input_ids are never modified (Phi-3-vision clamps them in place).
* LongRoPE factors are chosen per row of a batch (see rope.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels.fused import decode_inputs
from ..kernels.gemv import linear
from ..config import ModelConfig
from ..errors import PromptError
from .language import KVCache, Phi3Decoder
from .projector import ImageProjector
from .transfer import to_device
from .vision import ClipVisionTower


class Phi3VForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = ClipVisionTower(config.vision)
        self.projector = ImageProjector(config.projector)
        self.language_model = Phi3Decoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recomputes the non-persistent buffers (rotary frequencies), e.g. after building on the meta device."""
        self.language_model.rotary.reset_buffers(device)

    # ------------------------------------------------------------------ images

    def image_grids(self, image_sizes: torch.Tensor, num_slots: int) -> list[tuple[int, int]]:
        """(rows, cols) of crops per image from its HD size [h, w]; checks they fit the num_slots crop slots."""
        crop = self.config.vision.image_size
        grids = []
        for image_idx, (height, width) in enumerate(image_sizes.tolist()):
            if height <= 0 or width <= 0 or height % crop or width % crop:
                raise PromptError(f"image {image_idx + 1}: image size {height}x{width} is not a positive multiple of the {crop}-pixel crop")
            rows, cols = height // crop, width // crop
            if rows * cols + 1 > num_slots:
                raise PromptError(
                    f"image {image_idx + 1}: a {height}x{width} image needs {rows * cols} crops plus the global view, "
                    f"but pixel_values holds only {num_slots} crop slots per image"
                )
            grids.append((rows, cols))
        return grids

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                      tower: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """(I, N+1, 3, S, S) crops + (I, 2) HD sizes -> per image (num_tokens_i, hidden) projected features.

        `tower` replaces self.vision_tower (e.g. its CUDA graphs; its result is used at once). Give
        image_sizes on the CPU: on the GPU, reading them back waits for the work queued before.
        """
        if pixel_values.dim() != 5 or image_sizes.shape != (pixel_values.shape[0], 2):
            raise PromptError(
                f"expected pixel_values (images, crops, 3, H, W) and image_sizes (images, 2), "
                f"got {tuple(pixel_values.shape)} and {tuple(image_sizes.shape)}"
            )
        grids = self.image_grids(image_sizes, pixel_values.shape[1])
        num_real = [rows * cols + 1 for rows, cols in grids]
        # Only the real crops (global view + tiles) of every image, as one batch: padding slots are all-zero
        # and discarded by the reference anyway.
        crops = torch.cat([pixel_values[idx, :count] for idx, count in enumerate(num_real)])  # (sum n_i, 3, S, S)
        features = (tower or self.vision_tower)(crops)  # (sum n_i, P, C)
        merged = [
            self.projector.layout(crop_features, rows, cols)
            for crop_features, (rows, cols) in zip(features.split(num_real), grids)
        ]  # per image (tokens_i, 4C)
        projected = self.projector(torch.cat(merged))  # (sum tokens_i, hidden), all images at once like the reference
        return list(projected.split([m.shape[0] for m in merged]))

    # ------------------------------------------------------------------ text

    def embed(self, input_ids: torch.Tensor, image_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden); every maximal run of -g gets image g's features (g from 1)."""
        return self._embed(input_ids, image_features, bool((input_ids < 0).any()))

    def _embed(self, input_ids: torch.Tensor, image_features: list[torch.Tensor] | None, has_images: bool,
               host_ids: torch.Tensor | None = None) -> torch.Tensor:
        embed_tokens = self.language_model.embed_tokens
        embeds = embed_tokens(input_ids.clamp(min=0))  # clamp makes a copy: placeholders look up id 0 for now
        if not has_images:
            return embeds
        if not image_features:
            raise PromptError("input_ids contain image placeholders (negative ids) but no images were given")
        # From a host copy of the ids when there is one: reading them back from the GPU would wait
        # for the work queued before (the vision tower).
        rows, cols, sources = placeholder_index(host_ids if host_ids is not None else input_ids,
                                                [f.shape[0] for f in image_features])
        features = torch.cat(list(image_features)).to(device=embeds.device, dtype=embeds.dtype)  # (sum tokens, hidden)
        device = embeds.device
        rows, cols, sources = (to_device(t, device) for t in (rows, cols, sources))
        return embeds.index_put((rows, cols), features[sources])

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        logits_to_keep: int = 0,
        logits_positions: list[int] | None = None,
        has_images: bool | None = None,
    ) -> torch.Tensor:
        """Float32 logits (B, T, vocab), or of the last `logits_to_keep` positions when > 0, or of
        the columns `logits_positions` when given (a packed prefill's last token of each chunk).

        With a cache: the T new tokens take slots [cache.length, cache.length + T), attend to slots
        [0, cache.length + T) causally by slot and where attention_mask (B, cache.length + T) is 1,
        and cache.length advances by T. positions default to those slot numbers. With a PagedBatch
        (the engine's path) positions are required and masking follows its block tables.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if image_features is not None and pixel_values is not None:
            raise ValueError("pass either pixel_values (+ image_sizes) or precomputed image_features, not both")
        batch, num_new = input_ids.shape
        device = self.lm_head.weight.device
        host_ids = input_ids if input_ids.device.type == "cpu" else None  # image placement reads ids on the host
        input_ids = to_device(input_ids, device)
        past_len = 0
        paged = getattr(cache, "paged", False)
        if paged and positions is None:
            raise ValueError("a paged batch needs explicit positions")
        if cache is not None and not paged:
            past_len = cache.length
            if getattr(cache, "batch", batch) != batch:
                raise ValueError(f"the cache has {cache.batch} rows but input_ids has {batch}")
            cache.check_room(num_new)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, past_len + num_new):
                raise ValueError(
                    f"attention_mask must be (batch, cached + new) = ({batch}, {past_len + num_new}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(device)
        if positions is None:
            positions = torch.arange(past_len, past_len + num_new, device=device).expand(batch, num_new)  # (B, T)
        elif tuple(positions.shape) != (batch, num_new):
            raise ValueError(f"positions must be (batch, tokens) = ({batch}, {num_new}), got {tuple(positions.shape)}")
        positions = positions.to(device)

        if has_images is None:  # a host sync: callers that know (CUDA-graph capture) pass it
            has_images = bool((input_ids < 0).any())
        if has_images and image_features is None:
            if pixel_values is None or image_sizes is None:
                raise PromptError("input_ids contain image placeholders (negative ids) but pixel_values/image_sizes were not given")
            image_features = self.encode_images(pixel_values.to(device), image_sizes)
        rope_tables = getattr(cache, "rope_tables", None)  # a decode step of the engine's (PagedBatch)
        if rope_tables is not None and not has_images and num_new == 1:
            # Its embeddings and rotary rows looked up in one kernel (identical values).
            embeds, cos, sin = decode_inputs(input_ids, positions, cache.long_rope, self.language_model.embed_tokens.weight,
                                             rope_tables)  # (B, 1, hidden), (B, 1, D) twice
            rope = (cos, sin)
        else:
            embeds = self._embed(input_ids, image_features, has_images, host_ids)  # (B, T, hidden)
            rope = None
        keep = None if logits_positions is None else to_device(torch.tensor(logits_positions), device)  # (S,)
        last_rows_only = keep is not None and getattr(cache, "last_rows_only", False)
        if last_rows_only and list(logits_positions) != cache.last_columns():
            raise ValueError(f"logits_positions {list(logits_positions)} are not the batch's last columns {cache.last_columns()}")
        hidden = self.language_model(embeds, positions, attention_mask, cache,
                                     keep if last_rows_only else None, rope=rope)  # (B, T, hidden), or (B, S, hidden)
        if cache is not None and not paged:
            cache.advance(num_new)
        if keep is not None:
            if not last_rows_only:
                hidden = hidden[:, keep]
        elif logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return linear(hidden, self.lm_head.weight, out_dtype=torch.float32)


def placeholder_index(input_ids: torch.Tensor, num_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where image features go: (row, column) of every placeholder and the row of the concatenated
    features it takes. A maximal run of id -g must be exactly as long as image g's token count."""
    ids = input_ids.detach().cpu()
    rows, cols = (ids < 0).nonzero(as_tuple=True)  # row-major
    values = ids[rows, cols]
    # A run starts at the first placeholder, at a new row, after a gap, or where the id changes.
    starts_run = torch.ones_like(values, dtype=torch.bool)
    starts_run[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (values[1:] != values[:-1])
    run_starts = starts_run.nonzero(as_tuple=True)[0]  # (R,)
    run_lengths = torch.diff(run_starts, append=torch.tensor([values.numel()]))  # (R,)
    image_numbers = -values[run_starts]  # (R,), 1-based
    for start, length, number in zip(run_starts.tolist(), run_lengths.tolist(), image_numbers.tolist()):
        where = f"row {int(rows[start])}, column {int(cols[start])}"
        if number > len(num_tokens):
            raise PromptError(
                f"{where}: placeholder id {-number} names image {number}, but only {len(num_tokens)} image(s) were given"
            )
        if length != num_tokens[number - 1]:
            raise PromptError(
                f"{where}: a run of {length} placeholder ids {-number} for image {number}, which has "
                f"{num_tokens[number - 1]} tokens (each <|image_N|> tag must expand to exactly that many)"
            )
    offsets = torch.tensor([0, *num_tokens[:-1]]).cumsum(0)  # first feature row of each image
    run_of = starts_run.long().cumsum(0) - 1  # (P,) run index of each placeholder
    within = torch.arange(values.numel()) - run_starts[run_of]  # (P,) index inside its run
    sources = offsets[image_numbers[run_of] - 1] + within  # (P,)
    return rows, cols, sources
