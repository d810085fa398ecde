"""`phivision chat [IMAGE...]`: a multi-turn conversation on stdin/stdout.

Interactive on a terminal (a `> ` prompt, line editing), and scriptable through a pipe: every line
read is a question or a command, and every answer is written as it streams (one JSON line per
answer with --json). Answers go to stdout; notices and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ImageLoadError, PhiVisionError
from ..processing.loading import load_image
from .common import EXIT_INTERRUPTED, EXIT_OK, PROG, check_device, error_line, load_engine, model_name, notice, print_json, sampling_kwargs, write_stream

if TYPE_CHECKING:
    from ..api import Conversation

HELP = """\
Type a question and press Enter. Commands:
  /image PATH   attach an image to the next question (repeat for several)
  /reset        forget the conversation (the system message stays)
  /history      print the conversation so far
  /help         show this help
  /quit         leave (end of input, Ctrl-D, does too)
Ctrl-C while an answer is streaming stops it. The stopped question is dropped with its partial
answer and the images attached to it, so the history stays as it was before you asked; a question
that fails (an image over the context, ...) is dropped the same way. Ctrl-C at the prompt leaves."""


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "chat",
        parents=parents,
        help="multi-turn chat about images on stdin/stdout",
        description="A multi-turn conversation. Images given here are attached to the first question; "
        "/image PATH attaches more later. Reads questions line by line, so it can be driven through a pipe.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images for the first question")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    parser.set_defaults(run=run)


class ChatSession:
    """The read-answer loop around a Conversation; holds the images attached to the next question."""

    def __init__(self, conversation: "Conversation", args: argparse.Namespace, images: list[str]):
        self.conversation = conversation
        self.args = args
        self.pending: list[str] = list(images)
        self.interactive = sys.stdin.isatty()

    def run(self) -> int:
        if self.interactive:
            try:
                import readline  # noqa: F401 - imported for its side effect: line editing and history in input()
            except ImportError:
                pass
        while True:
            try:
                line = self._read_line()
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return EXIT_INTERRUPTED
            if line is None:
                return EXIT_OK
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return EXIT_OK
            else:
                self.answer(line)

    def _read_line(self) -> str | None:
        """The next line, or None at the end of input."""
        if self.interactive:
            try:
                return input("> ")
            except EOFError:
                print()
                return None
        line = sys.stdin.readline()
        return line if line else None

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(HELP, flush=True)
        elif name == "/reset":
            self.conversation.reset()
            self.pending = []
            notice(self.args, "conversation cleared")
        elif name == "/history":
            print(self.history(), flush=True)
        elif name == "/image":
            self.attach(_unquote(rest))
        else:
            print(f"{PROG}: error: unknown command {name}; /help lists the commands", file=sys.stderr, flush=True)
        return True

    def attach(self, source: str) -> None:
        if not source:
            print(f"{PROG}: error: /image needs a path, e.g. /image photo.jpg", file=sys.stderr, flush=True)
            return
        try:
            load_image(source, allow_urls=self.args.allow_urls)  # fail now, with the path in the message
        except ImageLoadError as exc:
            print(error_line(exc), file=sys.stderr, flush=True)
            return
        self.pending.append(source)
        notice(self.args, f"attached {source} to the next question")

    def answer(self, question: str) -> None:
        """Ask, streaming the answer; a failed or interrupted turn leaves the history untouched."""
        sampling = sampling_kwargs(self.args)
        try:
            if self.args.json:
                print_json(self.conversation.ask(question, images=self.pending, **sampling).as_dict())
            else:
                write_stream(self.conversation.stream(question, images=self.pending, **sampling))
        except KeyboardInterrupt:
            _drop_unfinished_turn(self.conversation)
            print(f"{PROG}: answer stopped; the question was dropped from the history", file=sys.stderr, flush=True)
        except PhiVisionError as exc:
            _drop_unfinished_turn(self.conversation)
            print(error_line(exc), file=sys.stderr, flush=True)
        # Images go with the question they were attached to, whether it was answered or dropped.
        self.pending = []

    def history(self) -> str:
        lines = []
        for message in self.conversation.messages:
            lines.append(f"{message['role']}: {_describe_content(message['content'])}")
        if self.pending:
            lines.append("(attached to the next question: " + ", ".join(self.pending) + ")")
        return "\n".join(lines) if lines else "(no turns yet)"


def _describe_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part.get("type") == "text":
            pieces.append(part["text"])
        else:
            pieces.append(f"[image {part.get('image')}]")
    return " ".join(pieces)


def _unquote(text: str) -> str:
    # Paths pasted from a file manager often come quoted.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _drop_unfinished_turn(conversation: "Conversation") -> None:
    """Undo what a failed or interrupted Conversation.stream left behind.

    The history is only written when a turn completes (and the engine aborts the request itself),
    but the turn's images stay queued inside the Conversation: without this they would ride along
    with the next question, and an image that made the turn too long would fail every turn after.
    """
    conversation.discard_pending()


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    # Check the images given up front before the model loads: a typo should not cost a load.
    for source in args.images:
        load_image(source, allow_urls=args.allow_urls)
    model = model_name(args)
    engine = load_engine(args, model)
    conversation = engine.conversation(system=args.system, num_crops=args.num_crops)
    session = ChatSession(conversation, args, args.images)
    if session.interactive:
        notice(args, f"chat with {model} ({engine.context_length}-token context); /help lists the commands, /quit leaves")
        if args.images:
            notice(args, "attached " + ", ".join(args.images) + " to the first question")
    return session.run()
