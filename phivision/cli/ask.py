"""`phivision ask IMAGE... [-p PROMPT | --task TASK]`: one question about one or more images, answer streamed."""

from __future__ import annotations

import argparse

from ..errors import PromptError
from ..processing.loading import load_image
from .budget import ContextBudget
from .common import UsageError, check_device, load_engine, model_name, print_json, sampling_kwargs, user_message, write_stream

# Default prompts per task: (for one image, for several). They ask for what a reader of that kind
# of image wants, and say what not to do where the model tends to drift (summarising an OCR job).
TASK_PROMPTS: dict[str, tuple[str, str]] = {
    "describe": (
        "Describe this image in detail: the main subjects and what they are doing, the setting, "
        "notable colours and objects, and any text that is visible.",
        "Describe each of these images in detail, one after the other: the main subjects and what they "
        "are doing, the setting, notable colours and objects, and any text that is visible.",
    ),
    "ocr": (
        "Transcribe all the text in this image exactly as written. Keep the layout: line breaks, headings, "
        "lists, columns and indentation. Do not summarise, translate or correct anything; write only the text.",
        "Transcribe all the text in these images exactly as written, image by image. Keep the layout: line "
        "breaks, headings, lists, columns and indentation. Do not summarise, translate or correct anything; "
        "write only the text.",
    ),
    "chart": (
        "Explain this chart: what type of chart it is, what the axes and the legend show (with units), "
        "the main values, and the overall trend or conclusion.",
        "Explain each of these charts: what type of chart it is, what the axes and the legend show (with "
        "units), the main values, and the overall trend or conclusion; then say how the charts relate.",
    ),
    "table": (
        "Reproduce the table in this image as a Markdown table with the same header, rows and columns, "
        "copying every cell exactly. Write only the table.",
        "Reproduce the table in each of these images as a Markdown table with the same header, rows and "
        "columns, copying every cell exactly. Write only the tables.",
    ),
    "compare": (
        "Describe this image in detail.",  # never used: compare needs two images (checked below)
        "Compare these images: what they have in common, how they differ, and anything that changed "
        "from one to the next.",
    ),
    "summarize": (
        "Summarise the content of this page or slide: its main topic and key points.",
        "These images are slides or pages, in order. Summarise them: the main topic, the key point of "
        "each one, and the overall conclusion.",
    ),
}
TASKS = tuple(TASK_PROMPTS)


def default_task(num_images: int) -> str:
    return "describe" if num_images == 1 else "compare"


def task_prompt(task: str, num_images: int) -> str:
    one, several = TASK_PROMPTS[task]
    return one if num_images == 1 else several


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ask",
        parents=parents,
        help="ask one question about one or more images",
        description="Answer one question about one or more images, streaming the answer to stdout. Without "
        "-p, --task picks a prompt (default: describe for one image, compare for several).",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file, data: URI or (with --allow-urls) URL")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("-p", "--prompt", help="the question")
    what.add_argument("--task", choices=TASKS, help="a ready-made prompt: " + ", ".join(TASKS))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    num_images = len(args.images)
    if args.prompt is not None:
        prompt = args.prompt
        if not prompt.strip():
            raise UsageError("the prompt (-p) is empty")
    else:
        task = args.task or default_task(num_images)
        if task == "compare" and num_images < 2:
            raise UsageError("--task compare needs at least two images")
        prompt = task_prompt(task, num_images)
    # Decode every image now: a missing or corrupt file fails before the model loads, not after.
    images = [load_image(source, allow_urls=args.allow_urls) for source in args.images]
    messages = user_message(images, prompt)

    from ..api import default_num_crops

    num_crops = args.num_crops or default_num_crops(num_images)
    model = model_name(args)
    check_context(ContextBudget.for_checkpoint(model, args.device), messages, [image.size for image in images], num_crops, args.max_new_tokens)

    engine = load_engine(args, model)
    if args.json:
        print_json(engine.chat(messages, num_crops=num_crops, **sampling_kwargs(args)).as_dict())
    else:
        write_stream(engine.stream_chat(messages, num_crops=num_crops, **sampling_kwargs(args)))
    return 0


def check_context(
    budget: ContextBudget, messages: list, image_sizes: list[tuple[int, int]], num_crops: int, max_new_tokens: int
) -> None:
    """Refuse a prompt that cannot fit, naming a num_crops or a max_new_tokens that would."""
    prompt_tokens = budget.prompt_tokens(messages, image_sizes, num_crops)
    if budget.fits(prompt_tokens, max_new_tokens):
        return
    noun = "image" if len(image_sizes) == 1 else "images"
    problem = (
        f"the prompt is {prompt_tokens} tokens ({len(image_sizes)} {noun} at num_crops={num_crops}) and with "
        f"max_new_tokens={max_new_tokens} that is over {budget.describe_limit()}"
    )
    fixes = []
    fewer_crops = next(
        (crops for crops in range(num_crops - 1, 0, -1) if budget.fits(budget.prompt_tokens(messages, image_sizes, crops), max_new_tokens)),
        None,
    )
    if fewer_crops is not None:
        fixes.append(f"--num-crops {fewer_crops}")
    if budget.room_for_answer(prompt_tokens) > 0:
        fixes.append(f"--max-new-tokens {budget.room_for_answer(prompt_tokens)}")
    advice = "try " + " or ".join(fixes) if fixes else "use fewer or smaller images"
    raise PromptError(f"{problem}; {advice}")
