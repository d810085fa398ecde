"""The server driven by the official `openai` client: plain and streamed answers, usage, models."""

from __future__ import annotations

import pytest

from serverutil import image_message, png_bytes

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


def test_plain_and_streamed_answers_agree(client, server):
    # A long question, so that whole KV blocks follow the image run and the prefix cache can hold them.
    messages = [image_message("Describe this image in detail. " * 20, png_bytes(96, 64, seed=1))]
    plain = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0,
                                           extra_body={"num_crops": 4})
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 16
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 16
    assert plain.id.startswith("chatcmpl-") and plain.object == "chat.completion"

    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"num_crops": 4}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    # The same prompt again: its KV came from the prefix cache (whole blocks, short of the last token).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
