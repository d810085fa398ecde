"""`AutoProcessor` with the reference's calling conventions, on top of our own Processor.

Only translation lives here (Hugging Face argument names, defaults and return shapes); the work is
done by phivision.processing. Model card code runs with nothing changed but the import line:

    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True, num_crops=4)
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, images, return_tensors="pt").to("cuda:0")
    text = processor.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..processing.chat import render_chat
from ..processing.prompt import ModelInputs, Processor
from ..processing.tokenizer import Tokenizer


def _check_return_tensors(return_tensors: str | None) -> None:
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors={return_tensors!r} is not supported: use 'pt' (torch tensors) or None")


def _rows(ids: Any) -> list[list[int]]:
    """A tensor (B, T), or a list of id lists -> plain Python lists."""
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1, ids.shape[-1]).tolist() if ids.ndim else [[int(ids)]]
    return [list(map(int, row)) for row in ids]


def _flat(ids: Any) -> list[int]:
    return ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class CompatTokenizer:
    """`processor.tokenizer` as the model card and transformers users call it (HF defaults kept)."""

    def __init__(self, processor: Processor):
        self._processor = processor
        self._tokenizer: Tokenizer = processor.tokenizer

    bos_token = property(lambda self: self._tokenizer.bos_token)
    eos_token = property(lambda self: self._tokenizer.eos_token)
    pad_token = property(lambda self: self._tokenizer.pad_token)
    unk_token = property(lambda self: self._tokenizer.unk_token)
    bos_token_id = property(lambda self: self._tokenizer.bos_token_id)
    eos_token_id = property(lambda self: self._tokenizer.eos_token_id)
    pad_token_id = property(lambda self: self._tokenizer.pad_token_id)
    unk_token_id = property(lambda self: self._tokenizer.unk_token_id)
    chat_template = property(lambda self: self._tokenizer.chat_template)

    def apply_chat_template(
        self,
        conversation: Any,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        return_tensors: str | None = None,
        **unused: Any,
    ) -> str | list[int] | torch.Tensor:
        """The rendered prompt (tokenize=False), or its ids encoded without added BOS, as transformers does.

        OpenAI-style image parts are rendered as numbered tags; their images must then be passed to
        the processor in that order (use phivision's Processor.apply_chat_template to get them back).
        """
        if self._processor.chat_template is None:
            raise CheckpointError("this checkpoint's tokenizer_config.json has no chat_template")
        prompt = render_chat(self._processor.chat_template, conversation, add_generation_prompt=add_generation_prompt).prompt
        if not tokenize:
            return prompt
        _check_return_tensors(return_tensors)
        # The template carries any BOS it wants, so transformers encodes the result without adding one.
        ids = self._tokenizer.encode(prompt, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.int64) if return_tensors == "pt" else ids

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """{"input_ids", "attention_mask"} for one text (lists) or several; tensors need equal lengths."""
        _check_return_tensors(return_tensors)
        texts = [text] if isinstance(text, str) else list(text)
        ids = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        masks = [[1] * len(row) for row in ids]
        if return_tensors == "pt":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("texts of different lengths cannot become one tensor; use the processor to batch prompts")
            return {"input_ids": torch.tensor(ids, dtype=torch.int64), "attention_mask": torch.tensor(masks, dtype=torch.int64)}
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    def encode(self, text: str, add_special_tokens: bool = True, **unused: Any) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> str:
        return self._tokenizer.decode(_flat(token_ids), skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> list[str]:
        return self._tokenizer.batch_decode(_rows(sequences), skip_special_tokens, clean_up_tokenization_spaces)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]


class CompatProcessor:
    """What `AutoProcessor.from_pretrained` returns: callable like the reference's Phi3VProcessor."""

    def __init__(self, processor: Processor):
        self.processor = processor
        self.tokenizer = CompatTokenizer(processor)

    @property
    def num_crops(self) -> int:
        return self.processor.num_crops

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        **unused: Any,
    ) -> ModelInputs:
        """Prompt(s) and images -> ModelInputs (a mapping with .to(device)); several prompts are left-padded."""
        _check_return_tensors(return_tensors)
        if text is None:
            raise ValueError("the processor needs a prompt (text=...)")
        return self.processor(text, images)

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None, **unused: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **unused: Any,
    ) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)


class AutoProcessor:
    """Entry point of the model card: `AutoProcessor.from_pretrained(model_id, trust_remote_code=True, num_crops=4)`."""

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | Path,
        *,
        trust_remote_code: bool = True,  # accepted: there is no remote code to trust here
        num_crops: int | None = None,
        revision: str | None = None,
        **unused: Any,
    ) -> CompatProcessor:
        return CompatProcessor(Processor.from_pretrained(pretrained_model_name_or_path, num_crops, revision=revision))
