"""Caption files beside a folder's images: read exactly, carried in the batches, kept through the
random flip, and a missing or undecodable one named."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffusion_apps.data import ImageDataModule

CAPTIONS = {
    "a.png": "a red cup",
    "b.jpg": "  une tasse\tbleue,\n  café  ",  # collapsed to "une tasse bleue, café"
    "c.png": "",  # the empty caption
    "d.jpeg": "a GREEN cup",
    "e.png": "a grey cup",
    "f.png": "a white cup",
}
COLLAPSED = {name: " ".join(text.split()) for name, text in CAPTIONS.items()}


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate(CAPTIONS):
        mode = "L" if i % 2 else "RGB"
        size = (12 + 4 * i, 20 - i)  # sizes differ, landscape and portrait
        fmt = "JPEG" if name.endswith(("jpg", "jpeg")) else "PNG"
        Image.new(mode, size, (40 * i,) * len(mode)).save(tmp_path / name, format=fmt)
        (tmp_path / name).with_suffix(".txt").write_text(CAPTIONS[name], encoding="utf-8")
    return tmp_path


def captioned(root, **kw):
    dm = ImageDataModule("folder", root=str(root), image_size=8, channels=3, captions=True, **kw)
    dm.setup()
    return dm


def test_each_image_carries_the_caption_of_its_file(folder):
    dm = captioned(folder, val_fraction=0.2)
    for ds in (dm.train_set, dm.val_set):
        for (path, _, caption), (x, label, got) in zip(ds.base, ds, strict=True):
            assert got == caption == COLLAPSED[path.name]
            assert x.shape == (3, 8, 8) and label == -1
    assert COLLAPSED["b.jpg"] == "une tasse bleue, café"


def test_batches_are_images_labels_captions_only_when_asked(folder):
    dm = captioned(folder, val_fraction=0.2, batch_size=4)
    images, labels, captions = next(iter(dm.train_dataloader()))
    order = [path.name for path, *_ in dm.train_set.base]  # the sampler's order, re-drawn
    indices = list(dm.train_dataloader().sampler)[:4]
    assert captions == tuple(COLLAPSED[order[i]] for i in indices)  # the default collate
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4,)
    plain = ImageDataModule("folder", root=str(folder), image_size=8, batch_size=4)
    assert len(next(iter(plain.train_dataloader()))) == 2  # default: (images, labels)


def test_the_random_flip_keeps_labels_and_captions(folder):
    dm = captioned(folder, random_flip=True)
    dm.trainer = SimpleNamespace(training=True)
    x = torch.arange(8.0).expand(4, 3, 8, 8)
    batch = (x, torch.tensor([-1] * 4), ["a", "b", "c", "d"])
    torch.manual_seed(0)
    flipped, labels, captions = dm.on_after_batch_transfer(batch, 0)
    assert captions == ["a", "b", "c", "d"] and torch.equal(labels, batch[1])
    mirrored = [torch.equal(f, x[0].flip(-1)) for f in flipped]
    assert any(mirrored) and not all(mirrored)  # seed 0: some flipped, some not


def test_a_missing_caption_file_is_named(folder):
    (folder / "d.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image without a caption file: .*d\.txt"):
        captioned(folder)


def test_a_caption_file_that_is_not_utf8_is_named(folder):
    (folder / "e.txt").write_bytes(b"caf\xe9")  # Latin-1
    with pytest.raises(ValueError, match=r"e\.txt is not UTF-8"):
        captioned(folder)


def test_captions_need_a_folder():
    with pytest.raises(ValueError, match="captions=True reads caption files beside the images"):
        ImageDataModule("digits", captions=True)
