"""Image folders: labels from sub-folders, seeded split, and errors that name the path."""

import io

import pytest
import torch
from PIL import Image

from diffusion_apps.data import ImageDataModule


def save(path, value: int, size=(20, 12), mode="RGB") -> None:
    """A uniform image: black (0) or white (255), so its class is visible after loading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    Image.new(mode, size, (value,) * len(mode)).save(path, format=fmt)


@pytest.fixture
def labelled(tmp_path):
    for i in range(6):
        save(tmp_path / "cat" / f"{i}.png", 0, mode="L")
        save(tmp_path / "dog" / f"{i}.png", 255, size=(40, 40))
    save(tmp_path / "dog" / "big.JPG", 255)  # extensions are case-insensitive
    save(tmp_path / "dog" / "deep" / "x.jpeg", 255)  # recursive: still class "dog"
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    save(tmp_path / ".ipynb_checkpoints" / "hidden.png", 0)  # hidden paths are skipped
    return tmp_path


def all_items(dm):
    return [item for ds in (dm.train_set, dm.val_set) for item in ds]


def test_labelled_folder(labelled):
    dm = ImageDataModule(
        "folder", root=str(labelled), image_size=16, channels=3, val_fraction=0.25, batch_size=4
    )
    assert dm.num_classes == 2  # known before setup, from the listing
    dm.setup()
    assert dm.class_names == ["cat", "dog"]
    assert (len(dm.train_set), len(dm.val_set)) == (10, 4)
    for x, y in all_items(dm):
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.full_like(x, 1.0 if y == 1 else -1.0))  # white dogs
    labels = [int(y) for _, y in all_items(dm)]
    assert sorted(labels) == [0] * 6 + [1] * 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        save(tmp_path / f"{i}.png", 255)
    save(tmp_path / "sub" / "a.png", 0)  # not all images in sub-folders: no labels
    dm = ImageDataModule("folder", root=str(tmp_path), channels=1, image_size=8, batch_size=2)
    assert dm.num_classes is None
    dm.setup()
    assert dm.class_names is None and (len(dm.train_set), len(dm.val_set)) == (5, 1)
    assert {int(y) for _, y in all_items(dm)} == {-1}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_split_is_seeded(labelled):
    def val_files(seed):
        dm = ImageDataModule("folder", root=str(labelled), seed=seed, val_fraction=0.5)
        dm.setup()
        return sorted(str(path) for path, _ in dm.val_set.base)

    assert val_files(0) == val_files(0) != val_files(1)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("content", [bytes(range(256)), png_bytes()[:-20]], ids=["junk", "cut"])
def test_corrupt_file_is_named(labelled, content):
    bad = labelled / "dog" / "broken.png"
    bad.write_bytes(content)
    dm = ImageDataModule("folder", root=str(labelled), verify="setup")  # lazy: test_data_bad_images
    with pytest.raises(ValueError, match=str(bad)):
        dm.setup()


def test_empty_and_missing_roots(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no images \(\*\.png, \*\.jpg.*found under"):
        ImageDataModule("folder", root=str(tmp_path / "empty")).setup()
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageDataModule("folder", root=str(missing)).setup()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _ = ImageDataModule("folder", root=str(missing)).num_classes


def test_batch_larger_than_train_set(labelled):
    dm = ImageDataModule("folder", root=str(labelled), batch_size=64)
    with pytest.raises(ValueError, match="batch_size=64"):
        dm.train_dataloader()
