"""Frame picking from videos and slide folders: which frames, in what order, and the errors users see.

The test video's frame k is a solid grey of level 12 * k, so the picked image itself tells which frame
it was (lossy codecs move the level by a few units, far less than the step of 12).
"""

from __future__ import annotations

import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phivision.errors import ImageLoadError, MediaError, PhiVisionError
from phivision.processing.video import (
    DEFAULT_NUM_FRAMES,
    Frame,
    natural_key,
    nearest_positions,
    probe_video,
    read_frames,
    target_times,
)

av = pytest.importorskip("av")

FPS = 10
NUM_VIDEO_FRAMES = 20  # 2 s
WIDTH, HEIGHT = 64, 48
LEVEL_STEP = 12


def write_video(path: Path, codec: str, *, fmt: str | None = None, drop_keyframes: bool = False) -> Path:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        if drop_keyframes:
            stream.codec_context.gop_size = 100  # one key frame only, so dropping it leaves nothing decodable
        for k in range(NUM_VIDEO_FRAMES):
            pixels = np.full((HEIGHT, WIDTH, 3), LEVEL_STEP * k, np.uint8)
            packets = stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24"))
            for packet in packets:
                if not (drop_keyframes and packet.is_keyframe):
                    container.mux(packet)
        for packet in stream.encode():
            if not (drop_keyframes and packet.is_keyframe):
                container.mux(packet)
    return path


def frame_number(image: Image.Image) -> int:
    return round(float(np.asarray(image, dtype=np.float64).mean()) / LEVEL_STEP)


def brute_force_nearest(num_frames: int, targets: list[float]) -> list[int]:
    """Independent reference: argmin over all frame times, earlier frame on ties, repeats dropped."""
    picks: list[int] = []
    for target in targets:
        best = min(range(num_frames), key=lambda k: (abs(k / FPS - target), k))
        if not picks or picks[-1] != best:
            picks.append(best)
    return picks


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "grey.mp4", "mpeg4")


# --- video files -------------------------------------------------------------------------------


def test_probe_video_reads_headers(video: Path):
    info = probe_video(video)
    assert info.duration_s == pytest.approx(NUM_VIDEO_FRAMES / FPS, abs=1e-6)
    assert info.fps == pytest.approx(FPS)
    assert info.num_frames == NUM_VIDEO_FRAMES
    assert (info.width, info.height) == (WIDTH, HEIGHT)


def test_default_picks_eight_evenly_spaced_frames(video: Path):
    frames = read_frames(video)
    assert len(frames) == DEFAULT_NUM_FRAMES
    assert all(isinstance(f, Frame) and f.image.mode == "RGB" and f.image.size == (WIDTH, HEIGHT) for f in frames)


@pytest.mark.parametrize("num_frames", [1, 3, 5, 7, 8])
def test_evenly_spaced_frames_are_nearest_to_slice_middles(video: Path, num_frames: int):
    duration = NUM_VIDEO_FRAMES / FPS
    expected = brute_force_nearest(NUM_VIDEO_FRAMES, [(i + 0.5) * duration / num_frames for i in range(num_frames)])
    frames = read_frames(video, num_frames=num_frames)
    assert [f.index for f in frames] == expected
    # The image really is that frame, and its time is the frame's presentation time.
    assert [frame_number(f.image) for f in frames] == expected
    assert [f.time_s for f in frames] == pytest.approx([k / FPS for k in expected])


def test_five_frames_are_the_slice_middles(video: Path):
    # 2 s in five 0.4 s slices: middles at 0.2, 0.6, 1.0, 1.4, 1.8 s, which are frames 2, 6, 10, 14, 18.
    assert [frame_number(f.image) for f in read_frames(video, num_frames=5)] == [2, 6, 10, 14, 18]


def test_more_frames_than_the_video_has_returns_each_frame_once(video: Path):
    frames = read_frames(video, num_frames=40)
    assert [f.index for f in frames] == list(range(NUM_VIDEO_FRAMES))
    assert [frame_number(f.image) for f in frames] == list(range(NUM_VIDEO_FRAMES))


@pytest.mark.parametrize(
    ("every_seconds", "expected"),
    [(0.5, [0, 5, 10, 15]), (0.7, [0, 7, 14]), (1.0, [0, 10]), (5.0, [0])],
)
def test_every_seconds(video: Path, every_seconds: float, expected: list[int]):
    frames = read_frames(video, every_seconds=every_seconds)
    assert [frame_number(f.image) for f in frames] == expected
    assert [f.time_s for f in frames] == pytest.approx([k / FPS for k in expected])


def test_too_many_frames_is_an_error_not_a_truncation(video: Path):
    with pytest.raises(MediaError, match="max_frames=10"):
        read_frames(video, every_seconds=0.1, max_frames=10)  # would be 20 frames
    with pytest.raises(MediaError, match="max_frames=5"):
        read_frames(video, num_frames=6, max_frames=5)
    assert len(read_frames(video, every_seconds=0.1, max_frames=20)) == 20


def test_progress_bar_does_not_change_the_frames(video: Path, capsys: pytest.CaptureFixture[str]):
    with_bar = read_frames(video, num_frames=4, progress=True)
    assert "frame" in capsys.readouterr().err
    without = read_frames(video, num_frames=4)
    assert [f.index for f in with_bar] == [f.index for f in without]


def test_matroska_without_stream_duration(tmp_path: Path):
    # ffv1 in Matroska carries only a container duration, not a per-stream one or a frame count.
    path = write_video(tmp_path / "grey.mkv", "ffv1")
    info = probe_video(path)
    assert info.duration_s == pytest.approx(2.0, abs=0.01)
    assert info.num_frames == NUM_VIDEO_FRAMES
    assert [frame_number(f.image) for f in read_frames(path, num_frames=5)] == [2, 6, 10, 14, 18]


def test_raw_stream_without_any_duration(tmp_path: Path):
    # A bare H.264 stream has no container timing at all: the duration comes from scanning packets.
    path = write_video(tmp_path / "grey.h264", "libx264", fmt="h264")
    info = probe_video(path)
    assert info.num_frames == NUM_VIDEO_FRAMES
    assert info.duration_s > 0
    frames = read_frames(path, num_frames=5)
    assert [frame_number(f.image) for f in frames] == [f.index for f in frames] == [2, 6, 10, 14, 18]


# --- the pure helpers --------------------------------------------------------------------------


def test_nearest_positions_ties_ends_and_repeats():
    assert list(nearest_positions([0.0, 1.0], [0.5])) == [0]  # a tie goes to the earlier item
    assert list(nearest_positions([0.0, 1.0, 2.0], [0.6, 0.9, 5.0, 9.0])) == [1, 2]
    assert list(nearest_positions([], [1.0])) == []
    assert list(nearest_positions([3.0, 4.0], [0.0, 1.0])) == [0]  # targets before the first item


def test_nearest_positions_stops_reading_early():
    consumed: list[int] = []

    def times():
        for k in range(1000):
            consumed.append(k)
            yield float(k)

    assert list(nearest_positions(times(), [2.2, 5.0])) == [2, 5]
    assert max(consumed) <= 6  # one past the last answer at most, never the whole stream


def test_target_times():
    assert target_times(2.0, num_frames=4) == pytest.approx([0.25, 0.75, 1.25, 1.75])
    assert target_times(2.0, every_seconds=0.5) == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert target_times(0.0, every_seconds=1.0) == [0.0]


def test_natural_order():
    names = ["slide10.png", "slide2.png", "Slide1.png", "slide1b.png", "intro.png"]
    assert sorted(names, key=natural_key) == ["intro.png", "Slide1.png", "slide1b.png", "slide2.png", "slide10.png"]


# --- folders of slides -------------------------------------------------------------------------


@pytest.fixture()
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "deck"
    folder.mkdir()
    # Slide k is grey level 12 * k; written in a scrambled order so directory order proves nothing.
    for k in [7, 1, 12, 3, 10, 2, 9, 4, 11, 5, 8, 6]:
        Image.new("RGB", (40, 30), (LEVEL_STEP * k,) * 3).save(folder / f"slide{k}.png")
    (folder / "notes.txt").write_text("not a slide")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "sub.png").mkdir()  # a folder with an image-like name is not an image
    return folder


def test_folder_returns_every_slide_in_natural_order(slides: Path):
    frames = read_frames(slides)
    assert [frame_number(f.image) for f in frames] == list(range(1, 13))
    assert [f.index for f in frames] == list(range(12))
    assert [f.time_s for f in frames] == [float(k) for k in range(12)]
    assert all(f.image.mode == "RGB" for f in frames)


def test_folder_with_num_frames_or_every_seconds_picks_like_a_video(slides: Path):
    # Twelve one-second slides in three slices: middles at 2, 6 and 10 s, i.e. slides 3, 7 and 11.
    assert [frame_number(f.image) for f in read_frames(slides, num_frames=3)] == [3, 7, 11]
    assert [frame_number(f.image) for f in read_frames(slides, every_seconds=5)] == [1, 6, 11]


def test_folder_errors(slides: Path, tmp_path: Path):
    with pytest.raises(MediaError, match="12 images, over max_frames=5"):
        read_frames(slides, max_frames=5)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(MediaError, match="no images") as info:
        read_frames(empty)
    assert str(empty) in str(info.value)


def test_folder_with_a_broken_image_names_that_file(slides: Path):
    (slides / "slide13.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="slide13.png"):
        read_frames(slides)


# --- errors on video input ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(MediaError, match="no such file") as info:
        read_frames(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(MediaError, match="no such file"):
        probe_video(missing)


@pytest.mark.parametrize("content", [b"", b"hello, not a video at all" * 50])
def test_not_a_video(tmp_path: Path, content: bytes):
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError) as info:
        read_frames(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ImageLoadError) and isinstance(info.value, PhiVisionError)
    assert info.value.__cause__ is None  # no PyAV traceback chained underneath


def test_truncated_video(tmp_path: Path, video: Path):
    path = tmp_path / "half.mp4"
    path.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(MediaError, match="half.mp4"):
        read_frames(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path):
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * 800)
    with pytest.raises(MediaError, match="no video stream"):
        read_frames(path)


def test_video_with_zero_decodable_frames(tmp_path: Path):
    # Without its only key frame, an H.264 stream has packets but nothing a decoder can show.
    path = write_video(tmp_path / "nokey.mkv", "libx264", drop_keyframes=True)
    with pytest.raises(MediaError, match="no frames"):
        read_frames(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 4, "every_seconds": 1.0}, "not both"),
        ({"num_frames": 0}, "at least 1"),
        ({"every_seconds": 0.0}, "positive"),
        ({"every_seconds": -1.0}, "positive"),
        ({"max_frames": 0}, "at least 1"),
    ],
)
def test_bad_arguments(video: Path, kwargs: dict, message: str):
    with pytest.raises(MediaError, match=message) as info:
        read_frames(video, **kwargs)
    assert str(video) in str(info.value)


def test_not_a_path():
    with pytest.raises(MediaError, match="expected the path"):
        read_frames(b"\x00\x01")  # type: ignore[arg-type]


def test_missing_pyav_names_the_extra(video: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(MediaError, match=r"video input needs PyAV: pip install 'phivision\[video\]'"):
        read_frames(video)
