"""The HTTP server: OpenAI's chat-completions API, a chat page, health and Prometheus metrics.

    engine = AsyncEngine(EngineSpec(model="microsoft/Phi-3.5-vision-instruct", device="cuda", dtype="bf16",
                                    engine_config=EngineConfig(max_num_seqs=64)))
    engine.start()                                   # the engine process loads the model
    app = create_app(engine, Processor.from_pretrained(...), ServerSettings(model_name="phi-3.5-vision"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

A request goes: body read within the size limit -> JSON -> fields validated -> images read under
the image policy and the prompt tokenised (in a worker thread, so the event loop keeps streaming
other answers) -> context checked -> sent to the engine process -> tokens streamed back. Every
refusal is an OpenAI-style error body with a status that names the kind of problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..api import default_num_crops
from ..errors import PhiVisionError
from ..generation.detokenize import RequestText
from ..generation.sampling import SamplingParams
from ..processing.image import num_image_tokens_for_size
from ..processing.prompt import tokenize_prompt
from ..processing.prompt import Processor
from .async_engine import CANCELLED, AsyncEngine, EngineDeadError, RequestStream
from .media import ImagePolicy, fetch_image, fetch_image_size
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    completion_id,
    usage_body,
    validation_error,
)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a request gives none


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None  # None: no authentication
    max_images: int = 32  # per request, over the whole conversation
    max_body_bytes: int = 100 * 2**20
    max_queued: int = 256  # requests waiting beyond those the engine runs at once; more get 503
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    graceful_shutdown_s: float = 60.0


@dataclass(frozen=True)
class _Prepared:
    prompt: str
    images: list[Any]  # what goes to the engine: the encoded bytes where the request had them, else the PIL image
    num_crops: int
    params: SamplingParams
    prompt_tokens: int


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Server:
    """The state behind the routes (one per app): settings, the engine process, metrics."""

    def __init__(self, engine: AsyncEngine, processor: Processor, settings: ServerSettings):
        self.engine = engine
        self.processor = processor  # the same checkpoint's tokenizer and template, for checks and text
        self.settings = settings
        self.metrics = ServerMetrics()
        self.draining = False
        self._image_pool = ThreadPoolExecutor(8, thread_name_prefix="phivision-images")

    # -------------------------------------------------------------- checks

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over the limit of {limit:,} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc

    def parse(self, payload: Any) -> ChatCompletionRequest:
        if not isinstance(payload, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        req.check_supported()
        if req.model != self.settings.model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")
        return req

    # -------------------------------------------------------------- preparation (worker thread)

    def load_request_images(self, messages: list[dict[str, Any]], num_crops: int | None, *,
                            sizes_only: bool = False) -> tuple[str, list[Any], int]:
        """The prompt, its images (FetchedImage each; with sizes_only, only (width, height) read from
        the headers) and the crop count."""
        prompt, sources = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        if len(sources) > self.settings.max_images:
            raise APIError(400, f"the conversation has {len(sources)} images; this server takes at most "
                                f"{self.settings.max_images} per request", code="too_many_images")
        policy = self.settings.image_policy
        fetch = fetch_image_size if sizes_only else fetch_image
        images = list(self._image_pool.map(lambda item: fetch(item[1], policy, f"image {item[0] + 1}"),
                                           enumerate(sources)))
        return prompt, images, num_crops if num_crops is not None else default_num_crops(len(images))

    def count_prompt(self, prompt: str, sizes: list[tuple[int, int]], num_crops: int) -> tuple[int, list[int]]:
        per_image = [num_image_tokens_for_size(width, height, num_crops) for width, height in sizes]
        return len(tokenize_prompt(self.processor.tokenizer, prompt, per_image)), per_image

    def prepare(self, req: ChatCompletionRequest) -> _Prepared:
        prompt, images, num_crops = self.load_request_images(req.template_messages(), req.num_crops)
        prompt_tokens, _ = self.count_prompt(prompt, [f.image.size for f in images], num_crops)
        room = self.max_model_len - prompt_tokens
        max_tokens = req.requested_max_tokens if req.requested_max_tokens is not None else room
        if prompt_tokens + max_tokens > self.max_model_len or room < 1:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt is "
                                f"{prompt_tokens} tokens (images included) and max_tokens asks for {max_tokens} more",
                           param="messages", code="context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else DEFAULT_TEMPERATURE,
            top_k=req.top_k or 0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            seed=req.seed,
            stop=tuple(req.stop or ()),
            ignore_eos=req.ignore_eos,
        )
        # The engine gets the encoded bytes where there are any (decoded again there, side by side and
        # beside its steps, and keyed for its feature cache there): a few kilobytes through the pipe
        # instead of every pixel.
        payloads = [f.data if f.data is not None else f.image for f in images]
        return _Prepared(prompt, payloads, num_crops, params, prompt_tokens)

    # -------------------------------------------------------------- generation

    async def start(self, req: ChatCompletionRequest) -> tuple[_Prepared, RequestStream]:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        prepared = await run_in_threadpool(self.prepare, req)
        if self.engine.num_unfinished >= self.capacity:
            raise APIError(503, f"the server is at capacity ({self.capacity} requests queued or running); retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})
        try:
            stream = self.engine.submit(prepared.prompt, prepared.images, prepared.params, prepared.num_crops)
            await stream.accepted()
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_stopped") from exc
        except PhiVisionError as exc:
            raise APIError(400, str(exc)) from exc
        except RuntimeError as exc:
            raise APIError(500, str(exc), type="server_error") from exc
        return prepared, stream

    async def tokens(self, prepared: _Prepared, stream: RequestStream, started: float) -> AsyncIterator[tuple[str, str | None]]:
        """(text piece, finish reason or None) as tokens come; the last item carries the finish reason."""
        params = prepared.params
        stop_ids = self.engine.info["default_stop_token_ids"]
        text = RequestText(self.processor.tokenizer, params.stop, stop_ids, params.ignore_eos)
        first = True
        try:
            async for out in stream.outputs():
                if out.finish_reason == "abort":
                    if out.error == CANCELLED:  # ended by abort(): the client left or a stop string was seen
                        yield "", "abort"
                        return
                    raise APIError(500, out.error or "the request was aborted", type="server_error")
                if first:
                    self.metrics.record_ttft(time.perf_counter() - started)
                    first = False
                piece = text.push(out.token_id) if out.token_id is not None else ""
                if text.stopped:
                    self.engine.abort(stream.request_id)
                    yield piece, "stop"
                    return
                if out.finished:
                    yield piece + text.finish(), out.finish_reason or "length"
                    return
                if piece:
                    yield piece, None
        except RuntimeError as exc:  # the engine failed mid-answer (reported by the engine process)
            raise APIError(500, str(exc), type="server_error") from exc
        finally:
            if not stream.finished:
                self.engine.abort(stream.request_id)  # the client left or an error: free the KV blocks now

    @property
    def max_model_len(self) -> int:
        return self.engine.info["max_model_len"]

    @property
    def capacity(self) -> int:
        return self.engine.info["max_num_seqs"] + self.settings.max_queued

    def usage(self, prepared: _Prepared, stream: RequestStream, completion_tokens: int) -> dict[str, Any]:
        return usage_body(prepared.prompt_tokens, completion_tokens, stream.info.cached_prompt_tokens)

    def completion_tokens(self, stream: RequestStream) -> int:
        return stream.info.completion_tokens


async def _watch_disconnect(request: Request, server: _Server, stream: RequestStream) -> None:
    """Aborts the request when the client goes away (non-streamed answers have no write to fail)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if not stream.finished:
                server.engine.abort(stream.request_id)
            return


def create_app(engine: AsyncEngine, processor: Processor, settings: ServerSettings) -> FastAPI:
    """The app around an engine process (started here if the caller has not started it)."""
    server = _Server(engine, processor, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.info:
            await run_in_threadpool(engine.start)
        try:
            yield
        finally:
            # uvicorn has already waited for open requests to finish (graceful shutdown).
            server.draining = True
            await run_in_threadpool(engine.shutdown)
            server._image_pool.shutdown(wait=False)

    app = FastAPI(title="phivision", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            server.metrics.record_response(exc.status)
        return _error_response(exc)

    @app.exception_handler(PhiVisionError)
    async def input_error(request: Request, exc: PhiVisionError) -> JSONResponse:
        # Prompt and image problems found while preparing (bad tags, unreadable image, ...).
        if request.url.path == "/v1/chat/completions":
            server.metrics.record_response(400)
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours: still an OpenAI-style body, so clients show a message rather than a parse error.
        if request.url.path == "/v1/chat/completions":
            server.metrics.record_response(500)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("phivision.server").joinpath("static/index.html").read_text(encoding="utf-8")
        # The page is one file with inline script and style; it may only talk to this server.
        return HTMLResponse(html, headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data: blob:; connect-src 'self'",
            "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        if not server.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "draining" if server.draining else "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(server.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.check_auth(request)
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": 0, "owned_by": "phivision",
            "max_model_len": server.max_model_len}]})

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """Extension: the prompt's token count (images included) for messages, without generating."""
        server.check_auth(request)
        payload = await server.read_json(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            raise APIError(400, "expected a JSON object with a 'messages' list", param="messages")
        try:
            req = ChatCompletionRequest.model_validate({"model": settings.model_name, "messages": payload["messages"],
                                                        "num_crops": payload.get("num_crops")})
        except ValidationError as exc:
            raise validation_error(exc) from exc
        # Sizes from the image headers: the page asks for a count whenever an image is attached, and
        # a 4032x3024 JPEG's header is read in 0.05 ms where decoding it takes 92 (2-core machine).
        prompt, sizes, num_crops = await run_in_threadpool(server.load_request_images, req.template_messages(),
                                                           req.num_crops, sizes_only=True)
        count, per_image = await run_in_threadpool(server.count_prompt, prompt, sizes, num_crops)
        return JSONResponse({"count": count, "image_tokens": per_image, "num_crops": num_crops,
                             "max_model_len": server.max_model_len})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        server.check_auth(request)
        req = server.parse(await server.read_json(request))
        prepared, stream = await server.start(req)
        rid, created = completion_id(), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream_events(server, req, prepared, stream, rid, created, started, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch_disconnect(request, server, stream))
        try:
            pieces, finish = [], "length"
            async for piece, reason in server.tokens(prepared, stream, started):
                pieces.append(piece)
                finish = reason or finish
        finally:
            watcher.cancel()
        completion = server.completion_tokens(stream)
        server.metrics.record_completion(completion)
        if finish == "abort":  # the client has gone: nobody reads this
            server.metrics.record_response(499)
            return Response(status_code=499)
        server.metrics.record_response(200)
        return JSONResponse(completion_body(rid, settings.model_name, "".join(pieces), finish,
                                            server.usage(prepared, stream, completion), created))

    return app


async def _stream_events(server: _Server, req: ChatCompletionRequest, prepared: _Prepared, stream: RequestStream,
                         rid: str, created: int, started: float, include_usage: bool) -> AsyncIterator[str]:
    model = req.model
    server.metrics.record_response(200)
    yield _sse(chunk_body(rid, model, created, {"role": "assistant", "content": ""}))
    try:
        async for piece, reason in server.tokens(prepared, stream, started):
            if piece:
                yield _sse(chunk_body(rid, model, created, {"content": piece}))
            if reason is not None:
                yield _sse(chunk_body(rid, model, created, {}, finish_reason=reason))
    except APIError as exc:
        # The status line has gone out already: the error travels as an event, as OpenAI does.
        yield _sse(exc.body())
        yield "data: [DONE]\n\n"
        return
    completion = server.completion_tokens(stream)
    server.metrics.record_completion(completion)
    if include_usage:
        yield _sse(chunk_body(rid, model, created, {}, usage=server.usage(prepared, stream, completion), with_choice=False))
    yield "data: [DONE]\n\n"
