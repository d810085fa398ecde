"""Prompts + images -> model inputs: tag splitting, placeholder expansion, validation and batching.

A prompt names its images with `<|image_N|>` tags (N from 1). As in the reference, the text is cut at
the tags and every text chunk is tokenised on its own with special tokens, so each chunk (even an
empty one) starts with BOS; tag N becomes the id -N repeated as many times as image N has tokens.

Deliberate differences from the reference:
* A tag is tied to its image by number, also in the model (the reference scatters features in order of
  appearance, so `<|image_2|>` before `<|image_1|>` mixes them up), and a repeated tag reuses the
  same image's features (the reference crashes in the model). The ids themselves equal the reference's.
* Several prompts can be batched: rows are left-padded with the pad id, and each row's tags are offset
  by the images of the rows before it, so id -g always names row g-1 of `pixel_values`.
* Tags in a prompt without images are an error (the reference tokenises them as plain text).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, PromptError
from ..hub import resolve_checkpoint
from .chat import IMAGE_TAG_PATTERN, ChatTemplate, render_chat
from .image import CLIP_MEAN, CLIP_STD, TOKENS_PER_CROP, num_image_tokens_for_size, preprocess_images
from .loading import load_image
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# The reference's processor default when preprocessor_config.json has no num_crops.
DEFAULT_NUM_CROPS = 1
# What the processor needs from a checkpoint (the model's weights are not downloaded for it).
PROCESSOR_FILE_PATTERNS = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "chat_template.jinja",
    "special_tokens_map.json",
    PREPROCESSOR_CONFIG_FILE,
    "processor_config.json",
]


@dataclass(frozen=True)
class PromptSplit:
    """A prompt cut at its image tags: len(chunks) == len(tags) + 1 (chunks may be empty)."""

    chunks: list[str]
    tags: list[int]  # tag numbers in text order, repeats kept


def split_prompt(prompt: str) -> PromptSplit:
    tags = [int(m.group(1)) for m in IMAGE_TAG_PATTERN.finditer(prompt)]
    return PromptSplit(chunks=IMAGE_TAG_PATTERN.split(prompt)[::2], tags=tags)


def check_image_tags(tags: Sequence[int], num_images: int) -> None:
    """The distinct tag numbers must be exactly 1..num_images (order and repeats are free)."""
    distinct = sorted(set(tags))
    if distinct != list(range(1, len(distinct) + 1)):
        missing = sorted(set(range(1, max(distinct) + 1)) - set(distinct))
        raise PromptError(
            f"image tags must be numbered from 1 without gaps (<|image_1|>, <|image_2|>, ...); "
            f"this prompt uses {distinct}, missing {missing}"
        )
    if len(distinct) != num_images:
        raise PromptError(
            f"each image needs its own <|image_N|> tag: got {len(distinct)} image tags and {num_images} images"
        )


def expand_image_tags(
    chunk_ids: Sequence[Sequence[int]],
    tags: Sequence[int],
    num_image_tokens: Sequence[int],
    image_offset: int = 0,
) -> list[int]:
    """Joins tokenised chunks with image placeholder runs.

    Tag k of this prompt is image g = image_offset + k of the batch; it becomes -g repeated
    num_image_tokens[g - 1] times (num_image_tokens covers the whole batch).
    """
    ids = list(chunk_ids[0])
    for tag, chunk in zip(tags, chunk_ids[1:]):
        image_number = image_offset + tag
        ids.extend([-image_number] * num_image_tokens[image_number - 1])
        ids.extend(chunk)
    return ids


def tokenize_prompt(tokenizer: Tokenizer, prompt: str, num_image_tokens: Sequence[int]) -> list[int]:
    """One prompt's ids, given its images' token counts in image order (tag k is image k)."""
    split = split_prompt(prompt)
    check_image_tags(split.tags, len(num_image_tokens))
    return expand_image_tags(tokenizer.encode_batch(split.chunks), split.tags, num_image_tokens)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (input_ids, attention_mask), both int64 (B, T), padded on the left."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for row_idx, row in enumerate(rows):
        if row:
            input_ids[row_idx, length - len(row) :] = torch.tensor(row, dtype=torch.int64)
            attention_mask[row_idx, length - len(row) :] = 1
    return input_ids, attention_mask


@dataclass(frozen=True, eq=False)
class ModelInputs(Mapping[str, torch.Tensor]):
    """What the model takes. Also a read-only mapping, so `model(**inputs)` works.

    The mapping holds input_ids, attention_mask and, when there are images, pixel_values and
    image_sizes; `num_image_tokens` (per image, in pixel_values order) is an attribute only.
    """

    input_ids: torch.Tensor  # int64 (B, T), left-padded; -g marks image g's positions
    attention_mask: torch.Tensor  # int64 (B, T), 0 on padding
    pixel_values: torch.Tensor | None = None  # float32 (I, N+1, 3, 336, 336)
    image_sizes: torch.Tensor | None = None  # int64 (I, 2): HD [h, w]
    num_image_tokens: list[int] = field(default_factory=list)

    _KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._KEYS or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (key for key in self._KEYS if getattr(self, key) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # Mapping's value equality would compare tensors elementwise; identity is the honest meaning.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """A copy on `device`; `dtype` applies to pixel_values only (ids stay int64)."""
        pixel_values = self.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=dtype)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel_values,
            image_sizes=None if self.image_sizes is None else self.image_sizes.to(device),
        )


def _as_image_list(images: Any) -> list[Any]:
    """None -> [], a list/tuple -> itself, anything else is one image."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _read_num_crops(folder: Path) -> int:
    """num_crops from preprocessor_config.json; the reference's default 1 when absent.

    Also refuses a preprocessor config whose normalisation or crop token count differs from the
    CLIP constants our image code implements, rather than silently producing other pixels.
    """
    path = folder / PREPROCESSOR_CONFIG_FILE
    if not path.is_file():
        return DEFAULT_NUM_CROPS
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    for key, expected in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        if key in config and not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(config[key], expected, strict=True)):
            raise CheckpointError(f"{path}: {key} {config[key]} differs from the CLIP values {list(expected)} this engine implements")
    if config.get("num_img_tokens", TOKENS_PER_CROP) != TOKENS_PER_CROP:
        raise CheckpointError(f"{path}: num_img_tokens {config['num_img_tokens']} is not {TOKENS_PER_CROP}, which this engine implements")
    return int(config.get("num_crops", DEFAULT_NUM_CROPS))


def _check_num_crops(num_crops: Any) -> int:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops must be a positive integer, got {num_crops!r}")
    return num_crops


@dataclass(frozen=True)
class Processor:
    """Turns prompts and images into ModelInputs, alone or as a left-padded batch."""

    tokenizer: Tokenizer
    num_crops: int = DEFAULT_NUM_CROPS
    chat_template: ChatTemplate | None = None
    allow_urls: bool = False  # whether image sources may be http(s) URLs (fetched by load_image)

    def __post_init__(self) -> None:
        _check_num_crops(self.num_crops)
        if self.chat_template is None and self.tokenizer.chat_template:
            # Default to the tokenizer's own template; setting a field of a frozen instance during
            # construction is the dataclass idiom for derived defaults.
            object.__setattr__(self, "chat_template", ChatTemplate.from_tokenizer(self.tokenizer))

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        num_crops: int | None = None,
        *,
        allow_urls: bool = False,
        revision: str | None = None,
    ) -> "Processor":
        """From a local checkpoint folder or a hub id; num_crops defaults to the checkpoint's preprocessor config."""
        folder = resolve_checkpoint(
            str(path_or_id),
            allow_patterns=PROCESSOR_FILE_PATTERNS,
            required=[TOKENIZER_FILE, TOKENIZER_CONFIG_FILE],
            revision=revision,
        )
        return cls(
            tokenizer=Tokenizer.from_dir(folder),
            num_crops=_read_num_crops(folder) if num_crops is None else _check_num_crops(num_crops),
            allow_urls=allow_urls,
        )

    def __call__(
        self,
        prompt: str | Sequence[str],
        images: Any = None,
        *,
        max_length: int | None = None,
    ) -> ModelInputs:
        """One prompt with its images (a list, one image, or None); or a list of prompts with one image list each."""
        if isinstance(prompt, str):
            return self.batch([(prompt, images)], max_length=max_length)
        prompts = list(prompt)
        if images is None:
            per_prompt: list[Any] = [None] * len(prompts)
        elif isinstance(images, (list, tuple)) and len(images) == len(prompts):
            per_prompt = list(images)
        else:
            raise PromptError(f"with {len(prompts)} prompts, images must be None or a list of {len(prompts)} image lists")
        return self.batch(list(zip(prompts, per_prompt)), max_length=max_length)

    def batch(self, requests: Sequence[tuple[str, Any]], *, max_length: int | None = None) -> ModelInputs:
        """Several (prompt, images) pairs -> one left-padded batch whose ids name global image rows."""
        if not requests:
            raise PromptError("nothing to process: the batch is empty")
        splits: list[PromptSplit] = []
        sources: list[Any] = []
        image_offsets: list[int] = []
        for row_idx, (prompt, row_images) in enumerate(requests):
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {row_idx} is a {type(prompt).__name__}, expected a string")
            row_sources = _as_image_list(row_images)
            split = split_prompt(prompt)
            # Validate tags before touching images, so a bad prompt fails fast and cheaply.
            try:
                check_image_tags(split.tags, len(row_sources))
            except PromptError as exc:
                raise PromptError(f"prompt {row_idx}: {exc}" if len(requests) > 1 else str(exc)) from None
            splits.append(split)
            image_offsets.append(len(sources))
            sources.extend(row_sources)

        # Token counts follow from the image sizes alone: check lengths before the costly preprocessing.
        images = [load_image(source, allow_urls=self.allow_urls) for source in sources]
        num_image_tokens = [num_image_tokens_for_size(image.width, image.height, self.num_crops) for image in images]

        # One call into the Rust tokenizer for every chunk of every prompt.
        all_chunk_ids = iter(self.tokenizer.encode_batch([chunk for split in splits for chunk in split.chunks]))
        rows = []
        for row_idx, (split, offset) in enumerate(zip(splits, image_offsets)):
            chunk_ids = [next(all_chunk_ids) for _ in split.chunks]
            row = expand_image_tags(chunk_ids, split.tags, num_image_tokens, offset)
            if max_length is not None and len(row) > max_length:
                where = f"prompt {row_idx} is" if len(requests) > 1 else "the prompt is"
                raise PromptError(f"{where} {len(row)} tokens long (images included), over the maximum of {max_length}")
            rows.append(row)

        pixel_values = image_sizes = None
        if images:
            processed = preprocess_images(images, self.num_crops)
            if list(processed.num_image_tokens) != num_image_tokens:
                raise RuntimeError(f"image token counts disagree: {processed.num_image_tokens} from preprocessing, {num_image_tokens} from sizes")
            pixel_values, image_sizes = processed.pixel_values, processed.image_sizes

        input_ids, attention_mask = left_pad(rows, self._pad_token_id())
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            num_image_tokens=num_image_tokens,
        )

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
        """OpenAI-style or model-card-style messages -> (prompt, image sources in tag order)."""
        if self.chat_template is None:
            raise CheckpointError("this checkpoint's tokenizer_config.json has no chat_template")
        chat = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt)
        return chat.prompt, chat.images

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if pad is None:
            raise CheckpointError("the tokenizer names neither a pad_token nor an eos_token to pad batches with")
        return pad


def _id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
