"""The Python API: load once, then chat with OpenAI-style messages, stream, or hold a conversation.

    import phivision
    pv = phivision.load()                      # microsoft/Phi-3.5-vision-instruct, best device and dtype
    print(pv.chat([{"role": "user", "content": [
        {"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "Describe the image."}]}]).text)

Image features are cached by image content, so an image that comes back (a later turn, the same
photo in another request) does not run the vision tower again; the engine's prefix cache reuses
the KV of a conversation's unchanged history.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .errors import PromptError
from .generation.detokenize import RequestText
from .generation.engine import Engine, EngineConfig
from .generation.sampling import SamplingParams
from .processing.image import num_image_tokens_for_size
from .processing.loading import load_image, read_image_size
from .processing.prompt import Processor, tokenize_prompt
from .weights import load_model

DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"
MODEL_ENV = "PHIVISION_MODEL"
# The model card's advice: 16 crops for one image, 4 for several (frames, slides).
SINGLE_IMAGE_CROPS = 16
MULTI_IMAGE_CROPS = 4
CPU_MAX_MODEL_LEN = 8192  # the CPU engine's default limit and KV pool, in tokens


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


class PhiVision:
    """A loaded model with its processor and engine: chat, stream and converse.

    Every request runs on the batched engine (paged KV cache, CUDA graphs on a GPU), the same path
    as the server's; batch 1 is its smallest batch. Image features are cached by content and the
    engine's prefix cache reuses the KV of a conversation's unchanged history.
    """

    def __init__(self, model: torch.nn.Module, processor: Processor, *, engine_config: EngineConfig | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if engine_config is None:
            engine_config = default_engine_config(model)
        self.engine = Engine(model, processor, engine_config)

    @property
    def image_cache(self):
        return self.engine.image_cache

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.engine.max_model_len

    def count_tokens(self, messages: Any, *, num_crops: int | None = None) -> int:
        """The prompt's length in tokens, images included, without running the model."""
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        sizes = [read_image_size(source, allow_urls=self.processor.allow_urls) for source in sources]
        crops = num_crops if num_crops is not None else default_num_crops(len(sizes))
        return len(tokenize_prompt(self.tokenizer, prompt, [num_image_tokens_for_size(w, h, crops) for w, h in sizes]))

    # -------------------------------------------------------------- generating

    def _run(self, messages: Any, num_crops: int | None, sampling: dict[str, Any]) -> Iterator[str | ChatResult]:
        """Text pieces as they come, then one final ChatResult."""
        start = time.perf_counter()
        params = sampling_params(sampling)
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        crops = num_crops if num_crops is not None else default_num_crops(len(sources))
        engine = self.engine
        request_id = engine.add_prompt(prompt, sources, params, num_crops=crops)
        state = engine.request_info(request_id)
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else engine.scheduler.config.default_stop_token_ids
        output = RequestText(self.tokenizer, params.stop, stop_ids, params.ignore_eos)
        text, completion, ttft, finish, done = "", 0, None, "length", False
        try:
            while not done:
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    if out.finish_reason == "abort":
                        raise PromptError(out.error or "the request was aborted")
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    done = out.finished
                    if out.token_id is None:
                        continue
                    completion += 1
                    if out.finished:
                        finish = out.finish_reason or finish
                    piece = output.push(out.token_id)
                    if output.stopped:
                        finish, done = "stop", True
                        engine.abort(request_id)  # frees its blocks at once
                    if piece:
                        text += piece
                        yield piece
        except BaseException:
            engine.abort(request_id)  # Ctrl-C or an error mid-answer: nothing stays allocated
            raise
        tail = output.finish()
        if tail:
            text += tail
            yield tail
        yield ChatResult(
            text=text,
            finish_reason=finish,
            prompt_tokens=state.num_prompt_tokens,
            completion_tokens=completion,
            image_tokens=state.num_image_tokens,
            cached_prompt_tokens=state.cached_prompt_tokens or 0,
            ttft_s=ttft or 0.0,
            total_s=time.perf_counter() - start,
        )

    def chat(self, messages: Any, *, num_crops: int | None = None, **sampling: Any) -> ChatResult:
        """One answer to OpenAI-style (or model-card-style) messages.

        Sampling options: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed, stop,
        stop_token_ids (default `<|end|>` and `<|endoftext|>`).
        """
        *_, result = self._run(messages, num_crops, sampling)
        return result

    def stream_chat(self, messages: Any, *, num_crops: int | None = None, **sampling: Any) -> Iterator[str]:
        """The answer's text in pieces as it is generated."""
        for item in self._run(messages, num_crops, sampling):
            if isinstance(item, str):
                yield item

    def conversation(self, *, system: str | None = None, num_crops: int | None = None) -> "Conversation":
        return Conversation(self, system=system, num_crops=num_crops)


class Conversation:
    """A multi-turn chat that keeps its history and images; the engine's prefix cache keeps the KV
    of the history, so each turn computes only what is new."""

    def __init__(self, engine: PhiVision, *, system: str | None = None, num_crops: int | None = None):
        self.engine = engine
        self.num_crops = num_crops
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self._pending_images: list[Any] = []
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

    def discard_pending(self) -> None:
        """Forget images attached with add_image that no question has used yet."""
        self._pending_images = []

    def stream(self, text: str, images: Sequence[Any] = (), **sampling: Any) -> Iterator[str]:
        """Ask; yields the answer's pieces and records the turn once it is complete.

        A turn that fails or is interrupted is dropped whole: the question, its partial answer and
        the images attached to it; the history stays as it was.
        """
        try:
            for image in images:
                self.add_image(image)
            parts = [{"type": "image", "image": image} for image in self._pending_images] + [{"type": "text", "text": text}]
            user = {"role": "user", "content": parts}
            messages = self.messages + [user]
            crops = self._crops(self.num_images + len(self._pending_images))
            result = None
            for item in self.engine._run(messages, crops, sampling):
                if isinstance(item, str):
                    yield item
                else:
                    result = item
        finally:
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
        self._num_crops_used = None


def load(
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_urls: bool = False,
    progress: bool = True,
    engine_config: EngineConfig | None = None,
) -> PhiVision:
    """Load a checkpoint (hub id or local folder; default $PHIVISION_MODEL or microsoft/Phi-3.5-vision-instruct)."""
    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    device = device or default_device()
    torch_dtype = parse_dtype(dtype) or default_dtype(device)
    processor = Processor.from_pretrained(model, allow_urls=allow_urls)
    network = load_model(model, device=device, dtype=torch_dtype, progress=progress)
    return PhiVision(network, processor, engine_config=engine_config)


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    """SamplingParams from keyword options; a misspelt or misplaced option is named, with the valid ones."""
    valid = [f.name for f in fields(SamplingParams)]
    unknown = [name for name in options if name not in valid]
    if unknown:
        hint = " (images go in the messages, as image parts)" if "images" in unknown else ""
        raise TypeError(f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; "
                        f"the sampling options are {', '.join(valid)}")
    return SamplingParams(**options)


def default_engine_config(model: torch.nn.Module) -> EngineConfig:
    """A few concurrent requests; on a GPU the KV pool takes what memory allows, on the CPU it holds
    one long request (CPU memory is shared with everything else)."""
    if next(model.parameters()).device.type == "cuda":
        return EngineConfig(max_num_seqs=8, gpu_memory_utilization=0.85)
    max_len = min(model.config.text.max_position_embeddings, CPU_MAX_MODEL_LEN)
    return EngineConfig(max_num_seqs=2, max_model_len=max_len, kv_cache_tokens=max_len)


__all__ = ["ChatResult", "Conversation", "PhiVision", "load", "DEFAULT_MODEL", "PromptError"]
