"""The user's own image files as model inputs, read exactly as ``ImageDataModule`` reads a folder.

``--images a.png b.jpg`` or ``--images DIR``: every file is verified first (a corrupt or
truncated one is named, or skipped with ``bad_images="skip"``), converted to the model's
channels (:func:`~diffusion_apps.data.sources.convert_image`) and sized by
:func:`~diffusion_apps.data.sources.pil_transform`. :func:`recipe` says how, in words, for the
outputs to record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_apps.data import sources


@dataclass(frozen=True)
class ImageFiles:
    """Image files and their labels: sub-folder classes of a folder given alone, else -1."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, part: slice) -> ImageFiles:
        """The files of ``part``, with their labels (``files[i : i + batch]``)."""
        return ImageFiles(self.paths[part], self.labels[part], self.class_names)

    def names(self, root: Path | None = None) -> list[str]:
        """Each file's name relative to the folder it was found in (the path given otherwise)."""
        return [str(p.relative_to(root)) if root else str(p) for p in self.paths]


def find_images(
    specs: Sequence[str | Path], flag: str = "--images"
) -> tuple[ImageFiles, Path | None]:
    """The image files ``specs`` name, and the folder when one folder was given.

    A folder is scanned like ``dataset="folder"`` (recursive, sorted, hidden paths skipped,
    first-level sub-folders as class labels); files are taken in the order given, each once.

    Raises:
        FileNotFoundError: a path that does not exist, a folder without images.
        ValueError: no path, a file that is not an image by its extension.
    """
    specs = [Path(s).expanduser() for s in specs]
    if not specs:
        raise ValueError(f"{flag}: give image files or one folder of images")
    missing = [str(p) for p in specs if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{flag}: no such file or folder: {', '.join(missing)}")
    folders = [p for p in specs if p.is_dir()]
    if folders and len(specs) > 1:
        raise ValueError(
            f"{flag}: give one folder, or image files, not both ({', '.join(map(str, folders))})"
        )
    if folders:
        files, labels, names = sources.scan_folder(str(folders[0]))
        found = ImageFiles(tuple(files), tuple(labels), tuple(names) if names else None)
        return found, folders[0]
    others = [str(p) for p in specs if p.suffix.lower() not in sources.IMAGE_EXTENSIONS]
    if others:
        kinds = ", ".join(sources.IMAGE_EXTENSIONS)
        raise ValueError(f"{flag}: not an image file ({kinds}): {', '.join(others)}")
    unique = tuple(dict.fromkeys(specs))
    return ImageFiles(unique, (-1,) * len(unique)), None


def load_images(
    files: ImageFiles, image_size: int, channels: int, bad_images: str = "stop"
) -> tuple[Tensor, Tensor, ImageFiles]:
    """Images (N, channels, image_size, image_size) in [−1, 1], labels (N,) and the files read
    (fewer than given when ``bad_images="skip"`` left some out, with a warning naming them)."""
    keep = sources.verify_images(files.paths, skip=bad_images == "skip")
    kept = ImageFiles(
        tuple(files.paths[i] for i in keep), tuple(files.labels[i] for i in keep), files.class_names
    )
    dataset = sources.PILImageDataset(
        list(zip(kept.paths, kept.labels, strict=True)),
        sources.pil_transform(image_size),
        channels,
        labelled=kept.class_names is not None,
    )
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.stack(labels), kept


def recipe(image_size: int, channels: int) -> str:
    """How :func:`load_images` turns a file into the model's input, in words."""
    mode = "grayscale (PIL mode L)" if channels == 1 else "RGB (alpha dropped)"
    return (
        f"converted to {mode}, 16-bit and float pixels scaled to [0, 1]; the shorter side "
        f"resized to {image_size} px (PIL bilinear, antialiased), center-cropped to "
        f"{image_size}x{image_size}; pixels mapped from [0, 255] to [-1, 1]"
    )
