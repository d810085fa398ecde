"""`phivision video FILE_OR_FOLDER`: frames of a video (or a folder of slides) and one question about them.

Before any frame is decoded or any weight loaded, the prompt the frames would make is measured
against the model's context (frame sizes from the video's headers or the images' headers); a
request that cannot fit fails with the frame counts and crop settings that would, or with --fit
is reduced to the largest that fits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import MediaError, PromptError
from ..processing.image import num_image_tokens_for_size
from ..processing.loading import read_image_size
from ..processing.video import DEFAULT_MAX_FRAMES, DEFAULT_NUM_FRAMES, IMAGE_SUFFIXES, probe_video, read_frames, target_times
from .budget import ContextBudget, largest_count_that_fits
from .common import PROG, check_device, load_engine, model_name, notice, positive_int, print_json, sampling_kwargs, user_message, write_stream

# The model card's advice for frames: 4 crops each (16 would spend ~2000 tokens on every frame).
DEFAULT_VIDEO_CROPS = 4
# What --fit falls back to, in order, when not even one frame fits at the asked num_crops.
FALLBACK_CROPS = (4, 2, 1)
VIDEO_PROMPT = "These are frames from a video, in time order. Summarize what happens in them."
SLIDES_PROMPT = "These are slides, in order. Summarize them: the main topic, the key point of each slide, and the conclusion."


@dataclass(frozen=True)
class FramePlan:
    """What read_frames will be asked for, known from headers alone."""

    num_frames: int  # frames the request picks (at most; a short video may give fewer)
    sizes: tuple[tuple[int, int], ...]  # distinct (width, height) of the frames it may pick
    is_folder: bool

    def frame_size(self, num_crops: int) -> tuple[int, int]:
        """The size that costs the most tokens: a folder's slides may differ, and the plan must never undercount."""
        return max(self.sizes, key=lambda size: num_image_tokens_for_size(*size, num_crops))


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "video",
        parents=parents,
        help="ask about a video or a folder of slides",
        description="Pick frames from a video file (evenly spaced, or one every N seconds) or the images of a "
        "folder (in natural order: slide2 before slide10) and answer one question about them. "
        f"num_crops defaults to {DEFAULT_VIDEO_CROPS} here.",
    )
    parser.add_argument("source", metavar="FILE_OR_FOLDER", help="a video file, or a folder of images (e.g. exported slides)")
    parser.add_argument("-p", "--prompt", help="the question (default: summarize what happens)")
    count = parser.add_mutually_exclusive_group()
    count.add_argument(
        "--frames", type=positive_int, default=None, help=f"evenly spaced frames to take (default: {DEFAULT_NUM_FRAMES}; a folder: all its images)"
    )
    count.add_argument("--every", type=float, default=None, metavar="SECONDS", help="one frame every SECONDS (a folder's images count as one second each)")
    parser.add_argument("--fit", action="store_true", help="take fewer frames (then fewer crops) when the request would not fit the context")
    parser.set_defaults(run=run)


def plan_frames(source: str, num_frames: int | None, every_seconds: float | None) -> FramePlan:
    """How many frames the request picks and how large they are, from headers only."""
    path = Path(source).expanduser()
    if every_seconds is not None and not every_seconds > 0:
        raise MediaError(str(path), f"--every must be a positive number of seconds, got {every_seconds}")
    if not path.exists():
        raise MediaError(str(path), "no such file or folder")
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise MediaError(str(path), "the folder holds no images (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
        available, duration_s = len(files), float(len(files))
        sizes = {read_image_size(p) for p in files}
        default = available
    else:
        info = probe_video(path)
        if info.width <= 0 or info.height <= 0:
            # Random bytes can pass FFmpeg's probe as a "stream" with no picture size.
            raise MediaError(str(path), "not a video, or a corrupt one (no frame size in its headers)")
        available, duration_s = info.num_frames, info.duration_s
        sizes = {(info.width, info.height)}
        default = DEFAULT_NUM_FRAMES
    if every_seconds is not None:
        wanted = len(target_times(max(duration_s, 0.0), every_seconds=every_seconds))
    else:
        wanted = num_frames or default
    # A frame nearest to two targets is picked once, so a request never gets more frames than there are.
    count = min(wanted, available) if available > 0 else wanted
    return FramePlan(num_frames=count, sizes=tuple(sorted(sizes)), is_folder=path.is_dir())


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    plan = plan_frames(args.source, args.frames, args.every)
    prompt = args.prompt or (SLIDES_PROMPT if plan.is_folder else VIDEO_PROMPT)
    asked_crops = num_crops = args.num_crops or DEFAULT_VIDEO_CROPS
    model = model_name(args)
    budget = ContextBudget.for_checkpoint(model, args.device)

    def prompt_tokens(count: int, crops: int) -> int:
        return budget.prompt_tokens(user_message(list(range(count)), prompt), [plan.frame_size(crops)] * count, crops)

    num_frames, every = args.frames, args.every
    needed = prompt_tokens(plan.num_frames, num_crops)
    if not budget.fits(needed, args.max_new_tokens):
        ladder = [num_crops] + [crops for crops in FALLBACK_CROPS if crops < num_crops]
        fitting = {
            crops: largest_count_that_fits(lambda n, c=crops: prompt_tokens(n, c), plan.num_frames, budget, args.max_new_tokens)
            for crops in ladder
        }
        usable = [crops for crops in ladder if fitting[crops] > 0]
        if not args.fit or not usable:
            message = _over_context_message(plan.num_frames, num_crops, needed, args.max_new_tokens, budget, fitting, prompt_tokens)
            if args.frames is not None and args.frames > plan.num_frames:
                holder = "folder" if plan.is_folder else "video"
                message = f"--frames {args.frames} gets {plan.num_frames} (all the {holder} has); " + message
            raise PromptError(message)
        num_crops = usable[0]
        num_frames, every = fitting[num_crops], None
        used = prompt_tokens(num_frames, num_crops)
        # Not silenced by --quiet: the model is shown less than was asked for.
        print(
            f"{PROG}: --fit: {plan.num_frames} frames at num_crops={asked_crops} do not fit; using "
            f"{num_frames} evenly spaced frames at num_crops={num_crops} ({used} prompt tokens + {args.max_new_tokens} new "
            f"of the {budget.context_length}-token limit)",
            file=sys.stderr,
            flush=True,
        )

    wanted = num_frames or plan.num_frames
    frames = read_frames(
        args.source, num_frames=num_frames, every_seconds=every, max_frames=max(DEFAULT_MAX_FRAMES, wanted), progress=not args.quiet
    )
    times = ", ".join(f"{frame.time_s:.2f}" for frame in frames)
    notice(args, f"{len(frames)} {'frame' if len(frames) == 1 else 'frames'} from {args.source} (at {times} s), num_crops={num_crops}")
    messages = user_message([frame.image for frame in frames], prompt)

    engine = load_engine(args, model)
    if args.json:
        result = engine.chat(messages, num_crops=num_crops, **sampling_kwargs(args)).as_dict()
        result["num_crops"] = num_crops
        result["frames"] = [{"index": frame.index, "time_s": round(frame.time_s, 3)} for frame in frames]
        print_json(result)
    else:
        write_stream(engine.stream_chat(messages, num_crops=num_crops, **sampling_kwargs(args)))
    return 0


def _over_context_message(
    num_frames: int, num_crops: int, needed: int, max_new_tokens: int, budget: ContextBudget, fitting: dict[int, int], prompt_tokens
) -> str:
    problem = (
        f"{num_frames} frames at num_crops={num_crops} make a {needed}-token prompt, and with max_new_tokens={max_new_tokens} "
        f"that is over {budget.describe_limit()}"
    )
    options = []
    best = 0
    for crops, count in fitting.items():  # from the asked num_crops down
        # Fewer crops are worth suggesting only where they let more frames in (a small frame
        # takes the same tokens at 2 crops as at 1).
        if count > best:
            best = count
            flags = f"--frames {count}" if crops == num_crops else f"--num-crops {crops} --frames {count}"
            options.append(f"{flags} ({count} {'frame' if count == 1 else 'frames'} at num_crops={crops})")
    if options:
        return f"{problem}; try " + ", or ".join(options) + ", or --fit to pick automatically"
    smallest = min(fitting)
    room = budget.room_for_answer(prompt_tokens(1, smallest))
    if room > 0:
        return f"{problem}; not even one frame fits at num_crops={smallest} with that answer length: lower --max-new-tokens to at most {room}"
    return f"{problem}; not even one frame at num_crops={smallest} fits"
