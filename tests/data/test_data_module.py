"""Argument checks and torchvision sources, offline: missing files fail clearly, never download."""

import numpy as np
import pytest
import torch

from diffusion_apps.data import ImageDataModule


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("dataset", "imagenet"),
        ("image_size", 4),
        ("channels", 2),
        ("batch_size", 0),
        ("val_fraction", 0.0),
        ("val_fraction", 1.0),
        ("num_workers", -1),
    ],
)
def test_bad_arguments_name_the_option(option, value):
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        ImageDataModule(**{option: value})


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "celeba"])
def test_torchvision_without_files_fails_clearly(tmp_path, name):
    dm = ImageDataModule(name, root=str(tmp_path), download=False)
    assert dm.num_classes == (None if name == "celeba" else 10)
    dm.prepare_data()  # download=False: nothing to do, no network
    with pytest.raises(FileNotFoundError, match=rf"dataset='{name}'.*{tmp_path}.*download=True"):
        dm.setup()


def write_idx(path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, uint8 type 0x08, ndim), big-endian int32 dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_files(tmp_path):
    """A tiny MNIST in torchvision's raw layout: padded 28 -> 32 like the embedded digits."""
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28))
        images[0] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n))
    dm = ImageDataModule("mnist", root=str(tmp_path), channels=3, batch_size=2, download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (6, 3)
    x, y = dm.val_set[0]
    assert x.shape == (3, 32, 32) and y.dtype == torch.int64 and int(y) == 0
    assert (x[:, 2:-2, 2:-2] == 1.0).all() and x[:, :2].eq(-1.0).all()
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (2, 3, 32, 32) and yb.tolist() == [0, 1]


def test_pin_memory_follows_the_trainer_device():
    """Pinned batches only pay for host-to-GPU copies: by default they are off without a CUDA
    trainer, and an explicit setting wins."""
    dm = ImageDataModule(batch_size=8)
    dm.setup("fit")
    assert dm.pin_memory is None and dm.train_dataloader().pin_memory is False
    dm = ImageDataModule(batch_size=8, pin_memory=True)
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is True
