"""ModelConfig: values read from config.json, defaults for what the real config lacks, clear refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from phivision.config import ModelConfig
from phivision.errors import CheckpointError
from tiny_phi3v import tiny_config_dict


@pytest.fixture(scope="module")
def real_config_dict(golden_dir: Path) -> dict:
    path = golden_dir.parent / "spec" / "phi35v-config.json"
    if not path.is_file():
        pytest.skip(f"no spec config at {path}")
    return json.loads(path.read_text())


def test_real_config_values(real_config_dict):
    config = ModelConfig.from_dict(real_config_dict)
    text, vision, projector = config.text, config.vision, config.projector
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (32064, 3072, 8192)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 32, 32, 96)
    assert (text.max_position_embeddings, text.original_max_position_embeddings) == (131072, 4096)
    assert text.rope_scaling_type == "su"
    assert len(text.rope_long_factor) == len(text.rope_short_factor) == 48
    assert text.rope_long_factor[0] == real_config_dict["rope_scaling"]["long_factor"][0]
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (1, 2, 32000)
    assert text.sliding_window == 131072
    # spec §6.8: sqrt(1 + ln 32 / ln 4096)
    assert text.rope_attention_factor == pytest.approx(1.1902380714238083, abs=1e-15)
    # No vision block in the real config: the reference's hard-coded ViT-L/14-336.
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 4096, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps, vision.hidden_act) == (336, 14, 1e-5, "quick_gelu")
    assert vision.feature_layer_idx == -2 and vision.num_layers_used == 23
    assert vision.num_positions == 577
    assert (projector.image_dim_out, projector.merged_dim, projector.hidden_size) == (1024, 4096, 3072)
    assert config.torch_dtype == torch.bfloat16


def test_tiny_checkpoint_vision_block_is_read(tiny_checkpoint):
    config = ModelConfig.from_file(tiny_checkpoint / "config.json")
    vision = config.vision
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (32, 48, 2, 2)
    assert vision.num_layers_used == 1
    assert config.text.head_dim == 16
    assert config.text.rope_attention_factor == pytest.approx(1.3540064007726602, abs=1e-15)
    # from_file also accepts the folder
    assert ModelConfig.from_file(tiny_checkpoint) == config


def test_unknown_keys_ignored_and_optional_keys_defaulted():
    data = tiny_config_dict()
    for key in ("pad_token_id", "num_key_value_heads", "sliding_window", "torch_dtype"):
        del data[key]
    config = ModelConfig.from_dict(data)
    assert config.text.pad_token_id is None
    assert config.text.num_key_value_heads == config.text.num_attention_heads
    assert config.text.sliding_window is None
    assert config.torch_dtype == torch.float32


def test_attention_factor_is_one_without_extension():
    config = ModelConfig.from_dict(tiny_config_dict(max_position_embeddings=16))
    assert config.text.rope_attention_factor == 1.0
    config = ModelConfig.from_dict(tiny_config_dict(max_position_embeddings=64))
    assert config.text.rope_attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))


def test_longrope_type_alias_accepted():
    data = tiny_config_dict()
    data["rope_scaling"]["type"] = "longrope"
    assert ModelConfig.from_dict(data).text.rope_scaling_type == "longrope"


def test_layer_idx_read_from_img_processor():
    data = tiny_config_dict()
    data["img_processor"]["layer_idx"] = -1
    assert ModelConfig.from_dict(data).vision.num_layers_used == 3
    data["img_processor"]["layer_idx"] = 1
    assert ModelConfig.from_dict(data).vision.num_layers_used == 1


def _broken(mutate) -> dict:
    data = tiny_config_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("hidden_size"), "hidden_size"),
        (lambda d: d.update(model_type="phi3"), "model_type"),
        (lambda d: d.update(hidden_size="32"), "hidden_size must be an integer"),
        (lambda d: d.update(num_attention_heads=5), "not divisible by num_attention_heads"),
        (lambda d: d.pop("rope_scaling"), "rope_scaling"),
        (lambda d: d["rope_scaling"].update(type="yarn"), "'yarn' is not supported"),
        (lambda d: d["rope_scaling"].update(long_factor=[1.0] * 5), "long_factor must hold head_dim/2 = 4"),
        (lambda d: d["rope_scaling"].pop("short_factor"), "rope_scaling.short_factor"),
        (lambda d: d.pop("original_max_position_embeddings"), "original_max_position_embeddings"),
        (lambda d: d.update(original_max_position_embeddings=512), "exceeds max_position_embeddings"),
        (lambda d: d["embd_layer"].update(hd_transform_order="glb_sub"), "hd_transform_order is 'glb_sub'"),
        (lambda d: d["embd_layer"].pop("projection_cls"), "projection_cls is absent"),
        (lambda d: d.pop("img_processor"), "img_processor"),
        (lambda d: d["img_processor"].update(image_dim_out=8), "image_dim_out (8) differs"),
        (lambda d: d["img_processor"].update(layer_idx=-5), "layer_idx -5 is out of range"),
        (lambda d: d["img_processor"].update(type_feature="cls_patch"), "type_feature"),
        (lambda d: d["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
        (lambda d: d["vision_config"].update(image_size=42), "even side"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda d: d.update(torch_dtype="int8"), "torch_dtype"),
    ],
)
def test_invalid_configs_are_refused_with_the_key_named(mutate, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_dict(_broken(mutate))


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(_broken(lambda d: d.pop("vocab_size"))))
    with pytest.raises(CheckpointError, match=r"config\.json.*vocab_size"):
        ModelConfig.from_file(tmp_path / "config.json")
