"""What a method offers, declared in one typed place that commands, eval and callbacks read.

A generating method has a ``generation`` (a :class:`Generation`) and answers one call,

    ``sample(num_samples, *, sampler, steps, eta, spacing, generator, progress, labels, prompts,
    scale) -> Tensor``  (N, C, H, W) in [−1, 1],

every keyword optional (None: the method's default), and ``nfe(sampler, steps)``, its network
evaluations per sample. An autoencoding method has an ``autoencoding`` (an
:class:`Autoencoding`). Other modules declare neither (``None``). Nobody inspects annotations,
checks a method's class or its name: :func:`generation_of` and :func:`autoencoding_of` say it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Input = Literal["labels", "prompts"]
AutoencodeMode = Literal["reconstruct", "interpolate", "trajectory", "variations", "manipulate"]


@dataclass(frozen=True)
class Generation:
    """What ``sample`` takes.

    Args:
        samplers: the values of ``sampler=``.
        sampler, steps: the defaults ``sample`` uses when they are not given.
        inputs: what a sample may be asked for: class ``labels`` in [0, ``num_classes``),
            caption ``prompts``. Unasked, a method that takes labels draws the classes
            0, 1, …, K−1 in turn (:meth:`inputs_for`).
        num_classes: K, for ``labels``.
        scale: what ``scale=`` means (e.g. "classifier-free guidance w"); None: no scale.
        note: a line for eval's report on how the method's rows were drawn.
    """

    samplers: tuple[str, ...]
    sampler: str
    steps: int
    inputs: tuple[Input, ...] = ()
    num_classes: int | None = None
    scale: str | None = None
    note: str | None = None

    def check(
        self,
        sampler: str | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        scale: float | None = None,
        owner: str = "this model",
    ) -> None:
        """Raise a ValueError naming what of a request ``owner`` cannot take."""
        if sampler is not None and sampler not in self.samplers:
            raise ValueError(
                f"{owner} samples with {', '.join(map(repr, self.samplers))}, not {sampler!r}"
            )
        for name, given in (("labels", labels), ("prompts", prompts)):
            if given is not None and name not in self.inputs:
                takes = " or ".join(self.inputs) if self.inputs else "nothing but the number"
                need = "; prompts need a caption-conditioned model" if name == "prompts" else ""
                raise ValueError(f"{owner} takes no {name} (it takes {takes}){need}")
        if scale is not None and self.scale is None:
            raise ValueError(f"{owner} takes no scale (it is not guided)")
        if labels is not None:
            values = torch.as_tensor(labels)
            k = self.num_classes
            if (
                values.dim() != 1
                or not len(values)
                or (k is not None and (values.min() < 0 or values.max() >= k))
            ):
                raise ValueError(f"labels must be a non-empty list of classes in [0, {k}), got "
                                 f"{values.tolist()}")  # fmt: skip
        if prompts is not None and not len(prompts):
            raise ValueError("prompts must not be empty")

    def inputs_for(
        self,
        start: int,
        n: int,
        labels: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> dict[str, list]:
        """The inputs of samples start, …, start + n − 1: the given ``labels`` or ``prompts``
        cycled (sample i gets item i mod their number, so batches continue the cycle), by
        default the classes 0, 1, …, K−1 when the method takes labels; {} when it takes
        nothing."""
        if prompts is not None:
            return {"prompts": cycle(list(prompts), n, start)}
        if labels is None and "labels" in self.inputs and self.num_classes:
            labels = range(self.num_classes)
        return {} if labels is None else {"labels": cycle(list(labels), n, start)}


@dataclass(frozen=True)
class Autoencoding:
    """What an autoencoding method offers: ``reconstruct(x)`` always.

    Args:
        stochastic_code: a diffusion autoencoder's API besides: ``encode(x) -> z``,
            ``encode_stochastic(x, z) -> x_T`` (DDIM inversion), ``decode(z, x_T)``,
            ``sample_steps``/``encode_steps``/``timesteps``; eval reports x_T inferred and
            random, and a linear probe of z.
        modes: the ``autoencode`` command's modes it offers.
    """

    stochastic_code: bool = False
    modes: tuple[AutoencodeMode, ...] = ()


def generation_of(module: Any) -> Generation | None:
    """The module's :class:`Generation`, None when it does not generate from nothing."""
    return getattr(module, "generation", None)


def autoencoding_of(module: Any) -> Autoencoding | None:
    """The module's :class:`Autoencoding`, None when it does not autoencode."""
    return getattr(module, "autoencoding", None)


def has_stochastic_code(module: Any) -> bool:
    """Whether the module is a diffusion autoencoder (DiffAE, PDAE): its ``autoencoding``
    declares a stochastic code x_T."""
    autoencoding = autoencoding_of(module)
    return autoencoding is not None and autoencoding.stochastic_code


def cycle(items: Sequence | torch.Tensor, n: int, start: int = 0):
    """Items start, …, start + n − 1 of ``items`` repeated without end (a list, or a tensor
    indexed along its first dimension)."""
    if not len(items):
        raise ValueError("nothing to cycle through: the labels/prompts are empty")
    if isinstance(items, torch.Tensor):
        return items[(torch.arange(start, start + n, device=items.device)) % len(items)]
    return [items[(start + i) % len(items)] for i in range(n)]
