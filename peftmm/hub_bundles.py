"""Bundles on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` pulled through
huggingface_hub's cache (``snapshot_download``), and a folder pushed (``create_repo``,
``upload_folder``).

The token is huggingface_hub's own: ``hf auth login`` or ``HF_TOKEN``; the endpoint its
``HF_ENDPOINT``. Under ``HF_HUB_OFFLINE`` (or ``peftmm --offline``) a pull is served from the
cache alone and a push is refused. A repository id is ``OWNER/NAME`` in the Hub's alphabet
(letters, digits, ``-``, ``_``, ``.``; no ``..``, no ``--``, no leading ``.``): anything that could
name a path elsewhere in the cache is refused before huggingface_hub sees it. What is pulled is
checked as a local bundle is (bundle.resolve_bundle reads its config and weights) before
anything loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BundleError
from .hub_access import hub_allowed
from .safe_load import short_repr

HUB_SCHEME = "hf://"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{_PART}/{_PART}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}(?:/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}){0,3}")
TOKEN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def check_repo_id(repo: str, where: str | None = None) -> str:
    """``repo`` if it is a plain ``OWNER/NAME``, else a BundleError (path tricks included)."""
    if not isinstance(repo, str) or not REPO_ID.fullmatch(repo) or ".." in repo or "--" in repo \
            or repo.endswith(".git"):
        raise BundleError(f"{short_repr(repo, 120)} is not a Hugging Face repository id: use OWNER/NAME (letters, "
                          "digits, '-', '_', '.'; no '..' or '--')", where)
    return repo


def parse_reference(reference: str) -> tuple[str, str | None]:
    """``hf://OWNER/NAME[@REVISION]`` -> (repo id, revision or None)."""
    body = reference[len(HUB_SCHEME):] if reference.startswith(HUB_SCHEME) else reference
    repo, at, revision = body.partition("@")
    check_repo_id(repo, reference)
    if at and (not REVISION.fullmatch(revision) or ".." in revision):
        raise BundleError(f"revision {short_repr(revision, 80)} is not a branch, tag or commit name", reference)
    return repo, revision or None


def cache_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of a snapshot folder in huggingface_hub's cache (whose files are links
    into it), or None for any other folder."""
    from huggingface_hub import constants

    folder = Path(folder).resolve()
    cache = Path(constants.HF_HUB_CACHE).resolve()
    if folder.parent.name != "snapshots" or not folder.is_relative_to(cache) or folder.parent.parent.parent != cache:
        return None
    return folder.parent.parent / "blobs"


def pull(reference: str, files: list[str]) -> Path:
    """The local folder of a Hub bundle's ``files`` (those it has), downloaded into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = parse_reference(reference)
    offline = not hub_allowed()
    try:
        folder = snapshot_download(repo, revision=revision, repo_type="model", allow_patterns=files,
                                   local_files_only=offline)
    except GatedRepoError:
        raise BundleError(f"the repository is gated: accept its terms on the Hub and {TOKEN_HINT}", reference) from None
    except RepositoryNotFoundError:
        raise BundleError(f"no such model repository on the Hugging Face Hub, or it is private and no token with "
                          f"access was given ({TOKEN_HINT})", reference) from None
    except RevisionNotFoundError:
        raise BundleError(f"the repository has no revision {revision!r}", reference) from None
    except LocalEntryNotFoundError:
        why = "the Hub may not be reached (HF_HUB_OFFLINE or --offline)" if offline else "the download failed"
        raise BundleError(f"not in the local Hugging Face cache and {why}", reference) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise BundleError(f"cannot download the bundle ({type(e).__name__}: {short_repr(str(e), 200)})",
                          reference) from None
    return Path(folder)


def push(folder: Path, repo: str, files: list[str], private: bool = False, revision: str | None = None,
         message: str | None = None) -> str:
    """Upload ``files`` of ``folder`` to model repository ``repo`` (created when missing); returns
    the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    check_repo_id(repo)
    if revision is not None:
        parse_reference(f"{repo}@{revision}")
    if not hub_allowed():
        raise BundleError("pushing needs the Hugging Face Hub, which is off here (HF_HUB_OFFLINE or --offline)", repo)
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", revision=revision,
                                 allow_patterns=files, commit_message=message or f"peftmm push {folder.name}")
    except LocalTokenNotFoundError:
        raise BundleError(f"pushing needs a Hugging Face token: {TOKEN_HINT}", repo) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise BundleError(f"the Hub refused the token (HTTP {status}): {TOKEN_HINT} with write access to "
                              f"{repo.split('/')[0]}", repo) from None
        raise BundleError(f"the push failed ({type(e).__name__}: {short_repr(str(e), 200)})", repo) from None
    except (OSError, ValueError) as e:
        raise BundleError(f"the push failed ({type(e).__name__}: {short_repr(str(e), 200)})", repo) from None
    return str(info)
