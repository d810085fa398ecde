"""KV block bookkeeping: which pool blocks each sequence owns, and a prefix cache of full blocks.

Integers only (no torch). A block is in one of three states:
* in use: ref count > 0 (several sequences share a block when their prefixes match);
* cached free: ref count 0 but its content hash is known, so a later prompt with the same prefix
  can take it back without recomputing; evicted least-recently-freed first when a fresh block is
  needed;
* free: ref count 0, content irrelevant.

A full block's hash chains the previous block's hash, the block's token ids, the content keys of
the images whose placeholders appear in it, and the LongRoPE factor set its keys were rotated
with: equal hashes mean equal keys/values, so sharing is safe.

Hashes are registered by `commit` once the KV of a block has been computed, not when it is
allocated: with chunked prefill a block can be allocated several steps before its KV exists, and
another sequence must not reuse it in between.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Ids

from .sequence import Sequence

BlockHash = bytes
_FIRST_BLOCK_PARENT = bytes(16)


def block_hash(parent: BlockHash | None, token_ids: Ids[int], image_keys: Ids[str], long_rope: bool) -> BlockHash:
    """The prefix-cache key of one full block (128-bit BLAKE2b, deterministic across runs)."""
    h = hashlib.blake2b(parent if parent is not None else _FIRST_BLOCK_PARENT, digest_size=16)
    h.update(b"L" if long_rope else b"S")
    h.update(array("q", token_ids).tobytes())
    for key in image_keys:
        data = key.encode()
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: keys cannot run together
    return h.digest()


def safe_prefix_length(token_ids: Ids[int], length: int, block_size: int) -> int:
    """The longest prefix of at most `length` tokens that is whole blocks and splits no image run.

    The runner computes image placeholders a whole run at a time, so a reused prefix must not end
    inside one: back off to the run's start, then down to a block boundary (which may land in an
    earlier run, hence the loop).
    """
    length -= length % block_size
    while 0 < length < len(token_ids) and token_ids[length] < 0 and token_ids[length - 1] == token_ids[length]:
        run_start = length - 1
        while run_start > 0 and token_ids[run_start - 1] == token_ids[length]:
            run_start -= 1
        length = run_start - run_start % block_size
    return length


class BlockManager:
    """Hands out KV blocks `num_reserved_blocks .. num_blocks - 1` of the pool to sequences.

    Block ids below `num_reserved_blocks` are never handed out (the runner's padded CUDA-graph
    rows read block 0).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, *,
                 num_reserved_blocks: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= num_reserved_blocks < num_blocks:
            raise ValueError(f"need at least one usable block: num_blocks={num_blocks}, reserved={num_reserved_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_reserved_blocks = num_reserved_blocks
        self._ref_counts = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks  # set iff _hash_to_block maps it here
        self._hash_to_block: dict[BlockHash, int] = {}
        self._free: deque[int] = deque(range(num_reserved_blocks, num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        # The hash chain of the last sequence asked about: a waiting head that cannot be admitted
        # is asked about every step, and a 128K-token prompt's chain costs ~10 ms to recompute.
        self._chain_owner: tuple[Sequence, bool] | None = None
        self._chain: list[BlockHash] = []

    # -- counts ---------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - self.num_reserved_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take: free plus cached free (those are evicted when taken)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by sequences."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # -- allocation -----------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would find blocks for every token of `seq` now."""
        hits, _ = self._prefix_hits(seq)
        return self._num_blocks_to_take(seq, hits) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Gives `seq` blocks for all its tokens, reusing cached blocks of its longest computed prefix.

        `seq.long_rope` must say which factor set its keys will use (it is part of the hash).
        Sets `num_cached_tokens` (= `num_computed_tokens`) to the reused tokens: whole blocks, at
        least one token short of the sequence (so the prefill has a last token to take logits
        from), never ending inside an image placeholder run.
        """
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        hits, hashes = self._prefix_hits(seq)
        if self._num_blocks_to_take(seq, hits) > self.num_free_blocks:
            raise RuntimeError(f"not enough free KV blocks for sequence {seq.seq_id}; check can_allocate first")
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._cached_free[block_id]
            self._ref_counts[block_id] += 1
        fresh = [self._take_fresh_block() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.block_table = hits + fresh
        seq.block_hashes = hashes
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def deallocate(self, seq: Sequence) -> None:
        """Drops `seq`'s references; its computed full blocks stay reusable until evicted."""
        # Tail first, so that a sequence's last blocks are evicted before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._hashes[block_id] is not None:
                    self._cached_free[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0
        seq.long_rope = None

    def can_append(self, seq: Sequence) -> bool:
        """Whether the blocks for `seq`'s tokens (the new last one included) can be found now."""
        return self._num_missing_blocks(seq) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        """Adds a block when `seq`'s last token starts a new one (before a decode step writes it)."""
        missing = self._num_missing_blocks(seq)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"no free KV block for sequence {seq.seq_id}; check can_append first")
        seq.block_table.extend(self._take_fresh_block() for _ in range(missing))

    def commit(self, seq: Sequence) -> None:
        """Registers the hashes of `seq`'s full blocks whose KV is now computed (`num_cached_tokens`).

        Called after every step. When another block already holds the same content (two equal
        prompts prefilled in the same step), that one stays the cached copy and this one is
        simply freed later.
        """
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_cached_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for block_idx in range(len(seq.block_hashes), num_full):
            h = self._hash_block(seq, block_idx, parent)
            block_id = seq.block_table[block_idx]
            if h not in self._hash_to_block:
                self._hash_to_block[h] = block_id
                self._hashes[block_id] = h
            seq.block_hashes.append(h)
            parent = h

    # -- internals ------------------------------------------------------------------------------

    def _num_missing_blocks(self, seq: Sequence) -> int:
        return max(0, seq.num_blocks(self.block_size) - len(seq.block_table))

    def _num_blocks_to_take(self, seq: Sequence, hits: list[int]) -> int:
        """Blocks that come out of the free pool: fresh ones plus hits that are cached free."""
        num_shared_in_use = sum(1 for block_id in hits if self._ref_counts[block_id] > 0)
        return seq.num_blocks(self.block_size) - num_shared_in_use

    def _hash_block(self, seq: Sequence, block_idx: int, parent: BlockHash | None) -> BlockHash:
        if seq.long_rope is None:
            raise ValueError(f"sequence {seq.seq_id}: set long_rope (the factor set of its keys) before hashing")
        token_ids = seq.block_token_ids(block_idx, self.block_size)
        images = dict.fromkeys(-t for t in token_ids if t < 0)  # image numbers, in order of appearance
        if images and max(images) > len(seq.image_key):
            raise ValueError(f"sequence {seq.seq_id} has placeholders of image {max(images)} "
                             f"but {len(seq.image_key)} image keys")
        return block_hash(parent, token_ids, [seq.image_key[g - 1] for g in images], seq.long_rope)

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[BlockHash]]:
        """Cached blocks holding `seq`'s longest reusable prefix, and their hashes."""
        if not self.enable_prefix_caching:
            return [], []
        max_blocks = (seq.num_tokens - 1) // self.block_size  # keep at least one token to compute
        owner = self._chain_owner
        if owner is None or owner[0] is not seq or owner[1] != seq.long_rope:
            # Full blocks never change (tokens are only appended), so a chain stays valid for its
            # sequence and factor set.
            self._chain_owner, self._chain = (seq, seq.long_rope), []
        chain = self._chain
        hits: list[int] = []
        for block_idx in range(max_blocks):
            if block_idx == len(chain):
                chain.append(self._hash_block(seq, block_idx, chain[-1] if chain else None))
            block_id = self._hash_to_block.get(chain[block_idx])
            if block_id is None:
                break
            hits.append(block_id)
        hashes = chain[: len(hits)]
        num_blocks = safe_prefix_length(seq.token_ids, len(hits) * self.block_size, self.block_size) // self.block_size
        return hits[:num_blocks], hashes[:num_blocks]

    def _take_fresh_block(self) -> int:
        """A block for new content: a plain free one, else the least recently freed cached one."""
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached_free.popitem(last=False)
            del self._hash_to_block[self._hashes[block_id]]
            self._hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id
