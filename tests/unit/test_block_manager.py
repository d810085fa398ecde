"""Block manager: allocation, ref counts, the prefix cache and its safety rules, LRU eviction."""

from dataclasses import dataclass

import pytest

from phivision.generation.block_manager import BlockManager, block_hash, safe_prefix_length
from phivision.generation.sequence import Sequence


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 8
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] | None = (2,)


_ids = iter(range(10**6))


def make_seq(tokens, image_key=(), long_rope=False):
    seq = Sequence(seq_id=next(_ids), request_id="r", token_ids=list(tokens), params=Params(), image_key=image_key)
    seq.long_rope = long_rope
    return seq


def compute(bm, seq, upto=None):
    """What a step does to the bookkeeping: the KV of tokens [0, upto) is now valid."""
    seq.num_cached_tokens = seq.num_computed_tokens = seq.num_tokens if upto is None else upto
    bm.commit(seq)


def allocated(bm, tokens, **kw):
    seq = make_seq(tokens, **kw)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    return seq


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert (bm.num_usable_blocks, bm.num_free_blocks, bm.usage) == (9, 9, 0.0)
    seq = allocated(bm, range(10, 20))  # 10 tokens -> 3 blocks
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(3 / 9)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    bm.deallocate(seq)
    assert bm.num_free_blocks == 9
    assert seq.block_table == [] and seq.long_rope is None
    assert all(bm.ref_count(b) == 0 for b in range(10))


def test_reserved_block_is_never_handed_out():
    bm = BlockManager(num_blocks=5, block_size=2)
    seqs = [allocated(bm, [100 + i, 200 + i]) for i in range(4)]
    assert sorted(b for s in seqs for b in s.block_table) == [1, 2, 3, 4]
    assert not bm.can_allocate(make_seq([7]))
    with pytest.raises(RuntimeError):
        bm.allocate(make_seq([7]))


def test_prefix_hit_across_two_sequences():
    bm = BlockManager(num_blocks=20, block_size=4)
    prompt = list(range(10, 20))  # 10 tokens: two full blocks and a partial one
    a = allocated(bm, prompt)
    compute(bm, a)
    b = allocated(bm, prompt)
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 19 - 4
    # Freeing one user keeps the shared blocks for the other.
    bm.deallocate(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]


def test_blocks_are_shared_only_once_computed():
    bm = BlockManager(num_blocks=20, block_size=4)
    prompt = list(range(10, 23))
    a = allocated(bm, prompt)
    assert allocated(bm, prompt).num_cached_tokens == 0  # allocated, KV not written yet
    compute(bm, a, upto=6)  # a chunk covered block 0 and half of block 1
    assert allocated(bm, prompt).num_cached_tokens == 4


def test_never_the_whole_prompt():
    bm = BlockManager(num_blocks=20, block_size=4)
    a = allocated(bm, range(8))  # exactly two blocks
    compute(bm, a)
    b = allocated(bm, range(8))
    assert b.num_cached_tokens == 4  # one block left to compute, so the prefill has logits
    c = allocated(bm, list(range(8)) + [99])
    assert c.num_cached_tokens == 8


def test_no_hit_when_images_differ():
    bm = BlockManager(num_blocks=40, block_size=4)
    prompt = [5, 6, 7, 8, 9, -1, -1, -1, -1, -1, 10, 11, 12]  # the image run starts in block 1
    a = allocated(bm, prompt, image_key=("cat",))
    compute(bm, a)
    other = allocated(bm, prompt, image_key=("dog",))
    assert other.num_cached_tokens == 4  # the text-only block 0 is shared, block 1 is not
    assert other.block_table[0] == a.block_table[0] and other.block_table[1] != a.block_table[1]
    same = allocated(bm, prompt, image_key=("cat",))
    assert same.num_cached_tokens == 12


def test_image_key_counts_where_its_run_continues():
    bm = BlockManager(num_blocks=40, block_size=4)
    # Image 2's run covers blocks 1 and 2; block 2 has no other image. Changing image 2's key must
    # break the match from block 1 on; changing image 1's key (block 0 only) from block 0 on.
    prompt = [-1, -1, 3, 4, -2, -2, -2, -2, -2, -2, 7, 8, 9]
    a = allocated(bm, prompt, image_key=("x", "y"))
    compute(bm, a)
    assert allocated(bm, prompt, image_key=("x", "z")).num_cached_tokens == 4
    assert allocated(bm, prompt, image_key=("w", "y")).num_cached_tokens == 0
    assert allocated(bm, prompt, image_key=("x", "y")).num_cached_tokens == 12


def test_no_hit_across_rope_factor_sets():
    bm = BlockManager(num_blocks=40, block_size=4)
    prompt = list(range(30, 43))
    short = allocated(bm, prompt, long_rope=False)
    compute(bm, short)
    assert allocated(bm, prompt, long_rope=True).num_cached_tokens == 0
    assert allocated(bm, prompt, long_rope=False).num_cached_tokens == 12


def test_hash_needs_the_factor_set_and_every_image_key():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq([1, 2, 3, 4, 5], long_rope=None)
    with pytest.raises(ValueError, match="long_rope"):
        bm.allocate(seq)
    with pytest.raises(ValueError, match="image"):
        bm.allocate(make_seq([1, -2, -2, 4, 5], image_key=("only-one",)))


def test_block_hash_separates_its_inputs():
    base = block_hash(None, [1, 2, 3, 4], ["k"], False)
    assert base == block_hash(None, [1, 2, 3, 4], ["k"], False)
    assert base != block_hash(None, [1, 2, 3, 5], ["k"], False)
    assert base != block_hash(None, [1, 2, 3, 4], ["k"], True)
    assert base != block_hash(None, [1, 2, 3, 4], ["j"], False)
    assert base != block_hash(block_hash(None, [0], [], False), [1, 2, 3, 4], ["k"], False)
    assert block_hash(None, [], ["ab", "c"], False) != block_hash(None, [], ["a", "bc"], False)


@pytest.mark.parametrize(
    "tokens, length, expected",
    [
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 8, 8),  # text only: whole blocks kept
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 7, 4),  # rounded down to a block boundary
        ([1, 2, 3, 4, 5, 6, -1, -1, -1, -1, 7], 8, 4),  # ends inside the run 6..9: back to 6, down to 4
        ([1, 2, 3, 4, -1, -1, -1, -1, 7], 8, 8),  # the run ends exactly at the boundary
        ([-1, -1, -1, -1, -2, -2, 5, 6, 7], 4, 4),  # two images meeting at the boundary: no split
        ([-1, -1, -1, -1, -1, -1, 9, -2, -2, -2, -2, 5], 8, 0),  # backing off lands in an earlier run
        ([1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2], 8, 0),
    ],
)
def test_safe_prefix_length(tokens, length, expected):
    assert safe_prefix_length(tokens, length, 4) == expected


def test_reuse_never_splits_an_image_run():
    bm = BlockManager(num_blocks=40, block_size=4)
    prompt = [1, 2, 3, 4, 5, 6, -1, -1, -1, -1, 7, 8, 9]
    a = allocated(bm, prompt, image_key=("img",))
    compute(bm, a)
    b = allocated(bm, prompt, image_key=("img",))
    assert b.num_cached_tokens == 12  # blocks 0-2 end after the run: fine
    c = allocated(bm, prompt[:9] + [42], image_key=("img",))  # reusable 8 tokens end inside the run
    assert c.num_cached_tokens == 4
    assert c.block_hashes == a.block_hashes[:1]


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=7, block_size=2)  # 6 usable
    a = allocated(bm, [1, 2, 3, 4, 100])  # blocks: [1 2] [3 4] [100]
    compute(bm, a)
    bm.deallocate(a)  # frees tail first: the partial block plainly, then [3 4], then [1 2]
    b = allocated(bm, [5, 6, 7, 8, 101])
    compute(bm, b)
    bm.deallocate(b)
    assert (bm.num_free_blocks, bm.num_cached_free_blocks) == (6, 4)
    # 3 fresh blocks: the 2 plain free ones, then the least recently freed cached one, a's [3 4].
    c = allocated(bm, [9] * 6)
    assert bm.num_cached_free_blocks == 3
    bm.deallocate(c)
    a2 = allocated(bm, [1, 2, 3, 4, 100])
    assert a2.num_cached_tokens == 2  # [1 2] survived, [3 4] was evicted
    b2 = allocated(bm, [5, 6, 7, 8, 101])
    assert b2.num_cached_tokens == 4


def test_cached_hit_takes_back_a_free_block_without_evicting_another():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    a = allocated(bm, [1, 2, 3, 4, 5])
    compute(bm, a)
    bm.deallocate(a)
    assert bm.num_cached_free_blocks == 2
    again = allocated(bm, [1, 2, 3, 4, 6])
    assert again.num_cached_tokens == 4 and bm.num_free_blocks == 0
    assert [bm.ref_count(x) for x in again.block_table] == [1, 1, 1]


def test_can_allocate_counts_blocks_shared_in_use():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable
    a = allocated(bm, [1, 2, 3, 4, 5])  # 3 blocks
    compute(bm, a)
    assert bm.num_free_blocks == 1
    b = make_seq([1, 2, 3, 4, 9])  # shares 2 in-use blocks, needs 1 new
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.num_free_blocks == 0 and b.num_cached_tokens == 4
    assert not bm.can_allocate(make_seq([1, 2, 3, 4, 7, 8, 9]))  # would need 2 new


def test_append_adds_a_block_when_the_last_one_is_full():
    bm = BlockManager(num_blocks=4, block_size=4)  # 3 usable
    seq = allocated(bm, [1, 2, 3, 4])
    compute(bm, seq)
    seq.append_token(5)  # the token to feed starts block 1
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 1
    for tok in (6, 7, 8):
        compute(bm, seq)
        seq.append_token(tok)
        bm.may_append(seq)
        assert len(seq.block_table) == 2  # still room in block 1
    hog = allocated(bm, [50])
    compute(bm, seq)
    seq.append_token(9)
    assert bm.num_free_blocks == 0 and not bm.can_append(seq)
    with pytest.raises(RuntimeError):
        bm.may_append(seq)
    bm.deallocate(hog)
    assert bm.can_append(seq)


def test_generated_blocks_become_reusable_once_computed():
    bm = BlockManager(num_blocks=20, block_size=4)
    seq = allocated(bm, [1, 2, 3])
    for tok in range(10, 16):  # decode: each step computes the fed token, then appends one
        compute(bm, seq)
        seq.append_token(tok)
        bm.may_append(seq)
    compute(bm, seq)  # tokens 0..8 computed: blocks 0 and 1 are full
    assert len(seq.block_hashes) == 2
    other = allocated(bm, seq.token_ids + [77])
    assert other.num_cached_tokens == 8


def test_same_content_computed_twice_keeps_one_cached_copy():
    bm = BlockManager(num_blocks=20, block_size=4)
    prompt = list(range(9))
    a, b = allocated(bm, prompt), allocated(bm, prompt)  # both allocated before either was computed
    assert b.num_cached_tokens == 0
    compute(bm, a)
    compute(bm, b)
    a_table = list(a.block_table)
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_cached_free_blocks == 2  # a's two full blocks; b's copies went back as plain free
    assert bm.num_free_blocks == 19
    c = allocated(bm, prompt)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a_table[:2]


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=20, block_size=4, enable_prefix_caching=False)
    a = allocated(bm, range(9))
    compute(bm, a)
    b = allocated(bm, range(9))
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    bm.deallocate(a)
    assert bm.num_cached_free_blocks == 0
