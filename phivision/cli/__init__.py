"""The `phivision` command line: argparse front-ends that call into the library.

Subcommands (one module each):
  tokens IMAGE...              image sizes, crop grids and image-token counts (no model needed)
  ask IMAGE... [-p PROMPT]     one question about one or more images, answer streamed
  chat [IMAGE...]              a multi-turn conversation on stdin/stdout
  video FILE_OR_FOLDER         frames of a video, or a folder of slides, and one question about them
  serve                        the OpenAI-compatible HTTP server and chat page

Each module's `add_parser` registers its subcommand with a `run` function taking the parsed
arguments and returning an exit code: 0 done, 2 a usage or input error (our PhiVisionError types:
one line `phivision: error: ...` on stderr, the traceback only with --debug), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import PhiVisionError
from . import ask, chat, serve, tokens, video
from .common import EXIT_INTERRUPTED, EXIT_USAGE, PROG, error_line, generation_options


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser = argparse.ArgumentParser(prog=PROG, description="Phi-3.5-vision-instruct engine and tools.", parents=[common])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    tokens.add_parser(subparsers, common)
    generating = [common, generation_options()]
    ask.add_parser(subparsers, generating)
    chat.add_parser(subparsers, generating)
    video.add_parser(subparsers, generating)
    serve.add_parser(subparsers, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except BrokenPipeError:
        # The reader went away (`phivision tokens ... | head`): stop quietly, like other command-line tools.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush from failing again
        return 0
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except PhiVisionError as exc:
        if getattr(args, "debug", False):
            raise
        print(error_line(exc), file=sys.stderr)
        return EXIT_USAGE


__all__ = ["build_parser", "main"]
