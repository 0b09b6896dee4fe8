"""The file index of an image folder, cached: a start does not walk millions of files again.

The index (paths relative to the folder, labels, class names) is written to
``$DIFFUSION_APPS_CACHE/folder_index/<hash of the folder's absolute path>.json`` (default
``~/.cache/diffusion_apps``), not into the folder: a file written there would change the very
modification time the cache is checked by, and datasets are often read-only.

It is used only while every folder walked still has the modification time it had when it was
listed (one ``stat`` per folder, not per file). A folder's time changes when an entry is added,
removed or renamed in it, so any added, removed or renamed image or sub-folder at any depth
forces a rescan; an image rewritten in place does not (a broken one is caught when it is
decoded, see ``bad_images``). A folder changed in the last :data:`SETTLE_NS` before the scan is
not cached: on a file system with coarse times (1 s or 2 s ticks) a later change in the same
tick would leave its time unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from diffusion_apps.data import sources

VERSION = 1  # of the file's layout
SETTLE_NS = 2_000_000_000


CACHE_ENV = "DIFFUSION_APPS_CACHE"


def cache_root() -> Path:
    """$DIFFUSION_APPS_CACHE, else ~/.cache/diffusion_apps: every cache of the package (the
    folder indexes, evaluation's features and classifier) lives under it."""
    cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffusion_apps"
    return Path(cache).expanduser()


def cache_file(base: Path) -> Path:
    """Where the index of the folder ``base`` is kept (the folder itself is not written to)."""
    key = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:32]
    return cache_root() / "folder_index" / f"{key}.json"


def _read(path: Path, base: Path) -> dict | None:
    """The cached index of ``base``, or None when absent, unreadable or out of date."""
    try:
        index = json.loads(path.read_text())
        if index["version"] != VERSION or index["root"] != str(base.resolve()):
            return None
        for folder, mtime in index["folders"].items():
            if (base / folder).stat().st_mtime_ns != mtime:
                return None
    except (OSError, ValueError, KeyError, TypeError):  # missing folder, partial or old file
        return None
    return index


def _write(path: Path, index: dict) -> None:
    """Atomically (ranks of one job may write at once), or a warning when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(
            f"dataset='folder': the file index cannot be cached at {path} ({err})", stacklevel=3
        )


def folder_index(root: str) -> tuple[list[Path], list[int], list[str] | None]:
    """:func:`~diffusion_apps.data.sources.scan_folder` of ``root``, from the cache when the
    folder has not changed since (see the module's docstring), else scanned and cached.

    Returns:
        files (sorted), labels, class_names.
    """
    base = sources.folder_root(root)
    path = cache_file(base)
    index = _read(path, base)
    if index is not None:
        files = [base / name for name in index["files"]]
        return files, index["labels"], index["class_names"]
    start = time.time_ns()
    found, folders = sources.walk_images(base)
    files, labels, class_names = sources.label_files(base, found)
    if max(folders.values()) < start - SETTLE_NS:
        names = [p.relative_to(base).as_posix() for p in files]
        index = {"version": VERSION, "root": str(base.resolve()), "folders": folders}
        _write(path, {**index, "files": names, "labels": labels, "class_names": class_names})
    return files, labels, class_names
