"""The checkpoint's tokenizer: `tokenizer.json` run by the `tokenizers` library, plus `tokenizer_config.json`.

Nothing clever happens here. Splitting out special tokens, their whitespace handling (rstrip on the chat
tokens) and byte fallback are all left to `tokenizers` and the flags stored in the checkpoint, so the
real files work unchanged. The one thing taken over from transformers is how a Llama-class tokenizer
builds its BOS/EOS template from `add_bos_token` / `add_eos_token`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.processors import TemplateProcessing

from ..errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Newer checkpoints may keep the template beside the config instead of inside it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_TEMPLATE_NAME = "default"

# transformers' clean_up_tokenization: spaces before punctuation and English contractions.
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces=True` post-processing of decoded text."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or serialised AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"unreadable special token entry in {TOKENIZER_CONFIG_FILE}: {value!r}")


def _chat_templates(value: Any) -> dict[str, str]:
    """The template field is either one string or a list of {name, template} entries."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE_NAME: value}
    if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value):
        return {str(t["name"]): str(t["template"]) for t in value}
    raise CheckpointError(f"unreadable chat_template in {TOKENIZER_CONFIG_FILE}: expected a string or a list of {{name, template}}")


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special tokens, flags and chat templates of tokenizer_config.json."""

    def __init__(self, backend: HFTokenizer, config: Mapping[str, Any], *, chat_template_file: str | None = None):
        self._backend = backend
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.additional_special_tokens: list[str] = [
            t for t in (_token_content(x) for x in config.get("additional_special_tokens", [])) if t is not None
        ]
        self.bos_token_id = self._special_id("bos_token", self.bos_token)
        self.eos_token_id = self._special_id("eos_token", self.eos_token)
        self.pad_token_id = self._special_id("pad_token", self.pad_token)
        self.unk_token_id = self._special_id("unk_token", self.unk_token)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_max_length: int | None = config.get("model_max_length")
        self._check_added_tokens(config.get("added_tokens_decoder", {}))

        templates = _chat_templates(config.get("chat_template"))
        if not templates and chat_template_file is not None:
            templates = {DEFAULT_TEMPLATE_NAME: chat_template_file}
        self.chat_templates: dict[str, str] = templates
        self.chat_template: str | None = templates.get(DEFAULT_TEMPLATE_NAME)

        tokenizer_class = str(config.get("tokenizer_class") or "")
        if tokenizer_class.startswith("Llama"):
            # transformers' Llama tokenizers rebuild the BOS/EOS template from these two flags
            # (defaults True / False), whatever tokenizer.json's post-processor says.
            self._set_bos_eos_template(bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False)))

        # The largest id the tokenizer knows. get_vocab_size() counts entries, and this family's ids
        # have holes (32011..32043), so it under-reports: never size a table by it.
        self.max_token_id = max(backend.get_vocab(with_added_tokens=True).values())
        self.special_token_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        missing = [name for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} has no {' or '.join(missing)}: the tokenizer needs both files")
        try:
            backend = HFTokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as exc:  # the Rust loader raises plain Exceptions
            raise CheckpointError(f"cannot load {folder / TOKENIZER_FILE}: {exc}") from exc
        try:
            config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {folder / TOKENIZER_CONFIG_FILE}: {exc}") from exc
        template_path = folder / CHAT_TEMPLATE_FILE
        template_file = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        return cls(backend, config, chat_template_file=template_file)

    # -- construction helpers ------------------------------------------------------------------

    def _special_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} names {name} {token!r}, which {TOKENIZER_FILE} does not contain")
        return token_id

    def _check_added_tokens(self, decoder: Mapping[str, Any]) -> None:
        """tokenizer_config's added tokens must sit at the same ids in tokenizer.json, or ids would silently differ."""
        wrong = []
        for key, entry in decoder.items():
            content = _token_content(entry)
            if content is not None and self._backend.token_to_id(content) != int(key):
                wrong.append(f"{content!r} is {key} in the config but {self._backend.token_to_id(content)} in {TOKENIZER_FILE}")
        if wrong:
            raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} and {TOKENIZER_FILE} disagree on added tokens: " + "; ".join(wrong))

    def _set_bos_eos_template(self, add_bos: bool, add_eos: bool) -> None:
        if add_bos and self.bos_token is None:
            raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} sets add_bos_token but names no bos_token")
        if add_eos and self.eos_token is None:
            raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} sets add_eos_token but names no eos_token")
        bos = f"{self.bos_token}:0 " if add_bos else ""
        eos = f" {self.eos_token}:0" if add_eos else ""
        single = f"{bos}$A:0{eos}"
        pair = f"{single}{' ' + self.bos_token + ':1' if add_bos else ''} $B:1{' ' + self.eos_token + ':1' if add_eos else ''}"
        special = []
        if add_bos:
            special.append((self.bos_token, self.bos_token_id))
        if add_eos:
            special.append((self.eos_token, self.eos_token_id))
        self._backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- public API ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Several texts in one call into the Rust tokenizer (which runs them in parallel)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def tokens(self, text: str, add_special_tokens: bool = True) -> list[str]:
        """The token strings of `encode(text)`, for inspecting how a text splits."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def decode(
        self,
        ids: Iterable[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of `ids`. Negative ids (image placeholders) are always dropped: they name no token.

        `clean_up_tokenization_spaces=None` follows the checkpoint's config (False for this family),
        which keeps decoding incremental-safe for streaming.
        """
        kept = [int(i) for i in ids if int(i) >= 0]
        text = self._backend.decode(kept, skip_special_tokens=skip_special_tokens)
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if cleanup else text

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def special_tokens_map(self) -> dict[str, Any]:
        """The special-token strings a chat template may use, named as transformers names them."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": list(self.additional_special_tokens),
        }

