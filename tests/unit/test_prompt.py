"""Prompt splitting, placeholder expansion, validation, batching and ModelInputs.

Image-token counts used below come from spec §4 (HD h x w -> tokens): 336x336 -> 313 and
336x1344 -> 745, and a 100x100 image at num_crops 1 or 4 becomes 336x336 resp. 672x672 (757).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from phivision.errors import CheckpointError, ImageLoadError, PromptError
from phivision.processing.prompt import (
    ModelInputs,
    Processor,
    check_image_tags,
    expand_image_tags,
    left_pad,
    split_prompt,
    tokenize_prompt,
)
from phivision.processing.tokenizer import Tokenizer

SQUARE_TOKENS_NC1 = 313  # 100x100 at num_crops 1 -> HD 336x336
WIDE_TOKENS_NC4 = 745  # 700x100 at num_crops 4 -> HD 336x1344 (h x w)
SQUARE_TOKENS_NC4 = 757  # 100x100 at num_crops 4 -> HD 672x672
PAD = 32000  # <|endoftext|>, the stand-in's pad token


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def processor(tokenizer_dir: Path) -> Processor:
    return Processor.from_pretrained(tokenizer_dir, num_crops=4)


def _square(colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (100, 100), colour)


def _wide() -> Image.Image:
    return Image.new("RGB", (700, 100), (10, 200, 10))


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """[(negative id, run length)] in order of appearance."""
    return [(key, len(list(group))) for key, group in itertools.groupby(ids) if key < 0]


# -- pure pieces -------------------------------------------------------------------------------


def test_split_prompt():
    split = split_prompt("<|image_1|>a<|image_12|><|image_2|>b <|image|> <|image_x|>")
    assert split.tags == [1, 12, 2]
    assert split.chunks == ["", "a", "", "b <|image|> <|image_x|>"]
    assert split_prompt("no tags").chunks == ["no tags"] and split_prompt("no tags").tags == []


@pytest.mark.parametrize("tags", [[1], [2, 1], [1, 1, 2], [3, 1, 2]])
def test_tags_in_any_order_and_repeated_are_fine(tags):
    check_image_tags(tags, len(set(tags)))


@pytest.mark.parametrize(
    ("tags", "num_images", "fragments"),
    [
        ([2], 1, ["[2]", "missing [1]"]),
        ([1, 3], 2, ["[1, 3]", "missing [2]"]),
        ([1], 2, ["got 1 image tags and 2 images"]),
        ([], 1, ["got 0 image tags and 1 images"]),
        ([1, 1], 0, ["got 1 image tags and 0 images"]),
    ],
)
def test_tag_errors_name_the_problem(tags, num_images, fragments):
    with pytest.raises(PromptError) as info:
        check_image_tags(tags, num_images)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_expand_matches_tags_to_images_by_number():
    chunks = [[1, 10], [1, 11], [1, 12]]
    # <|image_2|> first: its run has image 2's length (5), then image 1's (3).
    assert expand_image_tags(chunks, [2, 1], [3, 5]) == [1, 10] + [-2] * 5 + [1, 11] + [-1] * 3 + [1, 12]
    # With an offset of 2 images, tag k names global image 2 + k.
    assert expand_image_tags(chunks, [2, 1], [9, 9, 3, 5], image_offset=2) == [1, 10] + [-4] * 5 + [1, 11] + [-3] * 3 + [1, 12]
    assert expand_image_tags([[1, 10], [1], [1]], [1, 1], [3]) == [1, 10, -1, -1, -1, 1, -1, -1, -1, 1]


def test_tokenize_prompt_matches_the_documented_example(tok):
    # spec §5 / tokenizer README: with a 757-token image.
    ids = tokenize_prompt(tok, "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [757])
    assert ids == [1, 32010] + [-1] * 757 + [1, 29871, 13, 5618, 338, 445, 29973, 32007, 32001]


def test_left_pad():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], []], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.int64


# -- ModelInputs -------------------------------------------------------------------------------


def test_model_inputs_is_a_mapping_without_absent_keys():
    text_only = ModelInputs(input_ids=torch.ones(1, 3, dtype=torch.int64), attention_mask=torch.ones(1, 3, dtype=torch.int64))
    assert list(text_only) == ["input_ids", "attention_mask"] and len(text_only) == 2
    assert "pixel_values" not in text_only
    with pytest.raises(KeyError):
        text_only["pixel_values"]
    with pytest.raises(KeyError):
        text_only["num_image_tokens"]  # an attribute, not a model argument

    def model(input_ids, attention_mask, pixel_values=None, image_sizes=None):
        return input_ids.shape, pixel_values

    assert model(**text_only) == (torch.Size([1, 3]), None)


def test_model_inputs_to_returns_a_new_object():
    inputs = ModelInputs(
        input_ids=torch.ones(1, 3, dtype=torch.int64),
        attention_mask=torch.ones(1, 3, dtype=torch.int64),
        pixel_values=torch.zeros(1, 2, 3, 336, 336),
        image_sizes=torch.tensor([[336, 336]]),
        num_image_tokens=[313],
    )
    moved = inputs.to("cpu", dtype=torch.bfloat16)
    assert moved is not inputs and set(moved) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert moved.pixel_values.dtype == torch.bfloat16 and inputs.pixel_values.dtype == torch.float32
    assert moved.input_ids.dtype == torch.int64 and moved.num_image_tokens == [313]
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.input_ids = None


# -- the processor -----------------------------------------------------------------------------


def test_single_prompt(processor):
    inputs = processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [_square()])
    expected = [1, 32010] + [-1] * SQUARE_TOKENS_NC4 + [1, 29871, 13, 5618, 338, 445, 29973, 32007, 32001]
    assert inputs.input_ids.tolist() == [expected]
    assert inputs.attention_mask.tolist() == [[1] * len(expected)]
    assert inputs.pixel_values.shape == (1, 5, 3, 336, 336) and inputs.pixel_values.dtype == torch.float32
    assert inputs.image_sizes.tolist() == [[672, 672]] and inputs.num_image_tokens == [SQUARE_TOKENS_NC4]


def test_text_only_prompt_has_no_image_keys(processor, tok):
    inputs = processor("<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert set(inputs) == {"input_ids", "attention_mask"} and inputs.num_image_tokens == []
    assert inputs.input_ids.tolist() == [tok.encode("<|user|>\nHi<|end|>\n<|assistant|>\n")]


def test_one_image_need_not_be_in_a_list(processor):
    assert processor("<|image_1|>x", _square()).input_ids.tolist() == processor("<|image_1|>x", [_square()]).input_ids.tolist()


def test_out_of_order_tags_take_their_own_images_length(processor):
    inputs = processor("<|image_2|> then <|image_1|>", [_square(), _wide()])
    assert _runs(inputs.input_ids[0].tolist()) == [(-2, WIDE_TOKENS_NC4), (-1, SQUARE_TOKENS_NC4)]
    assert inputs.image_sizes.tolist() == [[672, 672], [336, 1344]]  # pixel rows stay in image order


def test_repeated_tag_reuses_the_image(processor):
    ids = processor("<|image_1|> and again <|image_1|>", [_square()]).input_ids[0].tolist()
    assert _runs(ids) == [(-1, SQUARE_TOKENS_NC4), (-1, SQUARE_TOKENS_NC4)]


def test_image_token_literal_is_text(processor):
    ids = processor("a <|image|> b").input_ids[0].tolist()
    assert 32044 in ids and all(i >= 0 for i in ids)


@pytest.mark.parametrize(
    ("prompt", "num_images", "fragment"),
    [
        ("<|image_1|> hi", 0, "got 1 image tags and 0 images"),
        ("hi", 1, "got 0 image tags and 1 images"),
        ("<|image_2|> hi", 1, "[2]"),
    ],
)
def test_prompt_and_images_must_agree(processor, prompt, num_images, fragment):
    with pytest.raises(PromptError) as info:
        processor(prompt, [_square()] * num_images or None)
    assert fragment in str(info.value)


def test_max_length_names_both_numbers(processor):
    prompt = "<|image_1|>\nDescribe."
    length = processor(prompt, [_square()]).input_ids.shape[1]
    assert processor(prompt, [_square()], max_length=length).input_ids.shape[1] == length
    with pytest.raises(PromptError) as info:
        processor(prompt, [_square()], max_length=length - 1)
    assert str(length) in str(info.value) and str(length - 1) in str(info.value)


def test_images_are_loaded_from_paths(processor, tmp_path):
    path = tmp_path / "square.png"
    _square().save(path)
    from_path = processor("<|image_1|>x", [str(path)])
    from_pil = processor("<|image_1|>x", [_square()])
    assert from_path.input_ids.tolist() == from_pil.input_ids.tolist()
    assert torch.equal(from_path.pixel_values, from_pil.pixel_values)


def test_urls_are_refused_unless_allowed(processor):
    with pytest.raises(ImageLoadError):
        processor("<|image_1|>x", ["http://127.0.0.1:9/cat.png"])


# -- batching ----------------------------------------------------------------------------------


def test_batch_rows_equal_single_prompts_with_offset_images(processor):
    requests = [
        ("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [_square()]),
        ("<|user|>\nJust text, a bit longer than the others, to set the width.<|end|>\n<|assistant|>\n", None),
        ("<|image_2|> then <|image_1|>", [_square((0, 0, 255)), _wide()]),
    ]
    batch = processor.batch(requests)
    singles = [processor(prompt, images) for prompt, images in requests]
    offsets = [0, 1, 1]  # images of the rows before each row

    width = max(s.input_ids.shape[1] for s in singles)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, width)
    for row, (single, offset) in enumerate(zip(singles, offsets)):
        ids = single.input_ids[0].tolist()
        shifted = [i - offset if i < 0 else i for i in ids]
        padding = width - len(ids)
        assert batch.input_ids[row].tolist() == [PAD] * padding + shifted
        assert batch.attention_mask[row].tolist() == [0] * padding + [1] * len(ids)

    # Every negative id g names pixel row g-1, whose token count is the run's length.
    assert batch.num_image_tokens == [SQUARE_TOKENS_NC4, SQUARE_TOKENS_NC4, WIDE_TOKENS_NC4]
    assert batch.image_sizes.tolist() == [[672, 672], [672, 672], [336, 1344]]
    assert batch.pixel_values.shape == (3, 5, 3, 336, 336)
    for g, length in _runs(batch.input_ids.flatten().tolist()):
        assert length == batch.num_image_tokens[-g - 1]
    assert torch.equal(batch.pixel_values[1:], torch.cat([singles[2].pixel_values]))
    assert torch.equal(batch.pixel_values[:1], singles[0].pixel_values)


def test_call_accepts_lists_of_prompts(processor):
    prompts = ["<|image_1|>a", "b"]
    via_call = processor(prompts, [[_square()], None])
    via_batch = processor.batch(list(zip(prompts, [[_square()], None])))
    assert torch.equal(via_call.input_ids, via_batch.input_ids)
    assert processor(["x", "yy zz"]).input_ids.shape[0] == 2
    with pytest.raises(PromptError, match="2 prompts"):
        processor(prompts, [[_square()]])


def test_batch_errors_name_the_prompt(processor):
    with pytest.raises(PromptError, match="prompt 1"):
        processor.batch([("<|image_1|>a", [_square()]), ("<|image_1|>b", None)])
    with pytest.raises(PromptError, match="prompt 0 is"):
        processor.batch([("<|image_1|>a", [_square()]), ("b", None)], max_length=10)
    with pytest.raises(PromptError, match="empty"):
        processor.batch([])


# -- construction ------------------------------------------------------------------------------


def test_num_crops_from_the_checkpoint(tiny_checkpoint, tokenizer_dir):
    assert Processor.from_pretrained(tiny_checkpoint).num_crops == 4  # preprocessor_config.json
    assert Processor.from_pretrained(tiny_checkpoint, num_crops=16).num_crops == 16
    assert Processor.from_pretrained(tokenizer_dir).num_crops == 1  # no preprocessor config: the reference's default


def _checkpoint_copy(tokenizer_dir: Path, folder: Path, preprocessor: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def test_preprocessor_config_checks(tokenizer_dir, tmp_path):
    no_key = _checkpoint_copy(tokenizer_dir, tmp_path / "a", {"num_img_tokens": 144})
    assert Processor.from_pretrained(no_key).num_crops == 1
    other_mean = _checkpoint_copy(tokenizer_dir, tmp_path / "b", {"num_crops": 4, "image_mean": [0.5, 0.5, 0.5]})
    with pytest.raises(CheckpointError, match="image_mean"):
        Processor.from_pretrained(other_mean)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_crops"):
            Processor.from_pretrained(no_key, num_crops=bad)


def test_missing_tokenizer_files_are_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json, tokenizer_config.json"):
        Processor.from_pretrained(tmp_path)


def test_from_a_hub_id_in_the_offline_cache(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "models--someone--phi-vision"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _checkpoint_copy(tokenizer_dir, repo / "snapshots" / commit, {"num_crops": 16})
    import phivision.hub as hub

    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    processor = Processor.from_pretrained("someone/phi-vision")
    assert processor.num_crops == 16 and processor.tokenizer.eos_token_id == 32000


# -- chat --------------------------------------------------------------------------------------


def test_apply_chat_template_feeds_the_processor(processor):
    image = _square()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    prompt, images = processor.apply_chat_template(messages)
    assert prompt == "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n" and images == [image]
    inputs = processor(prompt, images)
    assert inputs.input_ids.tolist() == processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n", [_square()]).input_ids.tolist()


def test_decode_skips_placeholders(processor):
    inputs = processor("<|user|>\n<|image_1|>\nWhat is this?<|end|>\n", [_square()])
    assert processor.decode(inputs.input_ids[0]) == "\nWhat is this?"


def test_direct_construction_uses_the_tokenizers_template(tok):
    prompt, images = Processor(tokenizer=tok).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|user|>\nHi<|end|>\n<|assistant|>\n" and images == []


def test_too_long_prompts_fail_before_image_preprocessing(processor, monkeypatch):
    import phivision.processing.prompt as prompt_module

    monkeypatch.setattr(prompt_module, "preprocess_images", lambda *a, **k: pytest.fail("preprocessed a rejected prompt"))
    with pytest.raises(PromptError, match="over the maximum of 100"):
        processor("<|image_1|>\nDescribe.", [_square()], max_length=100)
