"""Whether a request fits the context, decided before any weights are loaded.

Image tokens come from image sizes alone (`num_image_tokens_for_size`) and text tokens from the
checkpoint's own tokenizer and chat template, so the count is the one the engine will make, not
an estimate; loading the tokenizer and config.json takes a fraction of a second where loading the
weights can take minutes. The limit is the engine's: the model's max_position_embeddings, capped
by the default engine configuration for the device (phivision.api.default_engine_config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import CONFIG_FILE, ModelConfig
from ..hub import resolve_checkpoint
from ..processing.image import num_image_tokens_for_size
from ..processing.prompt import PROCESSOR_FILE_PATTERNS, Processor, tokenize_prompt
from ..processing.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

# The engine's default cap on a GPU (phivision/generation/engine.py, Engine.__init__).
GPU_MAX_MODEL_LEN = 32768


@dataclass(frozen=True)
class ContextBudget:
    """A checkpoint's context length with the tokenizer and template that fill it."""

    context_length: int  # what the engine on this device accepts: prompt plus answer
    model_context_length: int  # the checkpoint's max_position_embeddings
    processor: Processor

    @classmethod
    def for_checkpoint(cls, model: str, device: str | None) -> "ContextBudget":
        """From a checkpoint folder or hub id; fetches only config.json and the tokenizer files."""
        from ..api import default_device

        folder = resolve_checkpoint(
            model,
            allow_patterns=[CONFIG_FILE, *PROCESSOR_FILE_PATTERNS],
            required=[CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE],
        )
        model_context = ModelConfig.from_file(folder / CONFIG_FILE).text.max_position_embeddings
        limit = engine_context_length(model_context, device or default_device())
        return cls(limit, model_context, Processor.from_pretrained(folder))

    def describe_limit(self) -> str:
        """How messages name the limit: the model's context, or the engine's cap on this device."""
        if self.context_length < self.model_context_length:
            return f"the engine's limit of {self.context_length} tokens on this device (the model's context is {self.model_context_length})"
        return f"the model's context of {self.context_length} tokens"

    def prompt_tokens(self, messages: Any, image_sizes: Sequence[tuple[int, int]], num_crops: int) -> int:
        """The prompt's length in tokens; `image_sizes` are (width, height) of the messages' images in order.

        The messages' image sources are never opened, so placeholders will do.
        """
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if len(sources) != len(image_sizes):
            raise ValueError(f"{len(sources)} images in the messages but {len(image_sizes)} sizes")
        num_tokens = [num_image_tokens_for_size(width, height, num_crops) for width, height in image_sizes]
        return len(tokenize_prompt(self.processor.tokenizer, prompt, num_tokens))

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        # The engine's rule (generation.generate.check_context): prompt plus answer within the context.
        return prompt_tokens + max_new_tokens <= self.context_length

    def room_for_answer(self, prompt_tokens: int) -> int:
        """The largest max_new_tokens this prompt leaves room for (0 when the prompt alone is too long)."""
        return max(self.context_length - prompt_tokens, 0)


def engine_context_length(max_position_embeddings: int, device: str) -> int:
    """The max_model_len a default engine gets on `device`.

    Mirrors api.default_engine_config (CPU: CPU_MAX_MODEL_LEN) and Engine.__init__ (otherwise
    32768); were they to drift apart, the engine's own check still refuses the request, only
    later and without the suggestions.
    """
    from ..api import CPU_MAX_MODEL_LEN

    cap = GPU_MAX_MODEL_LEN if device.startswith("cuda") else CPU_MAX_MODEL_LEN
    return min(max_position_embeddings, cap)


def largest_count_that_fits(prompt_tokens_for: Callable[[int], int], upper: int, budget: ContextBudget, max_new_tokens: int) -> int:
    """The largest n in [0, upper] whose prompt fits with the answer; `prompt_tokens_for` grows with n."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if budget.fits(prompt_tokens_for(mid), max_new_tokens):
            low = mid
        else:
            high = mid - 1
    return low
