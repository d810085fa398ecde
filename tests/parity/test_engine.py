"""The batched paged engine reproduces the reference's greedy tokens, alone and together.

On the CPU the engine runs the same scheduler, block manager and runner as on CUDA (the kernels
fall back to their PyTorch references), so these tests check the bookkeeping end to end:
chunked prefill across image runs, prefix caching, preemption, the LongRoPE re-prefill, abort.
"""

from __future__ import annotations

import pytest
import torch

from phivision.errors import ImageLoadError, PromptError
from phivision.generation.engine import Engine, EngineConfig
from phivision.generation.sampling import SamplingParams
from phivision.processing.prompt import Processor
from phivision.weights import load_model

GREEDY_24 = SamplingParams(max_new_tokens=24, stop_token_ids=(32000,))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Processor.from_pretrained(str(tiny_checkpoint))


def _engine(model, processor, **overrides):
    settings = dict(max_num_seqs=8, block_size=16, kv_cache_tokens=8192, max_num_batched_tokens=1024, prefill_chunk_size=512)
    return Engine(model, processor, EngineConfig(**{**settings, **overrides}))


def _drain(engine, ids):
    """Steps the engine until it has no work; the new tokens of each request in `ids`."""
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    return [tokens[rid] for rid in ids]


def _run(engine, cases, processor_golden, params=GREEDY_24):
    ids = [engine.add_prompt(c["prompt"], [str(processor_golden / p) for p in c["images"]], params, num_crops=c["num_crops"])
           for c in cases]
    return _drain(engine, ids)


def test_all_golden_cases_batched_with_chunked_prefill(model, processor, tiny_manifest, processor_golden):
    engine = _engine(model, processor)
    results = _run(engine, tiny_manifest["cases"], processor_golden)
    for case, tokens in zip(tiny_manifest["cases"], results):
        assert tokens == case["expected"]["greedy_new_tokens"], case["id"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_each_golden_case_alone(model, processor, tiny_manifest, processor_golden):
    engine = _engine(model, processor, max_num_seqs=1)
    for case in tiny_manifest["cases"]:
        assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"], case["id"]


def test_small_pool_preempts_and_still_matches(model, processor, tiny_manifest, processor_golden):
    cases = [c for c in tiny_manifest["cases"] if c["id"] in ("text_only", "long_text_over_64", "multi_turn_nc1",
                                                              "text_crossing_64_during_generation")]
    # Room for about one and a half of these sequences at a time: decodes must preempt others.
    engine = _engine(model, processor, kv_cache_tokens=16 * 28, max_num_seqs=4)
    results = _run(engine, cases, processor_golden)
    for case, tokens in zip(cases, results):
        assert tokens == case["expected"]["greedy_new_tokens"], case["id"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_repeated_prompt_hits_the_prefix_cache(model, processor, tiny_manifest, processor_golden, monkeypatch):
    case = next(c for c in tiny_manifest["cases"] if c["id"] == "one_image_nc4")
    engine = _engine(model, processor)
    first = _run(engine, [case], processor_golden)[0]
    starts = []
    prefill_many = engine.runner.prefill_many
    monkeypatch.setattr(engine.runner, "prefill_many",
                        lambda chunks, long_rope: starts.extend(c.start for c in chunks) or prefill_many(chunks, long_rope))
    second = _run(engine, [case], processor_golden)[0]
    assert first == second == case["expected"]["greedy_new_tokens"]
    # Only the last partial block of the 769-token prompt was computed again; the image came from the cache.
    assert starts == [768 // 16 * 16]
    assert engine.image_cache.hits == 1


def test_abort_frees_blocks_at_once(model, processor):
    engine = _engine(model, processor)
    rid = engine.add_prompt("<|user|>\nTell me a long story.<|end|>\n<|assistant|>\n", [], SamplingParams(max_new_tokens=200))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    assert engine.abort(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert not engine.has_unfinished()


def test_over_the_limit_is_refused_before_work(model, processor):
    engine = _engine(model, processor, max_model_len=64)
    with pytest.raises(PromptError, match="max_new_tokens"):
        engine.add_prompt("<|user|>\nHi<|end|>\n<|assistant|>\n", [], SamplingParams(max_new_tokens=100))
    assert not engine.has_unfinished()


def test_add_prompts_batches_vision_and_isolates_bad_requests(model, processor, tiny_manifest, processor_golden, monkeypatch):
    """Several prompts added together: one vision-tower call per crop count, the golden tokens for
    each, and a refused request (an unreadable image) does not take the others down."""
    from phivision.generation import engine as engine_module
    from phivision.generation.engine import PromptRequest

    calls = []
    real_encode = engine_module.encode_images
    monkeypatch.setattr(engine_module, "encode_images",
                        lambda model, images, crops, cache, keys=None, tower=None, staged=None: calls.append((len(images), crops))
                        or real_encode(model, images, crops, cache, keys, tower, staged))
    engine = _engine(model, processor)
    cases = [c for c in tiny_manifest["cases"] if c["images"]]
    requests = [PromptRequest(c["prompt"], [str(processor_golden / p) for p in c["images"]], GREEDY_24, c["num_crops"])
                for c in cases]
    bad = PromptRequest("<|user|>\n<|image_1|>\nx<|end|>\n<|assistant|>\n", [b"not an image"], GREEDY_24, 4)
    results = engine.add_prompts([requests[0], bad, *requests[1:]])
    assert isinstance(results[1], ImageLoadError), results[1]
    assert not isinstance(results[0], Exception) and all(not isinstance(r, Exception) for r in results[2:])
    assert len(calls) == len({c["num_crops"] for c in cases})  # one call per crop count
    tokens = {rid: [] for rid in results if isinstance(rid, str)}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    ids = [results[0], *results[2:]]
    for case, rid in zip(cases, ids):
        assert tokens[rid] == case["expected"]["greedy_new_tokens"], case["id"]


def test_pixels_staged_while_preparing_for_images_not_cached(model, processor, tiny_manifest, processor_golden, monkeypatch):
    """A GPU engine copies each uncached image's RGB pixels into pinned memory in the preparing half
    (forced here on a CPU engine, unpinned): they are the image's pixels, an image already cached
    gets none, and the requests still produce their golden tokens."""
    import numpy as np

    from phivision.generation import engine as engine_module
    from phivision.generation.engine import PromptRequest
    from phivision.processing.image import staged_rgb
    from phivision.processing.loading import load_image

    monkeypatch.setattr(engine_module, "staged_rgb", lambda image, pin_memory: staged_rgb(image, pin_memory=False))
    engine = _engine(model, processor)
    assert engine.stage_when_preparing is False  # on the CPU the float pipeline works from PIL's resize
    engine.stage_when_preparing = True
    cases = [c for c in tiny_manifest["cases"] if c["images"]]
    requests = [PromptRequest(c["prompt"], [str(processor_golden / p) for p in c["images"]], GREEDY_24, c["num_crops"])
                for c in cases]
    prepared = engine.prepare_prompts(requests)
    for case, item in zip(cases, prepared):
        assert len(item.staged) == len(case["images"])
        for path, pixels in zip(case["images"], item.staged):
            assert np.array_equal(pixels.numpy(), np.asarray(load_image(str(processor_golden / path)).convert("RGB")))
    ids = engine.add_prepared(prepared)
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    for case, rid in zip(cases, ids):
        assert tokens[rid] == case["expected"]["greedy_new_tokens"], case["id"]
    again = engine.prepare_prompts(requests[:1])[0]  # its images are in the feature cache now
    assert again.staged == [None] * len(cases[0]["images"])
    # A lone image decodes through libspng (when installed) into an RGB array, staged as it is and
    # carried instead of a PIL image: the same pixels, the same tokens.
    from phivision.processing import png

    case = next(c for c in cases if len(c["images"]) == 1)
    path = processor_golden / case["images"][0]
    alone = PromptRequest(case["prompt"], [path.read_bytes()], GREEDY_24, case["num_crops"])
    (item,) = engine.prepare_prompts([alone])
    truecolour = png.decode_truecolour(path.read_bytes(), load_image(path).size) is not None
    assert isinstance(item.images[0], np.ndarray) == truecolour
    assert np.array_equal(item.staged[0].numpy(), np.asarray(load_image(path).convert("RGB")))
    (rid,) = engine.add_prepared([item], use_image_cache=False)
    assert _drain(engine, [rid])[0] == case["expected"]["greedy_new_tokens"]


def test_prepared_on_another_thread_while_stepping(model, processor, tiny_manifest, processor_golden):
    """prepare_prompts (the CPU half) runs on a worker thread while earlier requests decode;
    add_prepared then queues them: every request still gets its golden tokens, and a request whose
    image cannot be read comes back as its error from the preparation, not as a failure of the batch."""
    from concurrent.futures import ThreadPoolExecutor

    from phivision.generation.engine import PreparedPrompt, PromptRequest

    engine = _engine(model, processor)
    cases = [c for c in tiny_manifest["cases"] if c["images"]]
    first, rest = cases[0], cases[1:]
    (first_id,) = engine.add_prompts([PromptRequest(first["prompt"], [str(processor_golden / p) for p in first["images"]],
                                                    GREEDY_24, first["num_crops"])])
    tokens = {first_id: []}
    requests = [PromptRequest(c["prompt"], [str(processor_golden / p) for p in c["images"]], GREEDY_24, c["num_crops"])
                for c in rest]
    requests.append(PromptRequest("<|user|>\n<|image_1|>\nx<|end|>\n<|assistant|>\n", [b"\x89PNG broken"], GREEDY_24, 4))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.prepare_prompts, requests)
        steps = 0
        while engine.has_unfinished() and (steps == 0 or not future.done()):  # at least one step beside it
            for out in engine.step():
                if out.token_id is not None:
                    tokens[out.request_id].append(out.token_id)
            steps += 1
        prepared = future.result()
    assert all(isinstance(p, PreparedPrompt) for p in prepared[:-1])
    assert isinstance(prepared[-1], ImageLoadError), prepared[-1]
    results = engine.add_prepared(prepared)
    assert results[-1] is prepared[-1]
    tokens.update({rid: [] for rid in results[:-1]})
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    for case, rid in zip(cases, [first_id, *results[:-1]]):
        assert tokens[rid] == case["expected"]["greedy_new_tokens"], case["id"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_image_keys_by_file_bytes_or_by_pixels(model, processor, tiny_manifest, processor_golden):
    """Encoded bytes (and data: URIs) are keyed by the file, paths by the pixels (a file on disk may
    change); a second request with the same bytes takes its features from the cache and gets the
    same tokens as the path did."""
    import base64

    from phivision.generation.engine import PromptRequest
    from phivision.generation.image_cache import encoded_image_key, image_key
    from phivision.processing.loading import load_image

    case = next(c for c in tiny_manifest["cases"] if c["id"] == "one_image_nc4")
    path = processor_golden / case["images"][0]
    data = path.read_bytes()
    engine = _engine(model, processor)
    by_path, by_bytes, by_uri = engine.prepare_prompts([
        PromptRequest(case["prompt"], [str(path)], GREEDY_24, case["num_crops"]),
        PromptRequest(case["prompt"], [data], GREEDY_24, case["num_crops"]),
        PromptRequest(case["prompt"], ["data:image/png;base64," + base64.b64encode(data).decode()], GREEDY_24,
                      case["num_crops"]),
    ])
    assert by_path.image_keys == [image_key(load_image(str(path)), case["num_crops"])]
    assert by_bytes.image_keys == [encoded_image_key(data, case["num_crops"])]
    assert by_uri.image_keys[0] not in (by_path.image_keys[0], by_bytes.image_keys[0])
    first = engine.add_prepared([by_bytes])
    second = engine.add_prepared([by_bytes])  # the same bytes again (a new request id)
    assert engine.image_cache.hits == 1 and engine.image_cache.misses == 1
    tokens = {first[0]: [], second[0]: []}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
    assert tokens[first[0]] == tokens[second[0]] == case["expected"]["greedy_new_tokens"]


def test_a_failing_vision_batch_refuses_only_its_requests(model, processor, tiny_manifest, processor_golden, monkeypatch):
    """One vision batch per crop count: when the second one fails (out of memory, say), its requests
    are refused with the error and the first batch's requests run to their golden tokens."""
    from phivision.generation import engine as engine_module
    from phivision.generation.engine import PromptRequest

    cases = [c for c in tiny_manifest["cases"] if c["images"]]
    by_crops = {}
    for c in cases:
        by_crops.setdefault(c["num_crops"], c)
    assert len(by_crops) >= 2, "the golden cases cover two crop counts"
    (crops_a, case_a), (crops_b, case_b) = list(by_crops.items())[:2]
    real_encode = engine_module.encode_images
    calls = []

    def failing_second(model, images, crops, cache, keys=None, tower=None, staged=None):
        calls.append(crops)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_encode(model, images, crops, cache, keys, tower, staged)

    monkeypatch.setattr(engine_module, "encode_images", failing_second)
    engine = _engine(model, processor)
    results = engine.add_prompts([PromptRequest(c["prompt"], [str(processor_golden / p) for p in c["images"]], GREEDY_24,
                                                c["num_crops"]) for c in (case_a, case_b)])
    assert isinstance(results[0], str)
    assert isinstance(results[1], RuntimeError) and "out of memory (simulated)" in str(results[1])
    tokens = []
    while engine.has_unfinished():
        tokens += [out.token_id for out in engine.step() if out.token_id is not None and out.request_id == results[0]]
    assert tokens == case_a["expected"]["greedy_new_tokens"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_one_lazily_opened_image_shared_by_many_requests(model, processor, tiny_manifest, processor_golden):
    """The same PIL image object, opened but not yet decoded, in several requests prepared together
    (decoding runs on several threads): every request gets it, decoded once."""
    from PIL import Image

    from phivision.generation.engine import PreparedPrompt, PromptRequest

    case = next(c for c in tiny_manifest["cases"] if c["id"] == "one_image_nc4")
    lazy = Image.open(processor_golden / case["images"][0])
    engine = _engine(model, processor)
    prepared = engine.prepare_prompts([PromptRequest(case["prompt"], [lazy], GREEDY_24, case["num_crops"])] * 12)
    assert all(isinstance(p, PreparedPrompt) for p in prepared), [p for p in prepared if isinstance(p, Exception)][:1]
    assert len({p.image_keys[0] for p in prepared}) == 1


def test_peak_activation_estimate_runs_the_largest_forwards(model, monkeypatch):
    """The KV-pool sizing's measurement (CUDA only; its memory counters faked here) runs a full
    vision batch and a full prefill step through the model, and adds a continued chunk's gathered
    context for the engine's max_model_len; the vision and prefill peaks are measured apart (the
    vision tower's CUDA graphs keep theirs beside the prefill's)."""
    from phivision.generation import engine as engine_module

    peaks = iter([1000 + 4321, 1000 + 777])  # the vision batch's peak, then the prefill step's
    for name, fake in [("synchronize", lambda device=None: None), ("memory_allocated", lambda device=None: 1000),
                       ("reset_peak_memory_stats", lambda device=None: None),
                       ("max_memory_allocated", lambda device=None: next(peaks)), ("empty_cache", lambda: None)]:
        monkeypatch.setattr(torch.cuda, name, fake)
    seen = {}
    encode, forward = model.encode_images, model.forward

    def spy_encode(pixels, sizes, tower=None):
        seen["crops"] = tuple(pixels.shape[:2])  # (images, crop slots)
        return encode(pixels, sizes, tower)

    def spy_forward(ids, **kwargs):
        seen["tokens"] = ids.shape[1]
        return forward(ids, **kwargs)

    monkeypatch.setattr(model, "encode_images", spy_encode)
    monkeypatch.setattr(model, "forward", spy_forward)
    peak = engine_module._peak_activation_bytes(model, EngineConfig(max_num_batched_tokens=96), max_model_len=80)
    text = model.config.text
    assert seen == {"crops": (engine_module.MAX_VISION_BATCH_CROPS // 5, 5), "tokens": 80}  # capped at max_model_len
    assert peak == (4321, 777 + 2 * 2 * 80 * text.num_attention_heads * text.head_dim * 4)  # float32 here


class _ReplayOnCpu:
    """Stands in for a captured decode graph on the CPU: a replay runs the step into the graph's
    static logits and ends with the argmax over its own input ids, as the captured graph does
    (runner._DecodeGraph.capture), so the runner's bookkeeping around replays runs here too."""

    def __init__(self, runner, graph):
        self.runner, self.graph = runner, graph

    def replay(self):
        self.graph.logits.copy_(self.graph.run_eager(self.runner))
        torch.argmax(self.graph.logits, dim=-1, out=self.graph.argmax)


def _lookahead_engine(model, processor, replayed: bool, **overrides):
    """An engine with lookahead decode; `replayed`: its decode steps go through _ReplayOnCpu."""
    engine = _engine(model, processor, lookahead_decode=True, **overrides)
    if replayed:
        runner = engine.runner
        for graph in runner._graphs.values():
            graph.logits = torch.empty(graph.batch, model.config.text.vocab_size)
            graph.graph = _ReplayOnCpu(runner, graph)
    return engine


@pytest.mark.parametrize("replayed", [False, True])
def test_lookahead_decode_gives_the_golden_tokens(model, processor, tiny_manifest, processor_golden, replayed, monkeypatch):
    # Small blocks: sequences often cross into a new block, where no step is queued ahead.
    engine = _lookahead_engine(model, processor, replayed, block_size=16)
    from phivision.generation.runner import _DecodeGraph

    uploads = []
    upload = _DecodeGraph.upload
    monkeypatch.setattr(_DecodeGraph, "upload", lambda self, keep_ids=False: uploads.append(keep_ids) or upload(self, keep_ids))
    results = _run(engine, tiny_manifest["cases"], processor_golden)
    for case, tokens in zip(tiny_manifest["cases"], results):
        assert tokens == case["expected"]["greedy_new_tokens"], case["id"]
    used, queued = engine.num_lookahead_steps["used"], engine.num_lookahead_steps["queued"]
    assert 0 < used <= queued
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    # With replays, a greedy step queued ahead reads the tokens the step before left in its inputs.
    assert any(uploads) == replayed and not all(uploads)


def _scripted(engine):
    """Two requests decode; a third arrives mid-decode; the second is aborted later; a fourth stops early."""
    prompt = "<|user|>\nTell me a long story about {}.<|end|>\n<|assistant|>\n"
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    rids = [engine.add_prompt(prompt.format("a cat"), [], params), engine.add_prompt(prompt.format("a dog"), [], params)]
    tokens = {}
    for step in range(200):
        if step == 6:
            rids.append(engine.add_prompt(prompt.format("a bird"), [], params))
        if step == 10:
            assert engine.abort(rids[1])
        if step == 12:
            rids.append(engine.add_prompt(prompt.format("a fish"), [], SamplingParams(max_new_tokens=3, ignore_eos=True)))
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.token_id is not None:
                tokens.setdefault(out.request_id, []).append(out.token_id)
    return [tokens.get(rid, []) for rid in rids]


@pytest.mark.parametrize("replayed", [False, True])
def test_lookahead_decode_survives_arrivals_aborts_and_finishes(model, processor, replayed):
    plain = _scripted(_engine(model, processor, lookahead_decode=False))
    engine = _lookahead_engine(model, processor, replayed)
    ahead = _scripted(engine)
    assert ahead == plain
    assert [len(t) for t in ahead][::2] == [30, 30]
    assert engine.num_lookahead_steps["used"] > 0
    assert engine.num_lookahead_steps["queued"] > engine.num_lookahead_steps["used"]  # some were dropped
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


@pytest.mark.parametrize("replayed", [False, True])
def test_lookahead_rows_of_a_stopped_sequence_are_left_out(model, processor, monkeypatch, replayed):
    prompt = "<|user|>\nTell me a long story about {}.<|end|>\n<|assistant|>\n"

    def run(engine, stop_a):
        rid_a = engine.add_prompt(prompt.format("a cat"), [], SamplingParams(max_new_tokens=30, stop_token_ids=stop_a))
        rid_b = engine.add_prompt(prompt.format("a dog"), [], SamplingParams(max_new_tokens=30, ignore_eos=True))
        rid_c = engine.add_prompt(prompt.format("a cow"), [], SamplingParams(max_new_tokens=30, ignore_eos=True))
        return _drain(engine, [rid_a, rid_b, rid_c])

    free = run(_engine(model, processor, lookahead_decode=False), (-1,))
    stop = free[0][6]  # the first request stops at this token's first occurrence, mid-decode
    plain = run(_engine(model, processor, lookahead_decode=False), (stop,))
    engine = _lookahead_engine(model, processor, replayed)
    selected = []
    select = engine.runner.select_tokens
    monkeypatch.setattr(engine.runner, "select_tokens", lambda tokens, rows: selected.append(list(rows)) or select(tokens, rows))
    assert run(engine, (stop,)) == plain
    assert plain[0][-1] == stop and len(plain[0]) < 30 and len(plain[1]) == len(plain[2]) == 30
    assert selected == [[1, 2]]  # the step queued for all three served the other two
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_lookahead_with_sampling_unless_seeded(model, processor):
    prompt = "<|user|>\nTell me a long story about {}.<|end|>\n<|assistant|>\n"

    def run(engine, params):
        return _drain(engine, [engine.add_prompt(prompt.format(animal), [], params) for animal in ("a cat", "a dog")])

    # Unseeded and alike: the batch is sampled on the device in one go and runs ahead.
    engine = _engine(model, processor, lookahead_decode=True)
    sampled = run(engine, SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, ignore_eos=True))
    assert [len(t) for t in sampled] == [20, 20]
    assert engine.num_lookahead_steps["used"] > 0
    # Seeded: each request draws from its own generator, row by row, and never runs ahead, so its
    # draws are those of the engine without lookahead.
    seeded = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    engine = _engine(model, processor, lookahead_decode=True)
    assert run(engine, seeded) == run(_engine(model, processor, lookahead_decode=False), seeded)
    assert engine.num_lookahead_steps["queued"] == 0


def test_replayed_lookahead_feeds_sampled_tokens_not_the_argmax(model, processor):
    """A replayed step always ends with the argmax in its input ids; a sampled batch queued after it
    must still be fed its samples. Same seed, same draws: with and without replays alike."""
    prompt = "<|user|>\nTell me a long story about {}.<|end|>\n<|assistant|>\n"

    def run(engine, params):
        return _drain(engine, [engine.add_prompt(prompt.format(animal), [], params) for animal in ("a cat", "a dog")])

    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, ignore_eos=True)
    results = []
    for replayed in (False, True):
        torch.manual_seed(3)
        engine = _lookahead_engine(model, processor, replayed)
        results.append(run(engine, sampled))
        assert engine.num_lookahead_steps["used"] > 0
    assert results[0] == results[1]
    greedy = run(_lookahead_engine(model, processor, True), SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert greedy != results[0]


def test_prefill_attention_padded_to_buckets_gives_the_golden_tokens(model, processor, tiny_manifest, processor_golden,
                                                                      monkeypatch):
    """The cuDNN path's padding (one prompt from its start, attention on a whole bucket of rows, the
    rows past the prompt zero): on the CPU the same padded tensors go through SDPA, so this checks
    that the padding never reaches a real row. Small buckets make every golden prompt take it."""
    from phivision.generation import kv_cache, runner as runner_module

    monkeypatch.setattr(runner_module, "CUDNN_PREFILL_MIN_TOKENS", 1)
    monkeypatch.setattr(runner_module, "CUDNN_PREFILL_BUCKET", 48)
    padded = []
    original = kv_cache.PagedBatch._attend_padded

    def spy(self, layer_idx, x, *args):
        if layer_idx == 0:
            padded.append((x.shape[1], self.pad_to))
        return original(self, layer_idx, x, *args)

    monkeypatch.setattr(kv_cache.PagedBatch, "_attend_padded", spy)
    engine = _engine(model, processor, max_num_seqs=1, cudnn_prefill=True, enable_prefix_caching=False)
    assert engine.runner.prefill_buckets()[:2] == [48, 96]
    for case in tiny_manifest["cases"]:
        assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"], case["id"]
    assert len(padded) >= len(tiny_manifest["cases"])  # every prompt (and a LongRoPE re-prefill)
    assert all(pad_to % 48 == 0 and 0 <= pad_to - length < 48 for length, pad_to in padded)
    assert any(pad_to > length for length, pad_to in padded)  # some prompt had padding rows
    # Chunks that do not start their sequence keep the plain path.
    engine = _engine(model, processor, max_num_seqs=1, cudnn_prefill=True, prefill_chunk_size=64)
    padded.clear()
    case = max(tiny_manifest["cases"], key=lambda c: len(c["images"]))
    assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"]
    assert len(padded) == 1  # only the chunk at position 0, of the several this prompt needs
    assert engine.num_steps["prefill"] > 1


def test_prefill_attention_through_flash4_gives_the_golden_tokens(model, processor, tiny_manifest, processor_golden,
                                                                  monkeypatch):
    """The FlashAttention-4 path's plumbing, on the CPU: a stand-in with FA4's calling convention
    ((1, T, H, D) strided views of the projection rows in, (out, lse) back) computes the reference's
    attention, so this checks the views, the rotary and cache write before it, and the reshape
    after. Every prompt prefilled from its start must take it, and chunks that continue a prompt
    must not."""
    from phivision.generation import runner as runner_module
    from phivision.kernels import flash4
    from phivision.model.language import attention

    calls = []

    def stand_in(q, k, v, causal):
        assert causal and q.shape[0] == 1 and q.shape[1:] == k.shape[1:] == v.shape[1:]
        assert q.stride(-1) == 1 and q.stride(1) == 3 * q.shape[2] * q.shape[3]  # rows of the qkv product, no copy
        calls.append(q.shape[1])
        out = attention(*(t.transpose(1, 2) for t in (q, k, v)), mask=None, is_causal=True)  # (1, H, T, D)
        return out.transpose(1, 2), None

    monkeypatch.setattr(flash4, "_flash_attn_func", stand_in)
    monkeypatch.setattr(runner_module, "FLASH4_PREFILL_MIN_TOKENS", 1)  # the golden prompts are short
    engine = _engine(model, processor, max_num_seqs=1, flash4_prefill=True, enable_prefix_caching=False)
    assert engine.runner.config.flash4_prefill
    layers = model.config.text.num_hidden_layers
    for case in tiny_manifest["cases"]:
        calls.clear()
        assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"], case["id"]
        # the last layer attends at the last row only (the decode kernel), the others through FA4
        assert len(calls) % (layers - 1) == 0 and calls, case["id"]
    engine = _engine(model, processor, max_num_seqs=1, flash4_prefill=True, prefill_chunk_size=64)
    calls.clear()
    case = max(tiny_manifest["cases"], key=lambda c: len(c["images"]))
    assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"]
    assert engine.num_steps["prefill"] > 1
    assert len(calls) == layers - 1 and calls[0] <= 64  # only the chunk at position 0
    # Under the length threshold, a prompt keeps SDPA.
    monkeypatch.setattr(runner_module, "FLASH4_PREFILL_MIN_TOKENS", 10_000)
    calls.clear()
    case = tiny_manifest["cases"][0]
    assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"]
    assert not calls


def test_flash4_is_chosen_only_where_it_runs(model):
    """Auto: never on the CPU or in float32, and an explicit setting wins. With FA4, cuDNN's plans
    are built for the lengths under FA4's threshold only."""
    from phivision.generation.engine import _use_cudnn_prefill, _use_flash4_prefill
    from phivision.generation.runner import CUDNN_PREFILL_BUCKET, FLASH4_PREFILL_MIN_TOKENS, ModelRunner, RunnerConfig
    from phivision.kernels import flash4

    assert not flash4.supported(torch.device("cpu"), torch.bfloat16, 96)
    assert not _use_flash4_prefill(model, EngineConfig())
    assert _use_flash4_prefill(model, EngineConfig(flash4_prefill=True))
    assert _use_cudnn_prefill(model, EngineConfig(flash4_prefill=True, cudnn_prefill=True))
    both = ModelRunner(model, RunnerConfig(num_blocks=8, block_size=16, max_model_len=64, cudnn_prefill=True,
                                           flash4_prefill=True))
    cudnn_only = ModelRunner(model, RunnerConfig(num_blocks=8, block_size=16, max_model_len=64, cudnn_prefill=True))
    assert both.prefill_buckets()[-1] == -(-(FLASH4_PREFILL_MIN_TOKENS - 1) // CUDNN_PREFILL_BUCKET) * CUDNN_PREFILL_BUCKET
    assert cudnn_only.prefill_buckets()[-1] == 16384 and both.prefill_buckets()[0] == cudnn_only.prefill_buckets()[0]


def test_a_broken_flash4_install_falls_back_to_sdpa(model, processor, tiny_manifest, processor_golden, monkeypatch):
    """Auto mode runs FA4's kernel once first; if that raises, the engine warns and keeps SDPA."""
    from phivision.kernels import flash4

    def broken(q, k, v, causal):
        raise RuntimeError("cannot load libcute_dsl_runtime.so")

    monkeypatch.setattr(flash4, "_flash_attn_func", broken)
    monkeypatch.setattr(flash4, "supported", lambda device, dtype, head_dim: True)
    with pytest.warns(RuntimeWarning, match="libcute_dsl_runtime"):
        engine = _engine(model, processor, max_num_seqs=1)
    assert not engine.runner.config.flash4_prefill
    case = tiny_manifest["cases"][0]
    assert _run(engine, [case], processor_golden)[0] == case["expected"]["greedy_new_tokens"]


def test_a_burst_of_image_requests_is_prefilled_in_whole_prompts(model, processor, tiny_manifest, processor_golden,
                                                                  monkeypatch):
    """W4's shape on the tiny model: six image requests at once, a step budget that holds two of
    them. No prompt is started on the tokens before its image run, so every prefill step holds
    whole prompts from position 0, which attend in one packed call; each gets the golden tokens."""
    from phivision.generation import runner as runner_module
    from phivision.kernels import paged_attention

    chunks, packed_calls = [], []
    original, packed = runner_module.ModelRunner.prefill_many, paged_attention.packed_causal_attention

    def spy(self, step_chunks, long_rope):
        chunks.append([(chunk.start, len(chunk.token_ids)) for chunk in step_chunks])
        return original(self, step_chunks, long_rope)

    def spy_packed(q, k, v, cu_seqlens, lengths):
        packed_calls.append(list(lengths))
        return packed(q, k, v, cu_seqlens, lengths)

    monkeypatch.setattr(runner_module.ModelRunner, "prefill_many", spy)
    monkeypatch.setattr(paged_attention, "packed_causal_attention", spy_packed)
    case = next(c for c in tiny_manifest["cases"] if len(c["images"]) == 1 and c["num_crops"] == 4)
    length = len(case["expected"]["input_ids"])
    engine = _engine(model, processor, max_num_batched_tokens=2 * length + length // 2, prefill_chunk_size=4096,
                     enable_prefix_caching=False)
    results = _run(engine, [case] * 6, processor_golden)
    assert all(tokens == case["expected"]["greedy_new_tokens"] for tokens in results)
    assert [len(step) for step in chunks] == [2, 2, 2]
    assert all(chunk == (0, length) for step in chunks for chunk in step)
    # one call a layer, but the last, whose attention runs at each prompt's last token only
    assert packed_calls == [[length, length]] * (3 * (model.config.text.num_hidden_layers - 1))

