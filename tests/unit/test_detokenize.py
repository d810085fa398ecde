"""Streaming text equals the full decode, never shows half a character, and honours stop strings."""

import pytest

from phivision.generation.detokenize import IncrementalDecoder, StopStringFilter

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, this is a test.",
        "Ünïcödé — 東京タワー 🐱🚀 done",
        "  leading spaces\nand\ttabs  ",
        "<|end|>special<|endoftext|> in the middle",
    ],
)
def test_pieces_concatenate_to_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("🐱", add_special_tokens=False).ids
    assert len(ids) > 2  # byte-fallback pieces
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert all(p == "" for p in pieces[:-1])
    assert pieces[-1].strip() == "🐱"


def test_stop_string_cuts_and_holds_back_prefixes():
    f = StopStringFilter(["STOP"])
    shown = [f.push(p) for p in ["Hello ", "ST", "OR", "Y then ST", "OP and more"]]
    assert "".join(shown) == "Hello STORY then "
    assert f.stopped
    assert f.push("ignored") == ""
    # A prefix of the stop string was held back at the point it could still become one.
    assert shown[1] == ""


def test_stop_filter_without_stops_passes_through():
    f = StopStringFilter([])
    assert f.push("abc") == "abc"
    assert f.flush() == ""


def test_flush_releases_held_text_when_no_stop_came():
    f = StopStringFilter(["</answer>"])
    out = f.push("x </ans")
    assert out == "x "
    assert f.flush() == "</ans"
