"""The engine process's loop (server/async_engine._serve), run on a thread with in-process pipes:
requests are prepared beside the steps, and one aborted while still being prepared is accepted and
aborted at once (what the server expects of a request cancelled right after it started), while the
other request of its batch runs to the end."""

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
def engine(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint), dtype=torch.float32, progress=False)
    processor = Processor.from_pretrained(str(tiny_checkpoint))
    return Engine(model, processor, EngineConfig(max_num_seqs=4, block_size=16, kv_cache_tokens=4096))


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
    server_commands, engine_commands = multiprocessing.Pipe()
    engine_events, server_events = multiprocessing.Pipe()
    loop = threading.Thread(target=_serve, args=(engine, engine_commands, engine_events), daemon=True)
    loop.start()
    try:
        server_commands.send(("add", [("keep", case["prompt"], images, params, case["num_crops"]),
                                      ("drop", case["prompt"], images, params, case["num_crops"])]))
        server_commands.send(("abort", "drop"))
        gate.set()
        seen = _events_until(server_events, lambda m, _: m[0] == "outputs" and any(o[0] == "keep" and o[2] for o in m[1]))
        kinds = [(m[0], m[1]) for m in seen if m[0] in ("accepted", "aborted", "refused")]
        assert kinds == [("accepted", "keep"), ("accepted", "drop"), ("aborted", "drop")], kinds
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
