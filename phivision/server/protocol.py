"""The OpenAI chat-completions wire format: request validation, response and chunk bodies, errors.

Only what this server implements is accepted. Fields OpenAI clients commonly send and that do not
change the answer (`user`, `metadata`, ...) are ignored; fields that would change it and are not
implemented (`n` > 1, penalties, logprobs, tools, response formats) are refused with a clear error
instead of being silently ignored; any other unknown field is refused by name (a typo such as
`max_token` must not quietly fall back to a default).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Fields that OpenAI clients send and that cannot change a greedy or sampled answer here.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities",
                            "prediction", "reasoning_effort", "web_search_options"})
MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the HD transform decides the detail


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImageURLPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None  # accepted and ignored: the chat template has no place for it

    def as_template_message(self) -> dict[str, Any]:
        """The message as the processor takes it (`developer` is OpenAI's newer name for `system`)."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        parts = []
        for part in self.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image_url", "image_url": {"url": part.image_url.url}})
        return {"role": role, "content": parts}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by hand below, to name the field in the error

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM's name)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    num_crops: int | None = Field(default=None, ge=1, le=64)  # extension: default 16 for one image, 4 for more
    ignore_eos: bool = False  # extension: keep generating past end tokens (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def check_supported(self) -> None:
        """Refuse what would silently change the answer if ignored."""
        unknown = sorted(set(self.model_extra or {}) - IGNORED_FIELDS)
        if unknown:
            raise APIError(422, f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="unknown_field")
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported; send the request n times (with different seeds)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.tools or self.tool_choice not in (None, "none"):
            raise APIError(400, "tools are not supported by this model", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message() for m in self.messages]


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as one readable line per problem, naming each field's path."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {err['msg']}")
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    return APIError(422, "invalid request: " + "; ".join(problems[:8]), param=".".join(map(str, first)) or None,
                    code="invalid_field")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(request_id: str, model: str, text: str, finish_reason: str, usage: dict[str, Any],
                    created: int | None = None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chunk_body(request_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, Any] | None = None, with_choice: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
                            if with_choice else []}
    if usage is not None:
        body["usage"] = usage
    return body
