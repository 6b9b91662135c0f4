"""Inputs given by path or by Hugging Face Hub ID (`org/name`, `org/name@revision`), resolved in one place.

A Hub ID that is not a local path is fetched with `huggingface_hub.snapshot_download` — only
safetensors, JSON and tokenizer files, never pickles — or taken from the local cache when offline
(HF_HUB_OFFLINE=1). Then the input's kind is checked against its role (cws.io.kinds).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CwsError
from . import files
from .kinds import expect

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", "README.md"]


def resolve(
    spec: str | os.PathLike, role: str | None = None, what: str | None = None, *, cache_only: bool = False
) -> Path:
    """A local path for `spec` (a path, or a Hub ID resolved through the cache), checked to be of a
    kind `role` takes ("model", "base", "fine-tune", "direction"; see cws.io.kinds).
    cache_only: never download, even online."""
    path = Path(spec).expanduser()
    if is_hub_id(spec):
        path = download(spec, cache_only)
    if role is not None and path.exists():
        expect(files.resolve(path), role, what or role)
    return path


def is_hub_id(spec) -> bool:
    """Whether `spec` names a Hub repo: `org/name[@rev]`, and no such path here, nor one that looks local."""
    return isinstance(spec, str) and bool(REPO_ID.match(spec)) and not os.path.lexists(spec) and not looks_local(spec)


def looks_local(spec: str | os.PathLike) -> bool:
    """A path, not a Hub ID: it starts with / ./ ../ or ~, or its first folder exists here
    (`sentiment/directon` where `sentiment/` exists is a typo, not a repo)."""
    spec = os.fspath(spec)
    return spec.startswith(("/", "./", "../", "~")) or ("/" in spec and os.path.isdir(spec.split("/", 1)[0]))


def describe(spec: str | os.PathLike) -> str:
    """How to name an input in provenance and model cards: its Hub ID as given, or its absolute path."""
    return spec if is_hub_id(spec) else str(files.resolve(spec))


def hub_id(spec: str) -> str | None:
    """The Hub repo (`org/name`, no revision) an input named by `describe` came from: its Hub ID, or
    the repo of a Hugging Face cache snapshot path (`…/models--org--name/snapshots/…`); else None."""
    m = re.search(r"/models--([^/]+?)--([^/]+)/snapshots/", spec) if spec.startswith("/") else REPO_ID.match(spec)
    if m is None:
        return None
    return f"{m[1]}/{m[2]}" if spec.startswith("/") else m["repo"]


def download(spec: str, cache_only: bool = False) -> Path:
    """The snapshot directory of Hub repo `org/name[@revision]` (safetensors, JSON, tokenizer files)."""
    m = REPO_ID.match(spec)
    repo, rev = m["repo"], m["rev"]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise CwsError(f"{spec}: no such path, and huggingface_hub is not installed to fetch it from the Hub") from e
    try:
        path = Path(snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS, local_files_only=cache_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CwsError(
            f"{spec}: no such path, and not in the Hugging Face cache (offline: HF_HUB_OFFLINE=1 or no "
            f"network); download it once with `hf download {repo}`"
        ) from e
    except (HfHubHTTPError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CwsError(f"{spec}: no such path, and the Hugging Face Hub answered: {first}") from e
    if not any(path.rglob("*.safetensors")) and not (path / "direction.json").exists():
        raise CwsError(
            f"{spec}: the Hub repo has no .safetensors weights (pickle checkpoints are not read for "
            f"safety; convert with save_pretrained(..., safe_serialization=True))"
        )
    return path
