"""Reference sets: the real images that samples are scored against, and their cached features.

An :class:`ImageSet` reads images in batches, whatever holds them: a data module's train or val
split (:func:`split_set`), a folder of image files (:func:`folder_set`) or an npz batch of uint8
images (:func:`npz_set`, ADM's reference-batch layout). :func:`reference_of` gives a
:class:`Reference`: the features of such a set, computed once and cached on disk under the
sha256 of the extractor's inputs and weights, so a changed file or extractor computes anew.
A folder or npz also records that key under a fingerprint of its files' names, sizes and
modification times, so that a later run (every rank of a ``torchrun`` launch) loads the
features without reading an image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from diffusion_apps.data.captions import DIGIT_DATASETS
from diffusion_apps.evaluation.digits import resolve_cache_dir, save_atomic
from diffusion_apps.evaluation.metrics import (
    FeatureStats,
    Space,
    build_extractor,
    extract,
    mean_cov,
    space_input,
    state_hash,
)

Batches = Iterator[tuple[Tensor, Tensor]]  # images (B, C, H, W) in [-1, 1], labels (B,) int64


@dataclass(frozen=True)
class ImageSet:
    """Images read in batches: ``batches(n)`` yields (images (B, C, H, W) float32 in [−1, 1],
    labels (B,) int64, −1 where unlabelled).

    Attributes:
        name: what the images are, in words, for the report.
        num, channels, size: how many, their channels and (height, width).
        tag: the cache file's middle name ("train", "val", "folder", "npz").
        digits: whether they are grayscale digits the classifier was made for, labelled 0..9.
        listing: gives the files the images are read from and how, as they are now (their
            names, sizes, modification times, the size and channels read at), which any change
            to a file changes; None: not files (a data module's split), the cache key is always
            computed from the pixels.
    """

    name: str
    num: int
    channels: int
    size: tuple[int, int]
    tag: str
    digits: bool
    read: Callable[[int], Batches]
    listing: Callable[[], str] | None = None

    def batches(self, batch_size: int) -> Batches:
        return self.read(batch_size)


def describe(data) -> str:
    """A data module in words: ``ImageDataModule(dataset='folder', root='x', 32 px, 1 channel)``."""
    names = ("dataset", "image_size", "channels")
    dataset, size, channels = (getattr(data, name, None) for name in names)
    parts = [] if dataset is None else [f"dataset={dataset!r}"]
    if dataset not in (None, "digits") and getattr(data, "root", None) is not None:
        parts.append(f"root={str(data.root)!r}")
    if size is not None and channels is not None:
        parts.append(f"{size} px, {channels} channel{'s' * (channels != 1)}")
    return f"{type(data).__name__}({', '.join(parts)})"


def split_set(data, split: Literal["train", "val"]) -> ImageSet:
    """The ``train_set`` or ``val_set`` of a set-up data module (items indexed ``b[0]``, ``b[1]``:
    a third element, such as a caption, is ignored)."""
    dataset = getattr(data, f"{split}_set", None)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{describe(data)} has no {split}_set to score against (is it set up?)")
    first = dataset[0][0]  # (C, H, W)
    workers = getattr(data, "num_workers", 0)

    def read(batch_size: int) -> Batches:
        for b in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
            yield b[0].float(), b[1].long()

    digits = getattr(data, "dataset", None) in DIGIT_DATASETS and first.shape[0] == 1
    name = f"{split} split of {describe(data)}"
    return ImageSet(name, len(dataset), first.shape[0], tuple(first.shape[1:]), split, digits, read)


def folder_set(path: str | Path, image_size: int, channels: int, flag: str) -> ImageSet:
    """Every image under the folder ``path``, read like ``ImageDataModule(dataset="folder")`` at
    ``image_size`` px and ``channels`` (:func:`diffusion_apps.data.files.load_images`: the shorter
    side resized, PIL bilinear antialiased, then center-cropped); a file that cannot be read
    stops it, named. ``flag`` names the option in errors."""
    from diffusion_apps.data.files import find_images, load_images

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag}: no such folder: {path}")
    files, _ = find_images([path], flag)

    def read(batch_size: int) -> Batches:
        for i in range(0, len(files), batch_size):
            images, labels, _ = load_images(files[i : i + batch_size], image_size, channels)
            yield images, labels

    size = f"{image_size} px, {channels} channel{'s' * (channels != 1)}"
    name = f"image folder {path} read at {size}"
    how = f"folder {path.resolve()} read at {size}"
    square = (image_size, image_size)
    listing = partial(_listing, files.paths, how)
    return ImageSet(name, len(files), channels, square, "folder", False, read, listing)


def npz_set(path: str | Path, flag: str) -> ImageSet:
    """The uint8 images ``arr_0`` (N, H, W, C) of an npz file, as stored (x / 127.5 − 1), with
    its labels when it holds some (:mod:`diffusion_apps.npz`)."""
    from diffusion_apps.npz import iter_npz, npz_info

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    info = npz_info(path)  # checks the layout: uint8 (N, H, W, 1 or 3)
    if info.num < 1:
        raise ValueError(f"{flag} {path}: arr_0 holds no images")

    def read(batch_size: int) -> Batches:
        for images, labels in iter_npz(path, batch_size):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, H, W)
            y = torch.full((len(x),), -1) if labels is None else torch.from_numpy(labels).long()
            yield x, y

    size = f"{info.height}x{info.width} px, {info.channels} channel{'s' * (info.channels != 1)}"
    name = f"npz {path} ({size}, as stored)"
    listing = partial(_listing, [path.resolve()], "npz, as stored")
    shape = (info.height, info.width)
    return ImageSet(name, info.num, info.channels, shape, "npz", False, read, listing)


def _listing(paths, how: str) -> str:
    """``how``, then each file's path, size and modification time (ns): what a changed, added,
    removed or renamed file changes (``make``'s and rsync's test for a changed file)."""
    lines = [how]
    for path in paths:
        stat = os.stat(path)
        lines.append(f"{path} {stat.st_size} {stat.st_mtime_ns}")
    return "\n".join(lines)


def image_set(path: str | Path, flag: str, image_size: int, channels: int) -> ImageSet:
    """:func:`npz_set` for a ``.npz`` file, else :func:`folder_set` at ``image_size`` px and
    ``channels``."""
    if Path(path).suffix.lower() == ".npz":
        return npz_set(path, flag)
    return folder_set(path, image_size, channels, flag)


def samples_set(path: str | Path, flag: str) -> ImageSet:
    """Images made elsewhere: an npz as stored, or a folder read at its first image's shorter
    side and channels (1 for a grayscale first image, else 3)."""
    from PIL import Image

    from diffusion_apps.data.files import find_images

    if Path(path).suffix.lower() == ".npz":
        return npz_set(path, flag)
    files, _ = find_images([path], flag)
    with Image.open(files.paths[0]) as image:
        gray = image.mode in ("1", "L", "LA", "F") or image.mode.startswith("I")
        size = min(image.size)
    return folder_set(path, size, 1 if gray else 3, flag)


def batch_size_of(space: Space) -> int:
    """Images per extractor call: 500 digits, 50 Inception inputs (299 px)."""
    return 500 if space == "digits" else 50


def features_of(
    images: ImageSet,
    extractor: torch.nn.Module,
    space: Space,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Tensor, str]:
    """Features (N, d) of every image, and their cache key.

    The key is the sha256 of the extractor's inputs (:func:`~.metrics.space_input`: the bytes
    it sees) and of its weights (:func:`~.metrics.state_hash`); the features live in
    ``<cache_dir>/reference-<space>-<tag>-<key[:16]>.pt`` (read with ``weights_only=True``). A
    first pass reads the images for the key; only a miss reads them again for the features.
    Images with a ``listing`` skip both passes when ``reference-<space>-<tag>-listing-<h>.txt``
    (h: the sha256 of the listing and the weights) names the key of features still cached.
    Files are written whole or not at all, so that concurrent ranks never read half a file.
    """
    from tqdm.auto import tqdm

    cache, weights = resolve_cache_dir(cache_dir), state_hash(extractor)
    index = None
    if images.listing is not None:
        listed = hashlib.sha256(f"{images.listing()}\n{weights}".encode()).hexdigest()[:16]
        index = cache / f"reference-{space}-{images.tag}-listing-{listed}.txt"
        key = index.read_text().strip() if index.is_file() else None
        features = _cached(cache / f"reference-{space}-{images.tag}-{key}.pt") if key else None
        if features is not None:
            return features, key
    batch = batch_size_of(space)
    h = hashlib.sha256()
    for x, _ in images.batches(batch):
        h.update(space_input(x, space).contiguous().numpy().tobytes())
    h.update(weights.encode())
    key = h.hexdigest()[:16]
    path = cache / f"reference-{space}-{images.tag}-{key}.pt"
    features = _cached(path)
    if features is None:
        batches = tqdm(
            images.batches(batch),
            total=-(-images.num // batch),
            desc=f"{space} features of the {images.name} (once, then cached)",
            disable=not progress,
        )
        features = torch.cat([extract(extractor, x, space)[0] for x, _ in batches])
        save_atomic({"features": features, "space": space, "name": images.name}, path)
    if index is not None:
        written = index.with_name(f"{index.name}.{os.getpid()}.tmp")
        written.write_text(key)
        written.replace(index)
    return features, key


def _cached(path: Path) -> Tensor | None:
    """The features saved at ``path``, or None when there are none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["features"]


@dataclass(frozen=True)
class Reference:
    """Real images and their features (N, d); ``held_out``: real images of the same data that
    are not among them (a val split), the floor's samples."""

    real: ImageSet
    features: Tensor
    key: str
    held_out: ImageSet | None = None

    def line(self) -> str:
        """``reference: <name>, N images; floor: its val split, M images`` (or no floor)."""
        floor = "no floor (no held-out split of it)"
        if self.held_out is not None:
            split = "its val split" if self.held_out.tag == "val" else self.held_out.name
            floor = f"floor: {split}, {self.held_out.num} images"
        return f"reference: {self.real.name}, {len(self.features)} images; {floor}"

    def use(self, metric: FeatureStats) -> None:
        """Make these features ``metric``'s reference."""
        metric.set_reference(*mean_cov(self.features), self.features)  # (d,), (d, d), (N, d)

    def digits_warning(self, space: Space) -> str | None:
        """Why fd_digits means little here, when it does: the data is not grayscale digits."""
        if space != "digits" or self.real.digits:
            return None
        return (
            f"the {self.real.name} is not grayscale digits (dataset {' or '.join(DIGIT_DATASETS)}, "
            "1 channel): the digit classifier's features (fd_digits) are not meant for it; "
            "--space inception --feature_extractor_weights_path W gives FID"
        )


def reference_of(
    metric: FeatureStats,
    real: ImageSet,
    held_out: ImageSet | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Reference:
    """The :class:`Reference` of ``real`` in ``metric``'s space, and set as its reference."""
    features, key = features_of(real, metric.extractor, metric.space, cache_dir, progress)
    reference = Reference(real, features, key, held_out)
    reference.use(metric)
    return reference


def data_reference(metric: FeatureStats, data, progress: bool = True) -> Reference:
    """The train split of a set-up data module as the reference, its val split as the floor's."""
    held_out = split_set(data, "val") if getattr(data, "val_set", None) is not None else None
    return reference_of(metric, split_set(data, "train"), held_out, progress=progress)


def score(metric: FeatureStats, images: ImageSet) -> dict:
    """Every metric of ``images`` scored as if generated against ``metric``'s reference, on this
    process alone (no DDP sync: every rank computes the same numbers). Digit labels give
    accuracy."""
    local = FeatureStats(
        metric.space, metric.k, metric.kid_subsets, metric.kid_subset_size,
        extractor=metric.extractor, sync_on_compute=False,
    ).to(metric.device)  # fmt: skip
    local.reference = metric.reference
    labelled = metric.space == "digits" and images.digits
    for x, y in images.batches(batch_size_of(metric.space)):
        x = x.to(metric.device)
        local.update(x, real=False, labels=y.to(x.device) if labelled else None)
    return local.compute()


def embedded_data():
    """The embedded digits at the ImageDataModule defaults (32 px, 1 channel, val 0.1, seed 0)."""
    from diffusion_apps.data import ImageDataModule

    data = ImageDataModule()
    data.setup("validate")
    return data


def reference_features(
    space: Space = "digits",
    split: Literal["train", "val"] = "train",
    cache_dir: str | Path | None = None,
    feature_extractor_weights_path: str | None = None,
    progress: bool = True,
) -> Tensor:
    """Features (N, d) of a split of the embedded digits at the data-module defaults, cached
    (:func:`features_of`)."""
    extractor = build_extractor(space, cache_dir, feature_extractor_weights_path)
    return features_of(split_set(embedded_data(), split), extractor, space, cache_dir, progress)[0]


def real_floor(
    space: Space = "digits",
    cache_dir: str | Path | None = None,
    feature_extractor_weights_path: str | None = None,
    data=None,
) -> dict[str, float]:
    """The metrics of a data module's real val split scored as if generated (with its digit
    labels, so accuracy is the classifier's) against its train split: the floor a perfect
    generator of as many samples reaches. Default data: the embedded digits. This process
    alone (:func:`score`)."""
    stats = FeatureStats(
        space, feature_extractor_weights_path=feature_extractor_weights_path, cache_dir=cache_dir
    )
    data = embedded_data() if data is None else data
    reference_of(stats, split_set(data, "train"), cache_dir=cache_dir, progress=False)
    return score(stats, split_set(data, "val"))
