"""Chat template rendering: transformers' Jinja semantics, both message styles, and message validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivision.errors import CheckpointError, PromptError
from phivision.processing.chat import ChatTemplate, normalize_messages, render_chat
from phivision.processing.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def phi_template(tokenizer_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_tokenizer(Tokenizer.from_dir(tokenizer_dir))


# Expected texts are the chat format of spec §8.
def test_single_turn(phi_template):
    messages = [{"role": "user", "content": "<|image_1|>\nDescribe the image."}]
    assert render_chat(phi_template, messages).prompt == "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n"


def test_multi_turn_with_system(phi_template):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<|image_1|>\nWhat animal is this?"},
        {"role": "assistant", "content": "It is a cat."},
        {"role": "user", "content": "What colour is it?"},
    ]
    expected = (
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n<|image_1|>\nWhat animal is this?<|end|>\n"
        "<|assistant|>\nIt is a cat.<|end|>\n<|user|>\nWhat colour is it?<|end|>\n<|assistant|>\n"
    )
    assert render_chat(phi_template, messages).prompt == expected


def test_generation_prompt_only_when_asked(phi_template):
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(phi_template, messages, add_generation_prompt=False).prompt == "<|user|>\nHi<|end|>\n"


def test_model_card_style_returns_no_images(phi_template):
    chat = render_chat(phi_template, [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nCompare."}])
    assert chat.prompt == "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    assert chat.images == []


def test_openai_parts_are_numbered_across_the_conversation(phi_template):
    pixels = object()  # any object load_image accepts; chat.py passes sources through untouched
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And these?"}, {"type": "image_url", "image_url": "b.png"}, {"type": "image", "image": pixels}]},
    ]
    chat = render_chat(phi_template, messages)
    assert chat.prompt == (
        "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\nAnd these?\n<|image_2|>\n<|image_3|>\n<|end|>\n<|assistant|>\n"
    )
    assert chat.images[0] == "data:image/png;base64,AAAA" and chat.images[1] == "b.png" and chat.images[2] is pixels


def test_text_parts_are_joined_by_newlines(phi_template):
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    chat = render_chat(phi_template, messages)
    assert chat.prompt == "<|user|>\none\ntwo<|end|>\n<|assistant|>\n" and chat.images == []


def test_other_message_keys_are_kept():
    template = ChatTemplate("{% for m in messages %}{{ m['name'] }}: {{ m['content'] }}\n{% endfor %}")
    assert template.render([{"role": "user", "name": "ann", "content": "hi"}]) == "ann: hi\n"
    normalized, _ = normalize_messages([{"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]}])
    assert normalized == [{"role": "user", "name": "ann", "content": "hi"}]


@pytest.mark.parametrize(
    ("messages", "fragments"),
    [
        ([], ["non-empty list"]),
        ("hello", ["non-empty list"]),
        ([{"role": "user", "content": "a"}, "oops"], ["message 1", "str"]),
        ([{"role": "tool", "content": "a"}], ["message 0", "'tool'", "'user'"]),
        ([{"role": 3, "content": "a"}], ["message 0", "role"]),
        ([{"content": "a"}], ["message 0", "role", "None"]),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], ["message 1", "no content"]),
        ([{"role": "user", "content": 5}], ["message 0", "int"]),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], ["message 0, part 0", "'audio'"]),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "no type"}]}], ["message 0, part 1", "type"]),
        ([{"role": "user", "content": [{"type": "text", "text": 7}]}], ["message 0, part 0", "text"]),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ["message 0, part 0", "url"]),
        ([{"role": "user", "content": [{"type": "image"}]}], ["message 0, part 0", "image"]),
    ],
)
def test_invalid_messages_name_the_message_and_problem(phi_template, messages, fragments):
    with pytest.raises(PromptError) as info:
        render_chat(phi_template, messages)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_tags_and_image_parts_do_not_mix(phi_template):
    messages = [
        {"role": "user", "content": "<|image_1|>\nfirst"},
        {"role": "user", "content": [{"type": "image_url", "image_url": "a.png"}, {"type": "text", "text": "second"}]},
    ]
    with pytest.raises(PromptError, match="message 0.*not both"):
        render_chat(phi_template, messages)
    tagged_part = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "<|image_1|> again"}]}]
    with pytest.raises(PromptError, match="message 0"):
        render_chat(phi_template, tagged_part)


def test_raise_exception_becomes_a_prompt_error():
    template = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first, please') }}{% endif %}ok")
    assert template.render([{"role": "system", "content": ""}]) == "ok"
    with pytest.raises(PromptError, match="system first, please"):
        template.render([{"role": "user", "content": ""}])


def test_trim_and_lstrip_blocks_like_transformers():
    source = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}"
    # trim_blocks eats the newline after each block tag, lstrip_blocks the indentation before one.
    assert ChatTemplate(source).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a]\n[b]\n"


def test_loop_controls_are_enabled():
    source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
    assert ChatTemplate(source).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"


def test_special_token_variables_and_tojson():
    template = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] | tojson }}{{ eos_token }}", {"bos_token": "<s>", "eos_token": "</s>"})
    assert template.render([{"role": "user", "content": "café"}]) == '<s>"café"</s>'


def test_sandbox_refuses_mutation():
    template = ChatTemplate("{{ messages.append(1) }}")
    with pytest.raises(PromptError):
        template.render([{"role": "user", "content": "a"}])


def test_broken_template_is_a_checkpoint_problem():
    with pytest.raises(CheckpointError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_missing_template(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(CheckpointError, match="chat_template"):
        ChatTemplate.from_tokenizer(tok)
