"""Push an export folder to the Hugging Face Hub.

The token comes from ``HF_TOKEN`` or the login cache (``hf auth login``), never from a file in
the run or the project, so a pushed folder can never carry it. ``HF_ENDPOINT`` is read when the
push runs (a mirror, a private Hub, a test server), not only when huggingface_hub was imported.
Every failure becomes an AffinageError that says what was and was not uploaded.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from affinage.errors import AffinageError

# What upload_folder itself never uploads (huggingface_hub's DEFAULT_IGNORE_PATTERNS): a dry run lists the same files.
IGNORED = [
    ".git",
    ".git/*",
    "*/.git",
    "**/.git/**",
    ".cache/huggingface",
    ".cache/huggingface/*",
    "*/.cache/huggingface",
    "**/.cache/huggingface/**",
]
LOGIN_FIX = "run `hf auth login` (`huggingface-cli login` with older huggingface_hub), or `export HF_TOKEN=hf_...`"


def hub_endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` as set now, else huggingface_hub's own (default huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def folder_files(folder: Path) -> list[dict[str, Any]]:
    """The files a push of ``folder`` sends, as ``{"path", "size"}``, in upload order."""
    paths = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(paths, ignore_patterns=IGNORED)
    return [{"path": rel, "size": paths[rel].stat().st_size} for rel in kept]


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise AffinageError(
            f"'{repo_id}' is not a valid Hub repository id: {error}",
            fix="use NAME or NAMESPACE/NAME (letters, digits, '-', '_', '.')",
        ) from None


def resolve_token(token: str | None) -> str:
    """The caller's token, else HF_TOKEN, else the login cache: refused before any request when there is none."""
    found = token or get_token()
    if not found:
        raise AffinageError(
            "no Hugging Face token: pushing needs one with write access (nothing was uploaded)", fix=LOGIN_FIX
        )
    return found


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: HTTP and offline errors are OSErrors; the HTTP client's own by hub version."""
    found: list[type[BaseException]] = [OSError, ValueError]  # ValueError: the Hub refused the card's metadata
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _failure(error: BaseException, action: str, uploaded: str, endpoint: str) -> AffinageError:
    """Say what failed, what was uploaded, and the likely fix (by HTTP status where there is one)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        fix = "the token was refused: " + LOGIN_FIX
    elif status == 403:
        fix = "the token cannot write there: use a token with write access, or push to your own namespace"
    elif "offline mode" in str(error).lower():
        fix = "unset HF_HUB_OFFLINE to push"
    else:
        fix = f"check the network and HF_ENDPOINT ({endpoint}), then run the push again"
    reason = f"HTTP {status}" if status else type(error).__name__
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return AffinageError(f"{action} failed ({reason}{': ' + detail if detail else ''}); {uploaded}", fix=fix)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> dict[str, Any]:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it in one commit.

    ``dry_run`` touches no network: it lists the files (with sizes) and returns the card
    (``README.md``) that would be pushed. Returns ``{"repo_id", "url", "files", ...}``; a real
    push adds ``commit_url`` and ``commit``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AffinageError(
            f"nothing to push: {folder} is not a directory", fix="export the run first, then push that folder"
        )
    check_repo_id(repo_id)
    files = folder_files(folder)
    if not files:
        raise AffinageError(f"nothing to push: {folder} holds no files", fix="export the run into it first")
    endpoint = hub_endpoint()
    result: dict[str, Any] = {"repo_id": repo_id, "url": f"{endpoint}/{repo_id}", "files": files}
    if dry_run:
        card = folder / "README.md"
        return {
            **result,
            "dry_run": True,
            "private": private,
            "card": card.read_text(encoding="utf-8") if card.is_file() else None,
        }
    api = HfApi(endpoint=endpoint, token=resolve_token(token), library_name="affinage")
    errors = _network_errors()
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    except errors as error:
        action = f"creating the repository {repo_id} on {endpoint}"
        raise _failure(error, action, "nothing was uploaded", endpoint) from error
    full_id = getattr(repo_url, "repo_id", None) or repo_id
    try:
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=full_id,
            ignore_patterns=list(IGNORED),
            commit_message=commit_message or f"Upload {folder.name} with affinage",
            commit_description=commit_description,
        )
    except errors as error:
        uploaded = (
            f"the repository {repo_url} exists, but the files were not committed (or not all of them): "
            "re-run the push, unchanged files are skipped"
        )
        raise _failure(error, f"uploading {len(files)} files to {full_id}", uploaded, endpoint) from error
    return {**result, "repo_id": full_id, "url": str(repo_url), "commit_url": commit.commit_url, "commit": commit.oid}
