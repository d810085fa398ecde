"""Generation on the plain PyTorch path: prefill, decode steps, and the stream/generate layers.

Layers, from the bottom: `TokenGenerator` yields one token per row per step (prefill, then
decode steps on a preallocated dense KV cache); `stream_text` adds detokenisation and stop
strings for one prompt; `generate` collects whole answers for a batch.

LongRoPE (spec §6.8): a forward call uses the long factors iff its sequence is longer than
`original_max_position_embeddings`. The reference (Phi-3.5's "fix_rope_scaling") drops its KV
cache once, at the step where a generation first crosses that length, and re-runs the whole
sequence, so every cached key is rotated with the long factors from then on. We do the same:
the row's cache is rebuilt at that step. Numerically this equals recomputing everything each step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import PromptError
from .detokenize import Decodes, IncrementalDecoder, StopStringFilter
from .kv_cache import DenseKVCache
from .sampling import SamplingParams, make_generator, sample

DEFAULT_STOP_TOKENS = ("<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's answer."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    num_prompt_tokens: int
    ttft_s: float
    total_s: float


@dataclass(frozen=True)
class CachedPrefix:
    """A single sequence's KV cache kept after generation, for the next turn to reuse.

    `token_ids` are the ids whose keys/values fill the cache's first slots; `long_rope` says which
    LongRoPE factor set rotated them (a new prompt may reuse them only under the same set).
    """

    cache: DenseKVCache
    token_ids: list[int]
    long_rope: bool


def reusable_prefix_length(cached: Sequence[int], new: Sequence[int]) -> int:
    """How many leading ids of `new` the cache already holds, never splitting an image run and
    always leaving at least one id to run (its logits start the answer)."""
    n = 0
    for a, b in zip(cached, new):
        if a != b:
            break
        n += 1
    n = min(n, len(new) - 1)
    # Image features are written a whole run at a time: back off to the start of a split run.
    while n > 0 and new[n] < 0 and new[n - 1] == new[n]:
        n -= 1
    return max(n, 0)


@dataclass
class _Batch:
    """The growing token grid of a batch: left-padded prompt columns, then one column per step."""

    ids: torch.Tensor  # (B, T) int64, negative ids = image placeholders
    mask: torch.Tensor  # (B, T) int64, 0 = padding
    lengths: torch.Tensor  # (B,) real tokens so far per row
    long_rope: list[bool] = field(default_factory=list)  # cache rows built with the long factors


def default_stop_token_ids(tokenizer) -> tuple[int, ...]:
    """`<|end|>` and `<|endoftext|>`, the two ways this family ends a turn, when the tokenizer has them."""
    ids = [tokenizer.token_to_id(t) for t in DEFAULT_STOP_TOKENS]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def check_context(model, num_prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse before any work when the prompt, or the prompt plus the answer, cannot fit the context."""
    context = model.config.text.max_position_embeddings
    if num_prompt_tokens >= context:
        raise PromptError(
            f"the prompt is {num_prompt_tokens} tokens long, over the model's context of {context} tokens; "
            "use fewer or smaller images (num_crops) or a shorter text"
        )
    if num_prompt_tokens + max_new_tokens > context:
        raise PromptError(
            f"the prompt ({num_prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) is over the model's "
            f"context of {context} tokens; lower max_new_tokens to at most {context - num_prompt_tokens}"
        )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded grid: 0.. from each row's first real token (pads get 0)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


class TokenGenerator:
    """Yields the next token of every row, one step at a time, on a dense KV cache.

    Rows that finished (end token, max_new_tokens, or `finish(row)` from a caller that saw a stop
    string) keep being fed the pad token, which is masked out, until every row is done.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        params: SamplingParams,
        *,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | None = None,
        prefix: CachedPrefix | None = None,
    ):
        device = next(model.parameters()).device
        # Copies: the caller's tensors are never modified.
        ids = input_ids.to(device=device, dtype=torch.long).clone()
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long).clone())
        lengths = mask.sum(dim=-1)
        check_context(model, int(lengths.max()), params.max_new_tokens)
        self.model = model
        self.params = params
        self.stop_token_ids = set() if params.ignore_eos else set(int(t) for t in stop_token_ids)
        self.pad_token_id = pad_token_id
        self.num_rows = ids.shape[0]
        self.prompt_lengths = lengths.tolist()
        self.finished = [False] * self.num_rows
        self.num_generated = 0
        self._batch = _Batch(ids, mask, lengths)
        self._generator = make_generator(params.seed, device)
        if image_features is None and pixel_values is not None:
            with torch.inference_mode():
                image_features = model.encode_images(pixel_values.to(device), image_sizes.to(device))
        self._image_features = image_features
        capacity = ids.shape[1] + params.max_new_tokens
        self._reused = self._reuse(prefix, capacity)
        if self._reused == 0:
            self._cache = DenseKVCache.for_model(model.config, batch=self.num_rows, max_len=capacity, dtype=_dtype(model), device=device)

    def _reuse(self, prefix: CachedPrefix | None, capacity: int) -> int:
        """Adopt a previous turn's cache when its ids begin this prompt under the same LongRoPE set."""
        b = self._batch
        if prefix is None or self.num_rows != 1 or bool(b.mask.min() == 0):
            return 0
        new_ids = b.ids[0].tolist()
        if prefix.long_rope != (len(new_ids) > self._original_max) or prefix.cache.dtype != _dtype(self.model):
            return 0
        n = reusable_prefix_length(prefix.token_ids, new_ids)
        if n == 0:
            return 0
        cache = prefix.cache
        if cache.max_len < capacity:
            bigger = DenseKVCache.for_model(self.model.config, batch=1, max_len=capacity, dtype=cache.dtype, device=cache.device)
            bigger.keys[:, :, :, :n] = cache.keys[:, :, :, :n]
            bigger.values[:, :, :, :n] = cache.values[:, :, :, :n]
            bigger.length = n
            cache = bigger
        cache.crop(n)
        self._cache = cache
        return n

    @property
    def num_reused_tokens(self) -> int:
        """Prompt tokens whose keys/values came from a previous turn's cache."""
        return self._reused

    def cached_prefix(self) -> CachedPrefix:
        """This sequence's cache and ids, for a following turn (single sequences only)."""
        b = self._batch
        return CachedPrefix(self._cache, b.ids[0, : self._cache.length].tolist(), b.long_rope[0])

    @property
    def _original_max(self) -> int:
        return self.model.config.text.original_max_position_embeddings

    def finish(self, row: int) -> None:
        self.finished[row] = True

    def _prefill(self) -> torch.Tensor:
        """Run the whole grid from an empty cache; logits of the last column (B, V)."""
        b = self._batch
        self._cache.reset()
        logits = self.model(
            b.ids, positions=_positions(b.mask), attention_mask=b.mask, cache=self._cache, image_features=self._image_features,
            logits_to_keep=1,
        )
        b.long_rope = [int(n) > self._original_max for n in b.lengths.tolist()]
        return logits[:, -1]

    def _decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one column and return the logits after it (B, V)."""
        b = self._batch
        step_mask = torch.tensor([0 if done else 1 for done in self.finished], device=b.ids.device, dtype=torch.long)
        b.ids = torch.cat([b.ids, next_ids[:, None]], dim=1)
        b.mask = torch.cat([b.mask, step_mask[:, None]], dim=1)
        b.lengths = b.lengths + step_mask
        crossing = any(
            not done and not long and n > self._original_max
            for done, long, n in zip(self.finished, b.long_rope, b.lengths.tolist())
        )
        if crossing:
            # A row just passed original_max_position_embeddings: rebuild its keys with the long factors.
            return self._prefill()
        positions = (b.lengths - 1).clamp(min=0)[:, None]
        logits = self.model(next_ids[:, None], positions=positions, attention_mask=b.mask, cache=self._cache, logits_to_keep=1)
        return logits[:, -1]

    def _first_prefill(self) -> torch.Tensor:
        """The prompt's forward: all of it, or only what a reused cache does not hold yet."""
        if self._reused == 0:
            return self._prefill()
        b = self._batch
        start = self._reused
        logits = self.model(
            b.ids[:, start:],
            positions=_positions(b.mask)[:, start:],
            attention_mask=b.mask,
            cache=self._cache,
            image_features=self._image_features,
            logits_to_keep=1,
        )
        b.long_rope = [int(n) > self._original_max for n in b.lengths.tolist()]
        return logits[:, -1]

    def __iter__(self) -> Iterator[list[int | None]]:
        """Each step: the new token of each row, None for rows already finished."""
        with torch.inference_mode():
            logits = self._first_prefill()
            while True:
                next_ids = sample(logits, self.params, self._generator)
                self.num_generated += 1
                tokens: list[int | None] = []
                for row, tok in enumerate(next_ids.tolist()):
                    if self.finished[row]:
                        tokens.append(None)
                        next_ids[row] = self.pad_token_id
                        continue
                    tokens.append(tok)
                    if tok in self.stop_token_ids:
                        self.finished[row] = True
                if self.num_generated >= self.params.max_new_tokens:
                    self.finished = [True] * self.num_rows
                yield tokens
                if all(self.finished):
                    return
                logits = self._decode(next_ids)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _row_stream(tokenizer: Decodes, stop: Sequence[str]):
    return IncrementalDecoder(tokenizer), StopStringFilter(stop)


def stream_text(model, tokenizer, inputs, params: SamplingParams) -> Iterator[str]:
    """Text pieces of one prompt's answer as they are generated (never half a character)."""
    for pieces in stream_batch(model, tokenizer, inputs, params):
        piece = pieces[0]
        if piece:
            yield piece


def stream_batch(model, tokenizer, inputs, params: SamplingParams) -> Iterator[list[str]]:
    """Per step, the new text of every row ('' where nothing new is safe to show yet)."""
    gen = _token_generator(model, tokenizer, inputs, params)
    decoders = [_row_stream(tokenizer, params.stop) for _ in range(gen.num_rows)]
    for tokens in gen:
        pieces = []
        for row, tok in enumerate(tokens):
            decoder, stopper = decoders[row]
            if tok is None or tok in gen.stop_token_ids or stopper.stopped:
                pieces.append("")
                continue
            piece = stopper.push(decoder.push(tok))
            if stopper.stopped:
                gen.finish(row)
            pieces.append(piece)
        if all(gen.finished):
            pieces = [p + (s.push(d.flush()) + s.flush() if not s.stopped else "") for p, (d, s) in zip(pieces, decoders)]
        yield pieces


def _token_generator(model, tokenizer, inputs, params: SamplingParams) -> TokenGenerator:
    stop_ids = params.stop_token_ids if params.stop_token_ids is not None else default_stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenGenerator(
        model,
        inputs["input_ids"],
        inputs.get("attention_mask"),
        params,
        stop_token_ids=stop_ids,
        pad_token_id=pad,
        pixel_values=inputs.get("pixel_values"),
        image_sizes=inputs.get("image_sizes"),
    )


def generate(model, tokenizer, inputs, params: SamplingParams) -> list[GenerationOutput]:
    """Whole answers for every row of a (left-padded) batch."""
    start = time.perf_counter()
    gen = _token_generator(model, tokenizer, inputs, params)
    texts = [""] * gen.num_rows
    new_ids: list[list[int]] = [[] for _ in range(gen.num_rows)]
    stopped_by_stop = [False] * gen.num_rows
    decoders = [_row_stream(tokenizer, params.stop) for _ in range(gen.num_rows)]
    ttft = None
    for tokens in gen:
        if ttft is None:
            ttft = time.perf_counter() - start
        for row, tok in enumerate(tokens):
            decoder, stopper = decoders[row]
            if tok is None or stopper.stopped:
                continue
            if tok in gen.stop_token_ids:
                stopped_by_stop[row] = True
                continue
            new_ids[row].append(tok)
            texts[row] += stopper.push(decoder.push(tok))
            if stopper.stopped:
                stopped_by_stop[row] = True
                gen.finish(row)
    total = time.perf_counter() - start
    outputs = []
    for row in range(gen.num_rows):
        decoder, stopper = decoders[row]
        if not stopper.stopped:
            texts[row] += stopper.push(decoder.flush()) + stopper.flush()
        outputs.append(
            GenerationOutput(
                text=texts[row],
                token_ids=new_ids[row],
                finish_reason="stop" if stopped_by_stop[row] else "length",
                num_prompt_tokens=gen.prompt_lengths[row],
                ttft_s=ttft or 0.0,
                total_s=total,
            )
        )
    return outputs
