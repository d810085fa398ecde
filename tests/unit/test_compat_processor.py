"""The model card's processor code, run against phivision.compat with only the import line changed."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from PIL import Image

from phivision.compat import AutoProcessor
from phivision.processing.prompt import ModelInputs


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=True, num_crops=4)


def _image() -> Image.Image:
    return Image.new("RGB", (120, 90), (40, 120, 200))


def test_model_card_flow(processor):
    images = [_image()]
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"

    inputs = processor(prompt, images, return_tensors="pt").to("cpu")
    assert isinstance(inputs, Mapping) and isinstance(inputs, ModelInputs)
    assert set(inputs.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)  # num_crops 4 -> 5 slots
    prompt_len = inputs["input_ids"].shape[1]

    # What generate() would return: the prompt then new ids; the card slices the prompt off.
    answer = processor.tokenizer.encode("A blue square.<|end|>", add_special_tokens=False) + [processor.tokenizer.eos_token_id]
    generate_ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)[:, prompt_len:]
    response = processor.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    assert response == "A blue square."


def test_num_crops_default_comes_from_the_checkpoint(tiny_checkpoint):
    assert AutoProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=True).num_crops == 4
    assert AutoProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=True, num_crops=16).num_crops == 16


def test_tokenizer_attributes(processor):
    tok = processor.tokenizer
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (32000, 1, 32000)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|end|>") == 32007 and tok.convert_tokens_to_ids(["<s>", "<|user|>"]) == [1, 32010]
    assert tok.convert_ids_to_tokens(32001) == "<|assistant|>"


def test_apply_chat_template_tokenized_has_no_added_bos(processor):
    messages = [{"role": "user", "content": "What is this?"}]
    ids = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # "<|user|>\nWhat is this?<|end|>\n<|assistant|>\n" is [1, 32010, ...] with BOS (tokenizer README);
    # transformers encodes a rendered template without adding special tokens.
    assert ids == [32010, 1724, 338, 445, 29973, 32007, 32001]
    as_tensor = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    assert as_tensor.tolist() == [ids]
    # transformers' default is add_generation_prompt=False
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == "<|user|>\nWhat is this?<|end|>\n"


def test_tokenizer_call(processor):
    encoded = processor.tokenizer("Hello world, this is a test.")
    assert encoded["input_ids"] == [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889]
    assert encoded["attention_mask"] == [1] * 9
    batch = processor.tokenizer(["a b", "c d"], return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids"][:, 0].tolist() == [1, 1]
    with pytest.raises(ValueError, match="different lengths"):
        processor.tokenizer(["a", "a much longer text"], return_tensors="pt")


def test_decode_defaults_follow_transformers(processor):
    ids = processor.tokenizer("<|user|>\nHi<|end|>\n")["input_ids"]
    assert processor.decode(ids, skip_special_tokens=True) == "Hi"
    assert "<|end|>" in processor.decode(ids)  # transformers keeps special tokens by default
    assert processor.tokenizer.decode(torch.tensor(ids), skip_special_tokens=True) == "Hi"
    assert processor.batch_decode([ids, ids[:3]], skip_special_tokens=True) == ["Hi", "Hi"]
    spaced = processor.tokenizer.encode("Hi , there .", add_special_tokens=False)
    assert processor.decode(spaced, clean_up_tokenization_spaces=True) == "Hi, there."
    assert processor.decode(spaced, clean_up_tokenization_spaces=False) == "Hi , there ."


def test_several_prompts_are_left_padded(processor):
    inputs = processor(["<|image_1|>\nLook.", "Only text here, and a bit more of it than that."], [[_image()], None])
    assert inputs["input_ids"].shape[0] == 2
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    assert inputs["attention_mask"][lengths.index(min(lengths)), 0] == 0  # padding sits on the left


def test_unsupported_tensor_type(processor):
    with pytest.raises(ValueError, match="return_tensors"):
        processor("hi", return_tensors="np")
