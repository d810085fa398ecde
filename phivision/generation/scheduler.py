"""Which sequences run in the next step, as a prefill (in chunks) or a decode; preemption; finishing.

Integers only (no torch). Policy, step by step:
* Admission is first come, first served: the head of the waiting queue is admitted only when the
  blocks of all its tokens can be allocated now (prefix-cache hits included) and fewer than
  `max_num_seqs` sequences are running. No later request jumps a blocked head.
* A step is either a prefill step or a decode step. When both kinds of work exist they alternate:
  after a prefill step with sequences decoding, the next step is a decode of all of them. So a
  long prompt delays each running sequence by at most one prefill step per token, and a prefill
  step is bounded by `max_num_batched_tokens`.
* A prefill step first continues sequences whose prompts are part-way through, then admits
  waiting ones, giving each a chunk of at most `prefill_chunk_size` tokens within the step's
  budget. A chunk never ends inside an image placeholder run (the runner embeds whole runs): it
  stops before the run, or, when the run alone is longer than the limit, takes the whole run
  (over the limit, as the step's only chunk when it is over the budget). A chunk that stops before
  a run only because the rest of the step's budget cannot hold the run, and that would use less
  than half of that rest, is not taken: the step ends there and the prompt goes on in the next one.
* A decode step feeds the last token of every decoding sequence. When one needs a new block and
  none is free, the most recently arrived running sequence is preempted (recompute: its blocks are
  freed, it goes back to the front of the waiting queue with its generated tokens and is
  prefilled again later, mostly from the prefix cache). A sequence that cannot grow even when it
  runs alone is aborted with an error instead of waiting forever.
* LongRoPE (spec §6.8): keys are rotated with the long factor set iff the sequence was longer
  than `original_max_position_embeddings` when they were computed. A prompt over that length is
  prefilled with the long set throughout; a sequence whose length crosses it while decoding
  (cache built with the short set) is re-prefilled in full, once, with the long set. The factor
  set is part of the block hash, so the two sets never share cached blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field

from ..errors import PromptError
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int  # the pool's size, reserved blocks included (as the BlockManager counts)
    block_size: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # prefill tokens per step
    prefill_chunk_size: int = 2048  # most tokens of one sequence per prefill step
    max_model_len: int = 8192  # prompt + generated tokens
    original_max_position_embeddings: int = 4096  # LongRoPE's short/long switch point
    default_stop_token_ids: tuple[int, ...] = ()  # used when a request's stop_token_ids is None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size",
                     "max_model_len", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "default_stop_token_ids", tuple(self.default_stop_token_ids))


@dataclass(frozen=True)
class ScheduledBatch:
    """One step of work. Sequence i computes token positions `chunks[i]` = [start, end).

    prefill: one chunk per sequence (start = its cached tokens); a token is sampled only for the
    sequences whose `is_last_chunk` is true (end = num_tokens). decode: each sequence feeds its
    last token, chunk (num_tokens - 1, num_tokens), and always samples. Each sequence's
    `long_rope` is the factor set of this step's keys. `aborted`: sequences the scheduler gave up
    on during this call (finish_reason "abort", `error` says why); report them as finished. An
    empty `seqs` means there is nothing to run.
    """

    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]
    chunks: list[tuple[int, int]]
    is_last_chunk: list[bool]
    aborted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(end - start for start, end in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


def prefill_chunk_end(token_ids: Ids[int], start: int, max_len: int) -> int:
    """End of the chunk starting at `start`: at most `max_len` tokens unless that splits an image run.

    A chunk that would end inside a run stops at the run's start; if the run starts the chunk,
    the chunk takes the whole run instead (the only way to make progress).
    """
    num_tokens = len(token_ids)
    end = min(num_tokens, start + max_len)
    if end < num_tokens and token_ids[end] < 0 and token_ids[end - 1] == token_ids[end]:
        run_id = token_ids[end]
        run_start = end - 1
        while run_start > start and token_ids[run_start - 1] == run_id:
            run_start -= 1
        if run_start > start:
            return run_start
        while end < num_tokens and token_ids[end] == run_id:
            end += 1
    return end


class Scheduler:
    """Waiting queue, running sequences, and the step-by-step policy of the module docstring."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if (block_manager.block_size, block_manager.num_blocks) != (config.block_size, config.num_blocks):
            raise ValueError("the block manager and the scheduler config disagree on block_size / num_blocks")
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, KV not yet computed for every token
        self.decoding: list[Sequence] = []
        self._last_kind: str | None = None
        self._next_arrival = 0

    # -- queue state ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_prefill_tokens_left(self) -> int:
        """Prompt tokens not yet prefilled, of the waiting and part-prefilled sequences (tokens that a
        prefix-cache hit will skip included: they are known only at admission)."""
        return sum(seq.num_tokens - seq.num_computed_tokens for seq in (*self.waiting, *self.prefilling))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    # -- requests -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence. Refuses (PromptError, and marks it aborted) one that can never run."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} was already scheduled")
        reason = self.refusal(seq.num_tokens)
        if reason is not None:
            self._finish(seq, "abort", reason)
            raise PromptError(f"request {seq.request_id}: {reason}")
        seq.arrival_index = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(seq)

    def refusal(self, num_tokens: int) -> str | None:
        """Why a prompt of `num_tokens` tokens could never run here (`add` refuses it), else None."""
        cfg = self.config
        if num_tokens == 0:
            return "the prompt is empty"
        if num_tokens >= cfg.max_model_len:
            return f"the prompt is {num_tokens} tokens long; max_model_len={cfg.max_model_len} leaves no room for an answer"
        blocks = -(-num_tokens // cfg.block_size)
        if blocks > self.block_manager.num_usable_blocks:
            return f"the prompt needs {blocks} KV blocks but the pool has {self.block_manager.num_usable_blocks}"
        return None

    def abort(self, request_id: str) -> bool:
        """Finishes every sequence of `request_id` at once, freeing its blocks; False if none was unfinished."""
        found = [s for s in (*self.waiting, *self.prefilling, *self.decoding) if s.request_id == request_id]
        for seq in found:
            self._finish(seq, "abort", "aborted by the caller")
        return bool(found)

    # -- stepping -------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """The next step's work (see the module docstring for the policy)."""
        aborted: list[Sequence] = []
        if self.decoding and self._last_kind == "prefill":
            batch = self._schedule_decode(aborted) or self._schedule_prefill(aborted)
        else:
            batch = self._schedule_prefill(aborted) or self._schedule_decode(aborted)
        if batch is None:
            batch = ScheduledBatch("decode", [], [], [])
        self._last_kind = batch.kind if batch.seqs else None
        return ScheduledBatch(batch.kind, batch.seqs, batch.chunks, batch.is_last_chunk, aborted)

    def postprocess(self, seqs: Ids[Sequence], token_ids: Ids[int | None]) -> list[Sequence]:
        """Records a finished step: `token_ids[i]` is the token sampled for `seqs[i]` (ignored,
        may be None, for a prefill chunk that is not the last). Returns the sequences that finished."""
        if len(seqs) != len(token_ids):
            raise ValueError(f"{len(seqs)} sequences but {len(token_ids)} token ids")
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted since the step was scheduled; its blocks are already free
            seq.num_cached_tokens = seq.num_computed_tokens
            self.block_manager.commit(seq)
            if seq.num_cached_tokens < seq.num_tokens:
                continue  # a prefill chunk that is not the last: nothing was sampled
            if token_id is None:
                raise ValueError(f"sequence {seq.seq_id} finished its prefill but got no token")
            if any(s is seq for s in self.prefilling):
                self.prefilling.remove(seq)
                self.decoding.append(seq)
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
            elif seq.long_rope is False and seq.num_tokens > self.config.original_max_position_embeddings:
                # The token about to be fed takes the sequence over the switch point: its cached
                # keys use the short factors, the reference drops them and re-runs everything.
                self._requeue(seq)
        return finished

    def next_decode_if_no_stop(self, seqs: Ids[Sequence]) -> list[int] | None:
        """For a decode step of `seqs` just scheduled (not yet postprocessed): when the step after it
        is certain to be a decode of the same sequences, in the same order, on the same blocks,
        unless one samples a stop token (or is aborted, or a request arrives), each one's context
        length in that step; else None. Lets the engine queue that step before it has read this
        one's tokens.

        Certain means: nothing waits or is being prefilled, `seqs` are all the decoding sequences,
        and for each one the new token ends it by no length limit, takes it over no LongRoPE switch,
        and lands in a block it already holds (so the next step allocates and preempts nothing).
        """
        cfg = self.config
        if self.waiting or self.prefilling or len(seqs) != len(self.decoding):
            return None
        lens = []
        for seq in seqs:
            n = seq.num_tokens  # the next step feeds position n
            if (seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != n
                    or seq.num_generated + 1 >= seq.params.max_new_tokens or n + 1 >= cfg.max_model_len
                    or (seq.long_rope is False and n + 1 > cfg.original_max_position_embeddings)
                    or len(seq.block_table) * cfg.block_size <= n):
                return None
            lens.append(n + 1)
        order = sorted(self.decoding, key=lambda s: s.arrival_index)
        if any(a is not b for a, b in zip(order, seqs)):
            return None
        return lens

    # -- internals ------------------------------------------------------------------------------

    def _schedule_prefill(self, aborted: list[Sequence]) -> ScheduledBatch | None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        chunks: list[tuple[int, int]] = []

        def take_chunk(seq: Sequence) -> bool:
            """Schedules `seq`'s next chunk if the budget allows; False when the step is full."""
            nonlocal budget
            start = seq.num_computed_tokens
            limit = min(cfg.prefill_chunk_size, budget)
            end = prefill_chunk_end(seq.token_ids, start, limit)
            if end - start > budget and seqs:
                return False  # an image run over the budget goes alone in a later step
            cut_by_budget = end - start < limit and prefill_chunk_end(seq.token_ids, start, cfg.prefill_chunk_size) > end
            if seqs and cut_by_budget and 2 * (end - start) < limit:
                # Stopped short before an image run that does not fit in what is left of the step, and
                # the text before the run would use less than half of that: the step ends here, and
                # the prompt starts in the next one. Taken, such short chunks add up: each costs a
                # sequence admitted for a few tokens and a continued chunk in the next step (W4 over
                # HTTP: 45 prompts admitted on 2 tokens each, and every later step held only
                # continued chunks).
                return False
            seq.num_computed_tokens = end
            seqs.append(seq)
            chunks.append((start, end))
            budget -= end - start
            return budget > 0

        has_room = True
        for seq in list(self.prefilling):
            if not (has_room := take_chunk(seq)):
                break
        while has_room and self.waiting and self.num_running < cfg.max_num_seqs:
            seq = self.waiting[0]
            seq.long_rope = seq.num_tokens > cfg.original_max_position_embeddings
            if not self.block_manager.can_allocate(seq):
                seq.long_rope = None
                if self.num_running == 0:
                    # Every block is free or evictable and it still does not fit: it never will.
                    self.waiting.popleft()
                    self._finish(seq, "abort", f"needs {seq.num_blocks(cfg.block_size)} KV blocks, the pool has "
                                               f"{self.block_manager.num_usable_blocks}")
                    aborted.append(seq)
                    continue
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.prefilling.append(seq)
            has_room = take_chunk(seq)
        if not seqs:
            return None
        is_last = [end == seq.num_tokens for seq, (_, end) in zip(seqs, chunks)]
        return ScheduledBatch("prefill", seqs, chunks, is_last)

    def _schedule_decode(self, aborted: list[Sequence]) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        # Oldest first, so that every sequence already scheduled is older than any victim.
        for seq in sorted(self.decoding, key=lambda s: s.arrival_index):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below to make room for an earlier one
            while not self.block_manager.can_append(seq):
                victims = [s for s in (*self.prefilling, *self.decoding) if not any(s is t for t in scheduled)]
                victim = max(victims, key=lambda s: s.arrival_index)
                if victim is not seq:
                    self._preempt(victim)
                    continue
                if self.num_running == 1:
                    # Alone with every other block free, it still cannot grow: the pool is too small.
                    self._finish(seq, "abort", f"ran out of KV blocks at {seq.num_tokens} tokens: the pool has "
                                               f"{self.block_manager.num_usable_blocks} blocks of "
                                               f"{self.config.block_size}")
                    aborted.append(seq)
                else:
                    self._preempt(seq)
                break
            else:
                self.block_manager.may_append(seq)
                seq.num_computed_tokens = seq.num_tokens
                scheduled.append(seq)
        if not scheduled:
            return None
        chunks = [(seq.num_tokens - 1, seq.num_tokens) for seq in scheduled]
        return ScheduledBatch("decode", scheduled, chunks, [True] * len(scheduled))

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if not params.ignore_eos:
            stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.config.default_stop_token_ids
            if token_id in stop_ids:
                return "stop"
        if seq.num_generated >= params.max_new_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _remove_running(self, seq: Sequence) -> None:
        for queue in (self.prefilling, self.decoding):
            if any(s is seq for s in queue):
                queue.remove(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Frees `seq`'s blocks and puts it first in line, to be prefilled again from scratch."""
        self._remove_running(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        seq.num_preemptions += 1
        self._requeue(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is SequenceStatus.WAITING and any(s is seq for s in self.waiting):
            self.waiting.remove(seq)
        self._remove_running(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
