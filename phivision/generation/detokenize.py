"""Turning a growing list of token ids into text pieces, safely for streaming.

Two concerns live here: never emit half of a multi-byte character (byte-fallback tokens can split
one), and never emit text that may turn out to be the start of a stop string.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Yields the text that each new token adds, equal in sum to decoding all ids at once.

    Decoding a short window (from `prefix_offset`) instead of everything keeps each step cheap;
    the window starts one token back so tokenizers that strip a leading space at the start of a
    decode see the same context as in the full decode.
    """

    def __init__(self, tokenizer: Decodes, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
        text = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if text.endswith(_REPLACEMENT) or len(text) <= len(prefix):
            # An incomplete UTF-8 sequence (or a token that adds nothing yet): wait for more bytes.
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a genuinely invalid byte sequence)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
        text = self._tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopStringFilter:
    """Holds back text that could begin a stop string and cuts the output at the first one found."""

    def __init__(self, stop: Sequence[str]):
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that is now safe to show; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        self._pending += piece
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        if self._hold == 0:
            out, self._pending = self._pending, ""
            return out
        # Keep only as much as could still be the start of a stop string.
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class RequestText:
    """One request's generated token ids -> the text to show: end tokens dropped (unless
    `ignore_eos`), multi-byte characters kept whole, output cut at the first stop string.

    The API, the command line and the server all turn engine outputs into text through this, so a
    stop string ends an answer the same way everywhere.
    """

    def __init__(self, tokenizer: Decodes, stop: Sequence[str], stop_token_ids: Sequence[int], ignore_eos: bool = False):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stopper = StopStringFilter(stop)
        self._stop_ids = frozenset(stop_token_ids)
        self._ignore_eos = ignore_eos

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the answer is complete and the request should be ended."""
        return self._stopper.stopped

    def push(self, token_id: int) -> str:
        if token_id in self._stop_ids and not self._ignore_eos:
            return ""
        return self._stopper.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """The text still held back once the request has ended."""
        if self._stopper.stopped:
            return ""
        return self._stopper.push(self._decoder.flush()) + self._stopper.flush()
