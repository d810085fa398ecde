"""The model against the reference's golden outputs on the tiny checkpoint (golden/tiny-model).

The reference computed in float32 from the bf16-stored weights upcast, so we load with
dtype=float32. Inputs are the golden input_ids (exact) and the images through our image
preprocessor. Tolerances (golden README): logit rows 1e-4 absolute, logsumexp / row sums 1e-5
relative, argmax identical everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phivision.generation.kv_cache import DenseKVCache
from phivision.processing.image import preprocess_images
from phivision.weights import load_model

CASE_IDS = [
    "text_only",
    "one_image_nc4",
    "two_images_nc4",
    "multi_turn_nc1",
    "long_text_over_64",
    "text_crossing_64_during_generation",
]
LOGIT_ATOL = 1e-4
REL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def golden(tiny_golden: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_golden / "logits.safetensors"))


@pytest.fixture(scope="module")
def cases(tiny_manifest: dict) -> dict[str, dict]:
    return {case["id"]: case for case in tiny_manifest["cases"]}


@pytest.fixture(scope="module")
def inputs(cases: dict, processor_golden: Path) -> dict[str, dict]:
    """Per case: input_ids (1, T) and, with images, pixel_values / image_sizes from our preprocessor."""
    out = {}
    for case_id, case in cases.items():
        item = {"input_ids": torch.tensor([case["expected"]["input_ids"]])}
        if case["images"]:
            images = [Image.open(processor_golden / path) for path in case["images"]]
            batch = preprocess_images(images, case["num_crops"])
            assert batch.image_sizes.tolist() == case["expected"]["image_sizes_hw"]
            item.update(pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
        out[case_id] = item
    return out


@pytest.fixture(scope="module")
def logits(model, inputs: dict) -> dict[str, torch.Tensor]:
    """One full forward per case (no cache), shared by the tests below."""
    out = {}
    with torch.inference_mode():
        for case_id, item in inputs.items():
            ids = item["input_ids"]
            before = ids.clone()
            out[case_id] = model(**item)[0]
            assert torch.equal(ids, before), "forward modified the caller's input_ids"
    return out


def test_every_case_is_covered(cases):
    assert sorted(cases) == sorted(CASE_IDS)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_logits_match(case_id, cases, logits, golden):
    ours = logits[case_id]  # (T, V)
    case = cases[case_id]
    assert ours.shape == (case["expected"]["length"], 32064)
    assert torch.equal(ours.argmax(-1), golden[f"{case_id}__argmax"]), "argmax differs"
    rows_at = golden[f"{case_id}__rows_at"]
    torch.testing.assert_close(ours[rows_at], golden[f"{case_id}__rows"], atol=LOGIT_ATOL, rtol=0)
    ours64 = ours.double()
    torch.testing.assert_close(torch.logsumexp(ours64, -1), golden[f"{case_id}__logsumexp"], rtol=REL, atol=0)
    abs_sum = golden[f"{case_id}__rowabssum"]
    torch.testing.assert_close(ours64.abs().sum(-1), abs_sum, rtol=REL, atol=0)
    # A row sum can be near zero, so its error is measured against the row's absolute sum.
    assert ((ours64.sum(-1) - golden[f"{case_id}__rowsum"]).abs() <= REL * abs_sum).all()
    stats = case["expected"]["logits"]
    assert abs(ours64.sum().item() - stats["total_sum"]) <= REL * stats["total_abs_sum"]


def test_clip_features_and_image_embeddings(model, inputs, golden, cases):
    item = inputs["one_image_nc4"]
    expected_clip = golden["one_image_nc4__clip_patch_features"][0]  # (N+1, 576, C) incl. padding slots
    num_real = 1 + item["image_sizes"][0].prod().item() // 336**2
    with torch.inference_mode():
        clip = model.vision_tower(item["pixel_values"][0, :num_real])  # only the real crops, as encode_images runs them
        embeds = model.encode_images(item["pixel_values"], item["image_sizes"])[0]
    torch.testing.assert_close(clip, expected_clip[:num_real], atol=LOGIT_ATOL, rtol=0)
    expected = golden["one_image_nc4__image_embeds"]  # (757, hidden), in prompt order
    assert embeds.shape == expected.shape
    # The projector output reaches |x| ~ 600, where one float32 ulp is 6e-5: the bound is relative to
    # the tensor's scale, and the input CLIP features above already agree within 1e-4. Float32 matrix
    # products sum in an order that depends on the CPU's kernels: 1.0e-6 of the scale on one machine,
    # 2.7e-6 on a Xeon with AVX-512 FP16 (a wrong operation would be off by the scale itself).
    scale = expected.abs().max().item()
    assert (embeds - expected).abs().max().item() <= 1e-5 * scale


def test_skipping_padding_crops_changes_nothing(model, processor_golden):
    """No golden case has zero padding slots, so the golden images are re-run with num_crops 8:
    our tower skips the padding slots; the reference's way (every slot through CLIP, padding
    discarded afterwards) must give the same features."""
    images = [Image.open(processor_golden / "images" / name) for name in ("chelsea.png", "strip_4000x30.png")]
    batch = preprocess_images(images, 8)
    pixel_values, image_sizes = batch.pixel_values, batch.image_sizes
    grids = [(h // 336, w // 336) for h, w in image_sizes.tolist()]
    num_real = [1 + rows * cols for rows, cols in grids]
    assert any(n < pixel_values.shape[1] for n in num_real), "expected padding slots"
    with torch.inference_mode():
        ours = model.encode_images(pixel_values, image_sizes)
        every_slot = model.vision_tower(pixel_values.flatten(0, 1)).unflatten(0, pixel_values.shape[:2])
        merged = [model.projector.layout(every_slot[i, :n], *grids[i]) for i, n in enumerate(num_real)]
        reference = model.projector(torch.cat(merged)).split([m.shape[0] for m in merged])
    assert [f.shape[0] for f in ours] == batch.num_image_tokens
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=0, rtol=1e-6)


@pytest.mark.parametrize("case_id", ["text_only", "one_image_nc4", "multi_turn_nc1", "long_text_over_64"])
def test_greedy_tokens_from_one_forward(case_id, model, inputs, cases):
    """These cases never cross the 64-token original context while generating, so greedy decoding
    equals the argmax of one forward over prompt + generated tokens (causal attention)."""
    item = dict(inputs[case_id])
    new_tokens = cases[case_id]["expected"]["greedy_new_tokens"]
    prompt = item["input_ids"]
    item["input_ids"] = torch.cat([prompt, torch.tensor([new_tokens[:-1]])], dim=1)
    with torch.inference_mode():
        picks = model(**item, logits_to_keep=len(new_tokens))[0].argmax(-1)
    assert picks.tolist() == new_tokens


def test_cached_decode_equals_full_forward(model, inputs, cases):
    item = inputs["one_image_nc4"]
    new_tokens = torch.tensor([cases["one_image_nc4"]["expected"]["greedy_new_tokens"][:6]])
    prompt = item["input_ids"]
    full_ids = torch.cat([prompt, new_tokens], dim=1)
    with torch.inference_mode():
        features = model.encode_images(item["pixel_values"], item["image_sizes"])
        full = model(full_ids, image_features=features)[0]
        cache = DenseKVCache.for_model(model.config, batch=1, max_len=full_ids.shape[1], dtype=torch.float32, device="cpu")
        steps = [model(prompt, image_features=features, cache=cache)[0]]
        for t in range(new_tokens.shape[1]):
            steps.append(model(new_tokens[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=LOGIT_ATOL, rtol=0)


def test_generation_across_the_original_context_with_one_reprefill(model, inputs, cases):
    """The 47-token prompt's greedy continuation crosses 64 tokens: cached decoding with short
    factors, then (once, when the sequence first exceeds 64) cache reset and a re-prefill of
    everything with long factors, then cached decoding again (spec §6.8, Phi-3.5's fix)."""
    case = cases["text_crossing_64_during_generation"]
    expected = case["expected"]["greedy_new_tokens"]
    original_max = model.config.text.original_max_position_embeddings
    ids = inputs["text_crossing_64_during_generation"]["input_ids"]
    cache = DenseKVCache.for_model(model.config, batch=1, max_len=ids.shape[1] + len(expected), dtype=torch.float32, device="cpu")
    generated, reprefills = [], 0
    with torch.inference_mode():
        step_logits = model(ids, cache=cache, logits_to_keep=1)
        while len(generated) < len(expected):
            token = int(step_logits[0, -1].argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if cache.length <= original_max < ids.shape[1]:
                cache.reset()
                reprefills += 1
                step_logits = model(ids, cache=cache, logits_to_keep=1)
            else:
                step_logits = model(ids[:, -1:], cache=cache)
    assert reprefills == 1
    assert generated == expected


def test_left_padded_batch_rows_match_the_golden_logits(model, inputs, golden):
    """text_only (10 tokens) left-padded next to multi_turn_nc1 (337 tokens, one image)."""
    short, long = inputs["text_only"], inputs["multi_turn_nc1"]
    length = long["input_ids"].shape[1]
    pad = length - short["input_ids"].shape[1]
    ids = torch.cat([torch.full((1, pad), 32000), short["input_ids"]], dim=1)
    ids = torch.cat([ids, long["input_ids"]])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        batch = model(ids, positions=positions, attention_mask=mask, pixel_values=long["pixel_values"], image_sizes=long["image_sizes"])
    for row, case_id, offset in ((0, "text_only", pad), (1, "multi_turn_nc1", 0)):
        rows_at = golden[f"{case_id}__rows_at"] + offset
        torch.testing.assert_close(batch[row, rows_at], golden[f"{case_id}__rows"], atol=LOGIT_ATOL, rtol=0)
        assert torch.equal(batch[row, offset:].argmax(-1), golden[f"{case_id}__argmax"])
