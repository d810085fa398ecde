"""Scheduled work -> tensors -> model -> logits, on the paged KV pool.

`ModelRunner` owns the pool and, on CUDA, one captured CUDA graph of the decode step per batch
size in `graph_batch_sizes` (a decode batch runs in the smallest graph that holds it; the spare
rows point at the reserved block 0 and write nowhere). Prefill runs eagerly: its kernels are large
enough that launch overhead does not matter. There is one decode path whatever the batch size:
batch 1 is simply the smallest graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.paged_attention import decode_scratch, decode_splits
from ..model.language import fused_sdpa_only
from ..model.transfer import to_device
from .kv_cache import PagedBatch, PagedKVCache, padded_causal_attention

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# A prompt prefilled from its start in one chunk of at least CUDNN_PREFILL_MIN_TOKENS runs its
# attention through cuDNN, padded to a multiple of CUDNN_PREFILL_BUCKET rows. cuDNN's kernels beat
# flash's on Hopper (H200, prompts of new lengths: 8,190 tokens 126-128 against 137-141 ms, 2,531
# tokens 31 against 39-43), but cuDNN builds an execution plan (~40 ms) for every new length; with
# the padding there is one plan per bucket, all built at start. The padding rows cost attention
# work (causal: the last rows attend to almost every key), so buckets of 256 rather than 512: 8,211
# tokens 131.9 against 134.0 ms, 5,222 75.8 against 77.5 (benchmarks/exp_new_lengths.py), for 61
# plans up to 16K instead of 31. cuDNN's ragged form, which would skip the padding, builds a new
# plan at every call in torch 2.11 (55-70 ms each: benchmarks/exp_cudnn_ragged.py).
CUDNN_PREFILL_MIN_TOKENS = 1024
CUDNN_PREFILL_BUCKET = 256
# A prompt prefilled from its start in one chunk of at least FLASH4_PREFILL_MIN_TOKENS runs its
# attention through FlashAttention-4 (RunnerConfig.flash4_prefill), before the cuDNN rule above.
# FA4's kernel is faster at every length (H100, one layer's attention in a CUDA graph: 1,000 tokens
# 0.025 ms against SDPA flash's 0.042 and cuDNN's 0.032; 2,534 tokens 0.090 against cuDNN's 0.118),
# but its Python wrapper spends 120-330 us of host time a call (benchmarks/exp_flash4_attention.py,
# two hosts). A layer's products take ~0.33 ms a 1,024 tokens on the GPU, so under ~2K tokens the
# host would fall behind the GPU while queueing the prefill; those prompts keep cuDNN (or flash).
FLASH4_PREFILL_MIN_TOKENS = 2048


def _bucket(length: int) -> int:
    """`length` rounded up to a multiple of CUDNN_PREFILL_BUCKET."""
    return -(-length // CUDNN_PREFILL_BUCKET) * CUDNN_PREFILL_BUCKET


def _table_array(block_tables: Sequence[Sequence[int]], rows: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Block tables as one zero-padded (rows, width) int32 array, written into `out` when given.
    Rows filled in numpy: a torch.tensor per row took ~25 us on a 2-core machine, half of a
    batch-64 decode step's host time (3.1 ms there, argmax on the CPU included; 1.5 after)."""
    tables = np.zeros((rows, width), dtype=np.int32) if out is None else out
    if out is not None:
        tables[:] = 0
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    return tables


@dataclass(frozen=True)
class PrefillChunk:
    """Positions [start, start + len(token_ids)) of one sequence, with its blocks and image features."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    image_features: list[torch.Tensor] | None


@dataclass(frozen=True)
class DeviceTokens:
    """One token per row of a queued decode step, on the device and copied to pinned host memory;
    `tolist()` waits for that copy only (not for work queued after it)."""

    device: torch.Tensor  # (B,) int64
    host: torch.Tensor  # (B0,) int64, pinned on CUDA: the step's tokens, of which rows `rows` are ours
    event: torch.cuda.Event | None
    rows: tuple[int, ...] | None = None  # None: every row of `host`

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        values = self.host.tolist()
        return values if self.rows is None else [values[row] for row in self.rows]


@dataclass(frozen=True)
class RunnerConfig:
    num_blocks: int
    block_size: int = 64
    max_num_seqs: int = 64
    max_model_len: int = 8192
    use_cuda_graphs: bool = True
    # cuDNN attention for long prompts from their start, in length buckets (CUDNN_PREFILL_*); the
    # plans of every bucket up to max_prefill_tokens are built at start.
    cudnn_prefill: bool = False
    max_prefill_tokens: int = 16384
    # A prompt prefilled from its start in one chunk of FLASH4_PREFILL_MIN_TOKENS or more runs its
    # attention through FlashAttention-4's kernels (kernels/flash4.py; no padding, no plans); the
    # cuDNN rule above then covers the shorter ones only (fewer plans to build).
    flash4_prefill: bool = False
    # A prefill's last decoder layer computes only keys and values at the rows whose outputs feed
    # no logits (see Phi3Decoder.forward); off = every row, as the reference does.
    prefill_last_rows_only: bool = True
    # Decode steps look their rotary rows up in tables of every position below max_model_len (built
    # at start, ~0.4 KB a position in bf16) instead of computing them; off = computed each step.
    decode_rope_tables: bool = True

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.block_size)


class _DecodeGraph:
    """Static buffers and the captured decode step for one batch size.

    Every input of a step lives in one device byte buffer, fed from one pinned host buffer by a
    single asynchronous copy, instead of six pageable copies, each staged by the driver while the
    host waits. The GPU is idle while the host prepares a step, so this time counts in every step
    (the runner's host time per step: 33 us before, 17 after, on a 2-core machine)."""

    # (name, dtype, columns) of each input, laid out one after another in the byte buffers.
    _LAYOUT = (("input_ids", torch.int64, 1), ("positions", torch.int64, 1), ("slot_mapping", torch.int64, None),
               ("context_lens", torch.int32, None), ("long_rope", torch.bool, None), ("block_tables", torch.int32, "blocks"))
    _NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}
    ALIGN = 16  # bytes, of each input's offset in the buffers

    def __init__(self, runner: "ModelRunner", batch: int):
        device, cfg = runner.device, runner.config
        self.batch = batch
        shapes, offsets, size = {}, {}, 0
        for name, dtype, columns in self._LAYOUT:
            shape = (batch,) if columns is None else (batch, cfg.max_blocks_per_seq if columns == "blocks" else columns)
            offsets[name] = size
            shapes[name] = shape
            # 16-byte aligned: Triton compiles a variant of a kernel per pointer alignment (16 or
            # not). The prefill's last rows run the decode kernel on tensors of their own, always
            # aligned; graph inputs at 8-byte offsets (context_lens in the batch-1 graph, block
            # tables in those of 1, 4, 8 and 24) made those variants new, compiled mid-serving (W4
            # over HTTP on an H200 with the default KV pool: stalls of ~1 s, 1,935 tokens/s).
            size += -(-int(np.prod(shape)) * dtype.itemsize // self.ALIGN) * self.ALIGN
        self._device_bytes = torch.zeros(size, dtype=torch.uint8, device=device)
        self._host_bytes = torch.zeros(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        host = self._host_bytes.numpy()
        self.host: dict[str, np.ndarray] = {}
        for name, dtype, _ in self._LAYOUT:
            nbytes = int(np.prod(shapes[name])) * dtype.itemsize
            start = offsets[name]
            self.host[name] = host[start : start + nbytes].view(self._NUMPY[dtype]).reshape(shapes[name])
            setattr(self, name, self._device_bytes[start : start + nbytes].view(dtype).view(shapes[name]))
        self.slot_mapping.fill_(-1)
        self.context_lens.fill_(1)
        num_heads, head_dim = runner.num_heads, runner.head_dim
        self.num_splits = decode_splits(batch, num_heads, runner.num_sms)
        self.scratch = decode_scratch(batch, num_heads, self.num_splits, head_dim, device)
        self._ids_end = offsets["positions"]  # bytes of input_ids at the buffers' start
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        # The captured step ends with each row's argmax written over its own input ids: a greedy
        # step queued after it reads its tokens there, with nothing to copy between the two (see
        # ModelRunner.decode_queued). Rows' ids are read at the step's start and written at its end.
        self.argmax = self.input_ids[:, 0]  # (B,) int64, a view

    def feeds_itself(self, tokens: "DeviceTokens", batch: int) -> bool:
        """Whether `tokens` are this graph's own argmax of every row of a step of `batch` rows."""
        return (self.graph is not None and tokens.rows is None and tokens.device.shape[0] == batch
                and tokens.device.data_ptr() == self.argmax.data_ptr())

    def host_inputs(self) -> dict[str, np.ndarray]:
        """The pinned host views, once the previous step's copy out of them has finished."""
        if self._copied is not None:
            self._copied.synchronize()
        return self.host

    def upload(self, keep_ids: bool = False) -> None:
        """One asynchronous copy of every input to the device (keep_ids: all but input_ids, which
        the previous replay left there)."""
        start = self._ids_end if keep_ids else 0
        self._device_bytes[start:].copy_(self._host_bytes[start:], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def run_eager(self, runner: "ModelRunner") -> torch.Tensor:
        cache = PagedBatch(runner.pool, kind="decode", slot_mapping=self.slot_mapping, block_tables=self.block_tables,
                           long_rope=self.long_rope, context_lens=self.context_lens, num_splits=self.num_splits, scratch=self.scratch,
                           rope_tables=runner.rope_tables)
        return runner.model(self.input_ids, positions=self.positions, cache=cache, logits_to_keep=1, has_images=False)[:, -1]

    def capture(self, runner: "ModelRunner", pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compilation, cuBLAS handles) outside the capture
                self.run_eager(runner)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self.run_eager(runner)
            torch.argmax(self.logits, dim=-1, out=self.argmax)


class ModelRunner:
    """Runs prefill chunks and decode steps of sequences whose blocks the block manager assigned."""

    def __init__(self, model: torch.nn.Module, config: RunnerConfig, *, graph_batch_sizes: Sequence[int] = DEFAULT_GRAPH_BATCH_SIZES):
        self.model = model
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        text = model.config.text
        self.num_heads, self.head_dim = text.num_attention_heads, text.head_dim
        self.original_max = text.original_max_position_embeddings
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        self.pool = PagedKVCache.for_model(model.config, num_blocks=config.num_blocks, block_size=config.block_size,
                                           dtype=self.dtype, device=self.device)
        sizes = sorted({b for b in graph_batch_sizes if b <= config.max_num_seqs} | {config.max_num_seqs})
        self._graphs = {b: _DecodeGraph(self, b) for b in sizes}
        # Where queued steps leave their tokens (device, pinned host copy, its event) and where
        # select_tokens puts its row indices (pinned, device). Three slots, taken in turn: a step's
        # tokens must outlive the next step's launch, which reads them on the device, and the host's
        # read of them; the host is never more than one step ahead of the GPU (each engine step reads
        # the tokens of the step before), and an engine step takes at most two slots.
        pinned = self.device.type == "cuda"
        self._token_slots = [(torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device),
                              torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=pinned),
                              torch.cuda.Event() if pinned else None,
                              torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=pinned),
                              torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)) for _ in range(3)]
        self._next_token_slot = 0
        self.graphs_captured = False
        self.num_kv_heads = text.num_key_value_heads
        self.rope_tables = (model.language_model.rotary.tables(config.max_model_len, self.dtype)
                            if config.decode_rope_tables else None)
        # (padding applies on any device, so the CPU tests check it; only CUDA has cuDNN's plans)
        self.cudnn_prefill = config.cudnn_prefill and self.num_kv_heads == self.num_heads
        if config.use_cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()
        if self.cudnn_prefill and self.device.type == "cuda":
            self.build_prefill_plans()
        if config.flash4_prefill and self.device.type == "cuda":
            self.compile_flash4()

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Captures the largest batch first so smaller graphs share its memory pool."""
        mempool = torch.cuda.graph_pool_handle()
        for batch in sorted(self._graphs, reverse=True):
            self._graphs[batch].capture(self, mempool)
        torch.cuda.synchronize()
        self.graphs_captured = True

    def prefill_buckets(self) -> list[int]:
        """The padded lengths a prompt's attention may have on the cuDNN path."""
        longest = self.config.max_prefill_tokens
        if self.config.flash4_prefill:  # longer prompts go to FlashAttention-4
            longest = min(longest, FLASH4_PREFILL_MIN_TOKENS - 1)
        first, last = _bucket(CUDNN_PREFILL_MIN_TOKENS), _bucket(longest)
        return list(range(first, last + 1, CUDNN_PREFILL_BUCKET))

    @torch.inference_mode()
    def build_prefill_plans(self) -> None:
        """Runs the prefill attention of every bucket once, on zeros, so that cuDNN builds its plans
        now and no prompt waits for one. cuDNN keeps plans per thread: this must run on the thread
        that steps the engine (the engine's constructor does)."""
        width = 3 * self.num_heads * self.head_dim
        with self._prefill_attention(padded=True):
            for length in self.prefill_buckets():
                padded_causal_attention(torch.zeros((length, width), dtype=self.dtype, device=self.device),
                                        self.num_heads, self.head_dim)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def compile_flash4(self) -> None:
        """Runs FlashAttention-4's causal kernel once, so that it is compiled (seconds) now, not at
        the first prompt. Its kernels are keyed by dtype and head shape, not by length."""
        from ..kernels.flash4 import warm_up

        warm_up(self.device, self.dtype, self.num_heads, self.num_kv_heads, self.head_dim)

    def _flash4(self, chunks: Sequence["PrefillChunk"]) -> bool:
        """Whether a prefill's attention goes through FlashAttention-4: one long chunk from its start."""
        return (self.config.flash4_prefill and len(chunks) == 1 and chunks[0].start == 0
                and len(chunks[0].token_ids) >= FLASH4_PREFILL_MIN_TOKENS)

    def _padded_length(self, chunks: Sequence["PrefillChunk"]) -> int | None:
        """The bucket a prefill's attention is padded to (the cuDNN path), or None."""
        if not self.cudnn_prefill or len(chunks) != 1 or chunks[0].start != 0 or self._flash4(chunks):
            return None
        length = len(chunks[0].token_ids)
        if length < CUDNN_PREFILL_MIN_TOKENS or length > self.config.max_prefill_tokens:
            return None
        return _bucket(length)

    def slots(self, block_table: Sequence[int], start: int, end: int) -> np.ndarray:
        """Pool slots of positions [start, end) of a sequence with this block table (int64)."""
        size = self.config.block_size
        positions = np.arange(start, end, dtype=np.int64)
        return np.asarray(block_table, dtype=np.int64)[positions // size] * size + positions % size

    def prefill(self, token_ids: Sequence[int], start: int, block_table: Sequence[int],
                image_features: list[torch.Tensor] | None, long_rope: bool) -> torch.Tensor:
        """Computes positions [start, start + len(token_ids)) of one sequence; logits of the last (V,).

        `token_ids` are the chunk's ids (negative = image placeholders, whole runs only);
        `long_rope` is the factor set of the whole sequence being prefilled (spec §6.8).
        """
        return self.prefill_many([PrefillChunk(token_ids, start, block_table, image_features)], long_rope)[0]

    @torch.inference_mode()
    def prefill_many(self, chunks: Sequence["PrefillChunk"], long_rope: bool) -> torch.Tensor:
        """Prefills chunks of several sequences in one forward (all with the same LongRoPE factor
        set); logits of each chunk's last token (S, V).

        The chunks are packed into one row: the linear layers see all their tokens at once (one
        large product instead of one per sequence, and one kernel launch per layer op instead of
        one per sequence), attention runs per chunk. Each chunk's image tags -g are renumbered
        -(g + images of the chunks before it) so that one concatenated feature list serves all.
        """
        # Inputs built with numpy, per chunk rather than per token (an 8K-token step of 10 chunks:
        # 3.7 ms of host time with Python lists on a 2-core machine, while the GPU waits).
        ids_parts: list[np.ndarray] = []
        position_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        segments: list[tuple[int, int, int]] = []
        features: list[torch.Tensor] = []
        has_images = False
        offset = 0
        for chunk in chunks:
            chunk_ids = np.asarray(chunk.token_ids, dtype=np.int64)
            placeholders = chunk_ids < 0
            if placeholders.any():
                has_images = True
                if not chunk.image_features:
                    raise ValueError("a prefill chunk has image placeholders but its sequence has no image features")
                chunk_ids = np.where(placeholders, chunk_ids - len(features), chunk_ids)
            if chunk.image_features:
                features.extend(chunk.image_features)
            end = chunk.start + len(chunk_ids)
            ids_parts.append(chunk_ids)
            position_parts.append(np.arange(chunk.start, end, dtype=np.int64))
            slot_parts.append(self.slots(chunk.block_table, chunk.start, end))
            segments.append((offset, len(chunk_ids), chunk.start))
            offset += len(chunk_ids)
        ids = torch.from_numpy(np.concatenate(ids_parts))
        positions = torch.from_numpy(np.concatenate(position_parts))
        slots = torch.from_numpy(np.concatenate(slot_parts))
        # As wide as the decode graphs' tables: the last rows' attention (the decode kernel) then
        # has the graphs' strides, so Triton runs a variant it has compiled already.
        tables = _table_array([chunk.block_table for chunk in chunks], len(chunks), self.config.max_blocks_per_seq)
        cache = PagedBatch(
            self.pool,
            kind="prefill",
            slot_mapping=to_device(slots, self.device),
            block_tables=to_device(torch.from_numpy(tables), self.device),
            long_rope=to_device(torch.tensor([long_rope]), self.device),
            start=chunks[0].start,
            segments=segments,
            cu_seqlens=self._packed_offsets(segments),
            pad_to=(pad_to := self._padded_length(chunks)),
            flash4=self._flash4(chunks),
            **self._last_rows(chunks),
        )
        with self._prefill_attention(padded=pad_to is not None):
            # ids go on the host copy: the model places image features from it without a readback.
            logits = self.model(ids[None],
                                positions=to_device(positions[None], self.device),
                                cache=cache, image_features=features if has_images else None,
                                logits_positions=[offset + length - 1 for offset, length, _ in segments],
                                has_images=has_images)
        return logits[0]  # (S, V)

    def _last_rows(self, chunks: Sequence["PrefillChunk"]) -> dict:
        """PagedBatch arguments for a prefill whose last layer runs at each chunk's last row only
        (`RunnerConfig.prefill_last_rows_only`): each chunk's context length, int32 on the device,
        and the decode kernel's split count, that of the decode graph these rows would run in. The
        split count is a compile-time constant of the kernel: a count of its own for every number
        of chunks compiled a new variant in the middle of serving (W4 over HTTP on an H200: 2,397
        output tokens/s against ~3,650)."""
        if not self.config.prefill_last_rows_only:
            return {}
        lens = np.array([chunk.start + len(chunk.token_ids) for chunk in chunks], dtype=np.int32)
        sizes = [size for size in self._graphs if size >= len(chunks)]
        rows = min(sizes) if sizes else len(chunks)
        return {"last_rows_only": True, "context_lens": to_device(torch.from_numpy(lens), self.device),
                "num_splits": decode_splits(rows, self.num_heads, self.num_sms)}

    def _packed_offsets(self, segments: list[tuple[int, int, int]]) -> torch.Tensor | None:
        """For several chunks, one or more of which start their sequences, whose attention then runs
        in one packed call: their row offsets and the row's length, int32 on the device (cu_seqlens);
        else None. A chunk that continues its sequence is redone over the pool afterwards (see
        `PagedBatch.attend_qkv`). A step holds one when the previous step's token budget split a
        prompt; with one attention call per chunk instead, such a step of 8,192 tokens in ~800-token
        prompts took 117-121 ms, against 109-111 packed (H200, `benchmarks/exp_packed_prefill.py`)."""
        if len(segments) < 2 or all(start for _, _, start in segments):
            return None
        offsets = np.array([offset for offset, _, _ in segments] + [sum(length for _, length, _ in segments)], dtype=np.int32)
        return to_device(torch.from_numpy(offsets), self.device)

    def _prefill_attention(self, padded: bool):
        """Which SDPA kernels prefill attention may use on CUDA. Padded to a bucket (one prompt from
        its start): cuDNN first, whose plan for the bucket exists. Otherwise flash / memory-efficient
        only, never cuDNN, which would build a plan for every new (query, key) length: measured on an
        H200 (2026-12-03, third session), prompts of lengths not seen before took 135-139 ms (6K
        tokens) and 167-173 ms (8.1K) with cuDNN, 94-96 and 135-138 with flash; W4 on an H100 spent
        1.7-2.6 s in prefill steps with cuDNN, 1.1 s with flash."""
        if padded and self.device.type == "cuda":
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                               set_priority=True)
        return fused_sdpa_only(self.device)

    def _graph_for(self, batch: int) -> _DecodeGraph:
        for size in sorted(self._graphs):
            if size >= batch:
                return self._graphs[size]
        raise ValueError(f"a decode batch of {batch} is over max_num_seqs={self.config.max_num_seqs}")

    def _launch_decode(self, last_tokens: Sequence[int] | "DeviceTokens", context_lens: Sequence[int],
                       block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Queues one decode step; its logits (B, V), valid until the same graph's next replay.
        `last_tokens` may be a previous step's tokens still on the device (their host values unread)."""
        batch = len(context_lens)
        g = self._graph_for(batch)
        size = self.config.block_size
        inputs = g.host_inputs()
        # Padded rows write nowhere (slot -1) and read one token of the reserved block 0.
        lens = inputs["context_lens"]
        lens[:batch] = context_lens
        lens[batch:] = 1
        positions = inputs["positions"][:, 0]
        positions[:] = lens - 1
        on_device = isinstance(last_tokens, DeviceTokens)
        in_place = on_device and g.feeds_itself(last_tokens, batch)
        inputs["input_ids"][:batch, 0] = 0 if on_device else last_tokens
        inputs["input_ids"][batch:] = 0
        tables = _table_array(block_tables, *inputs["block_tables"].shape, out=inputs["block_tables"])
        rows = np.arange(batch)
        inputs["slot_mapping"][:batch] = tables[rows, positions[:batch] // size].astype(np.int64) * size + positions[:batch] % size
        inputs["slot_mapping"][batch:] = -1
        inputs["long_rope"][:] = lens > self.original_max
        g.upload(keep_ids=in_place)
        if on_device and not in_place:
            if last_tokens.device.shape[0] != batch:
                raise ValueError(f"{last_tokens.device.shape[0]} tokens on the device for a batch of {batch}")
            g.input_ids[:batch, 0].copy_(last_tokens.device)  # after the upload, in stream order
        if g.graph is not None:
            g.graph.replay()
            return g.logits[:batch]
        return g.run_eager(self)[:batch]

    @torch.inference_mode()
    def decode(self, last_tokens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """One new token per sequence: token i sits at position context_lens[i] - 1. Logits (B, V).

        Each row uses the long factors iff its length is over original_max_position_embeddings; the
        scheduler re-prefills a sequence at the step it crosses, so its cached keys agree.
        """
        return self._launch_decode(last_tokens, context_lens, block_tables)

    @torch.inference_mode()
    def decode_queued(self, last_tokens: Sequence[int] | "DeviceTokens", context_lens: Sequence[int],
                      block_tables: Sequence[Sequence[int]],
                      pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "DeviceTokens":
        """A decode step whose tokens are picked on the device (`pick`: logits (B, V) -> ids (B,),
        default the argmax), queued without waiting for them: the result's `device` tensor can feed
        the next step before the host has read it (`tolist()`), so the GPU never idles while the
        host turns a step around."""
        logits = self._launch_decode(last_tokens, context_lens, block_tables)
        batch = logits.shape[0]
        slot = self._take_token_slot()
        device, host, event = slot[0][:batch], slot[1][:batch], slot[2]
        g = self._graph_for(batch)
        if pick is None and g.graph is not None:
            # The replay's own argmax, in its input ids: valid until that graph's next replay, and
            # every reader of these tokens (the next step's inputs, select_tokens) is queued before it.
            device = g.argmax[:batch]
        elif pick is None:
            torch.argmax(logits, dim=-1, out=device)
        else:
            device.copy_(pick(logits))
        host.copy_(device, non_blocking=True)
        if event is not None:
            event.record()
        return DeviceTokens(device, host, event)

    @torch.inference_mode()
    def select_tokens(self, tokens: DeviceTokens, rows: Sequence[int]) -> DeviceTokens:
        """Rows `rows` of a queued step's tokens, gathered on the device without waiting for them
        (for a batch that lost some sequences: a stop token, an abort)."""
        slot = self._take_token_slot()
        index_host, index = slot[3][: len(rows)], slot[4][: len(rows)]
        index_host.numpy()[:] = rows
        index.copy_(index_host, non_blocking=True)
        device = slot[0][: len(rows)]
        torch.index_select(tokens.device, 0, index, out=device)
        picked = tuple(rows) if tokens.rows is None else tuple(tokens.rows[row] for row in rows)
        return DeviceTokens(device, tokens.host, tokens.event, picked)

    def _take_token_slot(self) -> tuple:
        slot = self._token_slots[self._next_token_slot]
        self._next_token_slot = (self._next_token_slot + 1) % len(self._token_slots)
        return slot
