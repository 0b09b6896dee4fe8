"""Image shards in Lightning's litdata format: an image folder packed once into chunk files,
streamed from a local path or an object store (``s3://…``, ``gs://…``) by every rank of a
multi-node job, and resumable mid-epoch through the loader's state dict.

Layout written by :func:`pack` (``python -m diffusion_apps data pack``)::

    SHARDS/train/  index.json chunk-*.bin    litdata's, one item per image
    SHARDS/val/    index.json chunk-*.bin
    SHARDS/diffusion_apps.json               class names, counts, how the images were packed

An item is ``{"image": bytes, "label": int, "name": str}``: the file's own bytes (decoded at read
time exactly as ``dataset="folder"`` decodes the file), or with ``image_size`` the image already
converted and sized as ``ImageDataModule`` would (PNG; TIFF for 16-bit/float pixels), which is
then read only at that size and channel count. The train/val split is the folder's
(:func:`~diffusion_apps.data.sources.split_indices` with the same ``val_fraction`` and
``seed``), so shards and folder hold the same images. litdata is optional: ``pip install
'diffusion_apps[stream]'``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_apps.data import index, sources

META = "diffusion_apps.json"
SPLITS = ("train", "val")
BLOCK = 1024  # images decoded at once while packing


def litdata():
    """The litdata module, or an error that says how to install it."""
    try:
        import litdata
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "dataset='shards' and `data pack` need litdata: pip install 'diffusion_apps[stream]'"
        ) from None
    return litdata


def _encoded(image) -> bytes:
    """``image`` losslessly: PNG for 8-bit modes, TIFF for mode "F" (float pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if image.mode == "F" else "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class _Packer:
    """One image file → its item, or the error that says why it cannot be read."""

    base: Path
    image_size: int | None
    channels: int

    def __call__(self, entry: tuple[str, int]) -> dict | sources.UnreadableImage:
        name, label = entry
        path = self.base / name
        try:
            mode = sources.image_mode(self.channels)
            image = sources.read_image(path, mode)  # decodes: the check
        except sources.UnreadableImage as err:
            return err
        if self.image_size is None:
            data = path.read_bytes()
        else:
            for step in sources.pil_transform(self.image_size).transforms[:2]:  # Resize, Crop
                image = step(image)
            data = _encoded(image)
        return {"image": data, "label": label, "name": name}


def _write(out: Path, entries: list[tuple[str, int]], packer: _Packer, skip_bad: bool,
           chunk_bytes: str, num_workers: int) -> int:  # fmt: skip
    """Items of ``entries`` (decoded by ``num_workers`` threads; PIL decodes without the GIL)
    written in order into litdata chunks under ``out``; returns how many."""
    from litdata.streaming.cache import Cache

    cache, written = Cache(str(out), chunk_bytes=chunk_bytes), 0
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        for start in range(0, len(entries), BLOCK):
            for item in pool.map(packer, entries[start : start + BLOCK]):
                if isinstance(item, sources.UnreadableImage):
                    if not skip_bad:
                        raise item
                    warnings.warn(f"{item}; not packed", stacklevel=3)
                    continue
                cache[written] = item
                written += 1
    cache.done()
    cache.merge()
    return written


def pack(
    folder: str,
    out: str,
    image_size: int | None = None,
    channels: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    bad_images: str = "stop",
    chunk_bytes: str = "64MB",
    num_workers: int = 4,
) -> Path:
    """Pack the image folder ``folder`` into litdata shards under ``out`` (see the module's
    docstring) with litdata's chunk writer; returns ``out``. The folder is indexed as
    ``dataset="folder"`` indexes it; every image is decoded, and one that cannot be read stops
    the pack naming it, or with ``bad_images="skip"`` is left out with a warning."""
    litdata()
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"data pack: --out {target} exists and is not empty")
    checks = [
        ("channels", channels, channels in (1, 3)),
        ("image_size", image_size, image_size is None or image_size >= 8),
        ("num_workers", num_workers, num_workers >= 1),
    ]
    for option, value, ok in checks:
        if not ok:
            raise ValueError(f"data pack: invalid {option}={value!r}")
    files, labels, class_names = index.folder_index(folder)
    base = Path(folder)
    packer = _Packer(base, image_size, channels)
    counts, splits = {}, sources.split_indices(len(files), val_fraction, seed)
    for split, ix in zip(SPLITS, splits, strict=True):
        entries = [(files[i].relative_to(base).as_posix(), labels[i]) for i in ix.tolist()]
        skip = bad_images == "skip"
        counts[split] = _write(target / split, entries, packer, skip, chunk_bytes, num_workers)
    meta = {
        "class_names": class_names,
        "counts": counts,
        "image_size": image_size,
        "channels": channels if image_size is not None else None,
        "val_fraction": val_fraction,
        "seed": seed,
        "folder": str(base.resolve()),
    }
    (target / META).write_text(json.dumps(meta, indent=1))
    return target


def _is_remote(root: str) -> bool:
    return "://" in root or root.startswith("local:")  # local: litdata's cached local reads


def read_meta(root: str) -> dict:
    """The pack's :data:`META` (downloaded through litdata for an object store), or an error
    saying that ``root`` is not a pack."""
    try:
        if _is_remote(root):
            from litdata.streaming.downloader import get_downloader

            key = hashlib.sha256(root.encode()).hexdigest()[:32]
            path = index.cache_root() / "shards" / key / META
            path.parent.mkdir(parents=True, exist_ok=True)
            get_downloader(root, str(path.parent), []).download_file(f"{root}/{META}", str(path))
        else:
            path = Path(root) / META
            for split in SPLITS:
                if not (Path(root) / split / "index.json").is_file():
                    raise FileNotFoundError(f"no {Path(root) / split / 'index.json'}")
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # missing, unreadable, not JSON
        raise FileNotFoundError(
            f"dataset='shards': {root} is not a pack written by `python -m diffusion_apps data "
            f"pack --folder DIR --out {root}` ({err})"
        ) from None


@dataclass(frozen=True)
class _Decoder:
    """litdata's ``transform``: an item to (image (C, H, W) in [-1, 1], label int64)."""

    transform: Any
    channels: int
    labelled: bool

    def __call__(self, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
        mode = sources.image_mode(self.channels)
        image = sources.read_image(item["name"], mode, bytes(item["image"]))
        x = self.transform(image).expand(self.channels, -1, -1)
        label = int(item["label"]) if self.labelled else -1
        return x, torch.tensor(label, dtype=torch.int64)


class _OncePerResume:
    """A restored place applies to the first pass after ``load_state_dict`` only.

    litdata replays a restored state at every ``iter()`` until one pass runs to its end, but
    Lightning ends an epoch at its batch count without exhausting the iterator, so every later
    epoch of a resumed run would repeat the tail of the resumed one."""

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._resuming = True

    def __iter__(self):
        if not getattr(self, "_resuming", False):
            self.restore = False
        self._resuming = False
        return super().__iter__()


@functools.cache
def loader_class(*mixins: type) -> type:
    """litdata's StreamingDataLoader, whose place mid-epoch is in its state dict (Lightning's
    fit loop keeps it in checkpoints and restores it), with :class:`_OncePerResume` and
    ``mixins``."""
    return type("ShardLoader", (*mixins, _OncePerResume, litdata().StreamingDataLoader), {})


def shard_sets(root: str, image_size: int, channels: int, seed: int):
    """The train (shuffled with ``seed``) and val StreamingDatasets of the pack ``root``, and its
    class names.

    Raises:
        FileNotFoundError: ``root`` is not a pack.
        ValueError: a pack sized at another ``image_size`` or ``channels``.
    """
    ld = litdata()
    meta = read_meta(root)
    packed = meta["image_size"], meta["channels"]
    if meta["image_size"] is not None and packed != (image_size, channels):
        raise ValueError(
            f"dataset='shards': {root} was packed at image_size={packed[0]}, channels="
            f"{packed[1]}; read it with those, or pack the folder again for image_size="
            f"{image_size}, channels={channels}"
        )
    names = meta["class_names"]
    decode = _Decoder(sources.pil_transform(image_size), channels, names is not None)
    train = ld.StreamingDataset(f"{root}/train", shuffle=True, seed=seed, transform=decode)
    val = ld.StreamingDataset(f"{root}/val", shuffle=False, transform=decode)
    return train, val, names
