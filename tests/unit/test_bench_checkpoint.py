"""benchmarks/make_checkpoint.py's bench_checkpoint: a real-shape checkpoint written once per
device call and reused by later processes, never a half-written one (writing it takes ~45 s of
device time, and a killed writer must not leave a folder that a later run loads)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import make_checkpoint  # noqa: E402


@pytest.fixture
def writes(monkeypatch):
    """A stand-in for the 8 GB writer: records its calls, writes a config.json, or fails when asked."""
    calls, fail = [], []

    def write(shared, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(b"x")
        if fail:
            raise KeyboardInterrupt  # killed mid-write
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(make_checkpoint, "write_bench_checkpoint", write)
    return calls, fail


def test_written_once_then_reused(tmp_path, writes):
    calls, _ = writes
    folder = tmp_path / "ckpt"
    with make_checkpoint.bench_checkpoint(tmp_path, folder) as first:
        assert first == folder and (folder / "config.json").is_file()
    with make_checkpoint.bench_checkpoint(tmp_path, folder) as second:
        assert second == folder
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial folder left


def test_killed_writer_leaves_nothing_loadable(tmp_path, writes):
    calls, fail = writes
    folder = tmp_path / "ckpt"
    fail.append(True)
    with pytest.raises(KeyboardInterrupt):
        with make_checkpoint.bench_checkpoint(tmp_path, folder):
            pass
    assert not folder.exists()
    fail.clear()
    with make_checkpoint.bench_checkpoint(tmp_path, folder) as written:  # the next run writes it whole
        assert (written / "config.json").is_file()
    assert len(calls) == 2


def test_temporary_folder_removed(tmp_path, writes):
    with make_checkpoint.bench_checkpoint(tmp_path, None) as folder:
        assert (folder / "config.json").is_file()
    assert not folder.exists()
