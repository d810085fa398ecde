"""The `phivision` command line: argparse front-ends that call into the library, no logic of their own.

Subcommands:
  tokens IMAGE... [--num-crops N] [--json]   image size, HD size, crop grid and image-token count

Each subcommand registers itself in `build_parser` with a `run` function taking the parsed
arguments and returning an exit code. Errors a user can cause (our PhiVisionError types) print one
line, `phivision: error: ...`, and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PhiVisionError
from .processing.image import CROP_SIZE, hd_size, num_image_tokens
from .processing.loading import read_image_size

PROG = "phivision"
EXIT_USAGE = 2
# The model card's advice: 16 crops for a single image, 4 for several images or video frames.
NUM_CROPS_SINGLE_IMAGE = 16
NUM_CROPS_MULTI_IMAGE = 4


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_tokens_command(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "tokens",
        parents=[common],
        help="count the image tokens each image takes in a prompt",
        description="Print each image's size, its HD size after the resize/pad step, the crop grid and the "
        "number of image tokens it takes in a prompt, then the total. Only image headers are read.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file, data: URI or (with --allow-urls) URL")
    parser.add_argument(
        "--num-crops",
        type=_positive_int,
        default=None,
        help=f"crops per image (default: {NUM_CROPS_SINGLE_IMAGE} for one image, {NUM_CROPS_MULTI_IMAGE} for several)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--allow-urls", action="store_true", help="allow http(s) URLs as images")
    parser.set_defaults(run=_run_tokens)


def _run_tokens(args: argparse.Namespace) -> int:
    num_crops = args.num_crops
    if num_crops is None:
        num_crops = NUM_CROPS_SINGLE_IMAGE if len(args.images) == 1 else NUM_CROPS_MULTI_IMAGE
    rows = []
    for source in args.images:
        width, height = read_image_size(source, allow_urls=args.allow_urls)
        hd_height, hd_width = hd_size(width, height, num_crops)
        rows.append(
            {
                "image": source if not source.startswith("data:") else "<data URI>",
                "width": width,
                "height": height,
                "hd_height": hd_height,
                "hd_width": hd_width,
                "grid_rows": hd_height // CROP_SIZE,
                "grid_cols": hd_width // CROP_SIZE,
                "num_image_tokens": num_image_tokens(hd_height, hd_width),
            }
        )
    total = sum(row["num_image_tokens"] for row in rows)
    if args.json:
        print(json.dumps({"num_crops": num_crops, "images": rows, "total_image_tokens": total}, indent=2))
        return 0
    table = [("image", "size (WxH)", "HD (HxW)", "grid (RxC)", "tokens")]
    for row in rows:
        table.append(
            (
                row["image"],
                f"{row['width']}x{row['height']}",
                f"{row['hd_height']}x{row['hd_width']}",
                f"{row['grid_rows']}x{row['grid_cols']}",
                str(row["num_image_tokens"]),
            )
        )
    noun = "image" if len(rows) == 1 else "images"
    table.append((f"total ({len(rows)} {noun}, num_crops={num_crops})", "", "", "", str(total)))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths)] + [line[-1].rjust(widths[-1])]
        print("  ".join(cells).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser = argparse.ArgumentParser(prog=PROG, description="Phi-3.5-vision-instruct engine and tools.", parents=[common])
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_tokens_command(subparsers, common)
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
    except PhiVisionError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
