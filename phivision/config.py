"""The model's architecture, read once from a checkpoint's config.json into frozen dataclasses.

Only the keys we need are read and validated (a CheckpointError names the key and the problem);
every other key is ignored on purpose. Nothing is guessed from names or paths.

The CLIP tower's shape is not in the real config.json: the reference hard-codes ViT-L/14-336, so
those are our defaults. A `vision_config` block (the tiny test checkpoint has one) overrides them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

CONFIG_FILE = "config.json"
MODEL_TYPE = "phi3_v"
# "su" is what Phi-3(.5)-vision's config says; newer transformers call the same scheme "longrope".
LONGROPE_TYPES = ("su", "longrope")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The reference's hard-coded CLIP ViT-L/14 @ 336 px (spec §2), used when config.json has no vision_config.
_CLIP_VIT_L_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower, built only up to the layer whose output is the image feature."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Index into CLIP's hidden_states (num_hidden_layers + 1 entries: embeddings, then each layer's output).
    feature_layer_idx: int = -2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.num_patches_per_side**2 + 1  # + CLS

    @property
    def num_layers_used(self) -> int:
        """Encoder layers that run: hidden_states[idx] is the output of this many layers."""
        idx = self.feature_layer_idx
        return self.num_hidden_layers + 1 + idx if idx < 0 else idx


@dataclass(frozen=True)
class ProjectorConfig:
    """2x2 merge of CLIP features, learnable separators in "sub_glb" order, then an MLP (spec §6.3-6.4)."""

    image_dim_out: int  # CLIP width; the merged features are 4x this
    hidden_size: int  # the decoder width the MLP projects to
    hd_transform_order: str = "sub_glb"

    @property
    def merged_dim(self) -> int:
        return 4 * self.image_dim_out


@dataclass(frozen=True)
class TextConfig:
    """The Phi-3-mini decoder with LongRoPE ("su") position scaling."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_scaling_type: str
    rope_long_factor: tuple[float, ...]
    rope_short_factor: tuple[float, ...]
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None  # Phi-3-vision-128k's config has none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_attention_factor(self) -> float:
        """Multiplies cos and sin (spec §6.8): sqrt(1 + ln(scale) / ln(original)) when the context was extended."""
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    projector: ProjectorConfig
    torch_dtype: torch.dtype  # the checkpoint's storage dtype, used when a caller asks for none

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """From a config.json (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"no {CONFIG_FILE} at {path}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"the config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise CheckpointError(f"model_type is {model_type!r}; this engine runs {MODEL_TYPE!r} (Phi-3/3.5-vision) checkpoints")
        text = _text_config(data)
        vision = _vision_config(data)
        projector = _projector_config(data, vision, text)
        dtype_name = data.get("torch_dtype", "float32")
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"torch_dtype {dtype_name!r} is not one of {sorted(_DTYPES)}")
        return cls(text=text, vision=vision, projector=projector, torch_dtype=_DTYPES[dtype_name])


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "", **default: Any) -> Any:
    """data[key] checked against `kind`; `default=` makes the key optional."""
    name = f"{where}{key}"
    if key not in data or data[key] is None:
        if "default" in default:
            return default["default"]
        raise CheckpointError(f"the config has no {name!r}")
    value = data[key]
    # bool is an int in Python; a JSON true is never a valid count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise CheckpointError(f"{name} must be {_kind_name(kind)}, got {value!r}")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise CheckpointError(f"{name} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list", bool: "true/false"}[k] for k in kinds)


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise CheckpointError(f"{name} must be positive, got {value}")


def _divides(name: str, whole: int, part_name: str, part: int) -> None:
    if whole % part:
        raise CheckpointError(f"{name} ({whole}) is not divisible by {part_name} ({part})")


def _text_config(data: dict[str, Any]) -> TextConfig:
    ints = {
        key: _get(data, key, int)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    }
    for key, value in ints.items():
        _positive(key, value)
    num_kv_heads = _get(data, "num_key_value_heads", int, default=ints["num_attention_heads"])
    _positive("num_key_value_heads", num_kv_heads)
    _divides("hidden_size", ints["hidden_size"], "num_attention_heads", ints["num_attention_heads"])
    _divides("num_attention_heads", ints["num_attention_heads"], "num_key_value_heads", num_kv_heads)
    head_dim = ints["hidden_size"] // ints["num_attention_heads"]
    if head_dim % 2:
        raise CheckpointError(f"the head size hidden_size/num_attention_heads = {head_dim} must be even for rotary embeddings")
    hidden_act = _get(data, "hidden_act", str, default="silu")
    if hidden_act != "silu":
        raise CheckpointError(f"hidden_act {hidden_act!r} is not supported (Phi-3 uses 'silu')")

    rope = _get(data, "rope_scaling", dict)
    rope_type = rope.get("type", rope.get("rope_type"))
    if rope_type not in LONGROPE_TYPES:
        raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported; expected one of {list(LONGROPE_TYPES)} (LongRoPE)")
    factors = {}
    for key in ("long_factor", "short_factor"):
        values = _get(rope, key, list, where="rope_scaling.")
        if len(values) != head_dim // 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise CheckpointError(
                f"rope_scaling.{key} must hold head_dim/2 = {head_dim // 2} numbers "
                f"(head_dim = hidden_size/num_attention_heads = {head_dim}), got {len(values)} entries"
            )
        if not all(v > 0 for v in values):
            raise CheckpointError(f"rope_scaling.{key} entries must be positive")
        factors[key] = tuple(float(v) for v in values)
    original_max = _get(data, "original_max_position_embeddings", int)
    _positive("original_max_position_embeddings", original_max)
    if original_max > ints["max_position_embeddings"]:
        raise CheckpointError(
            f"original_max_position_embeddings ({original_max}) exceeds max_position_embeddings ({ints['max_position_embeddings']})"
        )
    rope_theta = _get(data, "rope_theta", float, default=10000.0)
    rms_norm_eps = _get(data, "rms_norm_eps", float, default=1e-5)
    _positive("rope_theta", rope_theta)
    _positive("rms_norm_eps", rms_norm_eps)
    sliding_window = _get(data, "sliding_window", int, default=None)
    if sliding_window is not None:
        _positive("sliding_window", sliding_window)
    return TextConfig(
        **ints,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        original_max_position_embeddings=original_max,
        rope_scaling_type=rope_type,
        rope_long_factor=factors["long_factor"],
        rope_short_factor=factors["short_factor"],
        sliding_window=sliding_window,
        bos_token_id=_get(data, "bos_token_id", int, default=None),
        eos_token_id=_get(data, "eos_token_id", int, default=None),
        pad_token_id=_get(data, "pad_token_id", int, default=None),
    )


def _vision_config(data: dict[str, Any]) -> VisionConfig:
    img_processor = _get(data, "img_processor", dict)
    name = img_processor.get("name", "clip_vision_model")
    if name != "clip_vision_model":
        raise CheckpointError(f"img_processor.name {name!r} is not supported (expected 'clip_vision_model')")
    type_feature = img_processor.get("type_feature", "patch")
    if type_feature != "patch":
        raise CheckpointError(f"img_processor.type_feature {type_feature!r} is not supported (expected 'patch': CLS dropped)")
    layer_idx = _get(img_processor, "layer_idx", int, where="img_processor.", default=-2)

    block = _get(data, "vision_config", dict, default=None)
    source = _CLIP_VIT_L_336 if block is None else {**_CLIP_VIT_L_336, **{k: v for k, v in block.items() if v is not None}}
    where = "vision_config."
    values = {
        key: _get(source, key, int, where=where)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "num_channels")
    }
    for key, value in values.items():
        _positive(where + key, value)
    eps = _get(source, "layer_norm_eps", float, where=where)
    _positive(where + "layer_norm_eps", eps)
    act = _get(source, "hidden_act", str, where=where)
    if act != "quick_gelu":
        raise CheckpointError(f"vision_config.hidden_act {act!r} is not supported (CLIP uses 'quick_gelu')")
    _divides("vision_config.hidden_size", values["hidden_size"], "vision_config.num_attention_heads", values["num_attention_heads"])
    _divides("vision_config.image_size", values["image_size"], "vision_config.patch_size", values["patch_size"])
    per_side = values["image_size"] // values["patch_size"]
    if per_side % 2:
        raise CheckpointError(f"the CLIP patch grid ({per_side}x{per_side}) must have an even side for the 2x2 merge")
    config = VisionConfig(**values, layer_norm_eps=eps, hidden_act=act, feature_layer_idx=layer_idx)
    if not 0 <= config.num_layers_used <= config.num_hidden_layers:
        raise CheckpointError(
            f"img_processor.layer_idx {layer_idx} is out of range for a CLIP tower of {config.num_hidden_layers} layers"
        )
    return config


def _projector_config(data: dict[str, Any], vision: VisionConfig, text: TextConfig) -> ProjectorConfig:
    embd = _get(data, "embd_layer", dict)
    # The reference's defaults for absent keys (glb_sub order, linear projection, no HD) are other
    # architectures we do not implement, so an absent key is refused like a wrong one.
    expected = {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    }
    for key, value in expected.items():
        if embd.get(key) != value:
            got = "absent" if key not in embd else repr(embd[key])
            raise CheckpointError(f"embd_layer.{key} is {got}; this engine implements only {value!r}")
    image_dim_out = _get(_get(data, "img_processor", dict), "image_dim_out", int, where="img_processor.")
    if image_dim_out != vision.hidden_size:
        raise CheckpointError(
            f"img_processor.image_dim_out ({image_dim_out}) differs from the CLIP width ({vision.hidden_size})"
        )
    return ProjectorConfig(image_dim_out=image_dim_out, hidden_size=text.hidden_size, hd_transform_order="sub_glb")
