"""Frames from a video file, or from a folder of exported slides, as a short list of PIL images.

A video becomes a few evenly spaced frames (or one every N seconds) so that it can be passed to the
model as several images. Videos are decoded with PyAV, an optional dependency imported only here and
only when a video is actually read. Frames are decoded in order without seeking: seeking lands on
key frames and is unreliable across containers, whereas one sequential pass is exact and stops as
soon as the last wanted frame has gone by.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from ..errors import MediaError
from .loading import load_image

DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_FRAMES = 64
# What a folder of exported slides may contain; anything else in it (notes, .DS_Store) is ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PYAV_MISSING = "video input needs PyAV: pip install 'phivision[video]'"


@dataclass(frozen=True)
class Frame:
    """One picked frame: the picture, when it is shown (seconds from the first frame) and its position."""

    image: Image.Image  # RGB
    time_s: float
    index: int  # position among all decoded frames of the video, or among the folder's images


@dataclass(frozen=True)
class VideoInfo:
    """What a video's headers say, enough to plan how many frames (and image tokens) to take."""

    duration_s: float
    fps: float
    num_frames: int  # from the container when it says, otherwise duration * fps (an estimate)
    width: int
    height: int


def read_frames(
    source: str | os.PathLike[str],
    *,
    num_frames: int | None = None,
    every_seconds: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    progress: bool = False,
) -> list[Frame]:
    """Pick frames from a video file or a folder of images, in time order.

    With `num_frames` (8 when neither option is given) the frames nearest to the times
    (i + 0.5) * duration / num_frames are taken, i.e. the middles of equal slices of the video.
    With `every_seconds` the frames nearest to 0, every_seconds, 2 * every_seconds, ... are taken.
    A frame nearest to two targets is returned once, so a very short video may give fewer frames.
    Asking for more than `max_frames` frames is an error rather than a silent truncation, since
    dropping the end of a video would change what the model is shown without saying so.

    A folder is read as exported slides: its images in natural order (slide2 before slide10), each
    counting as one second (time_s = index). Without `num_frames`/`every_seconds` all of them are
    returned (an error past `max_frames`); with either option they are picked as for a video.
    """
    path = _as_path(source)
    if num_frames is not None and every_seconds is not None:
        raise MediaError(str(path), "give num_frames or every_seconds, not both")
    if num_frames is not None and num_frames < 1:
        raise MediaError(str(path), f"num_frames must be at least 1, got {num_frames}")
    if every_seconds is not None and not every_seconds > 0:
        raise MediaError(str(path), f"every_seconds must be positive, got {every_seconds}")
    if max_frames < 1:
        raise MediaError(str(path), f"max_frames must be at least 1, got {max_frames}")
    if num_frames is not None and num_frames > max_frames:
        raise MediaError(str(path), f"num_frames={num_frames} is over max_frames={max_frames}")
    if not path.exists():
        raise MediaError(str(path), "no such file or folder")

    if path.is_dir():
        return _read_folder(path, num_frames, every_seconds, max_frames)
    if num_frames is None and every_seconds is None:
        num_frames = min(DEFAULT_NUM_FRAMES, max_frames)
    return _read_video(path, num_frames, every_seconds, max_frames, progress)


def probe_video(source: str | os.PathLike[str]) -> VideoInfo:
    """Duration, frame rate, frame count and size of a video, from its headers without decoding.

    A bare stream with no timing in its headers (e.g. a raw .h264 file) costs one pass over its
    packets instead; still no frame is decoded.
    """
    path = _as_path(source)
    if not path.is_file():
        raise MediaError(str(path), "no such file" if not path.exists() else "not a file")
    av = _import_av(path)
    with _open_video(av, path) as container, _decoder_failures(path):
        stream = _video_stream(container, path)
        if stream.codec_context is None:
            raise MediaError(str(path), f"no decoder for its video codec ({stream.codec_tag or 'unknown'})")
        fps = _fps(stream)
        duration_s = _header_duration_s(av, container, stream)
        num_frames = int(stream.frames or 0)
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if duration_s is None:
        duration_s, num_frames = _scan_duration_s(av, path, fps)
    if fps <= 0 and duration_s > 0 and num_frames > 0:
        fps = num_frames / duration_s
    if num_frames <= 0:
        num_frames = round(duration_s * fps)
    return VideoInfo(duration_s=duration_s, fps=fps, num_frames=num_frames, width=width, height=height)


def target_times(
    duration_s: float, *, num_frames: int | None = None, every_seconds: float | None = None
) -> list[float]:
    """The times the picked frames should be nearest to (exactly one of the two options is given)."""
    if num_frames is not None:
        return [(i + 0.5) * duration_s / num_frames for i in range(num_frames)]
    assert every_seconds is not None
    # The small slack keeps a duration that is an exact multiple (2.0 s every 0.5 s) at 4 targets,
    # not 5 because of rounding in the division.
    count = max(1, math.ceil(duration_s / every_seconds - 1e-9))
    return [i * every_seconds for i in range(count)]


def nearest_positions(times: Iterable[float], targets: Sequence[float]) -> Iterator[int]:
    """Yield the positions in `times` nearest to each target, ascending and without repeats.

    Both `times` and `targets` must be ascending. `times` is consumed lazily and no further than one
    item past the last answer, so a decoder feeding it can stop early. Ties go to the earlier item.
    """
    target_idx = 0
    prev_pos: int | None = None
    prev_time = 0.0
    last_yielded = -1
    for pos, time in enumerate(times):
        while target_idx < len(targets) and time >= targets[target_idx]:
            target = targets[target_idx]
            pick = prev_pos if prev_pos is not None and target - prev_time <= time - target else pos
            if pick != last_yielded:
                yield pick
                last_yielded = pick
            target_idx += 1
        if target_idx == len(targets):
            return
        prev_pos, prev_time = pos, time
    # Targets past the last item all land on it.
    if prev_pos is not None and target_idx < len(targets) and prev_pos != last_yielded:
        yield prev_pos


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that compares runs of digits as numbers, so 'slide2' < 'slide10'."""
    # re.split with a group alternates text and digits, so positions line up between names.
    parts = re.split(r"(\d+)", name.casefold())
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)) + (name,)


# --- folders of images -------------------------------------------------------------------------


def _read_folder(path: Path, num_frames: int | None, every_seconds: float | None, max_frames: int) -> list[Frame]:
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise MediaError(str(path), "the folder holds no images (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    if num_frames is None and every_seconds is None:
        if len(files) > max_frames:
            raise MediaError(
                str(path), f"the folder holds {len(files)} images, over max_frames={max_frames}; pass num_frames to pick some"
            )
        positions = list(range(len(files)))
    else:
        # Each image counts as one second, so the video rules apply unchanged.
        targets = target_times(float(len(files)), num_frames=num_frames, every_seconds=every_seconds)
        _check_count(path, len(targets), max_frames)
        positions = list(nearest_positions(range(len(files)), targets))
    return [Frame(image=load_image(files[pos]).convert("RGB"), time_s=float(pos), index=pos) for pos in positions]


# --- video files -------------------------------------------------------------------------------


def _read_video(
    path: Path, num_frames: int | None, every_seconds: float | None, max_frames: int, progress: bool
) -> list[Frame]:
    info = probe_video(path)
    # A zero duration (a single still) still has one frame to give: every target is then time 0.
    targets = target_times(max(info.duration_s, 0.0), num_frames=num_frames, every_seconds=every_seconds)
    _check_count(path, len(targets), max_frames)

    av = _import_av(path)
    picked: list[Frame] = []
    with _open_video(av, path) as container, tqdm(
        total=info.num_frames or None, disable=not progress, unit="frame", desc=path.name
    ) as bar:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame threading: the same frames, decoded faster
        recent: dict[int, tuple[float, Any]] = {}  # the last two decoded (time, frame): every answer is one of them

        def decoded_times() -> Iterator[float]:
            origin_s: float | None = None
            frames = container.decode(stream)
            for pos in itertools.count():
                with _decoder_failures(path):
                    frame = next(frames, None)
                if frame is None:
                    return
                bar.update(1)
                time_s = float(frame.time) if frame.time is not None else pos / (info.fps or 1.0)
                # Count from the first frame: containers may start at a non-zero timestamp.
                origin_s = time_s if origin_s is None else origin_s
                recent[pos] = (time_s - origin_s, frame)
                recent.pop(pos - 2, None)
                yield time_s - origin_s

        for pos in nearest_positions(decoded_times(), targets):
            time_s, frame = recent[pos]
            with _decoder_failures(path):
                image = frame.to_image().convert("RGB")
            picked.append(Frame(image=image, time_s=time_s, index=pos))
    if not picked:
        raise MediaError(str(path), "no frames could be decoded")
    return picked


def _check_count(path: Path, count: int, max_frames: int) -> None:
    if count > max_frames:
        raise MediaError(
            str(path), f"that would pick {count} frames, over max_frames={max_frames}; raise every_seconds or max_frames"
        )


def _as_path(source: str | os.PathLike[str]) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(repr(source)[:80], "expected the path of a video file or of a folder of images")
    return Path(source)


def _import_av(path: Path) -> Any:
    try:
        import av
    except ImportError:
        raise MediaError(str(path), PYAV_MISSING) from None
    return av


def _open_video(av: Any, path: Path) -> Any:
    try:
        return av.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - see _decoder_failures
        raise MediaError(str(path), f"not a video, or a corrupt one: {_ffmpeg_reason(exc)}") from None


@contextlib.contextmanager
def _decoder_failures(path: Path) -> Iterator[None]:
    """Turn whatever PyAV raises on a damaged file into one MediaError naming the file.

    Damage surfaces as many types (FFmpegError subclasses, but also UnicodeDecodeError from broken
    metadata), so this wraps only the PyAV calls themselves and catches them all there.
    """
    try:
        yield
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MediaError(str(path), f"the video is corrupt: {_ffmpeg_reason(exc)}") from None


def _video_stream(container: Any, path: Path) -> Any:
    if not container.streams.video:
        raise MediaError(str(path), "the file has no video stream")
    return container.streams.video[0]


def _fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _header_duration_s(av: Any, container: Any, stream: Any) -> float | None:
    """The video stream's own duration, else the container's (which may include longer audio)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _scan_duration_s(av: Any, path: Path, fps: float) -> tuple[float, int]:
    """Duration and packet count from one pass over the packets, for files whose headers say nothing."""
    first_s: float | None = None
    end_s = 0.0
    num_packets = 0
    with _open_video(av, path) as container:
        stream = _video_stream(container, path)
        packets = container.demux(stream)
        while True:
            with _decoder_failures(path):
                packet = next(packets, None)
            if packet is None:
                break
            if packet.size == 0:  # the flush packet demux ends with
                continue
            num_packets += 1
            if packet.pts is not None and packet.time_base is not None:
                start = float(packet.pts * packet.time_base)
                first_s = start if first_s is None else min(first_s, start)
                end_s = max(end_s, start + float((packet.duration or 0) * packet.time_base))
    if first_s is not None and end_s > first_s:
        return end_s - first_s, num_packets
    return (num_packets / fps if fps > 0 else float(num_packets)), num_packets


def _ffmpeg_reason(exc: Exception) -> str:
    # PyAV's message repeats the errno and the file name; the reason alone reads better after ours.
    return getattr(exc, "strerror", None) or str(exc)
