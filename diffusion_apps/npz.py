"""Images as ``.npz`` files in the ADM evaluator's layout, streamed: never held whole.

``arr_0``: uint8 (N, H, W, C), C 1 or 3; ``arr_1`` (optional): int64 (N,) class labels; what
``np.load(path)["arr_0"]`` reads in guided-diffusion's ``evaluator.py``. :func:`iter_npz` reads
one in batches straight from its zip member; :class:`NpzWriter` writes one through ``.npy``
files preallocated beside it, from one process or every rank of a ``torchrun`` launch.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch.distributed as dist
from torch import Tensor

from diffusion_apps.images import to_uint8 as images_to_uint8

IMAGES, LABELS = "arr_0", "arr_1"
CHUNK = 1 << 24  # bytes copied at a time when packing


class NpzInfo(NamedTuple):
    """What an image npz holds: ``num`` images of ``height`` x ``width`` x ``channels``, and
    whether it has labels (``arr_1``)."""

    num: int
    height: int
    width: int
    channels: int
    has_labels: bool


def _header(fp: IO[bytes]) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) of the ``.npy`` array in ``fp``, left at its data."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _member(archive: zipfile.ZipFile, name: str, path: Path) -> tuple[IO[bytes], tuple, np.dtype]:
    """The open member ``name``.npy of ``archive``, positioned at its data, with its shape and
    dtype; a ValueError naming ``path`` for a Fortran-ordered or unreadable header."""
    fp = archive.open(f"{name}.npy")
    try:
        shape, fortran, dtype = _header(fp)
    except ValueError as err:
        fp.close()
        raise ValueError(f"{path}: {name} is not a readable .npy array ({err})") from None
    if fortran:
        fp.close()
        raise ValueError(f"{path}: {name} is stored in Fortran order; save it C-ordered")
    return fp, shape, dtype


def _open(path: str | Path) -> tuple[zipfile.ZipFile, Path]:
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz (zip) file") from None
    if f"{IMAGES}.npy" not in archive.namelist():
        archive.close()
        raise ValueError(f"{path} has no {IMAGES} (the images array)")
    return archive, path


def _check_images(path: Path, shape: tuple, dtype: np.dtype) -> tuple[int, int, int, int]:
    if dtype != np.uint8:
        raise ValueError(f"{path}: {IMAGES} must be uint8, not {dtype}")
    if len(shape) != 4:
        raise ValueError(f"{path}: {IMAGES} must be 4-d (N, H, W, C), not of shape {shape}")
    if shape[3] not in (1, 3):
        raise ValueError(f"{path}: {IMAGES} must have 1 or 3 channels last, not shape {shape}")
    return shape


def _check_labels(path: Path, shape: tuple, dtype: np.dtype, num: int) -> None:
    if dtype.kind not in "iu":
        raise ValueError(f"{path}: {LABELS} (labels) must be integers, not {dtype}")
    if shape != (num,):
        raise ValueError(f"{path}: {LABELS} (labels) must have shape ({num},), not {shape}")


def npz_info(path: str | Path) -> NpzInfo:
    """The layout of the image npz at ``path``, from its arrays' headers alone.

    Raises:
        ValueError: naming the file, for anything but the layout above (compression is fine).
    """
    archive, path = _open(path)
    with archive:
        fp, shape, dtype = _member(archive, IMAGES, path)
        fp.close()
        num, height, width, channels = _check_images(path, shape, dtype)
        has_labels = f"{LABELS}.npy" in archive.namelist()
        if has_labels:
            fp, shape, dtype = _member(archive, LABELS, path)
            fp.close()
            _check_labels(path, shape, dtype, num)
    return NpzInfo(num, height, width, channels, has_labels)


def _chunks(fp: IO[bytes], dtype: np.dtype, item: tuple, num: int, batch: int, what: str):
    """Arrays of ``batch`` items (the last one shorter) of ``num`` read from ``fp``."""
    size = dtype.itemsize * int(np.prod(item))
    for start in range(0, num, batch):
        n = min(batch, num - start)
        data = fp.read(n * size)
        if len(data) != n * size:
            raise ValueError(f"{what} ends after {start + len(data) // size} of {num} items")
        yield np.frombuffer(data, dtype).reshape(n, *item)


def iter_npz(path: str | Path, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(images, labels)`` of the image npz at ``path``, ``batch_size`` at a time, read from the
    zip member as it goes: images uint8 (B, H, W, C), labels int64 (B,) or None without
    ``arr_1``. The last batch holds the rest.

    Raises:
        ValueError: as :func:`npz_info`, or for an array shorter than its header says.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = npz_info(path)
    archive, path = _open(path)
    with archive:
        fp, shape, dtype = _member(archive, IMAGES, path)
        images = _chunks(fp, dtype, shape[1:], info.num, batch_size, f"{path}: {IMAGES}")
        labels = None
        if info.has_labels:
            lfp, _, ldtype = _member(archive, LABELS, path)
            labels = _chunks(lfp, ldtype, (), info.num, batch_size, f"{path}: {LABELS}")
        try:
            for x in images:
                yield x, None if labels is None else next(labels).astype(np.int64)
        finally:
            fp.close()
            if labels is not None:
                lfp.close()


def to_uint8(images: Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [−1, 1] as uint8 (B, H, W, C), the pixels ``save_png`` writes
    (:func:`diffusion_apps.images.to_uint8`)."""
    return images_to_uint8(images).permute(0, 2, 3, 1).numpy()


class NpzWriter:
    """Write ``num`` images of ``shape`` (C, H, W) (and their labels, with ``labels``) to the npz
    ``path``, batch by batch, in constant memory.

    The arrays are preallocated as ``.npy`` files beside ``path`` (``open_memmap``);
    :meth:`write` puts a batch at its sample indices by a positioned file write (a memory map's
    written pages would count in the process's resident memory, growing with N); leaving the
    ``with`` block packs them into ``path`` (a ZIP_STORED zip64 archive, written aside and renamed
    over it) and removes them. Under
    ``torchrun`` every rank makes one with the same arguments and its ``rank``, ``world``: rank
    0 creates the files, the others open them, each writes its own batches, rank 0 packs, and
    every rank leaves once ``path`` is complete. An exception in the block leaves no ``path``
    (an earlier one is removed on entry) and no temporary files.
    """

    def __init__(
        self,
        path: str | Path,
        num: int,
        shape: Sequence[int],
        labels: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        channels, height, width = shape
        if num < 1 or channels not in (1, 3):
            raise ValueError(f"NpzWriter: need num >= 1 and 1 or 3 channels, got {num}, {shape}")
        self.path, self.num, self.rank, self.world = Path(path), num, rank, world
        self.shapes = {IMAGES: ((num, height, width, channels), np.uint8)}
        if labels:
            self.shapes[LABELS] = ((num,), np.int64)
        self.files: dict[str, tuple[IO[bytes], int]] = {}  # name: (file, data offset)

    def _temporary(self, name: str) -> Path:
        return self.path.with_name(f".{self.path.name}.{name}")

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def __enter__(self) -> NpzWriter:
        if self.rank == 0:
            self.path.unlink(missing_ok=True)
            try:
                for name, (shape, dtype) in self.shapes.items():
                    npy = self._temporary(f"{name}.npy")
                    np.lib.format.open_memmap(npy, "w+", dtype, shape)  # sparse data; unmapped
            except OSError as err:  # a full disk, a file size limit
                self._remove_temporaries()
                raise _cannot_write(self.path, err) from None
        self._barrier()
        for name in self.shapes:
            # Unbuffered: a buffered file writes back its whole dirty span on close, stale
            # bytes between two of this rank's batches included, over another rank's batch.
            fp = open(self._temporary(f"{name}.npy"), "r+b", buffering=0)  # noqa: SIM115
            _header(fp)
            self.files[name] = fp, fp.tell()
        return self

    def _put(self, name: str, start: int, values: np.ndarray) -> None:
        fp, offset = self.files[name]
        values = np.ascontiguousarray(values)
        data = memoryview(values).cast("B")
        position = offset + start * (values.nbytes // len(values))
        while data:  # a raw write may write less than it is given
            written = os.pwrite(fp.fileno(), data, position)
            data, position = data[written:], position + written

    def write(self, start: int, images: Tensor, labels: Sequence[int] | Tensor | None = None):
        """Put images (B, C, H, W) in [−1, 1] (and their B labels) at samples start … start+B−1."""
        pixels = to_uint8(images)
        stop = start + len(pixels)
        shape = self.shapes[IMAGES][0]
        if pixels.shape[1:] != shape[1:] or not 0 <= start < stop <= self.num:
            raise ValueError(
                f"{self.path}: images {tuple(pixels.shape)} at {start} do not fit {shape}"
            )
        if (labels is None) != (LABELS not in self.shapes):
            takes = "takes labels" if LABELS in self.shapes else "was made without labels"
            raise ValueError(f"{self.path}: this writer {takes}")
        self._put(IMAGES, start, pixels)
        if labels is not None:
            self._put(LABELS, start, np.asarray(labels, dtype=np.int64))

    def __exit__(self, kind, error, trace) -> None:
        for fp, _ in self.files.values():
            fp.close()
        self.files.clear()
        try:
            if kind is None:
                self._barrier()  # every rank's batches are in the files
                if self.rank == 0:
                    self._pack()
                self._barrier()  # the npz is complete before any rank goes on
        finally:
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for name in (*(f"{n}.npy" for n in self.shapes), "partial"):
            self._temporary(name).unlink(missing_ok=True)

    def _pack(self) -> None:
        partial = self._temporary("partial")
        try:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name in self.shapes:
                    with (
                        open(self._temporary(f"{name}.npy"), "rb") as src,
                        archive.open(f"{name}.npy", "w", force_zip64=True) as dst,
                    ):
                        shutil.copyfileobj(src, dst, CHUNK)
            os.replace(partial, self.path)
        except OSError as err:
            raise _cannot_write(self.path, err) from None


def _cannot_write(path: Path, err: OSError) -> ValueError:
    return ValueError(f"cannot write {path} ({type(err).__name__}: {err.strerror or err})")
