"""Prompt processing against the reference processor's golden outputs (golden/processor/manifest.json).

input_ids, lengths, image sizes, tokenizer chunks and chat-template texts must match exactly;
validation cases must fail (as PromptError) for the same reasons.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

from phivision.errors import PromptError
from phivision.processing.chat import ChatTemplate, render_chat
from phivision.processing.prompt import Processor
from phivision.processing.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def _run(processor_golden: Path, tokenizer: Tokenizer, case: dict):
    processor = Processor(tokenizer=tokenizer, num_crops=case["num_crops"])
    images = [str(processor_golden / image) for image in case["images"]] or None
    return processor(case["prompt"], images)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    return [(key, len(list(group))) for key, group in itertools.groupby(ids) if key < 0]


# One test per case; test_case_counts fails if the manifest grows, so no case goes unchecked.
NUM_PROMPT_CASES = 7
NUM_TOKENIZER_CHECKS = 5


def test_case_counts(processor_manifest):
    assert len(processor_manifest["prompt_cases"]) == NUM_PROMPT_CASES
    assert len(processor_manifest["tokenizer_checks"]) == NUM_TOKENIZER_CHECKS


@pytest.fixture(params=range(NUM_PROMPT_CASES))
def prompt_case(request, processor_manifest) -> dict:
    return processor_manifest["prompt_cases"][request.param]


def test_prompt_cases(prompt_case, processor_golden, tokenizer):
    expected = prompt_case["expected"]
    inputs = _run(processor_golden, tokenizer, prompt_case)
    ids = inputs.input_ids[0].tolist()
    assert inputs.input_ids.shape == (1, expected["length"])
    assert ids == expected["input_ids"], prompt_case["id"]
    assert expected["attention_mask_all_ones"] and inputs.attention_mask.tolist() == [[1] * expected["length"]]
    if "image_sizes_hw" not in expected:
        assert inputs.pixel_values is None and inputs.image_sizes is None
        return
    assert inputs.image_sizes.tolist() == expected["image_sizes_hw"]
    assert list(inputs.pixel_values.shape) == expected["pixel_values_shape"]
    stats = expected["pixel_values_stats"]
    values = inputs.pixel_values.double()
    assert values.abs().sum().item() == pytest.approx(stats["abs_sum"], rel=1e-6)
    assert values.square().sum().item() == pytest.approx(stats["sum_sq"], rel=1e-6)
    # The plain sum cancels; compare it on the scale of the absolute sum.
    assert values.sum().item() == pytest.approx(stats["sum"], abs=1e-6 * stats["abs_sum"])
    assert values.min().item() == pytest.approx(stats["min"], abs=1e-6)
    assert values.max().item() == pytest.approx(stats["max"], abs=1e-6)


def test_images_out_of_order_runs_follow_tag_numbers(processor_manifest, processor_golden, tokenizer):
    """`<|image_2|>` before `<|image_1|>`: runs are -2 (image 2's length) then -1 (image 1's length).

    These ids equal the reference's. The reference's bug is not in the ids but in the model, which
    writes image features into the placeholder positions in order of appearance (so image 1's 757
    features would land in the 781 positions of -2). Our model assigns by the id's number instead;
    this test pins the id layout that makes that possible.
    """
    case = next(c for c in processor_manifest["prompt_cases"] if c["id"] == "images_out_of_order")
    inputs = _run(processor_golden, tokenizer, case)
    ids = inputs.input_ids[0].tolist()
    assert ids == case["expected"]["input_ids"]
    assert _runs(ids) == [(-2, inputs.num_image_tokens[1]), (-1, inputs.num_image_tokens[0])]
    assert inputs.num_image_tokens[0] != inputs.num_image_tokens[1]  # the case only bites with unequal lengths


@pytest.fixture(params=range(NUM_TOKENIZER_CHECKS))
def tokenizer_check(request, processor_manifest) -> dict:
    return processor_manifest["tokenizer_checks"][request.param]


def test_tokenizer_checks(tokenizer_check, processor_golden, tokenizer):
    expected = tokenizer_check["expected"]
    for chunk in expected["chunks"]:
        assert tokenizer.encode(chunk["text"]) == chunk["ids"], chunk["text"]
        assert tokenizer.tokens(chunk["text"]) == chunk["tokens"], chunk["text"]
    inputs = _run(processor_golden, tokenizer, tokenizer_check)
    assert inputs.input_ids[0].tolist() == expected["input_ids"]
    assert inputs.input_ids.shape[1] == expected["length"]
    assert inputs.num_image_tokens == expected["num_img_tokens"]


def test_chat_template_checks(processor_manifest, tokenizer):
    template = ChatTemplate.from_tokenizer(tokenizer)
    cases = processor_manifest["chat_template_checks"]
    assert cases
    for case in cases:
        rendered = render_chat(template, case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert rendered.prompt == case["expected_text"]
        assert rendered.images == []


def _reference_facts(message: str) -> list[str]:
    """The parts of a reference error message ours must also state: the bad tag list, or the counts."""
    listed = re.search(r"cannot be (\[.*\])$", message)
    if listed:
        return [str(ast.literal_eval(listed.group(1)))]
    counts = re.search(r"got \d+ image tags and \d+ images", message)
    assert counts, f"unexpected reference message: {message}"
    return [counts.group(0)]


def test_error_cases(processor_manifest, processor_golden, tokenizer):
    cases = processor_manifest["error_cases"]
    assert cases
    for case in cases:
        expected = case["expected"]
        if expected["raises"] is None:
            inputs = _run(processor_golden, tokenizer, case)
            ids = inputs.input_ids[0].tolist()
            assert len(ids) == expected["input_ids_length"], case["id"]
            assert sum(i < 0 for i in ids) == expected["num_negative_ids"], case["id"]
            continue
        with pytest.raises(PromptError) as info:
            _run(processor_golden, tokenizer, case)
        assert isinstance(info.value, ValueError)
        for fact in _reference_facts(expected["message"]):
            assert fact in str(info.value), (case["id"], str(info.value))


def test_no_images_loaded_when_tags_are_wrong(processor_manifest, processor_golden, tokenizer, monkeypatch):
    """Validation happens before any image is read, so a bad prompt costs nothing."""
    import phivision.processing.prompt as prompt_module

    monkeypatch.setattr(prompt_module, "load_image", lambda *a, **k: pytest.fail("image loaded before validation"))
    case = next(c for c in processor_manifest["error_cases"] if c["id"] == "tags_gap")
    with pytest.raises(PromptError):
        _run(processor_golden, tokenizer, case)


def test_golden_lengths_are_self_consistent(processor_manifest):
    """Guards the data itself: each case's id list has the recorded length."""
    for case in processor_manifest["prompt_cases"] + processor_manifest["tokenizer_checks"]:
        assert len(case["expected"]["input_ids"]) == case["expected"]["length"]


def test_tiny_model_prompts_and_decoded_text(tiny_manifest, tiny_checkpoint, processor_golden):
    """The tiny checkpoint's own tokenizer files: prompt ids and the reference's decoded greedy text."""
    for case in tiny_manifest["cases"]:
        expected = case["expected"]
        processor = Processor.from_pretrained(tiny_checkpoint, num_crops=case["num_crops"])
        images = [str(processor_golden / image) for image in case["images"]] or None
        assert processor(case["prompt"], images).input_ids[0].tolist() == expected["input_ids"], case["id"]
        text = processor.tokenizer.decode(expected["greedy_new_tokens"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert text == expected["greedy_text"], case["id"]
