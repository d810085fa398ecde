"""Scheduler: admission, chunked prefill, prefill/decode alternation, preemption, aborts, LongRoPE re-prefill.

`FakeRunner` plays the model: it keeps, for every KV slot, what a real runner would have written
there (token id, image key, position, LongRoPE factor set) and checks before each step that every
position a sequence attends to holds exactly its own content. Any bookkeeping error that would
feed a sequence someone else's KV (a bad prefix hit, a block freed too early, a stale factor
set) fails there.
"""

import random
from dataclasses import dataclass

import pytest

from phivision.errors import PromptError
from phivision.generation.block_manager import BlockManager
from phivision.generation.scheduler import ScheduledBatch, Scheduler, SchedulerConfig, prefill_chunk_end
from phivision.generation.sequence import Sequence, SequenceStatus

STOP = 2


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 8
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] | None = (STOP,)


def next_token(seq: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the request and its length."""
    return 1000 + (hash((seq.request_id, seq.num_tokens)) % 997)


class FakeRunner:
    def __init__(self, scheduler: Scheduler, choose=next_token):
        self.scheduler = scheduler
        self.config = scheduler.config
        self.slots: dict[int, tuple] = {}
        self.choose = choose
        self.history: list[ScheduledBatch] = []

    def expected(self, seq: Sequence, pos: int) -> tuple:
        tok = seq.token_ids[pos]
        return tok, seq.image_key[-tok - 1] if tok < 0 else None, pos, seq.long_rope

    def slot(self, seq: Sequence, pos: int) -> int:
        size = self.config.block_size
        block_id = seq.block_table[pos // size]
        assert block_id != 0, "block 0 is reserved"
        return block_id * size + pos % size

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        orig = self.config.original_max_position_embeddings
        out: list[int | None] = []
        for seq, (start, end), last in zip(batch.seqs, batch.chunks, batch.is_last_chunk):
            assert seq.status is SequenceStatus.RUNNING
            assert seq.long_rope == (seq.num_tokens > orig)  # the factor set of the current length
            assert start == seq.num_cached_tokens and end == seq.num_computed_tokens
            assert 0 <= start < end <= seq.num_tokens and last == (end == seq.num_tokens)
            if batch.kind == "decode":
                assert (start, end) == (seq.num_tokens - 1, seq.num_tokens)
            else:
                ids = seq.token_ids
                for cut in (start, end):  # chunks hold whole image runs
                    assert not (0 < cut < len(ids) and ids[cut] < 0 and ids[cut - 1] == ids[cut])
            for pos in range(start):
                assert self.slots.get(self.slot(seq, pos)) == self.expected(seq, pos), (seq.seq_id, pos)
            for pos in range(start, end):
                self.slots[self.slot(seq, pos)] = self.expected(seq, pos)
            out.append(self.choose(seq) if last else None)
        return out

    def step(self) -> tuple[ScheduledBatch, list[Sequence]]:
        batch = self.scheduler.schedule()
        self.history.append(batch)
        if batch.is_empty:
            return batch, []
        return batch, self.scheduler.postprocess(batch.seqs, self.run(batch))

    def drain(self, max_steps: int = 10_000) -> list[Sequence]:
        finished = []
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return finished
            batch, done = self.step()
            finished += done + batch.aborted
        raise AssertionError("the scheduler did not finish its work")


def make(num_blocks=64, block_size=4, prefix=True, **kw):
    cfg = SchedulerConfig(num_blocks=num_blocks, block_size=block_size, **{
        "max_num_seqs": 8, "max_num_batched_tokens": 64, "prefill_chunk_size": 32, "max_model_len": 256,
        "original_max_position_embeddings": 128, **kw})
    sched = Scheduler(cfg, BlockManager(num_blocks, block_size, enable_prefix_caching=prefix))
    return sched, FakeRunner(sched)


_ids = iter(range(10**6))


def seq_of(tokens, request_id=None, image_key=(), **params):
    seq_id = next(_ids)
    return Sequence(seq_id=seq_id, request_id=request_id or f"req-{seq_id}", token_ids=list(tokens),
                    params=Params(**params), image_key=image_key)


def check_pool(sched: Scheduler) -> None:
    """Ref counts equal the number of running sequences holding each block; the rest is free."""
    bm = sched.block_manager
    holders: dict[int, int] = {}
    for seq in (*sched.prefilling, *sched.decoding):
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.status is SequenceStatus.WAITING
    assert all(bm.ref_count(b) == holders.get(b, 0) for b in range(bm.num_blocks))
    assert bm.num_free_blocks == bm.num_usable_blocks - len(holders)


def test_single_request_runs_to_its_length_and_frees_everything():
    sched, runner = make()
    seq = seq_of(range(10, 20), max_new_tokens=5)
    sched.add(seq)
    finished = runner.drain()
    assert finished == [seq]
    assert seq.finish_reason == "length" and seq.num_generated == 5 and seq.error is None
    assert [b.kind for b in runner.history] == ["prefill"] + ["decode"] * 4
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks


def test_stop_token_finishes_unless_ignore_eos():
    choose = lambda seq: STOP if seq.num_generated == 2 else 7  # noqa: E731
    for ignore, expected in ((False, ("stop", 3)), (True, ("length", 6))):
        sched, runner = make()
        runner.choose = choose
        seq = seq_of(range(10, 15), max_new_tokens=6, ignore_eos=ignore)
        sched.add(seq)
        runner.drain()
        assert (seq.finish_reason, seq.num_generated) == expected


def test_default_stop_ids_apply_when_the_request_has_none():
    sched, runner = make(default_stop_token_ids=(9,))
    runner.choose = lambda seq: 9
    seq = seq_of(range(10, 15), stop_token_ids=None)
    sched.add(seq)
    runner.drain()
    assert seq.finish_reason == "stop" and seq.generated_token_ids == [9]


def test_max_model_len_ends_generation():
    sched, runner = make(max_model_len=12)
    seq = seq_of(range(10, 20), max_new_tokens=50)
    sched.add(seq)
    runner.drain()
    assert seq.finish_reason == "length" and seq.num_tokens == 12


def test_prefix_hit_across_requests_skips_computed_blocks():
    sched, runner = make()
    prompt = list(range(10, 30))
    first = seq_of(prompt, max_new_tokens=1)
    sched.add(first)
    runner.drain()
    second = seq_of(prompt, max_new_tokens=2)
    sched.add(second)
    batch, _ = runner.step()
    assert batch.kind == "prefill" and batch.chunks == [(16, 20)]  # 4 whole blocks reused, 1 left
    runner.drain()


def test_chunked_prefill_boundaries():
    sched, runner = make(prefill_chunk_size=4)
    seq = seq_of(range(10, 20), max_new_tokens=2)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        batch, _ = runner.step()
        assert batch.kind == "prefill"
        chunks.append((batch.chunks[0], batch.is_last_chunk[0]))
        if not batch.is_last_chunk[0]:
            assert seq.num_generated == 0  # nothing sampled for a middle chunk
    assert chunks == [((0, 4), False), ((4, 8), False), ((8, 10), True)]
    assert seq.num_generated == 1
    runner.drain()


def test_prefill_tokens_left_counts_waiting_and_part_prefilled_prompts():
    sched, runner = make(max_num_batched_tokens=8, prefill_chunk_size=8)
    a, b = seq_of(range(10, 16), max_new_tokens=2), seq_of(range(20, 30), max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    assert sched.num_prefill_tokens_left == 16
    runner.step()  # a whole (6), b's first 2
    assert sched.num_prefill_tokens_left == 8
    runner.step()  # a decodes
    assert sched.num_prefill_tokens_left == 8
    runner.step()  # b's last 8
    assert sched.num_prefill_tokens_left == 0
    runner.drain()


def test_step_budget_is_shared_between_prompts():
    sched, runner = make(max_num_batched_tokens=8, prefill_chunk_size=8)
    a, b = seq_of(range(10, 16)), seq_of(range(20, 26))
    sched.add(a)
    sched.add(b)
    batch, _ = runner.step()
    assert [s is x for s, x in zip(batch.seqs, (a, b))] == [True, True]
    assert batch.chunks == [(0, 6), (0, 2)] and batch.is_last_chunk == [True, False]
    assert batch.num_tokens == 8
    batch, _ = runner.step()  # a decodes now (alternation) ...
    assert batch.kind == "decode" and batch.seqs == [a]
    batch, _ = runner.step()  # ... then b's prompt continues where it stopped
    assert batch.kind == "prefill" and batch.seqs[0] is b and batch.chunks[0] == (2, 6)
    runner.drain()


@pytest.mark.parametrize(
    "tokens, start, max_len, expected",
    [
        ([1, 2, 3, 4, 5, 6], 0, 4, 4),
        ([1, 2, -1, -1, -1, 6], 0, 4, 2),  # would split the run 2..4: stop before it
        ([-1, -1, -1, -1, -1, -1, 7], 0, 4, 6),  # the run starts the chunk: take all of it
        ([1, -1, -1, -1, -2, -2], 1, 3, 4),  # two images meet at the limit: no split
        ([1, 2, 3], 1, 10, 3),
    ],
)
def test_prefill_chunk_end(tokens, start, max_len, expected):
    assert prefill_chunk_end(tokens, start, max_len) == expected


def test_chunks_keep_image_runs_whole():
    sched, runner = make(prefill_chunk_size=4, max_num_batched_tokens=4)
    tokens = [5, 6, -1, -1, -1, -1, -1, -1, 7, 8, 9]
    seq = seq_of(tokens, image_key=("img",), max_new_tokens=1)
    sched.add(seq)
    runner.drain()  # FakeRunner asserts no chunk splits a run
    prefill_chunks = [b.chunks[0] for b in runner.history if b.kind == "prefill"]
    assert prefill_chunks == [(0, 2), (2, 8), (8, 11)]  # the 6-token run is over the limit and goes alone


def test_a_prompt_is_not_started_on_the_text_before_an_image_run_that_the_budget_cannot_hold():
    """W4's shape: prompts of a short text, an image run, a question. A step holds as many whole
    prompts as its budget allows; the next prompt is not admitted on the few tokens before its
    image run (that made every later step hold continued chunks), it starts in the next step."""
    sched, runner = make(max_num_batched_tokens=64, prefill_chunk_size=64)
    prompts = [seq_of([5, 6, 7] + [-1] * 16 + list(range(100 + 10 * i, 106 + 10 * i)), image_key=(f"img{i}",),
                      max_new_tokens=2) for i in range(6)]  # 25 tokens each
    for seq in prompts:
        sched.add(seq)
    runner.drain()
    prefills = [b for b in runner.history if b.kind == "prefill"]
    assert [len(b.seqs) for b in prefills] == [2, 2, 2]
    assert all(chunk == (0, 25) for b in prefills for chunk in b.chunks)
    check_pool(sched)


@pytest.mark.parametrize(
    "budget, chunk_size, first_len, second_tokens, expected",
    [
        # The rule only refuses chunks too short to be worth a continued chunk later: here the text
        # before the run uses 50 of the 60 tokens left.
        (100, 100, 40, list(range(100, 150)) + [-1] * 30 + [8, 9, 10, 11, 12], [(0, 40), (0, 50)]),
        # The run is over `prefill_chunk_size`, so it never fits: the text before it is a chunk of its
        # own in any step.
        (64, 8, 4, [5, 6, 7] + [-1] * 12 + [8, 9], [(0, 4), (0, 3)]),
    ],
    ids=["fills-half-of-what-is-left", "run-over-the-chunk-limit"],
)
def test_text_before_an_image_run_is_still_taken_beside_another_prompt(budget, chunk_size, first_len, second_tokens,
                                                                       expected):
    sched, runner = make(max_num_batched_tokens=budget, prefill_chunk_size=chunk_size, num_blocks=128)
    first = seq_of(range(10, 10 + first_len), max_new_tokens=1)
    second = seq_of(second_tokens, image_key=("img",), max_new_tokens=1)
    sched.add(first)
    sched.add(second)
    batch, _ = runner.step()
    assert batch.seqs == [first, second] and batch.chunks == expected
    runner.drain()


def test_admission_waits_for_blocks():
    sched, runner = make(num_blocks=7, block_size=4)  # 6 usable blocks
    a = seq_of(range(10, 26), max_new_tokens=3)  # 4 blocks (grows to a 5th)
    b = seq_of(range(30, 42), max_new_tokens=3)  # 3 blocks
    sched.add(a)
    sched.add(b)
    batch, _ = runner.step()
    assert batch.seqs == [a] and sched.num_waiting == 1 and sched.num_running == 1
    while not a.is_finished:
        runner.step()
        assert b.status is SequenceStatus.WAITING
        check_pool(sched)
    batch, _ = runner.step()
    assert batch.kind == "prefill" and batch.seqs == [b]
    runner.drain()
    assert b.finish_reason == "length"


def test_max_num_seqs_caps_running():
    sched, runner = make(max_num_seqs=2)
    seqs = [seq_of(range(10 * i, 10 * i + 5), max_new_tokens=4) for i in range(1, 5)]
    for s in seqs:
        sched.add(s)
    runner.step()
    assert sched.num_running == 2 and sched.num_waiting == 2
    for _ in range(6):
        runner.step()
        assert sched.num_running <= 2
    runner.drain()
    assert all(s.finish_reason == "length" for s in seqs)


def test_preemption_and_readmission_keep_generated_tokens():
    plenty_sched, plenty = make(num_blocks=64)
    tight_sched, tight = make(num_blocks=7)  # 6 usable blocks of 4 for two sequences growing to 4 blocks each
    outputs = {}
    for sched, runner in ((plenty_sched, plenty), (tight_sched, tight)):
        a = seq_of(range(10, 17), request_id="a", max_new_tokens=8)
        b = seq_of(range(20, 27), request_id="b", max_new_tokens=8)
        a.seq_id, b.seq_id = 0, 1
        sched.add(a)
        sched.add(b)
        runner.drain()
        outputs[sched is tight_sched] = (a, b)
    (pa, pb), (ta, tb) = outputs[False], outputs[True]
    assert (pa.num_preemptions, pb.num_preemptions) == (0, 0)
    assert ta.num_preemptions == 0 and tb.num_preemptions >= 1  # the later arrival gives way
    assert ta.token_ids == pa.token_ids and tb.token_ids == pb.token_ids
    # b was put back first in line, re-prefilled over all its tokens (generated ones included).
    reprefills = [c for bt in tight.history if bt.kind == "prefill" for s, c in zip(bt.seqs, bt.chunks) if s is tb]
    assert len(reprefills) == 1 + tb.num_preemptions and all(end > 7 for _, end in reprefills[1:])


def test_preempted_sequence_goes_to_the_front_of_the_queue():
    sched, runner = make(num_blocks=7)
    a = seq_of(range(10, 17), max_new_tokens=8)
    b = seq_of(range(20, 27), max_new_tokens=8)
    c = seq_of(range(30, 50), max_new_tokens=5)  # 5 blocks: waits behind
    for s in (a, b, c):
        sched.add(s)
    for _ in range(50):
        runner.step()
        check_pool(sched)
        if b.num_preemptions:
            break
    assert list(sched.waiting)[:2] == [b, c]
    assert b.num_generated > 0 and b.block_table == []


def test_sequence_too_large_for_the_pool_is_refused_at_add():
    sched, runner = make(num_blocks=5)  # 4 usable blocks of 4
    seq = seq_of(range(100, 117))  # 17 tokens: 5 blocks
    with pytest.raises(PromptError, match="KV blocks"):
        sched.add(seq)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort" and seq.error
    assert not sched.has_unfinished()
    with pytest.raises(PromptError, match="max_model_len"):
        sched.add(seq_of(range(300)))


def test_sequence_outgrowing_the_pool_alone_is_aborted_not_looped():
    sched, runner = make(num_blocks=4)  # 3 usable blocks of 4: 12 tokens at most
    seq = seq_of(range(10, 20), max_new_tokens=50)
    sched.add(seq)
    finished = runner.drain()
    assert finished == [seq]
    assert seq.finish_reason == "abort" and "KV blocks" in seq.error
    assert seq.num_tokens == 13  # 12 tokens fit; the 13th has no block
    assert sched.block_manager.num_free_blocks == 3


def test_alternation_keeps_decodes_flowing_during_a_long_prefill():
    sched, runner = make(num_blocks=128, prefill_chunk_size=8, max_num_batched_tokens=8)
    short = seq_of(range(10, 14), max_new_tokens=40)
    sched.add(short)
    runner.step()
    runner.step()
    long = seq_of(range(100, 164), max_new_tokens=2)  # 64 tokens: 8 prefill chunks
    sched.add(long)
    kinds, short_lengths = [], []
    while long.num_generated == 0:
        batch, _ = runner.step()
        kinds.append(batch.kind)
        short_lengths.append(short.num_tokens)
    assert kinds == ["prefill", "decode"] * 7 + ["prefill"]
    # The short sequence gained a token at every decode step while the prompt was prefilled.
    assert short_lengths[-1] - short_lengths[0] == 7
    runner.drain()


def test_prefill_only_when_nothing_decodes():
    sched, runner = make(prefill_chunk_size=4)
    seq = seq_of(range(10, 26), max_new_tokens=1)
    sched.add(seq)
    kinds = [runner.step()[0].kind for _ in range(4)]
    assert kinds == ["prefill"] * 4


def test_abort_frees_at_once_waiting_or_running():
    sched, runner = make()
    running = seq_of(range(10, 20), request_id="run")
    sched.add(running)
    runner.step()
    waiting = seq_of(range(30, 40), request_id="wait")
    sched.add(waiting)
    bm = sched.block_manager
    assert bm.num_free_blocks < bm.num_usable_blocks
    assert sched.abort("run") and sched.abort("wait")
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert running.finish_reason == waiting.finish_reason == "abort"
    assert not sched.has_unfinished()
    assert not sched.abort("run") and not sched.abort("nobody")


def test_abort_between_schedule_and_postprocess_is_ignored():
    sched, runner = make()
    a, b = seq_of(range(10, 20), request_id="a"), seq_of(range(30, 40), request_id="b")
    sched.add(a)
    sched.add(b)
    runner.step()
    batch = sched.schedule()
    tokens = runner.run(batch)
    sched.abort("a")
    finished = sched.postprocess(batch.seqs, tokens)
    assert finished == [] and a.num_generated == 1 and b.num_generated == 2
    runner.drain()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks


def test_longrope_prompt_over_the_switch_is_long_from_the_start():
    sched, runner = make(original_max_position_embeddings=16)
    seq = seq_of(range(10, 30), max_new_tokens=4)  # 20 tokens > 16
    sched.add(seq)
    runner.drain()  # FakeRunner asserts long_rope == (length > 16) at every step
    assert [b.kind for b in runner.history] == ["prefill"] + ["decode"] * 3


def test_longrope_reprefill_when_decoding_crosses_the_switch():
    sched, runner = make(original_max_position_embeddings=16)
    seq = seq_of(range(10, 24), max_new_tokens=6)  # 14 tokens, short factors
    sched.add(seq)
    log = []
    while not seq.is_finished:
        batch, _ = runner.step()
        log.append((batch.kind, batch.chunks[0], seq.long_rope))
    # prefill 14 -> 15 tokens; decode 15th -> 16; decode 16th -> 17 tokens: over 16, so the whole
    # sequence is prefilled again with the long factors (no reuse of its short-factor blocks).
    assert log[:4] == [("prefill", (0, 14), False), ("decode", (14, 15), False), ("decode", (15, 16), None),
                       ("prefill", (0, 17), True)]
    assert all(kind == "decode" for kind, _, _ in log[4:])
    assert seq.num_preemptions == 0 and seq.num_generated == 6


def test_longrope_reprefill_does_not_reuse_short_blocks_of_others():
    sched, runner = make(original_max_position_embeddings=16)
    prompt = list(range(10, 24))
    other = seq_of(prompt + [1000 + i for i in range(10)], request_id="other", max_new_tokens=1)
    other_short = seq_of(prompt, request_id="short", max_new_tokens=1)
    sched.add(other_short)
    runner.drain()  # short-factor blocks of the prompt are now cached
    sched.add(other)  # 24 tokens > 16: long factors, must not hit the short blocks
    batch, _ = runner.step()  # FakeRunner also asserts the step used the long factors
    assert batch.kind == "prefill" and batch.chunks == [(0, 24)]
    again_short = seq_of(prompt + [99], request_id="short-2", max_new_tokens=1)
    sched.add(again_short)  # a short-factor sequence still finds the short blocks
    batch, _ = runner.step()
    assert batch.chunks == [(12, 15)]


@pytest.mark.parametrize("seed, block_size, num_blocks, prefix", [(1234, 4, 25, True), (99, 3, 33, True), (7, 4, 25, False)])
def test_random_workload_returns_the_pool_to_full(seed, block_size, num_blocks, prefix):
    rng = random.Random(seed)
    sched, runner = make(num_blocks=num_blocks, block_size=block_size, prefix=prefix, max_num_seqs=6,
                         max_num_batched_tokens=24, prefill_chunk_size=10, max_model_len=60,
                         original_max_position_embeddings=24, default_stop_token_ids=(STOP,))
    runner.choose = lambda seq: STOP if rng.random() < 0.05 else rng.randrange(3, 50)
    stems = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    keys = ["img-a", "img-b", "img-c"]
    all_seqs, requests, aborted = [], [], 0
    num_hits = 0
    allocate = sched.block_manager.allocate

    def counting_allocate(seq):
        nonlocal num_hits
        allocate(seq)
        num_hits += seq.num_cached_tokens > 0

    sched.block_manager.allocate = counting_allocate
    for cycle in range(200):
        action = rng.random()
        if action < 0.3:
            tokens = list(rng.choice(stems))
            image_key = ()
            if rng.random() < 0.5:
                pos = rng.randrange(len(tokens) + 1)
                tokens[pos:pos] = [-1] * rng.randrange(3, 12)
                image_key = (rng.choice(keys),)
            tokens += [rng.randrange(3, 50) for _ in range(rng.randrange(0, 30))]
            seq = seq_of(tokens, image_key=image_key, max_new_tokens=rng.randrange(1, 30),
                         ignore_eos=rng.random() < 0.2, stop_token_ids=None)
            try:
                sched.add(seq)
            except PromptError:
                assert seq.finish_reason == "abort"
                continue
            all_seqs.append(seq)
            requests.append(seq.request_id)
        elif action < 0.37 and requests:
            aborted += sched.abort(rng.choice(requests))
        else:
            runner.step()
        check_pool(sched)
    runner.drain()
    check_pool(sched)
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks and bm.usage == 0.0
    assert all(s.is_finished for s in all_seqs)
    reasons = {s.finish_reason for s in all_seqs}
    assert reasons <= {"stop", "length", "abort"}
    assert aborted > 0 and sum(s.num_preemptions for s in all_seqs) > 0  # the pressure was real
    assert (num_hits > 0) == prefix  # the prefix cache was exercised (and only when on)
    # Some sequences crossed the LongRoPE switch while decoding, and were re-prefilled in full.
    crossed = [s for s in all_seqs if s.num_prompt_tokens <= 24 < s.num_tokens - 1]
    reprefilled = {id(s) for b in runner.history if b.kind == "prefill"
                   for s, (start, end) in zip(b.seqs, b.chunks) if end > 24 >= s.num_prompt_tokens}
    assert crossed and any(id(s) in reprefilled for s in crossed)


def _decode_of(sched, runner, *seqs):
    """Runs the scheduler until `seqs` all decode; returns the first decode batch (not yet run)."""
    for seq in seqs:
        sched.add(seq)
    while True:
        batch = sched.schedule()
        assert not batch.is_empty
        if batch.kind == "decode":
            return batch
        sched.postprocess(batch.seqs, runner.run(batch))


def test_next_decode_predicted_only_when_certain():
    sched, runner = make(block_size=4, original_max_position_embeddings=128)
    a, b = seq_of(range(10, 15), max_new_tokens=20), seq_of(range(20, 25), max_new_tokens=20)
    batch = _decode_of(sched, runner, a, b)
    assert [s.num_tokens for s in batch.seqs] == [6, 6]
    # Position 6 lies in the second block, which both already hold (6 tokens -> 2 blocks of 4).
    assert sched.next_decode_if_no_stop(batch.seqs) == [7, 7]
    assert sched.next_decode_if_no_stop(batch.seqs[:1]) is None  # not every decoding sequence
    assert sched.next_decode_if_no_stop(batch.seqs[::-1]) is None  # not in the scheduler's order
    sched.postprocess(batch.seqs, runner.run(batch))
    batch = sched.schedule()
    assert [s.num_tokens for s in batch.seqs] == [7, 7]
    # The token after this one goes to position 7, the last slot of block 2: still held.
    assert sched.next_decode_if_no_stop(batch.seqs) == [8, 8]
    sched.postprocess(batch.seqs, runner.run(batch))
    batch = sched.schedule()
    assert sched.next_decode_if_no_stop(batch.seqs) is None  # position 8 needs a third block
    sched.add(seq_of(range(30, 34)))
    assert sched.next_decode_if_no_stop(batch.seqs) is None  # a request waits: next comes a prefill


@pytest.mark.parametrize("limit", ["max_new_tokens", "max_model_len", "longrope"])
def test_next_decode_not_predicted_when_the_next_token_ends_or_requeues(limit):
    settings = {"max_new_tokens": dict(), "max_model_len": dict(max_model_len=8), "longrope": dict(original_max_position_embeddings=7)}
    sched, runner = make(block_size=16, **settings[limit])
    seq = seq_of(range(10, 15), max_new_tokens=3 if limit == "max_new_tokens" else 50)
    batch = _decode_of(sched, runner, seq)  # 6 tokens, generated 1
    assert sched.next_decode_if_no_stop(batch.seqs) == [7]
    sched.postprocess(batch.seqs, runner.run(batch))
    batch = sched.schedule()  # 7 tokens: the token of this step is the 3rd generated, the 8th token
    assert batch.kind == "decode"
    assert sched.next_decode_if_no_stop(batch.seqs) is None


@pytest.mark.parametrize("seed", [5, 17, 2024])
def test_predicted_next_decode_is_what_schedule_gives(seed):
    """Random workloads: whenever a decode step predicts the next, and then no token stopped, no
    request arrived and none was aborted, the next step is exactly that decode, on the same blocks."""
    rng = random.Random(seed)
    sched, runner = make(num_blocks=30, block_size=4, max_num_seqs=5, max_num_batched_tokens=24, prefill_chunk_size=10,
                         max_model_len=60, original_max_position_embeddings=24, default_stop_token_ids=(STOP,))
    runner.choose = lambda seq: STOP if rng.random() < 0.04 else rng.randrange(3, 50)
    checked = 0
    prediction = None
    for _ in range(600):
        if rng.random() < 0.15:
            try:
                sched.add(seq_of([rng.randrange(3, 50) for _ in range(rng.randrange(2, 30))],
                                 max_new_tokens=rng.randrange(1, 30), stop_token_ids=None))
            except PromptError:
                pass
            prediction = None
        batch = sched.schedule()
        if prediction is not None:
            seqs, lens, tables = prediction
            assert batch.kind == "decode" and len(batch.seqs) == len(seqs)
            assert all(a is b for a, b in zip(batch.seqs, seqs))
            assert [s.num_tokens for s in batch.seqs] == lens
            assert [s.block_table for s in batch.seqs] == tables
            checked += 1
        prediction = None
        if batch.is_empty:
            continue
        lens = sched.next_decode_if_no_stop(batch.seqs) if batch.kind == "decode" else None
        tables = [list(s.block_table) for s in batch.seqs]
        tokens = runner.run(batch)
        sched.postprocess(batch.seqs, tokens)
        if lens is not None and STOP not in tokens:
            prediction = (list(batch.seqs), lens, tables)
        check_pool(sched)
    assert checked > 30
