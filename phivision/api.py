"""The Python API: load once, then chat with OpenAI-style messages, stream, or hold a conversation.

    import phivision
    pv = phivision.load()                      # microsoft/Phi-3.5-vision-instruct, best device and dtype
    print(pv.chat([{"role": "user", "content": [
        {"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "Describe the image."}]}]).text)

Image features are cached by image content, so an image that comes back (a later turn, the same
photo in another request) does not run the vision tower again; a `Conversation` also keeps the KV
cache of its last turn and reuses the unchanged prefix of the next prompt.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .errors import PromptError
from .generation.generate import CachedPrefix, TokenGenerator, check_context, default_stop_token_ids
from .generation.detokenize import IncrementalDecoder, StopStringFilter
from .generation.sampling import SamplingParams
from .processing.image import num_image_tokens_for_size, preprocess_images
from .processing.loading import load_image
from .processing.prompt import Processor, tokenize_prompt
from .weights import load_model

DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"
MODEL_ENV = "PHIVISION_MODEL"
# The model card's advice: 16 crops for one image, 4 for several (frames, slides).
SINGLE_IMAGE_CROPS = 16
MULTI_IMAGE_CROPS = 4


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (exact parity, no slow bf16 CPU kernels)."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return names[dtype]


def default_num_crops(num_images: int) -> int:
    return SINGLE_IMAGE_CROPS if num_images <= 1 else MULTI_IMAGE_CROPS


@dataclass(frozen=True)
class ChatResult:
    """One answer, with what it cost."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the previous turn
    ttft_s: float
    total_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "image_tokens": self.image_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens,
            },
            "timings": {"ttft_s": round(self.ttft_s, 4), "total_s": round(self.total_s, 4),
                        "decode_tok_s": round((self.completion_tokens - 1) / (self.total_s - self.ttft_s), 2)
                        if self.completion_tokens > 1 and self.total_s > self.ttft_s else None},
        }


class ImageFeatureCache:
    """Projected image features keyed by image content and num_crops; least recently used goes first."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: Image.Image, num_crops: int) -> tuple[str, int]:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
        digest.update(image.tobytes())
        return digest.hexdigest(), num_crops

    def get(self, key: tuple[str, int]) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return features

    def put(self, key: tuple[str, int], features: torch.Tensor) -> None:
        self.misses += 1
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenised prompt with its images' features ready."""

    prompt: str
    input_ids: torch.Tensor  # (1, T) int64, -g = image g
    image_features: list[torch.Tensor]
    num_image_tokens: list[int]


class PhiVision:
    """A loaded model with its processor: chat, stream and converse."""

    def __init__(self, model: torch.nn.Module, processor: Processor, *, feature_cache_entries: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_cache = ImageFeatureCache(feature_cache_entries)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.model.config.text.max_position_embeddings

    # -------------------------------------------------------------- preparing

    def prepare(self, messages: Any, *, num_crops: int | None = None, max_new_tokens: int = 0) -> PreparedPrompt:
        """Messages -> ids and image features; checks the context before running the vision tower."""
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [load_image(source, allow_urls=self.processor.allow_urls) for source in sources]
        crops = num_crops if num_crops is not None else default_num_crops(len(images))
        num_tokens = [num_image_tokens_for_size(image.width, image.height, crops) for image in images]
        ids = tokenize_prompt(self.tokenizer, prompt, num_tokens)
        check_context(self.model, len(ids), max(max_new_tokens, 0))
        features = self.image_features(images, crops)
        return PreparedPrompt(prompt, torch.tensor([ids], dtype=torch.long), features, num_tokens)

    def image_features(self, images: Sequence[Image.Image], num_crops: int) -> list[torch.Tensor]:
        """Projected features per image, running the vision tower only for images not seen before."""
        keys = [ImageFeatureCache.key(image, num_crops) for image in images]
        found = {key: self.image_cache.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing:
            first_image = {key: image for key, image in zip(reversed(keys), reversed(images))}
            batch = preprocess_images([first_image[key] for key in missing], num_crops)
            dtype = next(self.model.parameters()).dtype
            with torch.inference_mode():
                encoded = self.model.encode_images(batch.pixel_values.to(self.device, dtype), batch.image_sizes.to(self.device))
            for key, features in zip(missing, encoded):
                self.image_cache.put(key, features)
                found[key] = features
        return [found[key] for key in keys]

    def count_tokens(self, messages: Any, *, num_crops: int | None = None) -> int:
        """The prompt's length in tokens, images included, without running the model."""
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [load_image(source, allow_urls=self.processor.allow_urls) for source in sources]
        crops = num_crops if num_crops is not None else default_num_crops(len(images))
        return len(tokenize_prompt(self.tokenizer, prompt, [num_image_tokens_for_size(i.width, i.height, crops) for i in images]))

    # -------------------------------------------------------------- generating

    def _params(self, sampling: dict[str, Any]) -> SamplingParams:
        params = SamplingParams(**sampling)
        if params.stop_token_ids is None:
            params = SamplingParams(**{**sampling, "stop_token_ids": default_stop_token_ids(self.tokenizer)})
        return params

    def _generator(self, prepared: PreparedPrompt, params: SamplingParams, prefix: CachedPrefix | None) -> TokenGenerator:
        return TokenGenerator(
            self.model,
            prepared.input_ids,
            None,
            params,
            stop_token_ids=params.stop_token_ids or (),
            pad_token_id=self.tokenizer.pad_token_id or 0,
            image_features=prepared.image_features,
            prefix=prefix,
        )

    def _run(
        self, messages: Any, num_crops: int | None, sampling: dict[str, Any], prefix: CachedPrefix | None = None
    ) -> Iterator[str | tuple[ChatResult, TokenGenerator]]:
        """Text pieces as they come, then one final (result, generator) item."""
        start = time.perf_counter()
        params = self._params(sampling)
        prepared = self.prepare(messages, num_crops=num_crops, max_new_tokens=params.max_new_tokens)
        gen = self._generator(prepared, params, prefix)
        decoder, stopper = IncrementalDecoder(self.tokenizer), StopStringFilter(params.stop)
        text, completion, ttft, finish = "", 0, None, "length"
        for step in gen:
            token = step[0]
            if ttft is None:
                ttft = time.perf_counter() - start
            if token is None:
                break
            completion += 1
            if token in gen.stop_token_ids:
                finish = "stop"
                break
            piece = stopper.push(decoder.push(token))
            if stopper.stopped:
                finish = "stop"
                gen.finish(0)
            if piece:
                text += piece
                yield piece
        if not stopper.stopped:
            tail = stopper.push(decoder.flush()) + stopper.flush()
            if tail:
                text += tail
                yield tail
        result = ChatResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=prepared.input_ids.shape[1],
            completion_tokens=completion,
            image_tokens=sum(prepared.num_image_tokens),
            cached_prompt_tokens=gen.num_reused_tokens,
            ttft_s=ttft or 0.0,
            total_s=time.perf_counter() - start,
        )
        yield result, gen

    def chat(self, messages: Any, *, num_crops: int | None = None, **sampling: Any) -> ChatResult:
        """One answer to OpenAI-style (or model-card-style) messages.

        Sampling options: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed, stop,
        stop_token_ids (default `<|end|>` and `<|endoftext|>`).
        """
        *_, (result, _gen) = self._run(messages, num_crops, sampling)
        return result

    def stream_chat(self, messages: Any, *, num_crops: int | None = None, **sampling: Any) -> Iterator[str]:
        """The answer's text in pieces as it is generated."""
        for item in self._run(messages, num_crops, sampling):
            if isinstance(item, str):
                yield item

    def conversation(self, *, system: str | None = None, num_crops: int | None = None) -> "Conversation":
        return Conversation(self, system=system, num_crops=num_crops)


class Conversation:
    """A multi-turn chat that keeps its history, its images and the KV cache of its last turn."""

    def __init__(self, engine: PhiVision, *, system: str | None = None, num_crops: int | None = None):
        self.engine = engine
        self.num_crops = num_crops
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self._pending_images: list[Any] = []
        self._prefix: CachedPrefix | None = None
        self._num_crops_used: int | None = None

    @property
    def num_images(self) -> int:
        return sum(
            1 for m in self.messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image"
        )

    def add_image(self, image: Any) -> None:
        """Attach an image to the next question (paths, bytes, PIL images, arrays, data URIs)."""
        load_image(image, allow_urls=self.engine.processor.allow_urls)  # fail now, not at the next question
        self._pending_images.append(image)

    def _crops(self, total_images: int) -> int:
        # Fixed for the whole conversation once chosen: changing it would change earlier images' tokens.
        if self.num_crops is not None:
            return self.num_crops
        if self._num_crops_used is None:
            self._num_crops_used = default_num_crops(total_images)
        return self._num_crops_used

    def stream(self, text: str, images: Sequence[Any] = (), **sampling: Any) -> Iterator[str]:
        """Ask; yields the answer's pieces and records the turn once it is complete."""
        for image in images:
            self.add_image(image)
        parts = [{"type": "image", "image": image} for image in self._pending_images] + [{"type": "text", "text": text}]
        user = {"role": "user", "content": parts}
        messages = self.messages + [user]
        crops = self._crops(self.num_images + len(self._pending_images))
        result = None
        for item in self.engine._run(messages, crops, sampling, prefix=self._prefix):
            if isinstance(item, str):
                yield item
            else:
                result, gen = item
                self._prefix = gen.cached_prefix()
        self._pending_images = []
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        self.last_result = result

    def ask(self, text: str, images: Sequence[Any] = (), **sampling: Any) -> ChatResult:
        """Ask and wait for the whole answer."""
        for _ in self.stream(text, images, **sampling):
            pass
        return self.last_result

    def reset(self) -> None:
        """Forget the history (the system message stays) and the cached prefix."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._pending_images = []
        self._prefix = None
        self._num_crops_used = None


def load(
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_urls: bool = False,
    progress: bool = True,
) -> PhiVision:
    """Load a checkpoint (hub id or local folder; default $PHIVISION_MODEL or microsoft/Phi-3.5-vision-instruct)."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    device = device or default_device()
    torch_dtype = parse_dtype(dtype) or default_dtype(device)
    processor = Processor.from_pretrained(model, allow_urls=allow_urls)
    network = load_model(model, device=device, dtype=torch_dtype, progress=progress)
    return PhiVision(network, processor)


__all__ = ["ChatResult", "Conversation", "ImageFeatureCache", "PhiVision", "load", "DEFAULT_MODEL", "PromptError"]
