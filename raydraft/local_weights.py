"""Pretrained weights come from local files only (a directory, or a hub id already in the
cache): raydraft never downloads them. One error for a path that holds none says which
setting named it and how to fetch them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def from_local(loader: Any, path: str | Path, key: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)` from local files only, or `not_loadable`'s error for
    the setting `key`."""
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise not_loadable(str(path), loader, err, key) from None


def first_line(err: Exception) -> str:
    """An exception's reason in one line (its type when it has no message)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def not_loadable(path: str, loaded: type, err: Exception, key: str) -> FileNotFoundError:
    """The error for `key` naming `path`, from which `loaded` could not be loaded: the
    loader's first line of reason and how to fetch the weights."""
    return FileNotFoundError(
        f"{key} {path!r}: cannot load a {loaded.__name__} from it ({first_line(err)}). The weights "
        "must be present locally (a directory saved with save_pretrained, or a hub id already "
        f"in the cache): raydraft never downloads them. {fetch_hint(path, key)}"
    )


def fetch_hint(path: str, key: str) -> str:
    """How to put weights at `path` (the value of setting `key`): a directory to fill, or a
    hub id for the cache."""
    if Path(path).is_file():
        return ""
    if Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return f"Fetch one into that directory with `hf download REPO_ID --local-dir {path}`."
    return (
        f"Fetch it into the hub cache with `hf download {path}` where the hub is reachable "
        f"(the same HF_HUB_CACHE, or copy the cache over), or set {key} to a directory."
    )
