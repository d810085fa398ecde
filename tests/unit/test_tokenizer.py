"""The tokenizer wrapper: special tokens from the config, BOS/EOS flags, decoding rules, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phivision.errors import CheckpointError
from phivision.processing.tokenizer import Tokenizer, clean_up_tokenization


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def _variant(tokenizer_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the stand-in tokenizer whose tokenizer_config.json has `changes` applied (None deletes a key)."""
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_special_token_ids_come_from_the_config(tok):
    # Values documented in shared/tokenizer/README.md and spec §9.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 32000, 32000, 0)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.token_to_id("<|end|>") == 32007
    assert tok.token_to_id("<|image|>") == 32044
    assert tok.token_to_id("<|no such token|>") is None


def test_readme_examples(tok):
    assert tok.encode("Hello world, this is a test.") == [1, 15043, 3186, 29892, 445, 338, 263, 1243, 29889]
    assert tok.encode("<|user|>\nWhat is this?<|end|>\n<|assistant|>\n") == [1, 32010, 1724, 338, 445, 29973, 32007, 32001]


def test_bos_only_with_special_tokens(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", add_special_tokens=False) == []
    with_bos = tok.encode("Hello world")
    assert with_bos[0] == 1 and with_bos[1:] == tok.encode("Hello world", add_special_tokens=False)


def test_encode_batch_equals_encode_one_by_one(tok):
    texts = ["", "<|user|>\nHi", "\nWhat is this?<|end|>\n<|assistant|>\n", "Café 🙂"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_max_token_id_is_not_the_vocab_size_count(tok):
    # get_vocab_size() counts entries (32012) but ids have holes: the largest is 32044.
    assert tok.max_token_id == 32044


def test_decode_drops_image_placeholders_and_special_tokens(tok):
    ids = tok.encode("<|user|>\nWhat is this?<|end|>\n")
    with_images = ids[:2] + [-1] * 5 + [-2] * 3 + ids[2:]
    assert tok.decode(with_images) == "What is this?"
    shown = tok.decode(with_images, skip_special_tokens=False)
    assert "<|user|>" in shown and "<|end|>" in shown and "<s>" in shown


def test_decode_survives_ids_the_tokenizer_does_not_know(tok):
    # The model's vocabulary (32064) has rows for ids the tokenizer lacks (32011..32043, 32045..).
    assert tok.decode([1724, 32020, 32050, 338]) == tok.decode([1724, 338])


def test_decode_keeps_spaces_unless_asked(tok):
    ids = tok.encode("Hello , world .", add_special_tokens=False)
    assert tok.decode(ids) == "Hello , world ."  # the config says clean_up_tokenization_spaces: false
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == "Hello, world."
    assert tok.batch_decode([ids, ids[:1]]) == ["Hello , world .", "Hello"]


def test_clean_up_tokenization_rules():
    assert clean_up_tokenization("it 's a do n't ? yes !") == "it's a don't? yes!"


def test_chat_template_string(tok):
    assert tok.chat_template is not None and "<|end|>" in tok.chat_template


def test_chat_template_list_picks_default(tokenizer_dir, tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    tok = Tokenizer.from_dir(_variant(tokenizer_dir, tmp_path, chat_template=templates))
    assert tok.chat_template == "DEFAULT"
    assert tok.chat_templates == {"tool_use": "TOOLS", "default": "DEFAULT"}


def test_chat_template_file_beside_the_config(tokenizer_dir, tmp_path):
    folder = _variant(tokenizer_dir, tmp_path, chat_template=None)
    (folder / "chat_template.jinja").write_text("FROM FILE")
    assert Tokenizer.from_dir(folder).chat_template == "FROM FILE"


def test_special_tokens_as_added_token_dicts(tokenizer_dir, tmp_path):
    entry = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    tok = Tokenizer.from_dir(_variant(tokenizer_dir, tmp_path, eos_token=entry, bos_token={"content": "<s>"}))
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|endoftext|>", 32000, 1)


def test_add_bos_and_eos_flags_are_honoured(tokenizer_dir, tmp_path):
    # As transformers' Llama tokenizer does, whatever tokenizer.json's post-processor says.
    tok = Tokenizer.from_dir(_variant(tokenizer_dir, tmp_path, add_bos_token=False, add_eos_token=True))
    plain = Tokenizer.from_dir(tokenizer_dir).encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == plain + [32000]


def test_disagreeing_added_tokens_are_refused(tokenizer_dir, tmp_path):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    decoder = dict(config["added_tokens_decoder"])
    decoder["32011"] = decoder.pop("32010")  # <|user|> claimed at another id
    with pytest.raises(CheckpointError, match="<\\|user\\|>"):
        Tokenizer.from_dir(_variant(tokenizer_dir, tmp_path, added_tokens_decoder=decoder))


def test_unknown_special_token_is_refused(tokenizer_dir, tmp_path):
    with pytest.raises(CheckpointError, match="bos_token"):
        Tokenizer.from_dir(_variant(tokenizer_dir, tmp_path, bos_token="<|not in vocab|>"))


def test_missing_files_are_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tokenizer_dir, tmp_path):
    folder = _variant(tokenizer_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(folder)
