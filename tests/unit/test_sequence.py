"""Sequence state: token bookkeeping helpers, identity semantics, and the torch-free rule."""

import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass

import pytest

from phivision.generation.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 8
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] | None = (2,)


def test_token_helpers():
    prompt = [1, 5, -1, -1, 7]
    seq = Sequence(seq_id=3, request_id="r", token_ids=prompt, params=Params())
    assert seq.status is SequenceStatus.WAITING
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_generated) == (5, 5, 0)
    seq.append_token(42)
    seq.append_token(43)
    assert (seq.num_tokens, seq.num_generated, seq.last_token) == (7, 2, 43)
    assert seq.generated_token_ids == [42, 43]
    assert prompt == [1, 5, -1, -1, 7]  # the caller's list is not appended to


@pytest.mark.parametrize("num_tokens, block_size, expected", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3)])
def test_num_blocks_rounds_up(num_tokens, block_size, expected):
    seq = Sequence(seq_id=0, request_id="r", token_ids=list(range(num_tokens)), params=Params())
    assert seq.num_blocks(block_size) == expected


def test_block_token_ids():
    seq = Sequence(seq_id=0, request_id="r", token_ids=list(range(10)), params=Params())
    assert seq.block_token_ids(0, 4) == [0, 1, 2, 3]
    assert seq.block_token_ids(2, 4) == [8, 9]


def test_explicit_prompt_length_and_validation():
    seq = Sequence(seq_id=0, request_id="r", token_ids=[1, 2, 3, 4], params=Params(), num_prompt_tokens=3)
    assert seq.num_generated == 1 and seq.generated_token_ids == [4]
    with pytest.raises(ValueError):
        Sequence(seq_id=0, request_id="r", token_ids=[1, 2], params=Params(), num_prompt_tokens=3)


def test_sequences_compare_by_identity():
    a = Sequence(seq_id=0, request_id="r", token_ids=[1, 2], params=Params())
    b = Sequence(seq_id=0, request_id="r", token_ids=[1, 2], params=Params())
    assert a != b
    queue = [a, b]
    queue.remove(b)
    assert queue[0] is a


def test_bookkeeping_modules_do_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import phivision.generation.sequence, phivision.generation.block_manager, phivision.generation.scheduler\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
