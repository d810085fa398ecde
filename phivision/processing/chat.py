"""Chat messages -> prompt text, by rendering the checkpoint's own chat template.

The template runs as transformers' `apply_chat_template` runs it: Jinja2 in an immutable sandbox,
trim_blocks and lstrip_blocks on, the loopcontrols extension, `raise_exception` / `strftime_now`
globals, a `tojson` filter that keeps non-ASCII text, and the special-token strings as variables.

Two message styles are accepted:
* the model card's: `content` is a string that already holds `<|image_N|>` tags (the images are
  passed to the processor separately, in tag order);
* OpenAI's: `content` is a list of parts (`text`, `image_url`, `image`). Image parts are numbered
  `<|image_1|>`, `<|image_2|>`, ... in order of appearance across the whole conversation, and their
  sources are returned in that order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError, PromptError

DEFAULT_ROLES = ("system", "user", "assistant")
IMAGE_TAG_PATTERN = re.compile(r"<\|image_(\d+)\|>")
_PART_TYPES = ("text", "image_url", "image")


def image_tag(number: int) -> str:
    """The text that stands for image `number` (1-based) in a prompt."""
    return f"<|image_{number}|>"


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the prompt text and the image sources its tags refer to, in tag order."""

    prompt: str
    images: list[Any]


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. roles out of order): the user's input is at fault.
    raise PromptError(f"the chat template rejected the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled chat template, plus the roles it accepts and the special tokens it may print."""

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, Any] | None = None,
        roles: Sequence[str] = DEFAULT_ROLES,
    ):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"the checkpoint's chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.roles = tuple(roles)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, roles: Sequence[str] = DEFAULT_ROLES) -> "ChatTemplate":
        if not tokenizer.chat_template:
            raise CheckpointError("the checkpoint's tokenizer_config.json has no chat_template")
        return cls(tokenizer.chat_template, tokenizer.special_tokens_map(), roles)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False, **variables: Any) -> str:
        """Renders messages whose content is already plain text (see `render_chat` for image parts)."""
        context = {"tools": None, "documents": None, **self.special_tokens, **variables}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except PromptError:
            raise
        except jinja2.TemplateError as exc:
            raise PromptError(f"the chat template failed on these messages: {exc}") from exc


def _image_part_source(part: Mapping[str, Any], where: str) -> Any:
    if part["type"] == "image":
        if part.get("image") is None:
            raise PromptError(f"{where}: an 'image' part needs an 'image' value (a path, bytes, data URL or PIL image)")
        return part["image"]
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str) or not url:
        raise PromptError(f"{where}: an 'image_url' part needs image_url.url (or image_url) to be a non-empty string")
    return url


def _flatten_parts(parts: Sequence[Any], message_idx: int, images: list[Any]) -> str:
    """Joins a list of parts into one string; image parts become numbered tags, sources go to `images`.

    Each image tag is followed by a newline (the model card's layout); two pieces of text, or a text
    followed by an image, are separated by a newline when the first does not already end with one.
    """
    text = ""
    for part_idx, part in enumerate(parts):
        where = f"message {message_idx}, part {part_idx}"
        if not isinstance(part, Mapping) or "type" not in part:
            raise PromptError(f"{where}: a content part must be a dict with a 'type' (one of {', '.join(_PART_TYPES)})")
        kind = part["type"]
        if kind not in _PART_TYPES:
            raise PromptError(f"{where}: unknown part type {kind!r} (expected one of {', '.join(_PART_TYPES)})")
        if text and not text.endswith("\n"):
            text += "\n"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise PromptError(f"{where}: a 'text' part needs a string 'text'")
            text += part["text"]
        else:
            images.append(_image_part_source(part, where))
            text += image_tag(len(images)) + "\n"
    return text


def normalize_messages(messages: Any, roles: Sequence[str] = DEFAULT_ROLES) -> tuple[list[dict[str, Any]], list[Any]]:
    """Validates messages and turns every content into a string; returns them and the image sources in tag order."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    images: list[Any] = []
    normalized: list[dict[str, Any]] = []
    first_tagged_idx: int | None = None  # first message whose own text holds an <|image_N|> tag
    for idx, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PromptError(f"message {idx} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in roles:
            raise PromptError(f"message {idx}: role must be one of {', '.join(map(repr, roles))}, got {role!r}")
        content = message.get("content")
        if content is None:
            raise PromptError(f"message {idx} ({role}) has no content")
        if isinstance(content, str):
            user_text = text = content
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            text = _flatten_parts(content, idx, images)
            user_text = "".join(part["text"] for part in content if part["type"] == "text")
        else:
            raise PromptError(f"message {idx}: content must be a string or a list of parts, got {type(content).__name__}")
        if first_tagged_idx is None and IMAGE_TAG_PATTERN.search(user_text):
            first_tagged_idx = idx
        normalized.append({**message, "content": text})
    if images and first_tagged_idx is not None:
        # Tags typed into the text would collide with the numbers given to the image parts.
        raise PromptError(
            f"message {first_tagged_idx}: its text contains an <|image_N|> tag while the conversation also has "
            "image parts; give images either as parts or as tags in the text, not both"
        )
    return normalized, images


def render_chat(template: ChatTemplate, messages: Any, *, add_generation_prompt: bool = True) -> ChatPrompt:
    """Messages (either style) -> the prompt text and its images in tag order."""
    normalized, images = normalize_messages(messages, template.roles)
    return ChatPrompt(prompt=template.render(normalized, add_generation_prompt=add_generation_prompt), images=images)
