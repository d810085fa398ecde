"""The weight table and the strict loader: names, shapes, shards, aliases, dead tensors, dtypes, devices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phivision.config import ModelConfig
from phivision.errors import CheckpointError
from phivision.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    WeightNameMapper,
    checkpoint_tensor_shapes,
    load_model,
    write_random_checkpoint,
)
from tiny_phi3v import tiny_config_dict

ALIAS = "model.vision_embed_tokens.wte.weight"
CLIP = "model.vision_embed_tokens.img_processor.vision_model."


def _rewrite(folder: Path, edit) -> None:
    """Applies edit(dict of tensors) to a single-file checkpoint in place."""
    tensors = load_file(str(folder / SINGLE_FILE))
    edit(tensors)
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.fixture
def random_checkpoint(tmp_path) -> Path:
    return write_random_checkpoint(tiny_config_dict(), tmp_path / "ckpt", seed=1)


def test_table_reproduces_the_real_tensor_list(golden_dir):
    """Names and shapes derived from the config through the table equal the release's list (spec §3)."""
    spec = golden_dir.parent / "spec"
    if not (spec / "phi35v-weights.tsv").is_file():
        pytest.skip("no spec tensor list")
    rows = [line.split("\t") for line in (spec / "phi35v-weights.tsv").read_text().splitlines()[1:] if line]
    released = {name: tuple(int(d) for d in shape.split("x")) for name, shape, *_ in rows}
    config = ModelConfig.from_file(spec / "phi35v-config.json")
    assert checkpoint_tensor_shapes(config, with_wte_alias=True) == released
    assert ALIAS not in checkpoint_tensor_shapes(config)


def test_table_classifies_names():
    mapper = WeightNameMapper(ModelConfig.from_dict(tiny_config_dict()))  # CLIP: 3 layers, 2 used
    assert mapper.to_ours("model.layers.1.self_attn.qkv_proj.weight").ours == "language_model.layers.1.self_attn.qkv_proj.weight"
    assert mapper.to_ours("model.vision_embed_tokens.sub_GN").ours == "projector.sub_GN"
    assert mapper.to_ours(CLIP + "encoder.layers.1.mlp.fc1.weight").ours == "vision_tower.encoder.layers.1.mlp.fc1.weight"
    assert mapper.to_ours(ALIAS).kind == "alias"
    assert mapper.to_ours(CLIP + "encoder.layers.2.mlp.fc1.weight").kind == "unused"  # past the feature layer
    assert mapper.to_ours(CLIP + "post_layernorm.bias").kind == "unused"
    assert mapper.to_ours(CLIP + "embeddings.position_ids").kind == "unused"
    assert mapper.to_ours("something.else") is None


def test_random_checkpoint_single_and_sharded_load_identically(tmp_path):
    config = tiny_config_dict()
    single = write_random_checkpoint(config, tmp_path / "single", seed=3)
    sharded = write_random_checkpoint(config, tmp_path / "sharded", seed=3, num_shards=3)
    assert (single / SINGLE_FILE).is_file() and not (single / INDEX_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert shard_files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"]) == set(checkpoint_tensor_shapes(ModelConfig.from_dict(config)))
    assert json.loads((sharded / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a = _params(load_model(single, progress=False))
    b = _params(load_model(sharded, progress=False))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(t.dtype == torch.float32 for t in a.values())


def test_loaded_values_equal_the_stored_ones(random_checkpoint):
    stored = load_file(str(random_checkpoint / SINGLE_FILE))
    model = load_model(random_checkpoint, progress=False)
    assert torch.equal(model.language_model.layers[1].mlp.gate_up_proj.weight, stored["model.layers.1.mlp.gate_up_proj.weight"].float())
    assert torch.equal(model.projector.glb_GN, stored["model.vision_embed_tokens.glb_GN"].float())
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())
    # Only the layers up to the feature layer are built.
    assert len(model.vision_tower.encoder.layers) == 2
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_dtype_none_means_the_checkpoint_dtype_and_rope_buffers_are_real(random_checkpoint):
    model = load_model(random_checkpoint, dtype=None, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rotary = model.language_model.rotary
    assert not rotary.inv_freq_short.is_meta and rotary.inv_freq_short.dtype == torch.float32
    expected = 1.0 / (torch.tensor([1.0, 1.1, 1.2, 1.3], dtype=torch.float64) * 10000.0 ** (torch.arange(0, 8, 2) / 8))
    torch.testing.assert_close(rotary.inv_freq_short.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("storage", [torch.float16, torch.float32])
def test_other_storage_dtypes(tmp_path, storage):
    folder = write_random_checkpoint(tiny_config_dict(), tmp_path, dtype=storage, seed=2)
    model = load_model(folder, dtype=torch.float32, progress=False)
    stored = load_file(str(folder / SINGLE_FILE))["model.norm.weight"]
    assert stored.dtype == storage
    assert torch.equal(model.language_model.norm.weight, stored.float())


def test_alias_present_or_absent_gives_the_same_model(tmp_path):
    with_alias = write_random_checkpoint(tiny_config_dict(), tmp_path / "a", seed=4, with_wte_alias=True)
    without = write_random_checkpoint(tiny_config_dict(), tmp_path / "b", seed=4)
    stored = load_file(str(with_alias / SINGLE_FILE))
    assert torch.equal(stored[ALIAS], stored["model.embed_tokens.weight"])
    a, b = _params(load_model(with_alias, progress=False)), _params(load_model(without, progress=False))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_alias_with_a_wrong_shape_is_refused(random_checkpoint):
    _rewrite(random_checkpoint, lambda t: t.update({ALIAS: torch.zeros(3, 3, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"wte\.weight: checkpoint \[3, 3\], model expects \[128, 32\]"):
        load_model(random_checkpoint, progress=False)


def test_dead_tensors_are_optional(random_checkpoint):
    # The random checkpoint stores the dead CLIP layer and post_layernorm, like the release; add the
    # legacy position_ids buffer (int64), then remove all of them: both load.
    _rewrite(random_checkpoint, lambda t: t.update({CLIP + "embeddings.position_ids": torch.arange(17)[None]}))
    load_model(random_checkpoint, progress=False)

    def drop_dead(tensors):
        for name in [n for n in tensors if n.startswith((CLIP + "encoder.layers.2.", CLIP + "post_layernorm.", CLIP + "embeddings.position_ids"))]:
            del tensors[name]

    _rewrite(random_checkpoint, drop_dead)
    load_model(random_checkpoint, progress=False)


def test_missing_unexpected_and_wrong_shapes_are_all_listed(random_checkpoint):
    def damage(tensors):
        del tensors["model.layers.0.mlp.down_proj.weight"]
        del tensors["model.vision_embed_tokens.sub_GN"]
        tensors["model.layers.7.mlp.down_proj.weight"] = torch.zeros(32, 48, dtype=torch.bfloat16)
        tensors[CLIP + "encoder.layers.3.mlp.fc1.bias"] = torch.zeros(24, dtype=torch.bfloat16)  # past the tower's depth
        tensors["model.norm.weight"] = torch.zeros(31, dtype=torch.bfloat16)

    _rewrite(random_checkpoint, damage)
    with pytest.raises(CheckpointError) as info:
        load_model(random_checkpoint, progress=False)
    message = str(info.value)
    assert "missing tensors (2): model.layers.0.mlp.down_proj.weight, model.vision_embed_tokens.sub_GN" in message
    assert "model.layers.7.mlp.down_proj.weight" in message and CLIP + "encoder.layers.3.mlp.fc1.bias" in message
    assert "unexpected tensors (2)" in message
    assert "model.norm.weight: checkpoint [31], model expects [32]" in message


def test_unsupported_storage_dtype_is_refused(random_checkpoint):
    _rewrite(random_checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"unsupported storage dtypes.*model\.norm\.weight: I32"):
        load_model(random_checkpoint, progress=False)


def test_missing_files_are_reported(tmp_path, random_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(random_checkpoint / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(empty, progress=False)
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin"):
        load_model(empty, progress=False)

    sharded = write_random_checkpoint(tiny_config_dict(), tmp_path / "sharded", num_shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(sharded, progress=False)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(no_config, progress=False)


def test_a_tensor_stored_twice_is_refused(tmp_path):
    folder = write_random_checkpoint(tiny_config_dict(), tmp_path, num_shards=2)
    index = json.loads((folder / INDEX_FILE).read_text())
    first = "model-00001-of-00002.safetensors"
    name = next(n for n, f in index["weight_map"].items() if f != first)
    tensors = load_file(str(folder / first))
    tensors[name] = load_file(str(folder / index["weight_map"][name]))[name]
    save_file(tensors, str(folder / first))
    with pytest.raises(CheckpointError, match=f"{name} is stored twice"):
        load_model(folder, progress=False)


def test_golden_tiny_checkpoint_with_and_without_alias(tiny_checkpoint, tmp_path):
    """The golden checkpoint stores the alias; the bar checkpoint does not. Both load to the same model."""
    assert ALIAS in load_file(str(tiny_checkpoint / SINGLE_FILE))
    stripped = tmp_path / "no_alias"
    stripped.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", stripped / "config.json")
    tensors = load_file(str(tiny_checkpoint / SINGLE_FILE))
    del tensors[ALIAS]
    save_file(tensors, str(stripped / SINGLE_FILE), metadata={"format": "pt"})
    a = _params(load_model(tiny_checkpoint, progress=False))
    b = _params(load_model(stripped, progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ids = torch.tensor([[1, 32010, 15043, 29892, 32007, 32001]])
    model = load_model(stripped, progress=False)
    assert torch.isfinite(model(ids)).all()


def test_phi3_vision_128k_style_config_loads_and_runs(tmp_path):
    """Phi-3-vision-128k: no pad_token_id, other factor lists, sliding_window 131072 (spec §10)."""
    config = tiny_config_dict(sliding_window=131072)
    del config["pad_token_id"]
    config["rope_scaling"] = {"type": "su", "long_factor": [1.03, 1.05, 1.5, 2.5], "short_factor": [1.05, 1.05, 1.1, 1.2]}
    folder = write_random_checkpoint(config, tmp_path, num_shards=2)
    model = load_model(folder, progress=False)
    assert model.config.text.pad_token_id is None
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))  # crosses the 16-token original context
    logits = model(ids)
    assert logits.shape == (1, 20, 128) and torch.isfinite(logits).all()
