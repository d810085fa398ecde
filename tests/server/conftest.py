"""Fixtures of the server tests: a real `phivision serve` process on the tiny golden checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")

from serverutil import start_server  # noqa: E402

# Room for 32 concurrent requests of a few hundred tokens each (the tiny model's KV is 1 KiB a token).
# Lookahead decode on, as on a GPU (on the CPU it is off by default).
DEFAULT_ARGS = ("--max-num-seqs", "32", "--kv-cache-tokens", "65536", "--max-queued", "64",
                "--max-images", "4", "--max-image-mb", "1", "--max-body-mb", "4", "--lookahead-decode", "on")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    handle = start_server(tiny_checkpoint, tmp_path_factory.mktemp("server"), *DEFAULT_ARGS)
    yield handle
    code = handle.stop()
    assert code == 0, f"the server exited with {code}:\n{handle.log()[-4000:]}"
