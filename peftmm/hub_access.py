"""Whether and how a hub id may reach the Hugging Face Hub.

A backbone name can come from an untrusted bundle, so peftmm never lets transformers go to the
Hub on its own: a cached hub id loads with ``local_files_only`` (no update check), one that is
not cached is looked up with a single request, and only where the user allows the Hub (not
under ``HF_HUB_OFFLINE`` or ``peftmm --offline``). See backbones.resolve_source.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PeftmmError
from .safe_load import short_repr


def hub_allowed() -> bool:
    """Whether the Hugging Face Hub may be contacted: not under HF_HUB_OFFLINE (the environment's,
    or huggingface_hub's own setting) nor ``peftmm --offline``."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return not (flag or constants.HF_HUB_OFFLINE)


def hub_cached(repo: str) -> bool:
    """Whether a hub id's config is in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json")
    except (ValueError, OSError):   # not a valid repo id
        return False
    return isinstance(found, str)


def local_only(folder: str) -> bool:
    """Whether transformers must load ``folder`` (a hub id) from the cache alone: it is cached
    (no update check over the network) or the Hub is not allowed."""
    return not Path(folder).is_dir() and (hub_cached(folder) or not hub_allowed())


def probe_hub(repo: str) -> None:
    """One request to the Hub for a hub id that is not cached: a clear error instead of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(repo, timeout=10)
    except RepositoryNotFoundError:
        raise PeftmmError(f"backbone {repo!r}: no such model on the Hugging Face Hub (or it is private), and it is "
                          f"neither a zoo name nor a local folder") from None
    except Exception as e:  # noqa: BLE001  (any transport failure: one attempt, one message)
        raise PeftmmError(f"backbone {repo!r} is not in the local Hugging Face cache and the Hub could not be reached "
                          f"({type(e).__name__}: {short_repr(str(e), 120)}); one attempt was made. Set "
                          "HF_HUB_OFFLINE=1 to stay offline, or point the recipe at a local folder") from None
