"""`phivision ask | chat | video` on the tiny golden checkpoint: what reaches the model, what comes out, errors.

In-process runs share one loaded model (phivision.api.load is swapped for a function returning it,
after checking what the command asked for); a few runs are real subprocesses, as a user runs them.
Expected answers come from the Python API on the same model, not from earlier CLI output.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phivision
from phivision import api, cli
from phivision.cli import ask as ask_command
from phivision.cli import video as video_command
from phivision.errors import ImageLoadError
from phivision.processing.video import read_frames

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "examples" / "images"
CHART, SCENE, SLIDES = str(IMAGES / "chart.png"), str(IMAGES / "scene.png"), str(IMAGES / "slides")
MAX_NEW = 6


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> api.PhiVision:
    return phivision.load(str(tiny_checkpoint), device="cpu", progress=False)


@pytest.fixture(scope="module")
def base(tiny_checkpoint) -> list[str]:
    return ["--model", str(tiny_checkpoint), "--device", "cpu", "--max-new-tokens", str(MAX_NEW)]


@pytest.fixture
def loads(engine, tiny_checkpoint, monkeypatch) -> list[dict]:
    """Serve the module's model to the CLI, recording how each command asked for it."""
    calls: list[dict] = []
    real_load = api.load

    def fake_load(model=None, **kwargs):
        if model != str(tiny_checkpoint):
            return real_load(model, **kwargs)
        calls.append(kwargs)
        return engine

    monkeypatch.setattr(api, "load", fake_load)
    return calls


@pytest.fixture
def run(loads, capsys):
    def run_cli(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run_cli


@pytest.fixture
def spy(engine, monkeypatch) -> list[tuple]:
    """Record the messages, num_crops and sampling options every chat/stream_chat call receives."""
    calls: list[tuple] = []
    for name in ("chat", "stream_chat"):
        original = getattr(engine, name)

        def recorded(messages, *, num_crops=None, _original=original, **sampling):
            calls.append((messages, num_crops, sampling))
            return _original(messages, num_crops=num_crops, **sampling)

        monkeypatch.setattr(engine, name, recorded)
    return calls


def user(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]}]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("phivision: error: ") and "Traceback" not in err
    return lines[0]


def run_subprocess(*argv: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phivision", *argv],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        timeout=120,
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """1 s of 8 fps 64x48 video, each frame a different grey, written with PyAV."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 + 30 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def largest_frame_count(engine, source, prompt, num_crops, max_new_tokens, upper) -> int:
    """Frames that fit, counted the slow honest way: real frames through the API's own token count."""
    best = 0
    for n in range(1, upper + 1):
        frames = read_frames(source, num_frames=n)
        tokens = engine.count_tokens(user(prompt, *[f.image for f in frames]), num_crops=num_crops)
        if tokens + max_new_tokens > engine.context_length:
            break
        best = len(frames)
    return best


# ------------------------------------------------------------------------------------------ ask


def test_ask_task_chart_streams_the_chart_prompt(run, spy, engine, base, loads):
    code, out, err = run("ask", CHART, "--task", "chart", *base)
    assert code == 0, err
    ((messages, num_crops, sampling),) = spy
    (message,) = messages
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image", "text"]
    assert message["content"][1]["text"] == ask_command.task_prompt("chart", 1)
    assert "chart" in message["content"][1]["text"] and "axes" in message["content"][1]["text"]
    assert num_crops == 16  # the model card's single-image default
    assert sampling == {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None}
    expected = engine.chat(user(ask_command.task_prompt("chart", 1), CHART), num_crops=16, max_new_tokens=MAX_NEW).text
    assert out == expected + "\n"
    assert loads == [{"device": "cpu", "dtype": None, "allow_urls": False, "progress": True}]


def test_ask_two_images_compares_them_at_4_crops(run, spy, base):
    code, out, err = run("ask", CHART, SCENE, *base, "--quiet")
    assert code == 0, err
    ((messages, num_crops, _),) = spy
    parts = messages[0]["content"]
    assert [part["type"] for part in parts] == ["image", "image", "text"]
    assert [part["image"].size for part in parts[:2]] == [(800, 600), (640, 480)]  # chart first, as given
    assert parts[2]["text"] == ask_command.task_prompt("compare", 2)
    assert num_crops == 4
    assert out.endswith("\n") and out.strip()


def test_ask_json_usage_matches_the_api(run, engine, base, loads):
    question = "What is in the picture?"
    code, out, err = run("ask", SCENE, "-p", question, "--json", "--dtype", "fp32", *base)
    assert code == 0, err
    assert out.count("\n") == 1  # one JSON object, nothing streamed before it
    report = json.loads(out)
    assert report["usage"]["prompt_tokens"] == engine.count_tokens(user(question, SCENE))
    assert 1 <= report["usage"]["completion_tokens"] <= MAX_NEW
    assert report["text"] == engine.chat(user(question, SCENE), max_new_tokens=MAX_NEW).text
    assert set(report["timings"]) >= {"ttft_s", "total_s"}
    assert loads[0]["dtype"] == "fp32"


def test_ask_over_the_context_names_settings_that_fit(run, engine, tiny_checkpoint):
    # The default 512 new tokens on a 16-crop image cannot fit the tiny model's 2048 tokens.
    code, out, err = run("ask", SCENE, "-p", "Hi", "--model", str(tiny_checkpoint), "--device", "cpu")
    assert code == 2 and out == ""
    line = one_error_line(err)
    crops = int(re.search(r"--num-crops (\d+)", line).group(1))
    room = int(re.search(r"--max-new-tokens (\d+)", line).group(1))
    messages, context = user("Hi", SCENE), engine.context_length
    assert engine.count_tokens(messages, num_crops=crops) + 512 <= context
    assert engine.count_tokens(messages, num_crops=crops + 1) + 512 > context  # the largest that fits
    assert room == context - engine.count_tokens(messages, num_crops=16)


def test_ask_subprocess(engine, base):
    result = run_subprocess("ask", CHART, "--task", "chart", *base, "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet: no progress bar
    expected = engine.chat(user(ask_command.task_prompt("chart", 1), CHART), num_crops=16, max_new_tokens=MAX_NEW).text
    assert result.stdout == expected + "\n"


# ------------------------------------------------------------------------------------------ chat


def test_chat_through_stdin_subprocess(engine, base):
    script = f"Describe it.\n/image {SCENE}\nAnd this?\n/quit\nNever asked.\n"
    result = run_subprocess("chat", *base, "--num-crops", "4", "--json", stdin=script)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 2  # and nothing after /quit
    assert "> " not in result.stdout  # no prompt when stdin is not a terminal
    conversation = engine.conversation(num_crops=4)
    first = conversation.ask("Describe it.", max_new_tokens=MAX_NEW)
    second = conversation.ask("And this?", images=[SCENE], max_new_tokens=MAX_NEW)
    assert [a["text"] for a in answers] == [first.text, second.text]
    assert answers[1]["usage"]["prompt_tokens"] == second.prompt_tokens
    assert answers[1]["usage"]["image_tokens"] == second.image_tokens > 0
    # One session throughout, like the API's Conversation (no KV reuse here: the tiny model's LongRoPE
    # switch at 64 tokens falls between the two prompts).
    assert answers[1]["usage"]["cached_prompt_tokens"] == second.cached_prompt_tokens


def chat_session(run, monkeypatch, base, script: str, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    return run("chat", *base, *extra)


def test_chat_commands_and_failed_turns_keep_the_session(run, engine, base, monkeypatch, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    script = "\n".join(
        [
            "/help",
            f"/image {broken}",  # refused, the session goes on
            "/bogus",
            f"/image {CHART}",
            f"/image {SCENE}",
            "Two big images?",  # 2 x 1921 image tokens at 16 crops: over the 2048-token context
            "/history",
            "Hello.",
            "/history",
            "/reset",
            "/history",
        ]
    )
    code, out, err = chat_session(run, monkeypatch, base, script + "\n", "--num-crops", "16", "--system", "Be brief.")
    assert code == 0, err
    errors = [line for line in err.splitlines() if line.startswith("phivision: error:")]
    assert len(errors) == 3
    assert str(broken) in errors[0] and "/bogus" in errors[1] and "2048 tokens" in errors[2]
    assert "/image PATH" in out and "Ctrl-C" in out  # the help
    hello = engine.chat([{"role": "system", "content": "Be brief."}, *user("Hello.")], num_crops=16, max_new_tokens=MAX_NEW).text
    histories = out.split("Ctrl-C at the prompt leaves.\n", 1)[1]
    # The failed turn left nothing behind: the history after it is the system message alone, and
    # the next question is answered as the first one.
    expected = (
        "system: Be brief.\n"
        f"{hello}\n"
        f"system: Be brief.\nuser: Hello.\nassistant: {hello}\n"
        "system: Be brief.\n"
    )
    assert histories == expected


def test_ctrl_c_while_streaming_drops_the_turn(run, engine, base, monkeypatch):
    real_run = engine._run
    interrupted = []

    def interrupt_first_answer(*args, **kwargs):
        inner = real_run(*args, **kwargs)
        for item in inner:
            yield item
            if isinstance(item, str) and not interrupted:
                interrupted.append(item)
                inner.close()
                raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_run", interrupt_first_answer)
    code, out, err = chat_session(run, monkeypatch, base, f"/image {SCENE}\nDescribe it.\nWhat now?\n/history\n", "--num-crops", "4")
    assert code == 0, err
    assert interrupted and "stopped" in err
    fresh = engine.chat(user("What now?"), num_crops=4, max_new_tokens=MAX_NEW).text
    # The partial answer got its newline; the next question is answered as if it were the first.
    assert out == f"{interrupted[0]}\n{fresh}\nuser: What now?\nassistant: {fresh}\n"


def test_chat_bad_startup_image_exits_2_before_loading(run, base, loads, tmp_path):
    code, out, err = run("chat", str(tmp_path / "missing.png"), *base)
    assert code == 2 and "missing.png" in one_error_line(err)
    assert loads == []


# ------------------------------------------------------------------------------------------ video


def test_video_frames_json(run, spy, engine, base, clip):
    code, out, err = run("video", clip, "--frames", "2", "--json", *base)
    assert code == 0, err
    report = json.loads(out)
    frames = read_frames(clip, num_frames=2)
    assert [f["index"] for f in report["frames"]] == [f.index for f in frames]
    assert report["num_crops"] == 4
    messages = user(video_command.VIDEO_PROMPT, *[f.image for f in frames])
    assert report["usage"]["prompt_tokens"] == engine.count_tokens(messages, num_crops=4)
    assert report["text"] == engine.chat(messages, num_crops=4, max_new_tokens=MAX_NEW).text
    sent, num_crops, _ = spy[0]  # the command's call (the API calls above come after it)
    assert num_crops == 4
    assert all(np.array_equal(np.asarray(part["image"]), np.asarray(frame.image)) for part, frame in zip(sent[0]["content"], frames))


def test_video_fit_takes_the_frames_that_fit(run, engine, base, clip):
    code, out, err = run("video", clip, "--fit", "--json", *base)
    assert code == 0, err
    expected = largest_frame_count(engine, clip, video_command.VIDEO_PROMPT, 4, MAX_NEW, 8)
    assert 1 <= expected < 8  # 8 frames at 4 crops cannot fit 2048 tokens
    assert len(json.loads(out)["frames"]) == expected
    assert "--fit" in err and f"using {expected} evenly spaced frames" in err


def test_video_folder_of_slides(run, engine, base):
    code, out, err = run("video", SLIDES, "--num-crops", "1", "--json", *base)
    assert code == 0, err
    report = json.loads(out)
    slides = sorted(str(p) for p in Path(SLIDES).glob("*.png"))
    assert [f["index"] for f in report["frames"]] == list(range(len(slides)))
    messages = user(video_command.SLIDES_PROMPT, *slides)
    assert report["usage"]["prompt_tokens"] == engine.count_tokens(messages, num_crops=1)
    assert "4 frames from" in err  # the banner; not with --quiet


def test_video_too_many_frames_fails_with_a_suggestion(engine, base, clip):
    result = run_subprocess("video", clip, "--frames", "400", *base)
    assert result.returncode == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert "2048" in line
    suggested = {int(c or 4): int(n) for c, n in re.findall(r"(?:--num-crops (\d+) )?--frames (\d+) \(", line)}
    assert 4 in suggested  # fewer frames at the same num_crops comes first
    for crops, count in suggested.items():
        # Each suggestion fits, and is the most frames that do at its num_crops.
        assert count == largest_frame_count(engine, clip, video_command.VIDEO_PROMPT, crops, MAX_NEW, 8)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kind", ["missing", "corrupt", "folder"])
def test_bad_images_exit_2_with_one_line(run, base, loads, tmp_path, kind):
    path = tmp_path / "input.png"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "folder":
        path.mkdir()
    code, out, err = run("ask", str(path), *base)
    assert code == 2 and out == ""
    assert f"cannot read image {path}" in one_error_line(err)
    assert loads == []  # refused before the model loads


def test_corrupt_video_exits_2(run, base, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    code, _, err = run("video", str(path), *base)
    assert code == 2 and f"cannot read video {path}" in one_error_line(err)


def test_unknown_model_offline(run, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run("ask", SCENE, "--model", "nobody/no-such-phivision-model", "--device", "cpu")
    assert code == 2 and "offline" in one_error_line(err)
    result = run_subprocess("ask", SCENE, "--model", str(tmp_path / "no-model"), "--device", "cpu", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert "no-model" in one_error_line(result.stderr)


def test_usage_errors(run, base):
    assert run("ask", SCENE, "--task", "compare", *base)[0] == 2
    code, _, err = run("ask", SCENE, "--device", "no-such-device", "--model", base[1])
    assert code == 2 and "device" in one_error_line(err)
    with pytest.raises(SystemExit) as info:
        cli.main(["ask", SCENE, "-p", "x", "--task", "ocr"])  # one or the other
    assert info.value.code == 2


def test_debug_shows_the_exception(run, base, tmp_path):
    with pytest.raises(ImageLoadError):
        cli.main(["ask", str(tmp_path / "missing.png"), *base, "--debug"])


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("tokens", "ask", "chat", "video"))


def test_the_budget_uses_the_engines_limit(engine, tiny_checkpoint):
    from types import SimpleNamespace

    from phivision.cli.budget import ContextBudget, engine_context_length

    assert ContextBudget.for_checkpoint(str(tiny_checkpoint), "cpu").context_length == engine.context_length
    # The real model's 131072 positions: on the CPU the default engine holds fewer, and so must the budget.
    stub = SimpleNamespace(
        parameters=lambda: iter([SimpleNamespace(device=SimpleNamespace(type="cpu"))]),
        config=SimpleNamespace(text=SimpleNamespace(max_position_embeddings=131072)),
    )
    assert engine_context_length(131072, "cpu") == api.default_engine_config(stub).max_model_len < 131072
