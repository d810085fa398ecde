"""`AutoModelForCausalLM` with the reference's calling conventions, on top of our own model.

Only translation lives here: Hugging Face argument names and return shapes in, our loader and
generator underneath. Model card code runs with nothing changed but the import line.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import PromptError
from ..generation.engine import Engine, EngineConfig
from ..generation.sampling import SamplingParams
from ..weights import load_model

# transformers' defaults for `generate`, which the model card relies on implicitly.
_HF_DEFAULT_TOP_K = 50
_ACCEPTED_ATTN = {None, "eager", "sdpa", "flash_attention_2"}


@dataclass(frozen=True)
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V) float32


def _resolve_dtype(torch_dtype: Any) -> torch.dtype | None:
    """"auto" (or None) means the checkpoint's own dtype; strings and torch dtypes are both accepted."""
    if torch_dtype in (None, "auto"):
        return None
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if isinstance(torch_dtype, str) and isinstance(getattr(torch, torch_dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, torch_dtype.removeprefix("torch."))
    raise ValueError(f"unsupported torch_dtype {torch_dtype!r}; use 'auto', torch.float32, torch.bfloat16 or torch.float16")


def _resolve_device(device_map: Any) -> str:
    if device_map in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, (str, torch.device, int)):
        return str(device_map) if not isinstance(device_map, int) else f"cuda:{device_map}"
    raise ValueError(f"device_map {device_map!r} is not supported: give one device such as 'cuda', 'cuda:0' or 'cpu'")


class AutoModelForCausalLM:
    """Entry point of the model card: `AutoModelForCausalLM.from_pretrained(...)`."""

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str,
        *,
        device_map: Any = None,
        torch_dtype: Any = "auto",
        trust_remote_code: bool = True,  # accepted: there is no remote code to trust here
        _attn_implementation: str | None = None,
        attn_implementation: str | None = None,
        **unused: Any,
    ) -> "Phi3VCompatModel":
        attn = _attn_implementation or attn_implementation
        if attn not in _ACCEPTED_ATTN:
            raise ValueError(f"unknown attention implementation {attn!r}; expected one of eager, sdpa, flash_attention_2")
        # flash_attention_2 is accepted without the flash-attn package: SDPA picks fused kernels on CUDA.
        model = load_model(pretrained_model_name_or_path, device=_resolve_device(device_map), dtype=_resolve_dtype(torch_dtype))
        return Phi3VCompatModel(model)


class Phi3VCompatModel:
    """Wraps our Phi3VForCausalLM with the reference's `__call__` and `generate` conventions."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.config = model.config
        self._engine: Engine | None = None

    def _get_engine(self, batch: int, length: int) -> Engine:
        """The batched engine (the fast path on CUDA), made on first use and again when a call needs more room."""
        text = self.config.text
        max_len = min(text.max_position_embeddings, max(length, 8192))
        engine = self._engine
        if engine is None or engine.max_model_len < length or engine.config.max_num_seqs < batch:
            seqs = max(batch, 8)
            on_gpu = self.device.type == "cuda"
            # On a GPU the pool takes what memory allows; on the CPU it holds the batch at this length.
            config = EngineConfig(max_num_seqs=seqs, max_model_len=max_len,
                                  kv_cache_tokens=None if on_gpu else max_len * min(batch, 4))
            self._engine = engine = None  # release the old pool before sizing a new one
            if on_gpu:
                torch.cuda.empty_cache()
            self._engine = engine = Engine(self.model, None, config)
        return engine

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def eval(self) -> "Phi3VCompatModel":
        return self

    def to(self, device) -> "Phi3VCompatModel":
        self.model.to(device)
        self.model.reset_buffers(device)  # rotary tables are recomputed, not copied, on the new device
        return self

    def cuda(self, device: int | str | None = None) -> "Phi3VCompatModel":
        return self.to("cuda" if device is None else (f"cuda:{device}" if isinstance(device, int) else device))

    def cpu(self) -> "Phi3VCompatModel":
        return self.to("cpu")

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **unused: Any,
    ) -> CausalLMOutput:
        device = self.device
        with torch.inference_mode():
            logits = self.model(
                input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                pixel_values=None if pixel_values is None else pixel_values.to(device, self.dtype),
                image_sizes=None if image_sizes is None else image_sizes.to(device),
            )
        return CausalLMOutput(logits=logits)

    forward = __call__

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """The prompt followed by the new ids (B, T + new), finished rows padded, like transformers."""
        text = self.config.text
        if eos_token_id is None:
            eos_token_id = text.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = text.pad_token_id if text.pad_token_id is not None else eos[0]
        if do_sample:
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=1.0 if temperature is None else float(temperature),
                top_k=_HF_DEFAULT_TOP_K if top_k is None else int(top_k),
                top_p=1.0 if top_p is None else float(top_p),
                seed=seed,
            )
            if params.temperature == 0.0:
                raise PromptError("do_sample=True needs a temperature > 0 (use do_sample=False for greedy decoding)")
        else:
            params = SamplingParams(max_new_tokens=max_new_tokens)
        device = self.device
        features = None
        if pixel_values is not None:
            with torch.inference_mode():
                features = self.model.encode_images(pixel_values.to(device, self.dtype), image_sizes.to(device))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]  # padding removed
        engine = self._get_engine(len(rows), max(len(r) for r in rows) + max_new_tokens)
        params = replace(params, stop_token_ids=tuple(eos))
        # Keys for the prefix cache: fresh per call (features are not re-identified across calls here).
        image_keys = [uuid.uuid4().hex for _ in range(0 if features is None else len(features))]
        request_ids = []
        for row in rows:
            # Every row gets the whole feature list: its placeholder ids name images of the whole batch.
            row_features = features if any(t < 0 for t in row) else None
            row_params = params if params.seed is None else replace(params, seed=params.seed + len(request_ids))
            request_ids.append(engine.add_request(row, row_params, image_features=row_features,
                                                  image_keys=image_keys if row_features else ()))
        new_ids: dict[str, list[int]] = {rid: [] for rid in request_ids}
        while any(engine.request_info_or_none(rid) is not None for rid in request_ids):
            for out in engine.step():
                if out.request_id in new_ids and out.token_id is not None:
                    new_ids[out.request_id].append(out.token_id)
        width = max(len(v) for v in new_ids.values())
        new = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for row, rid in enumerate(request_ids):
            new[row, : len(new_ids[rid])] = torch.tensor(new_ids[rid], dtype=torch.long)
        return torch.cat([input_ids.cpu().long(), new], dim=1)

