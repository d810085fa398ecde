"""phivision: a fast, faithful engine for Phi-3.5-vision-instruct.

`phivision.load()` returns a `PhiVision` with `chat`, `stream_chat` and `conversation`; see
phivision/api.py. Imported lazily so that `import phivision` stays cheap for the command line.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = ("load", "PhiVision", "Conversation", "ChatResult", "DEFAULT_MODEL")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'phivision' has no attribute {name!r}")


__all__ = ["__version__", *_API]
