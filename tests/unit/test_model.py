"""The model on a random tiny checkpoint: cache, padding, LongRoPE per row, image placement, validation."""

from __future__ import annotations

import math

import pytest
import torch

from phivision.errors import PromptError
from phivision.generation.kv_cache import DenseKVCache
from phivision.model.language import build_attention_mask
from phivision.model.projector import add_row_separators, merge_2x2
from phivision.model.rope import LongRopeEmbedding
from phivision.config import ModelConfig
from tiny_phi3v import image_tokens, random_model, random_pixels, tiny_config_dict

ATOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory.mktemp("tiny"))


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _cache(model, batch: int, max_len: int) -> DenseKVCache:
    return DenseKVCache.for_model(model.config, batch=batch, max_len=max_len, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------------------------------------- cache


def test_prefill_then_decode_equals_full_forward(model):
    ids = _ids(12)  # stays under the 16-token original context: one factor set throughout
    full = model(ids)
    cache = _cache(model, 1, 16)
    pieces = [model(ids[:, :7], cache=cache)]
    assert cache.length == 7
    for t in range(7, 12):
        pieces.append(model(ids[:, t : t + 1], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_decode_with_long_factors_equals_full_forward_when_every_call_is_long(model):
    ids = _ids(24, seed=1)
    full = model(ids)  # 24 > 16: long factors
    cache = _cache(model, 1, 24)
    pieces = [model(ids[:, :20], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(20, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_reset_and_reprefill_after_crossing_the_original_context(model):
    """The generator's recipe: when a row crosses original_max, reset the cache and re-run everything."""
    ids = _ids(18, seed=2)
    cache = _cache(model, 1, 18)
    model(ids[:, :16], cache=cache)  # short factors
    stale = model(ids[:, 16:17], cache=cache)  # this call is long, but cached keys were rotated short
    cache.reset()
    fresh = model(ids[:, :17], cache=cache, logits_to_keep=1)
    torch.testing.assert_close(fresh, model(ids[:, :17])[:, -1:], atol=ATOL, rtol=0)
    assert (stale - fresh).abs().max() > 100 * ATOL  # the reset matters
    nxt = model(ids[:, 17:18], cache=cache)
    torch.testing.assert_close(nxt, model(ids)[:, -1:], atol=ATOL, rtol=0)


def test_cache_bookkeeping():
    cache = DenseKVCache(num_layers=2, batch=1, num_heads=2, max_len=5, head_dim=4, dtype=torch.float32, device="cpu")
    k = torch.ones(1, 2, 3, 4)
    keys, values = cache.update(0, k, 2 * k)
    assert keys.shape == (1, 2, 3, 4) and torch.equal(values, 2 * k)
    cache.advance(3)
    keys, _ = cache.update(1, torch.full((1, 2, 2, 4), 5.0), torch.zeros(1, 2, 2, 4))
    assert keys.shape == (1, 2, 5, 4) and torch.equal(keys[:, :, 3:], torch.full((1, 2, 2, 4), 5.0))
    cache.advance(2)
    with pytest.raises(ValueError, match="do not fit"):
        cache.check_room(1)
    cache.crop(2)
    assert cache.length == 2
    with pytest.raises(ValueError):
        cache.crop(3)
    cache.reset()
    assert cache.length == 0


def test_forward_refuses_a_cache_overflow_before_writing(model):
    cache = _cache(model, 1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        model(_ids(5), cache=cache)
    assert cache.length == 0


# ---------------------------------------------------------------------------------------------- padding


def _left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - r.shape[1] :] = r[0]
        mask[i, length - r.shape[1] :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("lengths", [(5, 11), (9, 20)])  # (9, 20): one short row, one long row
def test_left_padded_batch_equals_each_row_alone(model, lengths):
    rows = [_ids(n, seed=n) for n in lengths]
    ids, mask = _left_pad(rows)
    batch_logits = model(ids, positions=_positions(mask), attention_mask=mask)
    for i, row in enumerate(rows):
        alone = model(row)
        torch.testing.assert_close(batch_logits[i, -row.shape[1] :], alone[0], atol=ATOL, rtol=0)

    # And decoding on: one cached step per row.
    cache = _cache(model, 2, ids.shape[1] + 1)
    model(ids, positions=_positions(mask), attention_mask=mask, cache=cache)
    step = torch.tensor([[7], [9]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_logits = model(step, positions=mask.sum(-1, keepdim=True), attention_mask=step_mask, cache=cache)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, step[i : i + 1]], dim=1))
        torch.testing.assert_close(step_logits[i, 0], alone[0, -1], atol=ATOL, rtol=0)


def test_explicit_all_ones_mask_equals_the_causal_fast_path(model):
    ids = _ids(9)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)), model(ids), atol=ATOL, rtol=0)


def test_attention_mask_rule():
    attention_mask = torch.tensor([[0, 1, 1, 1]])
    mask, is_causal = build_attention_mask(attention_mask, past_len=1, num_new=3, sliding_window=None, device=torch.device("cpu"))
    assert not is_causal
    expected = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    # A padding query sees only itself, so its softmax row is never empty.
    mask, _ = build_attention_mask(torch.tensor([[0, 0, 1]]), past_len=0, num_new=3, sliding_window=None, device=torch.device("cpu"))
    assert torch.equal(mask[0, 0], torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool))
    # Sliding window: key k visible from q iff q - k <= window.
    mask, _ = build_attention_mask(None, past_len=0, num_new=4, sliding_window=1, device=torch.device("cpu"))
    assert torch.equal(mask[0, 0], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool))
    assert build_attention_mask(None, past_len=0, num_new=4, sliding_window=8, device=torch.device("cpu")) == (None, True)
    assert build_attention_mask(None, past_len=5, num_new=1, sliding_window=None, device=torch.device("cpu")) == (None, False)


def test_no_nan_from_fully_padded_columns(model):
    ids, mask = _left_pad([_ids(2), _ids(8)])
    logits = model(ids, positions=_positions(mask), attention_mask=mask)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- rope


def test_rope_tables_follow_the_spec():
    config = ModelConfig.from_dict(tiny_config_dict()).text
    rope = LongRopeEmbedding(config)
    positions = torch.tensor([[0, 3, 15], [0, 3, 16]])  # row 0: 16 tokens (short); row 1: 17 (long)
    cos, sin = rope(positions, torch.float32)
    f = math.sqrt(1 + math.log(256 / 16) / math.log(16))
    for row, factors in ((0, config.rope_short_factor), (1, config.rope_long_factor)):
        inv = [1 / (factors[i] * 10000 ** (2 * i / 8)) for i in range(4)]
        for t, p in enumerate(positions[row].tolist()):
            angles = [p * x for x in inv] * 2  # [angle, angle] along the head dim
            torch.testing.assert_close(cos[row, t], torch.tensor([math.cos(a) * f for a in angles]), atol=1e-5, rtol=0)
            torch.testing.assert_close(sin[row, t], torch.tensor([math.sin(a) * f for a in angles]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_positions", [10, 40])  # under and over the tiny model's original context of 16
def test_rope_table_rows_equal_the_computed_rotary_bit_for_bit(dtype, max_positions):
    """A decode step's rotary rows looked up in RopeTables are exactly what forward computes for
    that position and factor set (the tables hold short rows only below the original context)."""
    from phivision.kernels.fused import decode_inputs

    config = ModelConfig.from_dict(tiny_config_dict()).text
    rope = LongRopeEmbedding(config)
    tables = rope.tables(max_positions, dtype)
    original = config.original_max_position_embeddings
    assert tables.short_rows == min(max_positions, original)
    assert tables.cos.shape == (tables.short_rows + (max_positions if max_positions > original else 0), config.head_dim)
    positions = torch.arange(max_positions)[:, None]  # (P, 1): one decode row per position
    use_long = positions[:, 0] + 1 > original  # the runner's rule: the sequence's length over the original context
    embed = torch.randn(50, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.arange(max_positions)[:, None] % 50 - 3  # a few negative: placeholders look up row 0, as _embed's clamp
    embeds, cos, sin = decode_inputs(ids, positions, use_long, embed, tables)
    want_cos, want_sin = rope(positions, dtype, use_long)
    assert cos.dtype == dtype and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert torch.equal(embeds, torch.nn.functional.embedding(ids.clamp(min=0), embed))
    if max_positions > original:  # a short-set row of the same position differs: the lookup honours the flag
        short_cos, _ = decode_inputs(ids[-1:], positions[-1:], torch.tensor([False]), embed, tables)[1:]
        assert not torch.equal(short_cos, cos[-1:])


# ---------------------------------------------------------------------------------------------- images


def _image_ids(runs: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """Text, then for each (image number, count) a run of -number, text between, text at the end."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, 128, (3,), generator=g)]
    for number, count in runs:
        parts += [torch.full((count,), -number), torch.randint(3, 128, (2,), generator=g)]
    return torch.cat(parts)[None]


def test_merge_2x2_order():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 patch grid, channel = patch index
    merged = merge_2x2(grid, 4)
    assert merged.shape == (1, 2, 2, 4)
    assert merged[0, 0, 0].tolist() == [0, 1, 4, 5]
    assert merged[0, 1, 0].tolist() == [8, 9, 12, 13]
    assert merged[0, 0, 1].tolist() == [2, 3, 6, 7]


def test_layout_places_tiles_separators_and_global_view(model):
    """2 x 3 tiles of 2x2 cells: canvas rows of 6 cells + sub_GN, then glb_GN, then the global view."""
    projector = model.projector
    cells, channels = 2, 16
    # Crop c's patch (r, s) holds the value 1000*c + 10*r + s in every channel.
    crop_ids = torch.arange(7.0)[:, None, None] * 1000
    patch = (torch.arange(4.0)[:, None] * 10 + torch.arange(4.0)[None, :]).reshape(1, 16, 1)
    features = (crop_ids + patch).expand(7, 16, channels)
    tokens = projector.layout(features, 2, 3)
    assert tokens.shape == (image_tokens(2, 3), 4 * channels)
    sub_gn, glb_gn = projector.sub_GN.reshape(-1), projector.glb_GN.reshape(-1)
    width = 3 * cells + 1
    lines = tokens[: 2 * cells * width].reshape(2 * cells, width, -1)
    assert all(torch.equal(lines[r, -1], sub_gn) for r in range(2 * cells))
    # Canvas row 2 (tile row 1, cell row 0), column 3 (tile col 1, cell col 1): tile 1*3+1 = 4 -> crop 5.
    assert lines[2, 3, 0].item() == 5000 + 10 * 0 + 2  # first patch of cell (0, 1): patch (0, 2)
    assert lines[2, 3, channels].item() == 5000 + 3  # second: patch (0, 3)
    assert lines[2, 3, 2 * channels].item() == 5000 + 12  # third: patch (1, 2)
    assert torch.equal(tokens[2 * cells * width], glb_gn)
    global_lines = tokens[2 * cells * width + 1 :].reshape(cells, cells + 1, -1)
    assert global_lines[1, 0, 0].item() == 20  # crop 0 (global view), cell (1, 0) -> patch (2, 0)
    assert torch.equal(global_lines[0, -1], sub_gn)


def test_add_row_separators():
    out = add_row_separators(torch.zeros(2, 3, 1), torch.ones(1))
    assert out.flatten().tolist() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_features_go_to_the_image_they_name(model):
    pixel_values, image_sizes = random_pixels([(1, 2), (2, 1)], num_slots=5)
    features = model.encode_images(pixel_values, image_sizes)
    assert [f.shape[0] for f in features] == [image_tokens(1, 2), image_tokens(2, 1)]
    # Tag 2 before tag 1, and tag 2 again: each run takes its own image's features.
    ids = _image_ids([(2, image_tokens(2, 1)), (1, image_tokens(1, 2)), (2, image_tokens(2, 1))])
    original = ids.clone()
    embeds = model.embed(ids, features)
    where = (ids[0] < 0).nonzero().flatten()
    runs = torch.split(where, [image_tokens(2, 1), image_tokens(1, 2), image_tokens(2, 1)])
    torch.testing.assert_close(embeds[0, runs[0]], features[1], atol=0, rtol=0)
    torch.testing.assert_close(embeds[0, runs[1]], features[0], atol=0, rtol=0)
    torch.testing.assert_close(embeds[0, runs[2]], features[1], atol=0, rtol=0)
    text = ids[0] >= 0
    torch.testing.assert_close(embeds[0, text], model.language_model.embed_tokens(ids[0, text]), atol=0, rtol=0)
    # forward from pixels equals forward from precomputed features; the caller's ids stay unchanged
    a = model(ids, pixel_values=pixel_values, image_sizes=image_sizes)
    b = model(ids, image_features=features)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(ids, original)


def test_padding_crops_are_skipped_without_changing_anything(model):
    pixel_values, image_sizes = random_pixels([(1, 1), (1, 3)], num_slots=5)
    ours = model.encode_images(pixel_values, image_sizes)
    # The reference's way: every slot through CLIP (zero crops included), padding discarded afterwards.
    all_slots = model.vision_tower(pixel_values.flatten(0, 1)).unflatten(0, (2, 5))
    merged = [model.projector.layout(all_slots[0, :2], 1, 1), model.projector.layout(all_slots[1, :4], 1, 3)]
    reference = model.projector(torch.cat(merged)).split([m.shape[0] for m in merged])
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # More padding slots change nothing either.
    wider = torch.cat([pixel_values, torch.zeros(2, 3, *pixel_values.shape[2:])], dim=1)
    for a, b in zip(ours, model.encode_images(wider, image_sizes)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_cached_decode_after_an_image_prompt(model):
    pixel_values, image_sizes = random_pixels([(1, 1)], num_slots=2)
    ids = _image_ids([(1, image_tokens(1, 1))])
    ids = torch.cat([ids, _ids(3, seed=5)], dim=1)
    full = model(ids, pixel_values=pixel_values, image_sizes=image_sizes)
    cache = _cache(model, 1, ids.shape[1])
    prefix = ids.shape[1] - 3
    pieces = [model(ids[:, :prefix], pixel_values=pixel_values, image_sizes=image_sizes, cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache, pixel_values=pixel_values, image_sizes=image_sizes) for t in range(prefix, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([(1, image_tokens(1, 1) - 1)], "a run of 12 placeholder ids -1 for image 1, which has 13 tokens"),
        ([(1, image_tokens(1, 1)), (3, 5)], "placeholder id -3 names image 3, but only 2 image"),
    ],
)
def test_bad_placeholder_runs_are_refused(model, runs, message):
    pixel_values, image_sizes = random_pixels([(1, 1), (1, 1)], num_slots=2)
    with pytest.raises(PromptError, match=message):
        model(_image_ids(runs), pixel_values=pixel_values, image_sizes=image_sizes)


def test_placeholders_without_images_are_refused(model):
    with pytest.raises(PromptError, match="no images"):
        model.embed(_image_ids([(1, 4)]))
    with pytest.raises(PromptError, match="pixel_values"):
        model(_image_ids([(1, 4)]))


def test_image_sizes_must_fit_the_crop_slots(model):
    pixel_values, image_sizes = random_pixels([(2, 2)], num_slots=3)
    with pytest.raises(PromptError, match="needs 4 crops plus the global view"):
        model.encode_images(pixel_values, image_sizes)
    with pytest.raises(PromptError, match="not a positive multiple"):
        model.encode_images(pixel_values, torch.tensor([[60, 56]]))


def test_text_only_ignores_unused_pixel_values_and_keeps_ids(model):
    ids = _ids(6)
    pixel_values, image_sizes = random_pixels([(1, 1)], num_slots=2)
    torch.testing.assert_close(model(ids, pixel_values=pixel_values, image_sizes=image_sizes), model(ids), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- misc


def test_logits_to_keep_and_dtype(model):
    ids = _ids(7)
    full = model(ids)
    assert full.dtype == torch.float32 and full.shape == (1, 7, 128)
    torch.testing.assert_close(model(ids, logits_to_keep=2), full[:, -2:], atol=0, rtol=0)


def test_argument_validation(model):
    ids = _ids(4)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="positions must be"):
        model(ids, positions=torch.arange(3)[None])
    with pytest.raises(ValueError, match="either pixel_values"):
        model(ids, pixel_values=torch.zeros(1, 2, 3, 56, 56), image_features=[])
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])


def test_grouped_query_attention_and_bf16(tmp_path):
    config = tiny_config_dict(num_key_value_heads=2)
    gqa = random_model(tmp_path / "gqa", config)
    ids = _ids(10)
    full = gqa(ids)
    cache = _cache(gqa, 1, 10)
    assert cache.keys.shape == (2, 1, 2, 10, 8)
    pieces = [gqa(ids[:, :6], cache=cache)] + [gqa(ids[:, t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
    bf16 = random_model(tmp_path / "bf16", dtype=torch.bfloat16)
    logits = bf16(ids)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_patch_embedding_as_a_matrix_product_equals_the_convolution():
    # The CUDA path computes CLIP's patch embedding as one matrix product; same sums as the conv.
    from phivision.kernels.fused import quick_gelu
    from phivision.model.vision import patch_embed_matmul

    torch.manual_seed(0)
    weight = torch.randn(8, 3, 14, 14, dtype=torch.float64)
    pixels = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(pixels, weight, stride=14).flatten(2).transpose(1, 2)  # (N, P, C)
    got = patch_embed_matmul(pixels, weight)
    assert got.shape == (3, 16, 8)
    torch.testing.assert_close(got, conv, rtol=1e-12, atol=1e-12)
    # A transposed grid (or a wrong tap order) would not match: the check can fail.
    assert not torch.allclose(patch_embed_matmul(pixels.transpose(2, 3), weight), conv)
    x = torch.randn(4, 9)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


def test_vision_tower_carrying_the_residual_equals_the_pre_ln_blocks(model):
    """The tower fuses each residual add with the LayerNorm after it; on the CPU that is the same
    ops in the same order, so its features equal the plain pre-LN blocks, x + attn(LN1(x)) then
    x + MLP(LN2(x)), layer after layer, bit for bit."""
    tower = model.vision_tower
    assert len(tower.encoder.layers) >= 2  # the carry from one block's end into the next is exercised
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixels))
        for layer in tower.encoder.layers:
            h = h + layer.self_attn(layer.layer_norm1(h))
            h = h + layer.mlp(layer.layer_norm2(h))
        assert torch.equal(tower(pixels), h[:, 1:])
