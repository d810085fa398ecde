"""A preallocated dense KV cache: one (B, H_kv, max_len, D) key and value tensor per layer.

Slots are shared by every row: slot s of row b holds the token at column s of that row's
(left-padded) sequence, so one integer `length` describes the whole batch. The cache knows no
model logic: attention calls `update` to write a call's new keys/values at
[length, length + T) and read back [0, length + T); the model calls `advance(T)` once per
forward, after every layer has written.
"""

from __future__ import annotations

import torch


class DenseKVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers = num_layers
        self.batch = batch
        self.num_heads = num_heads
        self.max_len = max_len
        self.head_dim = head_dim
        self.length = 0  # slots filled, the same for every row

    @classmethod
    def for_model(cls, config, *, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> "DenseKVCache":
        """Sized for a ModelConfig's decoder (its layer count, KV heads and head size)."""
        text = config.text
        return cls(text.num_hidden_layers, batch, text.num_key_value_heads, max_len, text.head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def check_room(self, num_new: int) -> None:
        """Raises before any layer writes when `num_new` more slots do not fit."""
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} slots; {self.length} are used and {num_new} more do not fit"
            )

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes (B, H_kv, T, D) keys/values at slots [length, length+T); returns the views of slots [0, length+T)."""
        num_new = keys.shape[2]
        end = self.length + num_new
        self.keys[layer_idx, :, :, self.length : end] = keys
        self.values[layer_idx, :, :, self.length : end] = values
        # (B, H_kv, length + T, D) views; the last dimension stays contiguous for fused kernels.
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, num_new: int) -> None:
        """Marks `num_new` more slots as filled (once per forward call, after every layer wrote them)."""
        self.check_room(num_new)
        self.length += num_new

    def reset(self) -> None:
        """Empties the cache (its memory is kept and overwritten by the next prefill)."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Forgets every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} filled slots to {length}")
        self.length = length
