"""What the generating subcommands share: their options, loading the model, and writing answers.

The library is imported lazily (inside functions) so that `phivision --help` and `phivision tokens`
do not pay for importing the model code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PhiVisionError

if TYPE_CHECKING:
    from ..api import PhiVision

PROG = "phivision"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DEFAULT_MAX_NEW_TOKENS = 512
DTYPES = ("bf16", "fp16", "fp32")


class UsageError(PhiVisionError):
    """A command-line request that cannot be carried out as given (bad device, options that clash)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def generation_options() -> argparse.ArgumentParser:
    """A parent parser with the options of every command that runs the model."""
    parser = argparse.ArgumentParser(add_help=False)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help="checkpoint folder or Hugging Face Hub id (default: $PHIVISION_MODEL, else microsoft/Phi-3.5-vision-instruct)",
    )
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    model.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: bf16 on GPUs that have it, fp32 on CPU)")
    model.add_argument("--num-crops", type=positive_int, default=None, help="crops per image (16 for one image, 4 for several)")
    model.add_argument("--allow-urls", action="store_true", help="allow http(s) URLs as images")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer, in tokens (default: %(default)s)")
    sampling.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy, the reference's default (default: %(default)s)")
    sampling.add_argument("--top-k", type=non_negative_int, default=0, help="sample from the k likeliest tokens; 0 = off")
    sampling.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling threshold; 1 = off")
    sampling.add_argument("--seed", type=int, default=None, help="seed for sampling (a fixed seed repeats an answer)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object (text, usage, timings) instead of streaming")
    output.add_argument("--quiet", action="store_true", help="no progress bars or banners on stderr")
    return parser


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def model_name(args: argparse.Namespace) -> str:
    """--model, else $PHIVISION_MODEL, else the release: the same rule phivision.load applies."""
    from ..api import DEFAULT_MODEL, MODEL_ENV

    return args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have before minutes of loading, not after."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available on this machine (try --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")


def load_engine(args: argparse.Namespace, model: str) -> "PhiVision":
    from .. import api

    return api.load(model, device=args.device, dtype=args.dtype, allow_urls=args.allow_urls, progress=not args.quiet)


def user_message(images: Sequence[Any], text: str) -> list[dict[str, Any]]:
    """One OpenAI-style user message: the images first, then the question (the model card's layout)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def write_stream(pieces: Iterable[str]) -> str:
    """Write text pieces to stdout as they come, then a newline; returns the whole text.

    On Ctrl-C or an error mid-answer the line is still ended, so the shell prompt starts on its own line.
    """
    out = sys.stdout
    text: list[str] = []
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            text.append(piece)
    except BaseException:
        if text:
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    return "".join(text)


def print_json(data: dict[str, Any]) -> None:
    """One JSON object on one line (so that chat's answers read as JSON Lines)."""
    print(json.dumps(data, ensure_ascii=False), flush=True)


def notice(args: argparse.Namespace, message: str) -> None:
    """An informational line on stderr, silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def error_line(exc: BaseException) -> str:
    # One line whatever the message holds: scripts read stderr line by line.
    return f"{PROG}: error: " + " ".join(str(exc).split())
