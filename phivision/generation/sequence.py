"""One request's state in the batched engine: its token ids, its KV blocks, and how far it has got.

Integers only (no torch): the scheduler and the block manager read and write these fields, the
runner reads them to build tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class StopParams(Protocol):
    """What the scheduler reads from a request's parameters (SamplingParams fits)."""

    max_new_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...] | None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no KV blocks: never admitted, preempted, or queued for a LongRoPE re-prefill
    RUNNING = "running"  # holds KV blocks: being prefilled (maybe in chunks) or decoding
    FINISHED = "finished"  # done; its blocks are back in the pool


@dataclass(eq=False)  # identity, not field equality: the queues find and remove sequences by identity
class Sequence:
    """A prompt and its generated tokens, with the KV bookkeeping the scheduler keeps for it.

    `token_ids` holds the prompt then the generated ids; image placeholders are runs of -g for
    image g (1-based), and `image_key[g - 1]` is that image's content hash, so that the prefix
    cache never shares KV between prompts whose images differ.

    KV counters (positions are token indices):
    * `num_cached_tokens`: tokens [0, n) have valid keys/values in the blocks of `block_table`.
    * `num_computed_tokens`: tokens whose KV will be valid once the step just scheduled has run
      (the scheduler moves it ahead when it schedules a step; `Scheduler.postprocess` then sets
      `num_cached_tokens` to it). Between steps the two are equal.
    * `block_hashes`: the prefix-cache hashes of the leading full blocks whose KV is computed.
    * `long_rope`: which LongRoPE factor set the cached keys use (spec §6.8); None while nothing
      is cached.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]
    params: StopParams
    image_key: tuple[str, ...] = ()
    num_prompt_tokens: int = -1  # -1: every id in token_ids is prompt
    arrival_index: int = 0  # set by Scheduler.add: the order requests came in
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    error: str | None = None  # why it was aborted, when it was
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_computed_tokens: int = 0
    long_rope: bool | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.token_ids)  # ours to append to; the caller's list stays as it was
        self.image_key = tuple(self.image_key)
        if self.num_prompt_tokens == -1:
            self.num_prompt_tokens = len(self.token_ids)
        if not 0 <= self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(f"num_prompt_tokens={self.num_prompt_tokens} for {len(self.token_ids)} token ids")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the KV of every token (ceil)."""
        return -(-len(self.token_ids) // block_size)

    def block_token_ids(self, block_idx: int, block_size: int) -> list[int]:
        return self.token_ids[block_idx * block_size : (block_idx + 1) * block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
