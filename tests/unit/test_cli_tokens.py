"""`phivision tokens`: per-image sizes, grid and token counts, the total, defaults, JSON and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phivision import cli
from phivision.errors import ImageLoadError
from phivision.processing.image import hd_size, num_image_tokens_for_size

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def images(tmp_path):
    """Three small files of known sizes: landscape photo-ish, portrait, extreme strip."""
    paths = {}
    for name, (width, height) in {"wide.png": (400, 300), "tall.jpg": (300, 500), "strip.png": (1000, 3)}.items():
        path = tmp_path / name
        Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)
        paths[name] = (path, width, height)
    return paths


def run_json(capsys, argv):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_one_image_defaults_to_16_crops(images, capsys):
    path, width, height = images["wide.png"]
    report = run_json(capsys, ["tokens", str(path), "--json"])
    assert report["num_crops"] == 16
    (row,) = report["images"]
    hd_height, hd_width = hd_size(width, height, 16)
    assert (row["width"], row["height"]) == (width, height)
    assert (row["hd_height"], row["hd_width"]) == (hd_height, hd_width) == (1008, 1344)
    assert (row["grid_rows"], row["grid_cols"]) == (3, 4)
    assert row["num_image_tokens"] == report["total_image_tokens"] == 1921


def test_several_images_default_to_4_crops(images, capsys):
    sources = [str(images[name][0]) for name in ("wide.png", "tall.jpg", "strip.png")]
    report = run_json(capsys, ["tokens", *sources, "--json"])
    assert report["num_crops"] == 4
    expected = [num_image_tokens_for_size(w, h, 4) for _, w, h in (images[n] for n in ("wide.png", "tall.jpg", "strip.png"))]
    assert [row["num_image_tokens"] for row in report["images"]] == expected
    assert report["total_image_tokens"] == sum(expected)
    tall = report["images"][1]
    assert (tall["hd_height"], tall["hd_width"]) == hd_size(300, 500, 4)


def test_num_crops_option(images, capsys):
    path, width, height = images["tall.jpg"]
    report = run_json(capsys, ["tokens", str(path), "--num-crops", "1", "--json"])
    assert report["num_crops"] == 1 and report["total_image_tokens"] == 313
    report = run_json(capsys, ["tokens", str(path), str(path), "--num-crops", "9", "--json"])
    assert report["total_image_tokens"] == 2 * num_image_tokens_for_size(width, height, 9)


def test_table_output(images, capsys):
    path, _, _ = images["wide.png"]
    assert cli.main(["tokens", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["image", "size", "(WxH)", "HD", "(HxW)", "grid", "(RxC)", "tokens"]
    assert lines[1].split() == [str(path), "400x300", "1008x1344", "3x4", "1921"]
    assert lines[-1].startswith("total (1 image, num_crops=16)") and lines[-1].split()[-1] == "1921"


def test_header_is_enough(tmp_path, capsys):
    # A truncated file still has its size in the header: tokens does not need the pixels.
    full, path = tmp_path / "full.png", tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(full)
    path.write_bytes(full.read_bytes()[:400])
    report = run_json(capsys, ["tokens", str(path), "--json"])
    assert (report["images"][0]["width"], report["images"][0]["height"]) == (300, 200)


def bad_source(kind: str, folder: Path) -> str:
    if kind == "missing":
        return str(folder / "missing.png")
    if kind == "text":
        (folder / "notes.txt").write_text("hello")
        return str(folder / "notes.txt")
    if kind == "empty":
        (folder / "empty.png").write_bytes(b"")
        return str(folder / "empty.png")
    return "https://example.com/cat.png"


@pytest.mark.parametrize(("kind", "match"), [("missing", "no such file"), ("text", "not an image"), ("empty", "empty data"), ("url", "allow_urls")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, kind, match):
    assert cli.main(["tokens", bad_source(kind, tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phivision: error: cannot read image ")
    assert match in lines[0] and "Traceback" not in captured.err


def test_debug_shows_the_exception(tmp_path):
    for argv in (["--debug", "tokens", str(tmp_path / "x.png")], ["tokens", str(tmp_path / "x.png"), "--debug"]):
        with pytest.raises(ImageLoadError):
            cli.main(argv)


def test_usage_errors_exit_2(capsys):
    for argv in (["tokens"], ["tokens", "a.png", "--num-crops", "0"], ["tokens", "a.png", "--num-crops", "x"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
    assert cli.main([]) == 2  # no subcommand: help on stderr
    assert "tokens" in capsys.readouterr().err


def test_python_dash_m(images):
    path, _, _ = images["wide.png"]
    result = subprocess.run([sys.executable, "-m", "phivision", "tokens", str(path), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_image_tokens"] == 1921
    failed = subprocess.run([sys.executable, "-m", "phivision", "tokens", str(path) + ".missing"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.startswith("phivision: error:") and "Traceback" not in failed.stderr
