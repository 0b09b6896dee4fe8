"""What ``autoencode`` works on and how: the user's images, their codes or the val split
(:class:`Inputs`, :func:`read_inputs`), and the module's work in batches (:class:`Run`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffusion_apps.diffusion.exact_inversion import CoupledCode

if TYPE_CHECKING:
    from diffusion_apps.commands.codes_file import CodesFile


@dataclass
class Inputs:
    """The images a run works on, or their codes, and where they came from."""

    images: Tensor  # (N, C, H, W) in [−1, 1], on the CPU
    names: list[str]
    where: str
    recipe: str
    labels: Tensor  # (N,), −1 where unknown
    codes: CodesFile | None = None
    from_val: bool = False  # the checkpoint's val split

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: Tensor) -> Inputs:
        """The inputs where ``keep`` (N,) holds."""
        stored = self.codes
        if stored is not None:
            codes = type(stored.codes)(*(c[keep] for c in stored.codes))
            stored = replace(stored, codes=codes, images=stored.images[keep])
        names = [n for n, k in zip(self.names, keep.tolist(), strict=True) if k]
        return replace(self, images=self.images[keep], names=names, labels=self.labels[keep],
                       codes=stored)  # fmt: skip


class Run:
    """The module's work in batches of ``batch_size``, on its device, results on the CPU."""

    def __init__(self, module, batch_size: int, encode_steps: int, seed: int):
        self.module, self.batch_size, self.encode_steps = module, batch_size, encode_steps
        self.generator = torch.Generator(module.device).manual_seed(seed)

    def each(self, fn: Callable, *tensors: Tensor):
        """``fn`` of every batch of the ``tensors`` (sliced alike along dim 0), concatenated
        (each field, when ``fn`` returns a tuple such as :class:`Codes`)."""
        from tqdm.auto import tqdm

        n, device = len(tensors[0]), self.module.device
        starts = range(0, n, self.batch_size)
        outs = [
            fn(*(t[i : i + self.batch_size].to(device) for t in tensors))
            for i in tqdm(starts, desc="autoencode", unit="batch", disable=len(starts) < 2)
        ]
        if isinstance(outs[0], tuple):
            return type(outs[0])(*(_cat([o[k] for o in outs]) for k in range(len(outs[0]))))
        return _cat(outs)

    def codes(self, x: Tensor):
        """Both :class:`Codes` of images x (N, C, H, W), in batches."""
        return self.each(lambda b: self.module.codes(b, self.encode_steps), x)


def _cat(parts: list) -> Tensor | CoupledCode:
    """Batches of a tensor, or of EDICT's stochastic code, concatenated on the CPU."""
    parts = [p.cpu() for p in parts]
    return CoupledCode.cat(parts) if isinstance(parts[0], CoupledCode) else torch.cat(parts)


def read_inputs(
    module, ckpt_path, images, codes, weights: str, bad_images: str, inversion=None
) -> Inputs:
    """The images named by ``--images``, the codes of ``--codes`` (made by ``inversion`` when
    it is given), else the val split."""
    from diffusion_apps.data.files import find_images, load_images, recipe

    if codes is not None:
        from diffusion_apps.commands.codes_file import check_codes_match, read_codes

        stored = read_codes(codes)
        check_codes_match(stored, codes, module, weights, inversion)
        unknown = torch.full((len(stored.files),), -1)
        x = stored.images.float() / 127.5 - 1
        return Inputs(x, stored.files, f"the codes in {codes}", stored.recipe, unknown, stored)
    c, s, _ = module.sample_shape
    if images is not None:
        files, root = find_images(images)
        x, labels, files = load_images(files, s, c, bad_images)
        where = f"{len(files)} image files" + (f" under {root}" if root else "")
        return Inputs(x, files.names(root), where, recipe(s, c), labels)
    from torch.utils.data import DataLoader

    from diffusion_apps.checkpoint import read_checkpoint
    from diffusion_apps.commands.common import checkpoint_data

    data = checkpoint_data(read_checkpoint(ckpt_path), module)
    batch = next(iter(DataLoader(data.val_set, batch_size=min(len(data.val_set), 512))))
    x, labels = batch[0], batch[1]
    names = [f"val_{i:04d}" for i in range(len(x))]
    how = "the checkpoint's data module, its val split"
    return Inputs(x, names, how, how, labels, from_val=True)
