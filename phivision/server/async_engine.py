"""The engine in its own process, fed from asyncio: requests in, per-request streams of outputs back.

Why a process and not a thread: the engine's steps are short (a decode step of 64 requests is
~13 ms on an H100) and launching their kernels is Python work; the HTTP side (parsing, images,
detokenising, one server-sent event per token per request) is Python work too. Sharing one GIL,
each slows the other (measured: a W4 run at 1,440 tokens/s in one process against 2,200 for the
engine alone). So the engine runs in a child process (spawned: CUDA is not fork-safe) that owns
the model, the scheduler and the KV pool, and the server process talks to it over two pipes:

    server -> engine   ("add", [requests]), ("abort", request_id), ("stop",)
    engine -> server   ("ready", info), ("accepted", id, prompt_tokens), ("refused", id, kind, message),
                       ("outputs", [(id, token, finished, reason, error, cached_tokens), ...], stats)

Images cross as their encoded files where the request carried them (a few kilobytes, not every
pixel; the server process has decoded and checked them already, and the engine decodes them again
on a worker thread beside its steps), else as decoded PIL images. A sender thread writes commands
so the event loop never blocks on a full pipe; a reader thread turns engine messages into items on
each request's asyncio queue (one loop wake-up per step).
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PhiVisionError
from ..generation.engine import EngineConfig, StepOutput
from ..generation.sampling import SamplingParams

TOKEN_RATE_WINDOW_S = 10.0
CANCELLED = "cancelled"  # the error of the final output of a request ended by abort()
STARTUP_TIMEOUT_S = 1800.0  # loading 8 GB from a slow disk, capturing CUDA graphs


class EngineDeadError(RuntimeError):
    """The engine process has stopped; no request can be served."""


class EngineStartError(PhiVisionError):
    """The engine process could not load the model or build the engine."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process needs to build its engine (sent to it; must pickle)."""

    model: str
    device: str
    dtype: str  # "bf16", "fp16" or "fp32"
    engine_config: EngineConfig
    allow_urls: bool = False
    progress: bool = False


@dataclass
class RequestInfo:
    """What the server knows of one request: filled in as the engine reports."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


class RequestStream:
    """One request's outputs, read on the event loop: accepted() first, then outputs()."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.info = RequestInfo()
        self.finished = False

    async def accepted(self) -> RequestInfo:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return self.info

    async def outputs(self) -> AsyncIterator[StepOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item


@dataclass
class EngineCounters:
    requests_added: int = 0
    requests_refused: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    recent_tokens: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8192))  # (time, tokens)


class AsyncEngine:
    """The server's handle on the engine process."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.counters = EngineCounters()
        self.info: dict[str, Any] = {}  # from the engine's "ready" message: max_model_len, pool size, ...
        self.stats: dict[str, Any] = {}  # the engine's latest stats snapshot
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams (event loop vs reader thread)
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ids = 0
        self._dead: str | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        """Starts the engine process and waits until its model is loaded; its "ready" info."""
        context = multiprocessing.get_context("spawn")
        commands_recv, self._commands = context.Pipe(duplex=False)
        self._events, events_send = context.Pipe(duplex=False)
        self._process = context.Process(target=engine_main, args=(self.spec, commands_recv, events_send),
                                        name="phivision-engine", daemon=True)
        self._process.start()
        commands_recv.close()
        events_send.close()
        deadline = time.monotonic() + timeout
        while not self._events.poll(0.5):
            if not self._process.is_alive():
                raise EngineStartError(f"the engine process exited with code {self._process.exitcode} while loading")
            if time.monotonic() > deadline:
                self._process.kill()
                raise EngineStartError(f"the engine did not start within {timeout:.0f} s")
        message = self._events.recv()
        if message[0] == "failed":
            self._process.join(10)
            raise EngineStartError(message[1])
        self.info = message[1]
        self.stats = message[2]
        threading.Thread(target=self._read, name="phivision-engine-reader", daemon=True).start()
        threading.Thread(target=self._send, name="phivision-engine-sender", daemon=True).start()
        return self.info

    @property
    def alive(self) -> bool:
        return self._dead is None and self._process is not None and self._process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine process (call after the server has drained)."""
        if self._process is None:
            return
        self._outbox.put(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._mark_dead("the server is shutting down")

    # ------------------------------------------------------------------ requests (event loop)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def submit(self, prompt: str, images: Sequence[Any], params: SamplingParams, num_crops: int) -> RequestStream:
        """Queues a request; await `stream.accepted()` for the engine's verdict, then read `stream.outputs()`."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self._dead or 'not started'}")
        self._ids += 1
        stream = RequestStream(f"req-{self._ids}", asyncio.get_running_loop())
        with self._lock:
            if self._dead is not None:  # died since the check above: _mark_dead has failed every stream
                raise EngineDeadError(f"the engine has stopped: {self._dead}")
            self._streams[stream.request_id] = stream
        self._outbox.put(("add", [(stream.request_id, prompt, list(images), params, num_crops)]))
        return stream

    def abort(self, request_id: str) -> None:
        """Ends a request at once: the engine frees its KV blocks and its reader gets a final output."""
        self._outbox.put(("abort", request_id))

    def tokens_per_second(self, window: float = TOKEN_RATE_WINDOW_S) -> float:
        now = time.monotonic()
        return sum(n for t, n in list(self.counters.recent_tokens) if now - t <= window) / window

    # ------------------------------------------------------------------ pipe threads

    def _send(self) -> None:
        while True:
            command = self._outbox.get()
            # Adds waiting together go as one message, so the engine encodes their images in one batch.
            batch = [command]
            while command[0] != "stop":
                try:
                    command = self._outbox.get_nowait()
                except queue.Empty:
                    break
                batch.append(command)
            merged: list[Any] = []
            for item in batch:
                if item[0] == "add" and merged and merged[-1][0] == "add":
                    merged[-1][1].extend(item[1])
                else:
                    merged.append(item)
            try:
                for item in merged:
                    self._commands.send(item)
            except (OSError, ValueError):
                return  # the engine process is gone; the reader reports it
            if merged[-1][0] == "stop":
                return

    def _read(self) -> None:
        try:
            while True:
                message = self._events.recv()
                kind = message[0]
                if kind == "outputs":
                    self._deliver_outputs(message[1])
                    self.stats = message[2]
                elif kind == "accepted":
                    _, request_id, prompt_tokens = message
                    self.counters.requests_added += 1
                    self.counters.prompt_tokens += prompt_tokens
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        stream.info.prompt_tokens = prompt_tokens
                        self._put(stream, stream.info)
                elif kind == "refused":
                    _, request_id, error_kind, text = message
                    self.counters.requests_refused += 1
                    with self._lock:
                        stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        self._put(stream, _RefusedInput(text) if error_kind == "input" else RuntimeError(text))
                elif kind == "aborted":
                    _, request_id, stats = message
                    self.counters.requests_aborted += 1
                    with self._lock:
                        stream = self._streams.pop(request_id, None)
                    self.stats = stats  # after the pop: a reader who sees the freed blocks also sees room
                    if stream is not None:
                        self._put(stream, StepOutput(request_id, None, True, "abort", CANCELLED))
                elif kind == "stats":
                    self.stats = message[1]
        except (EOFError, OSError):
            pass
        code = self._process.exitcode if self._process is not None else None
        self._mark_dead(f"the engine process exited (code {code})")

    def _deliver_outputs(self, outputs: list[tuple]) -> None:
        items, new_tokens = [], 0
        with self._lock:
            for request_id, token, finished, reason, error, cached in outputs:
                if token is not None:
                    new_tokens += 1
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if token is not None:
                    stream.info.completion_tokens += 1
                if cached is not None:
                    stream.info.cached_prompt_tokens = cached
                items.append((stream, StepOutput(request_id, token, finished, reason, error)))
                if finished:
                    del self._streams[request_id]
        if new_tokens:
            self.counters.recent_tokens.append((time.monotonic(), new_tokens))
        # One wake-up per event loop per step, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, out in items:
            by_loop.setdefault(stream._loop, []).append((stream, out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                pass  # the event loop is closed

    def _put(self, stream: RequestStream, item: Any) -> None:
        try:
            stream._loop.call_soon_threadsafe(stream._queue.put_nowait, item)
        except RuntimeError:
            pass

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._put(stream, EngineDeadError(reason))


class _RefusedInput(PhiVisionError):
    """The engine refused a request for its input (the message is the engine's error)."""


def _put_all(items: list[tuple[RequestStream, StepOutput]]) -> None:
    for stream, out in items:
        stream._queue.put_nowait(out)


# ---------------------------------------------------------------------- the engine process


def engine_main(spec: EngineSpec, commands, events) -> None:
    """The child process: builds the engine, then serves commands and steps until told to stop."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the server process decides when the
    # engine stops (after running answers have finished), by a "stop" command or by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = _build_engine(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with the message
        events.send(("failed", f"{exc}" if isinstance(exc, PhiVisionError) else f"{type(exc).__name__}: {exc}"))
        return
    events.send(("ready", {"max_model_len": engine.max_model_len, "max_num_seqs": engine.config.max_num_seqs,
                           "block_size": engine.config.block_size,
                           "default_stop_token_ids": list(engine.scheduler.config.default_stop_token_ids)},
                 _stats(engine)))
    try:
        _serve(engine, commands, events)
    except (EOFError, OSError, BrokenPipeError):
        pass  # the server went away


def _build_engine(spec: EngineSpec):
    from ..api import parse_dtype
    from ..generation.engine import Engine
    from ..processing.prompt import Processor
    from ..weights import load_model

    processor = Processor.from_pretrained(spec.model, allow_urls=spec.allow_urls)
    model = load_model(spec.model, device=spec.device, dtype=parse_dtype(spec.dtype), progress=spec.progress)
    return Engine(model, processor, spec.engine_config)


def _stats(engine) -> dict[str, Any]:
    stats = engine.stats()
    stats["image_cache_hits"] = engine.image_cache.hits
    stats["image_cache_misses"] = engine.image_cache.misses
    device = next(engine.model.parameters()).device
    if device.type == "cuda":
        import torch

        stats["gpu_memory_allocated"] = torch.cuda.memory_allocated(device)
        stats["gpu_memory_peak"] = torch.cuda.max_memory_allocated(device)
    return stats


def _serve(engine, commands, events) -> None:
    """The engine process's loop: take commands, queue prepared requests, step.

    New requests are prepared (images decoded, hashed and resized, prompts tokenised: CPU work) on a
    worker thread while the loop keeps stepping the running ones. Once prepared, a request is
    accepted or refused at once (its length checked), then held in arrival order until the loop
    queues it in the engine, between two steps, with its vision-tower work. Requests are queued in
    slices: whenever the engine has less than one prefill step's budget of prompt tokens left to
    prefill, enough held requests to fill it (requests whose images all sit in the feature cache
    have no vision work to spread and go at once). So a burst of requests has its vision tower run
    one step's worth at a time, each slice after the previous slice's prefill, rather than all of
    it before the first prefill: the first requests of the burst get their first token sooner, and
    the requests already decoding are not held up for the whole burst's vision work at once (W4's
    ~55 later requests: 204 ms in one go on an H200). The price: between two of their tokens the
    decoding requests now wait for a slice's vision work and a prefill step together. W4 on an
    H200 (benchmarks/RESULTS.md, seventh session, two runs each on one machine): mean time to first
    token 699 and 673 ms against 729 and 846, p99 time between tokens 166 and 147 ms against 121
    and 132, throughput level. A decode step between the two, tried, kept the time between tokens
    but lost the gain in time to first token to the extra steps.
    """
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as wait_for

    from ..generation.engine import PromptRequest

    preparing: collections.deque = collections.deque()  # (future of prepare_prompts, its requests), oldest first
    held: collections.deque = collections.deque()  # (request, PreparedPrompt): accepted, not queued in the engine yet
    cancelled: set[str] = set()  # aborted while still being prepared
    budget = engine.config.max_num_batched_tokens
    preparer = ThreadPoolExecutor(1, thread_name_prefix="phivision-prepare")
    try:
        while True:
            if preparing and not engine.has_unfinished() and not held:
                wait_for([preparing[0][0]])  # nothing to step until the oldest preparation is done
            # Block while idle; otherwise take whatever has arrived.
            received = []
            if commands.poll(None if not (engine.has_unfinished() or preparing or held) else 0):
                received.append(commands.recv())
                while commands.poll(0):
                    received.append(commands.recv())
            for command in received:
                kind = command[0]
                if kind == "stop":
                    return
                if kind == "add":
                    requests = [PromptRequest(prompt, images, params, crops, request_id)
                                for request_id, prompt, images, params, crops in command[1]]
                    preparing.append((preparer.submit(engine.prepare_prompts, requests), requests))
                elif kind == "abort":
                    request_id = command[1]
                    if engine.abort(request_id):
                        events.send(("aborted", request_id, _stats(engine)))
                    elif (entry := next((e for e in held if e[0].request_id == request_id), None)) is not None:
                        held.remove(entry)  # its vision tower never runs
                        events.send(("aborted", request_id, _stats(engine)))
                    elif any(request.request_id == request_id for _, requests in preparing for request in requests):
                        cancelled.add(request_id)
            while preparing and preparing[0][0].done():
                for request, item in _prepared(*preparing.popleft()):
                    request_id = request.request_id
                    if isinstance(item, BaseException):
                        events.send(("refused", request_id, "input" if isinstance(item, PhiVisionError) else "internal",
                                     str(item)))
                    else:
                        events.send(("accepted", request_id, len(item.prompt_ids)))
                        if request_id in cancelled:
                            # The sequence the server knows for a request cancelled right after it started.
                            events.send(("aborted", request_id, _stats(engine)))
                        else:
                            held.append((request, item))
                    cancelled.discard(request_id)
            now = []
            backlog = engine.scheduler.num_prefill_tokens_left
            while held and (backlog < budget or not _needs_vision(engine, held[0][1])):
                now.append(held.popleft())
                backlog += len(now[-1][1].prompt_ids)
            if now:
                _queue(engine, now, events)
            if not engine.has_unfinished():
                events.send(("stats", _stats(engine)))
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001
                # A failed step leaves no trustworthy state for its requests: end them all with the
                # error, free their blocks, and keep serving new requests.
                traceback.print_exc()
                ended = [rid for rid in list(engine._requests)]
                for request_id in ended:
                    engine.abort(request_id)
                events.send(("outputs", [(rid, None, True, "abort", f"the engine failed while generating: {exc}", None)
                                         for rid in ended], _stats(engine)))
                continue
            packed = [(out.request_id, out.token_id, out.finished, out.finish_reason, out.error, out.cached_prompt_tokens)
                      for out in outputs]
            events.send(("outputs", packed, _stats(engine)))
    finally:
        # Stopping (or the server gone): queued preparations are dropped, not decoded first.
        preparer.shutdown(wait=False, cancel_futures=True)


def _prepared(future, requests: list) -> list[tuple[Any, Any]]:
    """(request, PreparedPrompt or the exception that refuses it) for each of a finished
    preparation's requests (`Engine.prepare_prompts` has checked their lengths)."""
    try:
        return list(zip(requests, future.result()))
    except Exception as exc:  # noqa: BLE001 - a bug in preparation: refuse its requests, keep serving
        traceback.print_exc()
        return [(request, RuntimeError(f"could not prepare the request: {exc}")) for request in requests]


def _needs_vision(engine, item) -> bool:
    """Whether queueing this prepared request runs the vision tower (an image not in the feature cache)."""
    return any(key not in engine.image_cache for key in item.image_keys)


def _queue(engine, entries: list[tuple[Any, Any]], events) -> None:
    """Queues accepted requests in the engine (their vision tower runs here, one batch per crop
    count); one that fails now (the vision tower out of memory, say) ends at once with the error."""
    try:
        results: list[Any] = engine.add_prepared([item for _, item in entries])
    except Exception as exc:  # noqa: BLE001 - a bug: end them all, and none may run unreported
        traceback.print_exc()
        for request, _ in entries:
            engine.abort(request.request_id)
        results = [RuntimeError(f"could not start the request: {exc}")] * len(entries)
    failed = [(request.request_id, None, True, "abort", str(result), None)
              for (request, _), result in zip(entries, results) if isinstance(result, BaseException)]
    if failed:
        events.send(("outputs", failed, _stats(engine)))
