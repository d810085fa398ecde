"""The Python API on the tiny golden checkpoint: chat, streaming, conversations and their caches."""

from __future__ import annotations

import pytest
import torch

import phivision
from phivision.api import PhiVision
from phivision.generation.engine import EngineConfig
from phivision.errors import ImageLoadError, PromptError

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="module")
def pv(tiny_checkpoint) -> PhiVision:
    return phivision.load(str(tiny_checkpoint), device="cpu", progress=False)


@pytest.fixture()
def count_vision(pv, monkeypatch):
    calls = []
    original = pv.model.encode_images

    def counted(pixel_values, image_sizes, tower=None):
        calls.append(pixel_values.shape[0])
        return original(pixel_values, image_sizes, tower)

    monkeypatch.setattr(pv.model, "encode_images", counted)
    return calls


def _user(text, *images):
    return {"role": "user", "content": [{"type": "image", "image": str(i)} for i in images] + [{"type": "text", "text": text}]}


def test_chat_matches_the_golden_greedy_text(pv, tiny_manifest, processor_golden):
    case = next(c for c in tiny_manifest["cases"] if c["id"] == "one_image_nc4")
    messages = [_user("Describe the image.", processor_golden / case["images"][0])]
    result = pv.chat(messages, num_crops=4, max_new_tokens=24, stop_token_ids=[32000])
    assert result.text == case["expected"]["greedy_text"]
    assert result.prompt_tokens == case["expected"]["length"]
    assert result.completion_tokens == 24 and result.finish_reason == "length"
    assert result.image_tokens == 757


def test_stream_joins_to_chat_text(pv):
    messages = [_user("What is shown?", EXAMPLES / "chart.png")]
    pieces = list(pv.stream_chat(messages, num_crops=4, max_new_tokens=12))
    assert "".join(pieces) == pv.chat(messages, num_crops=4, max_new_tokens=12).text


def test_conversation_runs_vision_once_per_distinct_image_and_reuses_kv(pv, count_vision):
    pv.image_cache.clear()
    conv = pv.conversation(num_crops=4)
    first = conv.ask("Describe it.", images=[EXAMPLES / "scene.png"], max_new_tokens=6)
    second = conv.ask("And this one?", images=[EXAMPLES / "chart.png"], max_new_tokens=6)
    third = conv.ask("Which one is brighter?", max_new_tokens=6)
    # scene once, chart once; the third turn re-sends both images and runs no vision at all.
    assert count_vision == [1, 1]
    # The prefix cache works in whole KV blocks: every full block of the previous turn is reused.
    block = pv.engine.config.block_size
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens >= first.prompt_tokens // block * block > 0
    assert third.cached_prompt_tokens >= second.prompt_tokens // block * block
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3
    # The same image in a new, unrelated chat reuses the cached features too.
    pv.chat([_user("Again?", EXAMPLES / "scene.png")], num_crops=4, max_new_tokens=2)
    assert count_vision == [1, 1]


def test_cached_turn_gives_the_same_answer_as_a_fresh_chat(pv):
    conv = pv.conversation(num_crops=4)
    conv.ask("Describe it.", images=[EXAMPLES / "scene.png"], max_new_tokens=5)
    second = conv.ask("Say more.", max_new_tokens=10)
    assert second.cached_prompt_tokens > 0
    uncached = PhiVision(pv.model, pv.processor, engine_config=EngineConfig(
        max_num_seqs=2, max_model_len=2048, kv_cache_tokens=2048, enable_prefix_caching=False))
    fresh = uncached.chat(conv.messages[:-1], num_crops=4, max_new_tokens=10)
    assert fresh.cached_prompt_tokens == 0
    assert second.text == fresh.text


def test_count_tokens_agrees_with_the_prompt(pv):
    messages = [_user("Compare.", EXAMPLES / "chart.png", EXAMPLES / "table.png")]
    assert pv.count_tokens(messages) == pv.chat(messages, max_new_tokens=1).prompt_tokens


def test_stop_string_frees_the_request(pv):
    messages = [_user("Tell a story.")]
    full = pv.chat(messages, max_new_tokens=12).text
    stop = full[4:7]
    assert stop.strip()
    result = pv.chat(messages, max_new_tokens=12, stop=[stop])
    assert result.text == full[: full.index(stop)] and result.finish_reason == "stop"
    assert not pv.engine.has_unfinished()
    assert pv.engine.block_manager.num_free_blocks == pv.engine.block_manager.num_usable_blocks


def test_bad_inputs_raise_clear_errors(pv):
    with pytest.raises(ImageLoadError, match="no-such.png"):
        pv.chat([_user("Hi", "no-such.png")], max_new_tokens=2)
    with pytest.raises(PromptError, match="max_new_tokens"):
        pv.chat([_user("Hi")], max_new_tokens=10**6)
    conv = pv.conversation()
    with pytest.raises(ImageLoadError):
        conv.add_image(b"not an image")
    assert conv.messages == []
    # A misplaced or misspelt keyword is named, with the options that exist.
    with pytest.raises(TypeError, match=r"'images' \(images go in the messages.*max_new_tokens, temperature"):
        pv.chat([_user("Hi")], images=["x.png"])
    with pytest.raises(TypeError, match=r"'max_tokens'.*the sampling options are"):
        conv.ask("Hi", max_tokens=3)
    assert conv.messages == []


def test_seeded_sampling_through_the_api(pv):
    messages = [_user("Tell a story.")]
    a = pv.chat(messages, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5).text
    b = pv.chat(messages, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5).text
    assert a == b


def test_failed_turn_is_dropped_whole(pv):
    conv = pv.conversation(num_crops=4)
    conv.add_image(EXAMPLES / "scene.png")
    with pytest.raises(PromptError):
        conv.ask("Describe it.", max_new_tokens=10**6)
    assert conv.messages == []
    # The image attached to the failed question does not ride along with the next one.
    assert conv.ask("Hello?", max_new_tokens=2).image_tokens == 0
