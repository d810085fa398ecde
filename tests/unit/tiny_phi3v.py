"""Small Phi-3-vision configs and random models for the model/loader unit tests (no golden data needed)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from phivision.weights import load_model, write_random_checkpoint

# CLIP crops of 56 px with 14 px patches: a 4x4 patch grid -> 2x2 merged cells per crop.
CROP = 56


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """A config.json with the real keys and tiny sizes (decoder head_dim 8, 16-token original context)."""
    config = {
        "model_type": "phi3_v",
        "architectures": ["Phi3VForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "su", "long_factor": [1.0, 2.0, 4.0, 8.0], "short_factor": [1.0, 1.1, 1.2, 1.3]},
        "sliding_window": 262144,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "some_unknown_key": {"ignored": True},
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {"name": "clip_vision_model", "image_dim_out": 16, "num_img_tokens": 144},
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": CROP,
            "patch_size": 14,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
    }
    for key, value in overrides.items():
        config[key] = value
    return copy.deepcopy(config)


def random_model(folder: Path, config: dict[str, Any] | None = None, *, dtype=torch.float32, seed: int = 0, **kwargs):
    """Writes a random checkpoint to `folder` and loads it (so the loader is exercised too).

    Weights are drawn wider than a real initialisation (std 0.2) so that attention is far from
    uniform and position or masking mistakes show up clearly in the logits.
    """
    kwargs.setdefault("std", 0.2)
    write_random_checkpoint(config or tiny_config_dict(), folder, seed=seed, **kwargs)
    return load_model(folder, dtype=dtype, progress=False)


def image_tokens(rows: int, cols: int, cells: int = 2) -> int:
    """Tokens of one image whose HD grid is rows x cols crops, `cells` merged cells per crop side."""
    return rows * cells * (cols * cells + 1) + 1 + cells * (cells + 1)


def random_pixels(grids: list[tuple[int, int]], num_slots: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, num_slots, 3, CROP, CROP) pixel values with zeroed padding slots, and (I, 2) HD sizes."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(grids), num_slots, 3, CROP, CROP, generator=generator)
    for idx, (rows, cols) in enumerate(grids):
        pixel_values[idx, rows * cols + 1 :] = 0
    image_sizes = torch.tensor([[rows * CROP, cols * CROP] for rows, cols in grids])
    return pixel_values, image_sizes
