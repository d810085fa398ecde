"""The exception types users catch. Each names the offending input and the reason."""

from __future__ import annotations


class PhiVisionError(Exception):
    """Base class of every error phivision raises on purpose."""


class ImageLoadError(PhiVisionError, ValueError):
    """An image input could not be read: missing, corrupt, truncated, unsupported or too large."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source}: {reason}")


class PromptError(PhiVisionError, ValueError):
    """A prompt and its images do not fit together (bad tags, count mismatch, over the context)."""


class CheckpointError(PhiVisionError):
    """A checkpoint folder or hub id could not be resolved or loaded (missing files, bad tensors)."""


class MediaError(ImageLoadError):
    """A video, or a folder of exported slides, could not be read (or asked for impossible frames).

    A subclass of ImageLoadError so that code catching unreadable visual input catches both.
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        PhiVisionError.__init__(self, f"cannot read video {source}: {reason}")
