"""Checkpoint tensors <-> our modules: THE name table, the strict loader, and a random-checkpoint writer.

Loading builds the model on the meta device (no memory), checks every tensor name and shape from
the safetensors headers before reading any data, then reads each tensor straight onto the target
device, casts it and installs it, so the checkpoint is never held twice.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .config import CONFIG_FILE, ModelConfig
from .errors import CheckpointError
from .hub import resolve_checkpoint
from .model.phi3v import Phi3VForCausalLM
from .model.vision import ClipEncoderLayer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_FILE_PATTERNS = [CONFIG_FILE, "generation_config.json", "*.safetensors", INDEX_FILE]

PARAM, ALIAS, UNUSED = "param", "alias", "unused"
_CLIP = "model.vision_embed_tokens.img_processor.vision_model."


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint names starting with `checkpoint` map to `ours` + the rest of the name.

    kind PARAM: loaded. ALIAS: a second name for a tensor we load under another name (accepted
    when present, never required). UNUSED: stored but intentionally not built. In `checkpoint`,
    "{clip_layer_past_feature}" stands for the index of any CLIP layer after the feature layer.
    """

    checkpoint: str
    ours: str
    kind: str = PARAM


# First match wins, so specific rules come before the prefixes that contain them.
WEIGHT_TABLE: tuple[WeightRule, ...] = (
    # The image embedder holds a reference to the token embedding (spec §3): tied, loaded once.
    WeightRule("model.vision_embed_tokens.wte.weight", "language_model.embed_tokens.weight", ALIAS),
    # CLIP's last layer and post-layernorm come after the feature layer (hidden_states[-2]); never built.
    WeightRule(_CLIP + "post_layernorm.", "", UNUSED),
    WeightRule(_CLIP + "encoder.layers.{clip_layer_past_feature}.", "", UNUSED),
    # A buffer older transformers versions saved; positions are implicit in our embedding.
    WeightRule(_CLIP + "embeddings.position_ids", "", UNUSED),
    WeightRule(_CLIP, "vision_tower."),
    WeightRule("model.vision_embed_tokens.", "projector."),  # glb_GN, sub_GN, img_projection.{0,2}
    WeightRule("model.", "language_model."),  # embed_tokens, layers.L, norm
    WeightRule("lm_head.", "lm_head."),
)

_STORAGE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class NameMapping:
    kind: str  # PARAM, ALIAS or UNUSED
    ours: str  # our parameter name ("" for UNUSED)


class WeightNameMapper:
    """The table compiled for one config (the CLIP layers past the feature layer depend on it)."""

    def __init__(self, config: ModelConfig):
        vision = config.vision
        dead_layers = "|".join(str(i) for i in range(vision.num_layers_used, vision.num_hidden_layers))
        self._rules = []
        for rule in WEIGHT_TABLE:
            if "{clip_layer_past_feature}" in rule.checkpoint and not dead_layers:
                continue
            parts = [re.escape(p) for p in rule.checkpoint.split("{clip_layer_past_feature}")]
            pattern = f"(?:{dead_layers})".join(parts)
            exact = rule.kind == ALIAS
            self._rules.append((re.compile(pattern + ("$" if exact else "")), rule))

    def to_ours(self, name: str) -> NameMapping | None:
        """Checkpoint name -> our name (None: no rule covers it)."""
        for pattern, rule in self._rules:
            match = pattern.match(name)
            if match:
                if rule.kind == PARAM:
                    return NameMapping(PARAM, rule.ours + name[match.end() :])
                return NameMapping(rule.kind, rule.ours)
        return None

    def to_checkpoint(self, ours: str) -> str:
        """Our parameter name -> its checkpoint name (inverse of the PARAM rules)."""
        candidates = [r for _, r in self._rules if r.kind == PARAM and ours.startswith(r.ours)]
        rule = max(candidates, key=lambda r: len(r.ours))
        name = rule.checkpoint + ours[len(rule.ours) :]
        mapped = self.to_ours(name)
        assert mapped == NameMapping(PARAM, ours), f"weight table does not round-trip {ours} -> {name} -> {mapped}"
        return name


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of model.safetensors.index.json, or model.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the shard index {index}: {exc!r}") from exc
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the shard index names files that are not there: {', '.join(missing)}")
        return [folder / name for name in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; only safetensors in the Hugging Face layout is supported)" if others else ""
    raise CheckpointError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def read_headers(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor's file, shape and dtype, from the headers only (no tensor data is read)."""
    stored: dict[str, StoredTensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in stored:
                        raise CheckpointError(f"tensor {name} is stored twice: in {stored[name].file.name} and {path.name}")
                    tensor_slice = f.get_slice(name)
                    stored[name] = StoredTensor(path, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return stored


# ---------------------------------------------------------------------------------------------- loading


def build_meta_model(config: ModelConfig) -> Phi3VForCausalLM:
    """The model's structure with no memory behind it."""
    with torch.device("meta"):
        return Phi3VForCausalLM(config)


def _plan(model: nn.Module, mapper: WeightNameMapper, stored: dict[str, StoredTensor]) -> dict[str, str]:
    """checkpoint name -> our parameter name for everything to load; raises listing every problem at once."""
    expected = dict(model.state_dict(keep_vars=True).items())
    plan: dict[str, str] = {}
    present: set[str] = set()  # our names the checkpoint has, whatever their shape
    unexpected, bad_shapes, bad_dtypes = [], [], []
    for name, info in sorted(stored.items()):
        mapping = mapper.to_ours(name)
        if mapping is None or (mapping.kind != UNUSED and mapping.ours not in expected):
            unexpected.append(name)
            continue
        if mapping.kind == UNUSED:
            continue
        present.add(mapping.ours)
        want = tuple(expected[mapping.ours].shape)
        if info.shape != want:
            bad_shapes.append(f"{name}: checkpoint {list(info.shape)}, model expects {list(want)}")
            continue
        if info.dtype not in _STORAGE_DTYPES:
            bad_dtypes.append(f"{name}: {info.dtype}")
            continue
        if mapping.kind == PARAM:
            plan[name] = mapping.ours
    missing = sorted(mapper.to_checkpoint(name) for name in set(expected) - present)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shapes:
        problems.append(f"wrong shapes ({len(bad_shapes)}): {'; '.join(bad_shapes)}")
    if bad_dtypes:
        problems.append(f"unsupported storage dtypes (need BF16, F16 or F32): {', '.join(bad_dtypes)}")
    if problems:
        raise CheckpointError("the checkpoint does not match its config.json: " + " | ".join(problems))
    return plan


def _install(model: nn.Module, ours: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = ours.rpartition(".")
    setattr(model.get_submodule(module_path), leaf, nn.Parameter(tensor, requires_grad=False))


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def load_weights(
    model: Phi3VForCausalLM,
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> None:
    """Fills a (meta-device) model from the checkpoint in `folder`, strictly, tensor by tensor."""
    mapper = WeightNameMapper(model.config)
    stored = read_headers(checkpoint_files(folder))
    plan = _plan(model, mapper, stored)
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(stored[name].file, []).append(name)
    with tqdm(total=len(plan), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device=_safetensors_device(device)) as f:
                for name in names:
                    _install(model, plan[name], f.get_tensor(name).to(dtype))
                    bar.update()
    model.reset_buffers(device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # unreachable when _plan is right; a guard against silently random weights
        raise CheckpointError(f"tensors left unloaded: {', '.join(leftovers)}")


def load_model(
    path_or_id: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
) -> Phi3VForCausalLM:
    """A ready (eval mode, no grad) model from a local folder or a Hugging Face Hub id.

    dtype None means the checkpoint's own torch_dtype. Checkpoint tensors may be stored in bf16,
    fp16 or fp32; all are cast to `dtype`.
    """
    folder = resolve_checkpoint(str(path_or_id), allow_patterns=MODEL_FILE_PATTERNS, required=[CONFIG_FILE])
    config = ModelConfig.from_file(folder / CONFIG_FILE)
    device = torch.device(device)
    model = build_meta_model(config)
    load_weights(model, folder, device=device, dtype=config.torch_dtype if dtype is None else dtype, progress=progress)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- writing


def checkpoint_tensor_shapes(config: ModelConfig, *, with_wte_alias: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint in the real layout holds for `config`, with its shape, sorted by name.

    Includes the tensors we never build (CLIP layers past the feature layer, post_layernorm), as the
    release stores them. The `wte` alias is left out unless asked for (the bar checkpoint lacks it).
    """
    mapper = WeightNameMapper(config)
    model = build_meta_model(config)
    shapes = {mapper.to_checkpoint(name): tuple(p.shape) for name, p in model.named_parameters()}
    vision = config.vision
    with torch.device("meta"):
        template = ClipEncoderLayer(vision)
    for layer_idx in range(vision.num_layers_used, vision.num_hidden_layers):
        for name, p in template.named_parameters():
            shapes[f"{_CLIP}encoder.layers.{layer_idx}.{name}"] = tuple(p.shape)
    for name in ("weight", "bias"):
        shapes[f"{_CLIP}post_layernorm.{name}"] = (vision.hidden_size,)
    if with_wte_alias:
        shapes["model.vision_embed_tokens.wte.weight"] = shapes["model.embed_tokens.weight"]
    return dict(sorted(shapes.items()))


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, std: float) -> torch.Tensor:
    """Normal(0, std) values; norm scales near 1 so activations stay in a sane range."""
    values = torch.randn(shape, generator=generator) * std
    leaf = name.rsplit(".", 2)
    is_norm_scale = name.endswith(".weight") and "norm" in leaf[-2]
    return values + 1.0 if is_norm_scale else values


def _split_shards(shapes: dict[str, tuple[int, ...]], num_shards: int, itemsize: int) -> list[list[str]]:
    """Consecutive names cut into num_shards groups of about equal bytes."""
    names = list(shapes)
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must be between 1 and {len(names)}, got {num_shards}")
    sizes = [itemsize * int(torch.Size(shapes[n]).numel()) for n in names]
    total, shards, current, done = sum(sizes), [], [], 0
    for idx, (name, size) in enumerate(zip(names, sizes)):
        current.append(name)
        done += size
        remaining_names, remaining_shards = len(names) - idx - 1, num_shards - len(shards) - 1
        if remaining_shards and (done >= total * (len(shards) + 1) / num_shards or remaining_names == remaining_shards):
            shards.append(current)
            current = []
    shards.append(current)
    return shards


def write_random_checkpoint(
    config_dict: dict[str, Any],
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 1,
    seed: int = 0,
    with_wte_alias: bool = False,
    std: float = 0.02,
) -> Path:
    """A random-weight checkpoint in the real Hugging Face layout, for tests and benchmarks.

    Names come from the weight table, shapes from the config; with num_shards > 1 the tensors are
    split into model-0000k-of-0000n.safetensors files plus model.safetensors.index.json. Tensors are
    generated one shard at a time. config.json is written with torch_dtype set to `dtype`.
    """
    config = ModelConfig.from_dict(config_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_tensor_shapes(config, with_wte_alias=with_wte_alias)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _split_shards(shapes, num_shards, itemsize)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    embed = None
    for shard_idx, names in enumerate(shards):
        file_name = SINGLE_FILE if num_shards == 1 else f"model-{shard_idx + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {}
        for name in names:
            if name == "model.vision_embed_tokens.wte.weight" and embed is not None:
                tensors[name] = embed.clone()  # the alias holds equal values, as in a real save
            else:
                tensors[name] = _random_tensor(name, shapes[name], generator, std).to(dtype)
            if name == "model.embed_tokens.weight" and with_wte_alias:
                embed = tensors[name]
            weight_map[name] = file_name
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    if num_shards > 1:
        total_size = sum(itemsize * int(torch.Size(s).numel()) for s in shapes.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    dtype_name = str(dtype).removeprefix("torch.")
    (folder / CONFIG_FILE).write_text(json.dumps({**config_dict, "torch_dtype": dtype_name}, indent=2), encoding="utf-8")
    return folder

