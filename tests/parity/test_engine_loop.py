"""The engine process's loop (server/async_engine._serve), run on a thread with in-process pipes:
requests are prepared beside the steps, and one aborted while still being prepared is accepted and
aborted at once (what the server expects of a request cancelled right after it started), while the
other request of its batch runs to the end; a burst of requests is accepted at once and queued in
slices of one prefill step's budget, each slice (its vision tower run) after the previous slice's
prefill, except requests whose images are cached; a failing slice ends only its own requests."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from phivision.generation.engine import Engine, EngineConfig
from phivision.generation.sampling import SamplingParams
from phivision.processing.prompt import Processor
from phivision.server.async_engine import _serve
from phivision.weights import load_model


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint), dtype=torch.float32, progress=False)
    return model, Processor.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def engine(parts):
    return Engine(*parts, EngineConfig(max_num_seqs=4, block_size=16, kv_cache_tokens=4096))


def _start(engine):
    server_commands, engine_commands = multiprocessing.Pipe()
    engine_events, server_events = multiprocessing.Pipe()
    loop = threading.Thread(target=_serve, args=(engine, engine_commands, engine_events), daemon=True)
    loop.start()
    return loop, server_commands, server_events


def _events_until(events, predicate, timeout: float = 60.0) -> list[tuple]:
    seen = []
    while True:
        assert events.poll(timeout), f"no engine message within {timeout} s; got {[m[0] for m in seen]}"
        message = events.recv()
        seen.append(message)
        if predicate(message, seen):
            return seen


def test_abort_while_preparing_and_a_normal_request(engine, tiny_manifest, processor_golden, monkeypatch):
    case = next(c for c in tiny_manifest["cases"] if c["images"])
    images = [(processor_golden / p).read_bytes() for p in case["images"]]  # encoded files, as the server sends them
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    gate = threading.Event()
    real_prepare = engine.prepare_prompts
    prepared_on = []

    def gated_prepare(requests):
        prepared_on.append(threading.current_thread().name)
        assert gate.wait(30), "the test never opened the gate"
        return real_prepare(requests)

    monkeypatch.setattr(engine, "prepare_prompts", gated_prepare)
    real_add, queued = engine.add_prepared, []

    def spy_add(prepared):
        queued.append([item.request.request_id for item in prepared])
        return real_add(prepared)

    monkeypatch.setattr(engine, "add_prepared", spy_add)
    loop, server_commands, server_events = _start(engine)
    try:
        server_commands.send(("add", [("keep", case["prompt"], images, params, case["num_crops"]),
                                      ("drop", case["prompt"], images, params, case["num_crops"])]))
        server_commands.send(("abort", "drop"))
        gate.set()
        seen = _events_until(server_events, lambda m, _: m[0] == "outputs" and any(o[0] == "keep" and o[2] for o in m[1]))
        kinds = [(m[0], m[1]) for m in seen if m[0] in ("accepted", "aborted", "refused")]
        assert [k for k in kinds if k[1] == "keep"] == [("accepted", "keep")], kinds
        assert [k for k in kinds if k[1] == "drop"] == [("accepted", "drop"), ("aborted", "drop")], kinds
        assert queued == [["keep"]]  # the cancelled request never reached the engine (nor its vision tower)
        tokens = [o[1] for m in seen if m[0] == "outputs" for o in m[1] if o[0] == "keep" and o[1] is not None]
        assert len(tokens) == 8
        assert not any(o[0] == "drop" for m in seen if m[0] == "outputs" for o in m[1])
        assert prepared_on and prepared_on[0].startswith("phivision-prepare")  # not the loop's own thread
    finally:
        server_commands.send(("stop",))
        loop.join(30)
    assert not loop.is_alive()
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_a_burst_is_queued_in_slices_of_one_prefill_step(parts, tiny_manifest, processor_golden, monkeypatch):
    """Six image requests in one message, a step budget of two prompts: they are queued
    (their vision tower run) a step's worth at a time, each slice only once the engine has less
    than a step's budget left to prefill, so the first ones are prefilled before the last ones are
    queued; all are accepted at once; every request gets the golden tokens."""
    case = next(c for c in tiny_manifest["cases"] if len(c["images"]) == 1 and c["num_crops"] == 4)
    length = len(case["expected"]["input_ids"])
    budget = 2 * length  # each slice is then exactly one prefill step: the queue is empty after it
    # No feature cache: each request's vision work counts, as for W4's 64 different images (here one
    # image six times, which the cache would hold after the first slice).
    engine = Engine(*parts, EngineConfig(max_num_seqs=8, block_size=16, kv_cache_tokens=8192,
                                         max_num_batched_tokens=budget, prefill_chunk_size=4096,
                                         enable_prefix_caching=False, image_cache_entries=0))
    image = (processor_golden / case["images"][0]).read_bytes()
    new_tokens = len(case["expected"]["greedy_new_tokens"])
    params = SamplingParams(max_new_tokens=new_tokens)
    timeline = []  # in the order the work ran: ("add", ids, prompt tokens left to prefill before it), ("prefill",), ("decode",)
    real_add = engine.add_prepared

    def spy_add(prepared):
        timeline.append(("add", [item.request.request_id for item in prepared], engine.scheduler.num_prefill_tokens_left))
        return real_add(prepared)

    def spy_runner(name):
        real = getattr(engine.runner, name)

        def spy(*args, **kwargs):
            timeline.append(("prefill" if name == "prefill_many" else "decode",))
            return real(*args, **kwargs)
        return spy

    monkeypatch.setattr(engine, "add_prepared", spy_add)
    for name in ("prefill_many", "decode", "decode_queued"):
        monkeypatch.setattr(engine.runner, name, spy_runner(name))
    ids = [f"r{i}" for i in range(6)]
    loop, server_commands, server_events = _start(engine)
    try:
        server_commands.send(("add", [(rid, case["prompt"], [image], params, case["num_crops"]) for rid in ids]))
        seen = _events_until(server_events, lambda m, s: sum(o[2] for x in s if x[0] == "outputs" for o in x[1]) == 6)
    finally:
        server_commands.send(("stop",))
        loop.join(30)
    tokens = {rid: [o[1] for m in seen if m[0] == "outputs" for o in m[1] if o[0] == rid and o[1] is not None] for rid in ids}
    assert all(tokens[rid] == case["expected"]["greedy_new_tokens"] for rid in ids), tokens
    adds = [entry for entry in timeline if entry[0] == "add"]
    assert [rid for _, queued, _ in adds for rid in queued] == ids  # arrival order, each once
    assert [len(queued) for _, queued, _ in adds] == [2, 2, 2]
    assert all(left < budget for _, _, left in adds)
    # Each slice is queued once the one before it has been prefilled: one prefill step between two.
    kinds = [entry[0] for entry in timeline]
    at = [i for i, kind in enumerate(kinds) if kind == "add"]
    assert kinds[:2] == ["add", "prefill"]
    assert all(kinds[a:b].count("prefill") == 1 for a, b in zip(at, at[1:])), kinds
    # Acceptance does not wait for the slice: all six are accepted before any token comes.
    first_output = next(i for i, m in enumerate(seen) if m[0] == "outputs")
    assert [m[1] for m in seen[:first_output] if m[0] == "accepted"] == ids
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_a_request_cancelled_while_held_is_never_queued(parts, tiny_manifest, processor_golden, monkeypatch):
    """The burst above with the last request cancelled while it waits for its slice: it is accepted
    and aborted at once, never reaches the engine, and the others run to the end."""
    case = next(c for c in tiny_manifest["cases"] if len(c["images"]) == 1 and c["num_crops"] == 4)
    length = len(case["expected"]["input_ids"])
    engine = Engine(*parts, EngineConfig(max_num_seqs=8, block_size=16, kv_cache_tokens=8192,
                                         max_num_batched_tokens=2 * length + length // 2, prefill_chunk_size=4096))
    image = (processor_golden / case["images"][0]).read_bytes()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    gate, queued = threading.Event(), []
    real_add, real_step = engine.add_prepared, engine.step

    def spy_add(prepared):
        queued.extend(item.request.request_id for item in prepared)
        return real_add(prepared)

    def gated_step():
        assert gate.wait(30), "the test never opened the gate"
        return real_step()

    monkeypatch.setattr(engine, "add_prepared", spy_add)
    monkeypatch.setattr(engine, "step", gated_step)
    ids = [f"r{i}" for i in range(6)]
    loop, server_commands, server_events = _start(engine)
    try:
        server_commands.send(("add", [(rid, case["prompt"], [image], params, case["num_crops"]) for rid in ids]))
        _events_until(server_events, lambda m, _: m[0] == "accepted" and m[1] == "r2")  # the first slice is queued
        server_commands.send(("abort", "r5"))  # in the pipe before the first step ends
        gate.set()
        seen = _events_until(server_events, lambda m, s: sum(o[2] for x in s if x[0] == "outputs" for o in x[1]) == 5)
    finally:
        server_commands.send(("stop",))
        loop.join(30)
    assert [(m[0], m[1]) for m in seen if m[1] == "r5"] == [("accepted", "r5"), ("aborted", "r5")]
    assert queued == ids[:5]
    finished = [o[0] for m in seen if m[0] == "outputs" for o in m[1] if o[2]]
    assert sorted(finished) == ids[:5]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def _burst(parts, tiny_manifest, processor_golden, monkeypatch, *, fail_first_slice=False, **config):
    """Runs six requests of one image through the loop (budget: two prompts); returns the engine,
    the ids queued by each add_prepared call and the messages seen until all six have ended."""
    case = next(c for c in tiny_manifest["cases"] if len(c["images"]) == 1 and c["num_crops"] == 4)
    length = len(case["expected"]["input_ids"])
    engine = Engine(*parts, EngineConfig(max_num_seqs=8, block_size=16, kv_cache_tokens=8192,
                                         max_num_batched_tokens=2 * length, prefill_chunk_size=4096, **config))
    image = (processor_golden / case["images"][0]).read_bytes()
    params = SamplingParams(max_new_tokens=len(case["expected"]["greedy_new_tokens"]))
    real_add, queued = engine.add_prepared, []

    def spy_add(prepared):
        queued.append([item.request.request_id for item in prepared])
        if fail_first_slice and len(queued) == 1:
            return [RuntimeError("could not run the vision tower: out of memory")] * len(prepared)
        return real_add(prepared)

    monkeypatch.setattr(engine, "add_prepared", spy_add)
    loop, server_commands, server_events = _start(engine)
    try:
        server_commands.send(("add", [(f"r{i}", case["prompt"], [image], params, case["num_crops"]) for i in range(6)]))
        seen = _events_until(server_events, lambda m, s: sum(o[2] for x in s if x[0] == "outputs" for o in x[1]) == 6,
                             timeout=20)
    finally:
        server_commands.send(("stop",))
        loop.join(30)
    tokens = {f"r{i}": [o[1] for m in seen if m[0] == "outputs" for o in m[1] if o[0] == f"r{i}" and o[1] is not None]
              for i in range(6)}
    assert all(tokens[rid] == case["expected"]["greedy_new_tokens"] for rid in tokens if rid not in queued[0] or
               not fail_first_slice), tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    return engine, queued, seen


def test_requests_whose_images_are_cached_are_queued_at_once(parts, tiny_manifest, processor_golden, monkeypatch):
    """One image six times, feature cache and prefix cache on: once the first slice has put the
    image's features in the cache, the other requests have no vision work to spread and are all
    queued at once (prefilled mostly from the prefix cache, in one step), not a step's worth at a
    time."""
    engine, queued, seen = _burst(parts, tiny_manifest, processor_golden, monkeypatch)
    assert queued == [["r0", "r1"], ["r2", "r3", "r4", "r5"]]
    assert [m[1] for m in seen if m[0] == "accepted"] == [f"r{i}" for i in range(6)]


def test_a_slice_that_fails_ends_its_requests_and_the_next_slice_goes_on(parts, tiny_manifest, processor_golden,
                                                                         monkeypatch):
    """The first slice fails as a whole (its vision tower out of memory) while nothing else runs:
    its requests, already accepted, end at once with the error, and the loop goes on to queue the
    others without waiting for another message."""
    engine, queued, seen = _burst(parts, tiny_manifest, processor_golden, monkeypatch, fail_first_slice=True,
                                  image_cache_entries=0)
    assert queued[0] == ["r0", "r1"] and len(queued) == 3
    ends = {o[0]: o for m in seen if m[0] == "outputs" for o in m[1] if o[2]}
    assert [ends[rid][3:5] for rid in ("r0", "r1")] == [("abort", "could not run the vision tower: out of memory")] * 2
    assert all(ends[f"r{i}"][3] != "abort" for i in range(2, 6))


def test_a_prompt_the_pool_can_never_hold_is_refused_before_it_is_held(parts, tiny_manifest, processor_golden,
                                                                        monkeypatch):
    """Refused for its length as soon as it is prepared (an input error, which the server answers
    with 400), never queued in the engine or run through the vision tower."""
    case = next(c for c in tiny_manifest["cases"] if len(c["images"]) == 1 and c["num_crops"] == 4)
    length = len(case["expected"]["input_ids"])
    engine = Engine(*parts, EngineConfig(max_num_seqs=4, block_size=16, kv_cache_tokens=length // 2))
    real_add, queued = engine.add_prepared, []

    def spy_add(prepared):
        queued.append(prepared)
        return real_add(prepared)

    monkeypatch.setattr(engine, "add_prepared", spy_add)
    image = (processor_golden / case["images"][0]).read_bytes()
    loop, server_commands, server_events = _start(engine)
    try:
        server_commands.send(("add", [("big", case["prompt"], [image], SamplingParams(max_new_tokens=4),
                                       case["num_crops"])]))
        seen = _events_until(server_events, lambda m, _: m[0] in ("accepted", "refused"), timeout=20)
    finally:
        server_commands.send(("stop",))
        loop.join(30)
    refused = seen[-1]
    assert refused[:3] == ("refused", "big", "input") and "KV blocks" in refused[3], refused
    assert queued == []
