"""The paged engine path (runner + paged pool) computes the same logits as the plain forward.

On the CPU the paged kernels fall back to their PyTorch references, so this checks the
bookkeeping: slots, block tables, chunked prefill over cached blocks, per-row decode lengths.
"""

from __future__ import annotations

import pytest
import torch

from phivision.generation.runner import DEFAULT_GRAPH_BATCH_SIZES, ModelRunner, RunnerConfig
from phivision.kernels.paged_attention import paged_decode_attention_reference, write_kv
from phivision.processing.prompt import Processor
from phivision.weights import load_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), dtype=torch.float32, progress=False)


def test_chunked_prefill_and_batched_decode_match_full_forward(model, tiny_checkpoint, tiny_manifest, processor_golden):
    cases = {c["id"]: c for c in tiny_manifest["cases"]}
    proc = Processor.from_pretrained(str(tiny_checkpoint), num_crops=4)
    image_case, text_case = cases["one_image_nc4"], cases["long_text_over_64"]
    inputs = proc(image_case["prompt"], [str(processor_golden / image_case["images"][0])])
    features = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
    seqs = [image_case["expected"]["input_ids"], text_case["expected"]["input_ids"]]
    extra = [[5, 77, 901], [42, 7, 3]]  # three decode steps with fixed tokens

    runner = ModelRunner(model, RunnerConfig(num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=1024))
    # Blocks handed out in a scrambled order, never block 0 (reserved for padding).
    free = list(range(63, 0, -1))
    tables = [[free.pop() for _ in range(-(-(len(s) + 3) // 16))][::-1] for s in seqs]

    last_logits = []
    for ids, table, feats in zip(seqs, tables, [features, None]):
        # The image prompt in two chunks; the split sits after the image run, which must stay whole.
        split = 762 if feats is not None else 40
        assert ids[split - 1] >= 0
        long = len(ids) > model.config.text.original_max_position_embeddings  # both prompts: long factors
        runner.prefill(ids[:split], 0, table, feats, long)
        last_logits.append(runner.prefill(ids[split:], split, table, feats, long))

    lengths = [len(s) for s in seqs]
    decoded = []
    for step in range(3):
        tokens = [e[step] for e in extra]
        lengths = [n + 1 for n in lengths]
        decoded.append(runner.decode(tokens, lengths, tables))

    for row, (ids, feats) in enumerate(zip(seqs, [features, None])):
        full = ids + extra[row]
        ref = model(torch.tensor([full]), image_features=feats)[0]  # (T, V)
        assert torch.allclose(last_logits[row], ref[len(ids) - 1], atol=1e-4), (row, (last_logits[row] - ref[len(ids) - 1]).abs().max())
        for step in range(3):
            assert torch.allclose(decoded[step][row], ref[len(ids) + step], atol=1e-4), (row, step)


def test_write_and_reference_decode_round_trip():
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    k_pool = torch.zeros(6, kv_heads, block, dim)
    v_pool = torch.zeros(6, kv_heads, block, dim)
    qkv = torch.randn(5, (heads + 2 * kv_heads) * dim)
    table = torch.tensor([[3, 1]])
    write_kv(qkv, k_pool, v_pool, torch.tensor([12, 13, 14, 15, 4]), heads, kv_heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(5, kv_heads, dim)
    assert torch.equal(k_pool[3, :, 0], k[0]) and torch.equal(k_pool[1, :, 0], k[4])
    out = paged_decode_attention_reference(qkv[4:5], k_pool, v_pool, table, torch.tensor([5]), heads, dim)
    q = qkv[4, : heads * dim].view(heads, 1, dim)
    keys = k.repeat_interleave(2, dim=1).transpose(0, 1)  # (H, 5, D)
    values = qkv[:, (heads + kv_heads) * dim :].view(5, kv_heads, dim).repeat_interleave(2, dim=1).transpose(0, 1)
    expected = ((q @ keys.transpose(1, 2)) / dim**0.5).softmax(-1) @ values
    assert torch.allclose(out.view(heads, dim), expected.view(heads, dim), atol=1e-6)


def test_packed_prefill_of_several_sequences_matches_each_alone(model, tiny_checkpoint, tiny_manifest, processor_golden,
                                                                monkeypatch):
    """Chunks of three sequences in one packed forward: two with their own image 1 (renumbered
    inside the pack), one continuing from cached blocks; each chunk's last logits as if alone. All
    three go through the one packed attention call per layer, and only the continuing chunk is
    then redone over the pool."""
    from phivision.generation.runner import PrefillChunk
    from phivision.kernels import paged_attention

    calls = {"packed": [], "paged": []}
    packed_call, paged_call = paged_attention.packed_causal_attention, paged_attention.paged_prefill_attention

    def spy_packed(q, k, v, cu_seqlens, lengths):
        calls["packed"].append(list(lengths))
        return packed_call(q, k, v, cu_seqlens, lengths)

    def spy_paged(q, k, v, k_pool, v_pool, block_table, start):
        calls["paged"].append((q.shape[2], start))
        return paged_call(q, k, v, k_pool, v_pool, block_table, start)

    cases = {c["id"]: c for c in tiny_manifest["cases"]}
    proc = Processor.from_pretrained(str(tiny_checkpoint), num_crops=4)
    image_case = cases["one_image_nc4"]
    inputs = proc(image_case["prompt"], [str(processor_golden / image_case["images"][0])])
    features = model.encode_images(inputs["pixel_values"], inputs["image_sizes"])
    other = [f * 0.5 for f in features]  # a "different image" of the same size
    ids = image_case["expected"]["input_ids"]
    text = [1, 32010, 29871, 13] + list(range(500, 570))  # 74 tokens
    runner = ModelRunner(model, RunnerConfig(num_blocks=200, block_size=16, max_num_seqs=4, max_model_len=1024))
    free = list(range(199, 0, -1))
    tables = [[free.pop() for _ in range(-(-len(s) // 16))] for s in (ids, ids, text)]
    # Every sequence here is over the tiny model's 64-token switch point: long factors throughout.
    runner.prefill(text[:32], 0, tables[2], None, True)  # the text sequence's first 32 tokens are cached already
    monkeypatch.setattr(paged_attention, "packed_causal_attention", spy_packed)
    monkeypatch.setattr(paged_attention, "paged_prefill_attention", spy_paged)
    packed = runner.prefill_many([PrefillChunk(ids, 0, tables[0], features), PrefillChunk(ids, 0, tables[1], other),
                                  PrefillChunk(text[32:], 32, tables[2], None)], long_rope=True)
    for row, (seq, feats) in enumerate([(ids, features), (ids, other), (text, None)]):
        alone = model(torch.tensor([seq]), image_features=feats)[0, -1]
        assert torch.allclose(packed[row], alone, atol=1e-4), (row, (packed[row] - alone).abs().max())
    assert not torch.allclose(packed[0], packed[1], atol=1e-3)  # the two images really were told apart
    layers = model.config.text.num_hidden_layers - 1  # the last layer attends at each chunk's last row only
    assert calls["packed"] == [[len(ids), len(ids), len(text) - 32]] * layers
    assert calls["paged"] == [(len(text) - 32, 32)] * layers


@pytest.mark.parametrize("padded", [False, True])
def test_last_layer_at_the_last_rows_only(model, tiny_manifest, padded, monkeypatch):
    """A prefill whose last layer runs at each chunk's last row only gives the logits of the one
    that runs every row, and leaves the same keys and values in the pool (every layer's, the last
    included): for two chunks (one continuing its sequence), and for one prompt whose attention
    is padded to a bucket (the cuDNN path's shape)."""
    from phivision.generation import kv_cache, runner as runner_module
    from phivision.generation.runner import PrefillChunk

    monkeypatch.setattr(runner_module, "CUDNN_PREFILL_MIN_TOKENS", 1)
    monkeypatch.setattr(runner_module, "CUDNN_PREFILL_BUCKET", 48)
    padded_calls = []
    original = kv_cache.PagedBatch._attend_padded

    def spy(self, layer_idx, *args):
        padded_calls.append(layer_idx)
        return original(self, layer_idx, *args)

    monkeypatch.setattr(kv_cache.PagedBatch, "_attend_padded", spy)
    ids = next(c for c in tiny_manifest["cases"] if c["id"] == "long_text_over_64")["expected"]["input_ids"]
    text = [1, 32010, 29871, 13] + list(range(500, 570))  # 74 tokens
    layers = model.config.text.num_hidden_layers
    results = []
    for last_rows_only in (False, True):
        runner = ModelRunner(model, RunnerConfig(num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=1024,
                                                 cudnn_prefill=padded, prefill_last_rows_only=last_rows_only))
        padded_calls.clear()
        if padded:
            logits = runner.prefill(text, 0, [1, 2, 3, 4, 5], None, True)[None]  # (1, V)
            assert padded_calls == list(range(layers - 1 if last_rows_only else layers))
        else:
            id_blocks, text_blocks = list(range(11, 11 + -(-len(ids) // 16))), [6, 7, 8, 9, 10]
            runner.prefill(text[:32], 0, text_blocks, None, True)
            logits = runner.prefill_many([PrefillChunk(ids, 0, id_blocks, None),
                                          PrefillChunk(text[32:], 32, text_blocks, None)], long_rope=True)  # (2, V)
        results.append((logits, runner.pool.keys.clone(), runner.pool.values.clone()))
    (every, keys, values), (last, keys_last, values_last) = results
    assert last.shape == every.shape
    torch.testing.assert_close(last, every, atol=1e-5, rtol=1e-5)
    assert torch.equal(keys_last, keys) and torch.equal(values_last, values)
    assert keys[-1].abs().sum() > 0  # the last layer's keys were written


def test_last_rows_only_needs_the_last_columns(model):
    """The model refuses to compute a pruned last layer at columns other than each chunk's last."""
    from phivision.generation.kv_cache import PagedBatch

    runner = ModelRunner(model, RunnerConfig(num_blocks=8, block_size=16, max_num_seqs=1, max_model_len=64))
    cache = PagedBatch(runner.pool, kind="prefill", slot_mapping=torch.arange(16, 26), block_tables=torch.tensor([[1]]),
                       long_rope=torch.tensor([False]), context_lens=torch.tensor([10], dtype=torch.int32),
                       segments=[(0, 10, 0)], last_rows_only=True)
    ids = torch.arange(100, 110)[None]
    with pytest.raises(ValueError, match="last columns"):
        model(ids, positions=torch.arange(10)[None], cache=cache, logits_positions=[8], has_images=False)
    logits = model(ids, positions=torch.arange(10)[None], cache=cache, logits_positions=[9], has_images=False)
    assert logits.shape == (1, 1, model.config.text.vocab_size)
    with pytest.raises(ValueError, match="last_rows_only is for a prefill"):
        PagedBatch(runner.pool, kind="prefill", slot_mapping=torch.arange(10), block_tables=torch.tensor([[1]]),
                   long_rope=torch.tensor([False]), last_rows_only=True)


def test_decode_inputs_of_a_padded_batch(model, tiny_checkpoint, tiny_manifest):
    """Three sequences decode in the graph of four: each row's logits equal its decode alone, and the
    one input buffer holds each row's token, position, slot, length and factor-set flag, with the
    spare row writing nowhere (slot -1) and reading one token of the reserved block 0."""
    cases = {c["id"]: c for c in tiny_manifest["cases"]}
    ids = cases["long_text_over_64"]["expected"]["input_ids"]
    prompts = [ids[:30], ids[:45], ids[:70]]
    runner = ModelRunner(model, RunnerConfig(num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=1024))
    tables = [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]]
    for prompt, table in zip(prompts, tables):
        runner.prefill(prompt, 0, table, None, False)
    tokens, lengths = [11, 22, 33], [len(p) + 1 for p in prompts]
    together = runner.decode(tokens, lengths, tables)
    graph = runner._graph_for(3)
    assert graph.batch == 4
    assert graph.input_ids[:, 0].tolist() == tokens + [0]
    assert graph.positions[:, 0].tolist() == [n - 1 for n in lengths] + [0]
    assert graph.context_lens.tolist() == lengths + [1]
    assert graph.slot_mapping.tolist() == [t[(n - 1) // 16] * 16 + (n - 1) % 16 for t, n in zip(tables, lengths)] + [-1]
    original = model.config.text.original_max_position_embeddings
    assert graph.long_rope.tolist() == [n > original for n in lengths] + [False]
    assert graph.block_tables[3].eq(0).all() and graph.block_tables[2, :5].tolist() == tables[2]
    for row, (token, length, table) in enumerate(zip(tokens, lengths, tables)):
        alone = runner.decode([token], [length], [table])  # rewrites the same slot with the same key/value
        assert torch.allclose(alone[0], together[row], atol=1e-5), row


def test_decode_with_rope_tables_equals_computed_rotary(model, tiny_manifest):
    """Decode steps whose rotary rows are looked up (the default) give the logits of steps that
    compute them, on both sides of the original context (the long factors from 4,097 tokens on in
    the real model), for a padded batch."""
    ids = next(c for c in tiny_manifest["cases"] if c["id"] == "long_text_over_64")["expected"]["input_ids"]
    original = model.config.text.original_max_position_embeddings
    prompts = [ids[: original - 4], ids[:70]]
    assert len(ids) >= 70 > original
    tables = [list(range(1, 7)), list(range(7, 13))]  # 96 slots each
    results = []
    for lookup in (False, True):
        runner = ModelRunner(model, RunnerConfig(num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=1024,
                                                 decode_rope_tables=lookup))
        assert (runner.rope_tables is not None) == lookup
        for prompt, table in zip(prompts, tables):
            runner.prefill(prompt, 0, table, None, len(prompt) > original)
        steps, lengths = [], [len(p) + 1 for p in prompts]
        for step in range(6):  # the first row crosses the original context on the way
            steps.append(runner.decode([40 + step, 50 + step], lengths, tables))
            lengths = [n + 1 for n in lengths]
        results.append(torch.stack(steps))
    assert torch.equal(results[0], results[1])


def test_graph_inputs_are_16_byte_aligned(model):
    """Every decode graph's inputs start at 16-byte boundaries, as the tensors a prefill's last rows
    pass to the same kernel do: Triton compiles a kernel variant per pointer alignment, and a graph
    input at an 8-byte offset left the prefill's variant to compile in the middle of serving."""
    runner = ModelRunner(model, RunnerConfig(num_blocks=8, block_size=16, max_num_seqs=128, max_model_len=1000))
    assert sorted(runner._graphs) == list(DEFAULT_GRAPH_BATCH_SIZES)  # every graph size is checked
    for batch, graph in runner._graphs.items():
        base = graph._device_bytes.data_ptr()
        for name, _, _ in graph._LAYOUT:
            assert (getattr(graph, name).data_ptr() - base) % 16 == 0, (batch, name)


def test_packed_causal_attention_keeps_sequences_apart():
    from phivision.kernels.paged_attention import packed_causal_attention

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total, heads, dim = sum(lengths), 4, 8
    qkv = torch.randn(total, 3 * heads * dim)
    q, k, v = (part.view(total, heads, dim) for part in qkv.split(heads * dim, dim=-1))  # strided rows, as in the model
    out = packed_causal_attention(q, k, v, None, lengths)  # (T, H, D)
    # The same as one attention over the whole row with a block-diagonal causal mask.
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                                attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out, expected)
    assert out.shape == (total, heads, dim)
