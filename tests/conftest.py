"""Shared test fixtures: where the golden data lives, and the rule for when it may be missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("PHIVISION_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN = SHARED / "golden"


def _require(path: Path) -> Path:
    """Golden data may only be skipped outside CI; in CI (CI=true) its absence is a failure."""
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"golden data missing in CI: {path}")
        pytest.skip(f"golden data not found at {path}")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require(GOLDEN)


@pytest.fixture(scope="session")
def processor_golden(golden_dir: Path) -> Path:
    return _require(golden_dir / "processor")


@pytest.fixture(scope="session")
def processor_manifest(processor_golden: Path) -> dict:
    return json.loads((processor_golden / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_golden(golden_dir: Path) -> Path:
    return _require(golden_dir / "tiny-model")


@pytest.fixture(scope="session")
def tiny_manifest(tiny_golden: Path) -> dict:
    return json.loads((tiny_golden / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_golden: Path) -> Path:
    return tiny_golden / "checkpoint"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return _require(SHARED / "tokenizer")
