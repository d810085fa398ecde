"""The engine on its own thread, fed from asyncio: requests in, per-request streams of outputs back.

The Engine is single-threaded by design (scheduler, block manager and runner share state), so one
thread owns it. Handlers on the event loop never touch it: they post commands (add, abort) to an
inbox and read their request's outputs from an asyncio queue that the engine thread fills with
`loop.call_soon_threadsafe`. The thread steps while any request is unfinished and sleeps on the
inbox otherwise, so an idle server uses no CPU.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..generation.engine import Engine, PromptRequest, RequestState, StepOutput
from ..generation.sampling import SamplingParams

TOKEN_RATE_WINDOW_S = 10.0
CANCELLED = "cancelled"  # the error of the final output of a request ended by abort()


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class RequestStream:
    """What the engine thread reports for one request, read on the event loop.

    The first item is the request's RequestState (accepted) or an exception (refused); then
    StepOutputs until one is finished.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.state: RequestState | None = None
        self.finished = False

    def put(self, item: Any) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    async def accepted(self) -> RequestState:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.state = item
        return item

    async def outputs(self) -> AsyncIterator[StepOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item


def _deliver(items: list[tuple[RequestStream, StepOutput]]) -> None:
    for stream, out in items:
        stream._queue.put_nowait(out)


@dataclass
class _Add:
    stream: RequestStream
    prompt: str
    images: Sequence[Any]
    params: SamplingParams
    num_crops: int


@dataclass
class AsyncEngineStats:
    requests_added: int = 0
    requests_refused: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    recent_tokens: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8192))  # (time, tokens)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = AsyncEngineStats()
        self._inbox: collections.deque[Any] = collections.deque()
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._ids = 0
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="phivision-engine", daemon=True)

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (queued, prefilling or decoding)."""
        return len(self._streams) + sum(isinstance(c, _Add) for c in list(self._inbox))

    def submit(self, prompt: str, images: Sequence[Any], params: SamplingParams, num_crops: int) -> RequestStream:
        """Queues a request; await `stream.accepted()` for the engine's verdict, then read `stream.outputs()`."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped{f': {self._error}' if self._error else ''}")
        self._ids += 1
        stream = RequestStream(f"req-{self._ids}", asyncio.get_running_loop())
        self._post(_Add(stream, prompt, images, params, num_crops))
        return stream

    def abort(self, request_id: str) -> None:
        """Ends a request at once (its KV blocks are freed on the engine thread's next turn)."""
        self._post(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts what is left and stops the thread (call after the server has drained)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def tokens_per_second(self, window: float = TOKEN_RATE_WINDOW_S) -> float:
        now = time.monotonic()
        recent = [n for t, n in list(self.stats.recent_tokens) if now - t <= window]
        return sum(recent) / window

    def _post(self, command: Any) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._inbox and not self._stop and not self.engine.has_unfinished():
                        self._wake.wait()
                    commands = list(self._inbox)
                    self._inbox.clear()
                    stop = self._stop
                # Consecutive adds go in together: their images share vision-tower batches.
                adds: list[_Add] = []
                for command in commands:
                    if isinstance(command, _Add):
                        adds.append(command)
                        continue
                    self._add(adds)
                    adds = []
                    self._abort(command[1])
                self._add(adds)
                if stop:
                    break
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request below
            self._error = exc
            traceback.print_exc()
        finally:
            self._stop = True
            self._fail_all(self._error or EngineDeadError("the server is shutting down"))

    def _add(self, adds: list[_Add]) -> None:
        if not adds:
            return
        requests = [PromptRequest(a.prompt, a.images, a.params, a.num_crops, a.stream.request_id) for a in adds]
        try:
            results: list[Any] = self.engine.add_prompts(requests)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory in the vision tower: these requests fail
            traceback.print_exc()
            results = [RuntimeError(f"could not start the request: {exc}")] * len(adds)
        for add, result in zip(adds, results):
            stream = add.stream
            if isinstance(result, BaseException):
                self.stats.requests_refused += 1
                stream.put(result)
                continue
            state = self.engine.request_info(stream.request_id)
            self.stats.requests_added += 1
            self.stats.prompt_tokens += state.num_prompt_tokens
            self._streams[stream.request_id] = stream
            stream.put(state)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self.engine.abort(request_id)
            self.stats.requests_aborted += 1
            # A reader may still be waiting (e.g. a plain request whose client left): end its stream.
            stream.put(StepOutput(request_id, None, True, "abort", CANCELLED))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            # A failed step leaves no trustworthy state for the requests in it: end them all with
            # the error, free their blocks, and keep serving new requests.
            self.stats.step_errors += 1
            traceback.print_exc()
            for request_id in list(self._streams):
                self.engine.abort(request_id)
            self._fail_all(RuntimeError(f"the engine failed while generating: {exc}"))
            return
        self.stats.steps += 1
        new_tokens = 0
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StepOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.token_id is not None:
                new_tokens += 1
            if stream is None:
                continue
            deliveries.setdefault(stream._loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
        # One wake-up of the event loop per step, not one per request: 64 streams at 60 steps a
        # second would otherwise cost thousands of loop callbacks a second.
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass  # the event loop is closed
        if new_tokens:
            self.stats.recent_tokens.append((time.monotonic(), new_tokens))

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(exc)
        for command in list(self._inbox):
            if isinstance(command, _Add):
                command.stream.put(exc)
        self._inbox.clear()
