"""Greedy generation equals the reference's 24 golden tokens, through our API and the compat API.

Covers the KV cache (the golden tokens were made with the reference's cache), the LongRoPE switch
while generating (`text_crossing_64_during_generation` crosses original_max_position_embeddings),
left-padded batches, prefix reuse across turns, streaming and the context checks.
"""

from __future__ import annotations

import pytest
import torch

from phivision.errors import PromptError
from phivision.generation.generate import TokenGenerator, generate, stream_text
from phivision.generation.sampling import SamplingParams
from phivision.processing.prompt import Processor
from phivision.weights import load_model

EOS = 32000  # the model card stops on <|endoftext|> only; so did the golden run
GREEDY_24 = SamplingParams(max_new_tokens=24, stop_token_ids=(EOS,))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def processors(tiny_checkpoint):
    return {n: Processor.from_pretrained(str(tiny_checkpoint), num_crops=n) for n in (1, 4)}


def _inputs(case, processors, processor_golden):
    images = [str(processor_golden / p) for p in case["images"]]
    return processors[case["num_crops"]](case["prompt"], images or None)


def _cases(tiny_manifest):
    return {case["id"]: case for case in tiny_manifest["cases"]}


def test_greedy_tokens_match_every_golden_case(model, processors, tiny_manifest, processor_golden):
    for case in tiny_manifest["cases"]:
        inputs = _inputs(case, processors, processor_golden)
        gen = TokenGenerator(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            GREEDY_24,
            stop_token_ids=[EOS],
            pad_token_id=EOS,
            pixel_values=inputs.get("pixel_values"),
            image_sizes=inputs.get("image_sizes"),
        )
        tokens = [step[0] for step in gen]
        assert tokens == case["expected"]["greedy_new_tokens"], case["id"]


def test_generate_text_matches_golden_text(model, processors, tiny_manifest, processor_golden):
    tokenizer = processors[4].tokenizer
    for case in tiny_manifest["cases"]:
        out = generate(model, tokenizer, _inputs(case, processors, processor_golden), GREEDY_24)[0]
        assert out.token_ids == case["expected"]["greedy_new_tokens"], case["id"]
        assert out.text == case["expected"]["greedy_text"], case["id"]
        assert out.finish_reason == "length"
        assert out.num_prompt_tokens == case["expected"]["length"]


def test_streamed_pieces_join_to_the_generated_text(model, processors, tiny_manifest, processor_golden):
    case = _cases(tiny_manifest)["one_image_nc4"]
    pieces = list(stream_text(model, processors[4].tokenizer, _inputs(case, processors, processor_golden), GREEDY_24))
    assert len(pieces) > 1
    assert "".join(pieces) == case["expected"]["greedy_text"]


def test_stop_string_ends_the_answer_early(model, processors, tiny_manifest, processor_golden):
    case = _cases(tiny_manifest)["text_only"]
    full = case["expected"]["greedy_text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible text"
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(EOS,), stop=(stop,))
    out = generate(model, processors[4].tokenizer, _inputs(case, processors, processor_golden), params)[0]
    assert out.text == full[: full.index(stop)]
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < 24


def test_left_padded_batch_equals_each_prompt_alone(model, processors, tiny_manifest, processor_golden):
    cases = _cases(tiny_manifest)
    chosen = [cases["text_only"], cases["one_image_nc4"], cases["text_crossing_64_during_generation"]]
    batch = processors[4].batch(
        [(c["prompt"], [str(processor_golden / p) for p in c["images"]] or None) for c in chosen]
    )
    assert batch["attention_mask"].min() == 0  # really padded
    outs = generate(model, processors[4].tokenizer, batch, GREEDY_24)
    for case, out in zip(chosen, outs):
        assert out.token_ids == case["expected"]["greedy_new_tokens"], case["id"]


def test_next_turn_reuses_the_cached_prefix(model, processors, tiny_manifest, processor_golden):
    case = _cases(tiny_manifest)["multi_turn_nc1"]
    first_turn = case["prompt"][: case["prompt"].index("A chart.")]
    image = [str(processor_golden / case["images"][0])]
    proc = processors[1]
    first = TokenGenerator(
        model, *_ids_mask(proc(first_turn, image)), SamplingParams(max_new_tokens=3), stop_token_ids=[EOS],
        pad_token_id=EOS, **_pixels(proc(first_turn, image)),
    )
    list(first)
    prefix = first.cached_prefix()
    inputs = proc(case["prompt"], image)
    second = TokenGenerator(
        model, *_ids_mask(inputs), GREEDY_24, stop_token_ids=[EOS], pad_token_id=EOS, prefix=prefix, **_pixels(inputs)
    )
    tokens = [step[0] for step in second]
    # The whole first-turn prompt (image included) came from the cache, and the answer is unchanged.
    assert second.num_reused_tokens >= len(proc(first_turn, image)["input_ids"][0]) - 1
    assert tokens == case["expected"]["greedy_new_tokens"]


def _ids_mask(inputs):
    return inputs["input_ids"], inputs["attention_mask"]


def _pixels(inputs):
    return {"pixel_values": inputs.get("pixel_values"), "image_sizes": inputs.get("image_sizes")}


def test_over_the_context_is_refused_before_any_work(model, processors):
    inputs = processors[4]("<|user|>\nHi<|end|>\n<|assistant|>\n")
    context = model.config.text.max_position_embeddings
    with pytest.raises(PromptError, match="max_new_tokens"):
        TokenGenerator(model, inputs["input_ids"], None, SamplingParams(max_new_tokens=context), stop_token_ids=[], pad_token_id=0)
    too_long = torch.ones((1, context + 1), dtype=torch.long)
    with pytest.raises(PromptError, match="over the model's context"):
        TokenGenerator(model, too_long, None, SamplingParams(max_new_tokens=1), stop_token_ids=[], pad_token_id=0)


def test_callers_tensors_are_not_modified(model, processors, tiny_manifest, processor_golden):
    inputs = _inputs(_cases(tiny_manifest)["one_image_nc4"], processors, processor_golden)
    before = {k: v.clone() for k, v in inputs.items()}
    generate(model, processors[4].tokenizer, inputs, SamplingParams(max_new_tokens=4))
    for key, value in inputs.items():
        assert torch.equal(value, before[key]), key


def test_seeded_sampling_is_reproducible(model, processors, tiny_manifest, processor_golden):
    inputs = _inputs(_cases(tiny_manifest)["text_only"], processors, processor_golden)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    a = generate(model, processors[4].tokenizer, inputs, params)[0].token_ids
    b = generate(model, processors[4].tokenizer, inputs, params)[0].token_ids
    c = generate(model, processors[4].tokenizer, inputs, SamplingParams(max_new_tokens=12, temperature=0.9, seed=99))[0].token_ids
    assert a == b
    assert a != c
