"""The folder's file index is cached outside the folder, used while no folder walked has changed,
and rescanned when a file or sub-folder is added, removed or renamed at any depth."""

import json
import os

import pytest
from PIL import Image

from diffusion_apps.data import ImageDataModule, index

HOUR_AGO_NS = 3600 * 10**9


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_APPS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def settle(root) -> None:
    """Every folder under ``root`` last changed an hour ago, like a dataset at rest."""
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        mtime = folder.stat().st_mtime_ns - HOUR_AGO_NS
        os.utime(folder, ns=(mtime, mtime))


@pytest.fixture
def root(tmp_path):
    """Two classes, one with a nested folder, and a hidden folder that is never indexed."""
    root = tmp_path / "images"
    for name in ("cat/0.png", "cat/1.png", "dog/0.png", "dog/deep/2.png", ".hidden/3.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(root / name)
    settle(root)
    return root


def names(dm: ImageDataModule) -> list[str]:
    dm.setup()
    files = [path for ds in (dm.train_set, dm.val_set) for path, _ in ds.base]
    return sorted(path.relative_to(dm.root).as_posix() for path in files)


def module(root) -> ImageDataModule:
    return ImageDataModule("folder", root=str(root), val_fraction=0.25)


def test_the_index_is_written_outside_the_folder(cache, root):
    before = root.stat().st_mtime_ns
    assert names(module(root)) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/deep/2.png"]
    written = json.loads(index.cache_file(root).read_text())
    assert index.cache_file(root).is_relative_to(cache)
    assert written["files"] == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/deep/2.png"]
    assert written["labels"] == [0, 0, 1, 1] and written["class_names"] == ["cat", "dog"]
    assert root.stat().st_mtime_ns == before  # nothing written into the folder


def test_a_second_start_reads_the_cache_not_the_folder(cache, root):
    module(root).setup()
    # An image added behind the cache's back: its folder's time put back as it was. Only a
    # module that read the index from the cache, without listing the folder, misses it.
    mtime = (root / "cat").stat().st_mtime_ns
    Image.new("L", (8, 8)).save(root / "cat" / "unseen.png")
    os.utime(root / "cat", ns=(mtime, mtime))
    dm = module(root)
    assert dm.num_classes == 2
    assert "cat/unseen.png" not in names(dm)


@pytest.mark.parametrize(
    "change, expected",
    [
        ("add dog/deep/new.png", "new file listed"),
        ("remove dog/deep/2.png", "file gone"),
        ("add bird/0.png", "new class"),
        ("rename cat/1.png", "renamed"),
    ],
)
def test_a_changed_folder_is_rescanned(cache, root, change, expected):
    module(root).setup()
    assert index.cache_file(root).is_file()
    what, name = change.split()
    if what == "add":
        (root / name).parent.mkdir(exist_ok=True)
        Image.new("L", (8, 8)).save(root / name)
    elif what == "remove":
        (root / name).unlink()
    else:
        (root / name).rename(root / "cat" / "9.png")
    dm = module(root)
    listed = names(dm)
    if expected == "new class":
        assert dm.num_classes == 3 and dm.class_names == ["bird", "cat", "dog"]
    elif expected == "renamed":
        assert "cat/9.png" in listed and "cat/1.png" not in listed
    else:
        assert (name in listed) == (what == "add")


def test_a_folder_changed_just_now_is_not_cached(cache, tmp_path):
    """A file system with 1 s or 2 s times could hide a change made in the same tick."""
    for i in range(4):
        Image.new("L", (8, 8)).save(tmp_path / f"{i}.png")
    module(tmp_path).setup()
    assert not index.cache_file(tmp_path).exists()
