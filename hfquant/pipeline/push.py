"""Push a finished `<output_dir>/model` to the Hub with the real `huggingface_hub` client.

The token comes from `HF_TOKEN` or the stored login (huggingface_hub reads both); hfquant never reads it,
logs it, or writes it anywhere. `dry_run` lists what would be uploaded and uploads nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Optional
from ..errors import HfquantError

log = logging.getLogger("hfquant")


class PushError(HfquantError, RuntimeError):
    """The upload failed; the local folder is intact and the message says how to retry."""


def planned_files(folder: str) -> list:
    out = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            out.append({"path": os.path.relpath(path, folder), "size": os.path.getsize(path)})
    return sorted(out, key=lambda f: f["path"])


def _scrub(text: str) -> str:
    """Remove anything token-shaped the client might have echoed (defence in depth)."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


def push(folder: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
         commit_message: Optional[str] = None, dry_run: bool = False) -> dict:
    files = planned_files(folder)
    summary = {"repo_id": repo_id, "revision": revision or "main", "private": private,
               "files": files, "bytes": sum(f["size"] for f in files)}
    if dry_run:
        log.info("dry run: would upload %d files (%d bytes) to %s@%s", len(files), summary["bytes"], repo_id, summary["revision"])
        return dict(summary, dry_run=True)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or "Upload quantized model (hfquant)")
    except Exception as exc:
        first_line = _scrub(str(exc)).splitlines()[0] if str(exc) else ""
        failed = f"pushing {folder} to {repo_id} failed ({type(exc).__name__}: {first_line}). The local folder is intact"
        fix = lasting_cause(exc, repo_id, revision)
        if fix:  # the same command would fail the same way: say what to change, not "retry"
            raise PushError(f"{failed}; a retry cannot succeed until {fix}") from None
        raise PushError(f"{failed}; retry with the same command plus resume=true hub.push=true") from None
    return dict(summary, dry_run=False, url=str(url), commit=info.oid, commit_url=info.commit_url)


def lasting_cause(exc: BaseException, repo_id: str, revision: Optional[str]) -> Optional[str]:
    """What must change before a push can succeed (bad token, no permission, no such repo or branch, a request
    the Hub refuses), or None when the failure may be transient (network, timeouts, 429, 5xx)."""
    from huggingface_hub.errors import (BadRequestError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    status = getattr(getattr(exc, "response", None), "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    if isinstance(exc, HFValidationError):
        return f"hub.repo_id / hub.revision are valid ({repo_id!r}, {revision!r})"
    if status == 401:
        return "the token is valid: set HF_TOKEN to a current token or run `hf auth login`"
    if status == 403:
        return f"the token may write to {repo_id!r}: use a token with write access to its namespace, or another repo_id"
    if isinstance(exc, RevisionNotFoundError):
        return f"branch {revision!r} exists in {repo_id!r}: create it, or leave hub.revision out to push to main"
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return f"{repo_id!r} exists and the token can write to it (404: not found or no permission)"
    if isinstance(exc, BadRequestError) or status in (400, 413):
        return "the request is fixed (the Hub refused it; see the message)"
    return None
