"""Local folder or Hugging Face Hub id -> a folder holding the checkpoint files a caller needs.

Downloads (and their progress bars) are huggingface_hub's own; offline mode (HF_HUB_OFFLINE=1) is
respected by reading only the local cache. Every failure becomes a CheckpointError that says what
happened and how to point at a local folder instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from .errors import CheckpointError

_TRUE_VALUES = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Offline mode as huggingface_hub defines it, read now (the library reads it once, at import)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def _missing_files(folder: Path, required: Sequence[str]) -> list[str]:
    """Required names not in `folder`; a name with '*' is a glob that must match at least one file."""
    return [name for name in required if not (any(folder.glob(name)) if "*" in name else (folder / name).is_file())]


def _local_hint(repo_id: str) -> str:
    return (
        f"To use a local copy instead, download it once (e.g. `hf download {repo_id} --local-dir DIR`) "
        "and pass that folder's path in place of the hub id."
    )


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_checkpoint(
    path_or_id: str | os.PathLike[str],
    *,
    allow_patterns: list[str] | None = None,
    required: Sequence[str] = (),
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The folder holding a checkpoint: a local folder as is, or a hub snapshot (downloaded when needed).

    `allow_patterns` limits what is downloaded (a processor needs no weights); `required` lists the files
    the caller cannot do without (globs allowed, e.g. "*.safetensors"): missing ones are reported
    together in one CheckpointError.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        folder = local.resolve()
        origin = f"the local folder {folder}"
    elif local.exists():
        raise CheckpointError(f"{local} is a file; pass the checkpoint's folder (the one holding config.json)")
    elif not _is_repo_id(str(path_or_id)):
        raise CheckpointError(
            f"no folder {str(path_or_id)!r} exists, and it is not a Hugging Face Hub id either "
            "(like 'microsoft/Phi-3.5-vision-instruct')"
        )
    else:
        repo_id = str(path_or_id)
        folder = _download(repo_id, allow_patterns=allow_patterns, revision=revision, cache_dir=cache_dir)
        origin = f"the hub snapshot of {repo_id} ({folder})"
    missing = _missing_files(folder, required)
    if missing:
        raise CheckpointError(f"{origin} lacks {', '.join(missing)}")
    return folder


def _download(
    repo_id: str,
    *,
    allow_patterns: list[str] | None,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    """huggingface_hub.snapshot_download with its failures translated into CheckpointErrors."""
    offline = hub_offline()
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    hint = _local_hint(repo_id)
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as exc:
        if type(exc).__name__ == "IncompleteSnapshotError":
            reason = f"the cached copy of {repo_id} in {cache} is incomplete (an interrupted download?) and cannot be completed now"
        elif offline:
            reason = f"{repo_id} is not in the local Hugging Face cache ({cache}) and offline mode is on (HF_HUB_OFFLINE=1), so it cannot be downloaded"
        else:
            reason = f"the Hugging Face Hub could not be reached to download {repo_id}, and it is not in the local cache ({cache})"
        raise CheckpointError(f"{reason}. {hint}") from exc
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login`, or set HF_TOKEN). {hint}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id} was not found on the Hugging Face Hub (a typo, or a private repository you are not logged in for). {hint}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {repo_id} from the Hugging Face Hub failed: {exc}. {hint}") from exc
    except OSError as exc:  # disk full, permissions, connection errors the library let through
        raise CheckpointError(f"downloading {repo_id} failed: {exc}. {hint}") from exc
