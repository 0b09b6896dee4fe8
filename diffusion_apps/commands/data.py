"""``python -m diffusion_apps data pack``: an image folder → litdata shards for streaming.

::

    python -m diffusion_apps data pack --folder images --out shards [--image_size 64]
    # then train from them, on any number of nodes:
    python -m diffusion_apps fit --config configs/ddpm.yaml \\
        --data.init_args.dataset shards --data.init_args.root shards   # or s3://bucket/shards

See :mod:`diffusion_apps.data.shards` for the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


class Data:
    """Prepare datasets: ``pack`` an image folder into litdata shards (dataset="shards")."""

    def pack(
        self,
        folder: str,
        out: str,
        image_size: int | None = None,
        channels: Literal[1, 3] = 3,
        val_fraction: float = 0.1,
        seed: int = 0,
        bad_images: Literal["stop", "skip"] = "stop",
        chunk_bytes: str = "64MB",
        num_workers: int = 4,
    ) -> Path:
        """Pack the images under ``folder`` into litdata shards in ``out``.

        Args:
            folder: an image folder, read as ``dataset="folder"`` reads it (first-level
                sub-folders as classes).
            out: the pack's folder (new or empty): ``train/``, ``val/`` and
                ``diffusion_apps.json``.
            image_size: store each image converted to ``channels`` and sized (shorter side
                resized, center-cropped) as training at this size reads it, losslessly: less
                to decode per step, but readable only at that size. Default: the files' own
                bytes, readable at any size.
            channels: 1 or 3, with ``image_size``.
            val_fraction: the share held out, split as ``dataset="folder"`` splits it with
                the same ``seed``.
            seed: seed of that split.
            bad_images: a file that cannot be read: "stop" naming it, or "skip" it (not packed)
                with a warning naming it.
            chunk_bytes: the size of one shard file (litdata's chunk), e.g. "64MB".
            num_workers: threads that decode images while packing.

        Returns:
            The pack's folder.
        """
        from diffusion_apps.data import shards

        return shards.pack(
            folder, out, image_size, channels, val_fraction, seed, bad_images, chunk_bytes,
            num_workers,
        )  # fmt: skip
