"""`phivision tokens IMAGE...`: how many image tokens each image takes, from image headers alone."""

from __future__ import annotations

import argparse
import json

from ..processing.image import CROP_SIZE, hd_size, num_image_tokens
from ..processing.loading import read_image_size
from .common import positive_int

# The model card's advice: 16 crops for a single image, 4 for several images or video frames.
NUM_CROPS_SINGLE_IMAGE = 16
NUM_CROPS_MULTI_IMAGE = 4


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
        type=positive_int,
        default=None,
        help=f"crops per image (default: {NUM_CROPS_SINGLE_IMAGE} for one image, {NUM_CROPS_MULTI_IMAGE} for several)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--allow-urls", action="store_true", help="allow http(s) URLs as images")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
