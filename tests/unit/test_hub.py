"""Checkpoint resolution: local folders, offline hub cache, and readable errors. Never touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import phivision.hub as hub
from phivision.errors import CheckpointError
from phivision.hub import resolve_checkpoint

REPO_ID = "phivision-tests/not-a-real-repo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME; returns the hub cache folder inside it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def _fake_cached_snapshot(cache: Path, files: dict[str, str]) -> Path:
    """The layout huggingface_hub leaves behind after a download: refs/main -> snapshots/<commit>/."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_local_folder_is_used_directly(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001.safetensors").write_text("")
    assert resolve_checkpoint(str(tmp_path), required=["config.json", "*.safetensors"]) == tmp_path.resolve()
    assert resolve_checkpoint(tmp_path) == tmp_path.resolve()  # a Path works too


def test_local_folder_lists_every_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(str(tmp_path), required=["config.json", "tokenizer.json", "*.safetensors"])
    message = str(info.value)
    assert "tokenizer.json" in message and "*.safetensors" in message and "config.json" not in message.split("lacks")[1]


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(str(path))


@pytest.mark.parametrize("path", ["./no/such/dir", "/definitely/not/here", "../missing"])
def test_missing_local_path_is_not_sent_to_the_hub(path, monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("must not reach the hub"))
    with pytest.raises(CheckpointError, match="no folder"):
        resolve_checkpoint(path)


def test_offline_and_not_cached(offline, monkeypatch):
    calls = []
    real = hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", spy)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(REPO_ID, cache_dir=offline)
    message = str(info.value)
    assert "offline" in message and "HF_HUB_OFFLINE" in message and REPO_ID in message
    assert "local copy" in message and "--local-dir" in message
    assert calls and calls[0]["local_files_only"] is True
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)


def test_offline_uses_the_cache(offline):
    snapshot = _fake_cached_snapshot(offline, {"tokenizer.json": "{}", "tokenizer_config.json": "{}"})
    found = resolve_checkpoint(REPO_ID, cache_dir=offline, required=["tokenizer.json", "tokenizer_config.json"])
    assert found.resolve() == snapshot.resolve()
    with pytest.raises(CheckpointError, match="lacks config.json"):
        resolve_checkpoint(REPO_ID, cache_dir=offline, required=["tokenizer.json", "config.json"])


def test_offline_env_read_at_import_time_in_a_fresh_process(tmp_path):
    """The real setting: HF_HUB_OFFLINE and HF_HOME exported before anything is imported."""
    snapshot = _fake_cached_snapshot(tmp_path / "hf" / "hub", {"config.json": "{}"})
    script = textwrap.dedent(
        f"""
        from phivision.errors import CheckpointError
        from phivision.hub import resolve_checkpoint
        print(resolve_checkpoint({REPO_ID!r}, required=["config.json"]))
        try:
            resolve_checkpoint("phivision-tests/other-repo")
        except CheckpointError as exc:
            print("ERROR", exc)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert Path(first).resolve() == snapshot.resolve()
    assert second.startswith("ERROR") and "offline" in second and "phivision-tests/other-repo" in second


def _hub_error(cls, message: str):
    """An instance of a huggingface_hub HTTP error without a real HTTP response behind it."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize(
    ("error", "fragments"),
    [
        (_hub_error(GatedRepoError, "403 gated"), ["gated", "log in", "HF_TOKEN", "--local-dir"]),
        (_hub_error(RepositoryNotFoundError, "404"), ["not found", "--local-dir"]),
        (_hub_error(RevisionNotFoundError, "404 revision"), ["no revision 'v9'"]),
        (_hub_error(HfHubHTTPError, "500 server error"), ["failed", "500 server error"]),
        (LocalEntryNotFoundError("connection refused"), ["could not be reached", "not in the local cache"]),
        (OSError("No space left on device"), ["No space left on device"]),
    ],
)
def test_hub_failures_are_explained(error, fragments, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    seen = {}

    def failing(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        raise error

    monkeypatch.setattr(hub, "snapshot_download", failing)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(REPO_ID, revision="v9", allow_patterns=["*.json"], cache_dir=tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.__cause__ is error
    assert seen["repo_id"] == REPO_ID and seen["allow_patterns"] == ["*.json"] and seen["local_files_only"] is False


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_offline_flag_values(value, monkeypatch):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()
