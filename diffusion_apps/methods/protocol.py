"""What a method offers, declared in one typed place that commands, eval and callbacks read.

A generating method declares a ``generation`` (a :class:`Generation`) and implements
``generate(num_samples, request)``; callers make the one call of :class:`Generates`,

    ``sample(num_samples, *, sampler, steps, eta, spacing, generator, progress, labels, prompts,
    scale, x_T) -> Tensor``  (N, C, H, W) in [−1, 1],

every keyword a field of :class:`SampleRequest` (None: the method's default), checked against
the declaration before the method sees it; ``nfe(sampler, steps)`` counts its network
evaluations per sample. An autoencoding method declares an ``autoencoding`` (an
:class:`Autoencoding`). Nobody inspects annotations, checks a method's class or its name:
:func:`generation_of` and :func:`autoencoding_of` say what a module offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

Input = Literal["labels", "prompts", "x_T"]
Option = Literal["eta", "spacing"]
AutoencodeMode = Literal["reconstruct", "interpolate", "trajectory", "variations", "manipulate"]


@dataclass(frozen=True)
class SampleRequest:
    """One ``sample`` call's keywords; None leaves the choice to the method.

    Args:
        sampler, steps: one of the method's samplers and its number of steps.
        eta, spacing: DDIM's η, the timestep subsequence ("uniform", "quad", "logsnr").
        generator: draws every random number of the call.
        progress: a progress bar over the steps.
        labels: sample i's class ``labels[i]``; prompts: its caption (each list as long as the
            batch: :meth:`Generation.inputs_for` cycles them).
        scale: the guidance scale (classifier-free w, classifier guidance s).
        x_T: the start noise (N, *sample_shape).
    """

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None
    generator: torch.Generator | None = None
    progress: bool = False
    labels: Sequence[int] | Tensor | None = None
    prompts: Sequence[str] | None = None
    scale: float | None = None
    x_T: Tensor | None = None


@dataclass(frozen=True)
class Generation:
    """What ``sample`` takes.

    Args:
        samplers: the values of ``sampler=``.
        sampler, steps: the defaults ``sample`` uses when they are not given.
        inputs: what a sample may be asked for besides: class ``labels`` in
            [0, ``num_classes``), caption ``prompts``, its start noise ``x_T``. Unasked, a method
            that takes labels draws the classes 0, 1, …, K−1 in turn (:meth:`inputs_for`).
        options: the sampler settings it takes besides ``sampler`` and ``steps``.
        num_classes: K, for ``labels``.
        max_steps: the most ``steps`` it can take (a DDPM: its T); None: no bound.
        scale: what ``scale=`` means (e.g. "classifier-free guidance w"); None: no scale.
        note: a line for eval's report on how the method's rows were drawn.
    """

    samplers: tuple[str, ...]
    sampler: str
    steps: int
    inputs: tuple[Input, ...] = ()
    options: tuple[Option, ...] = ("eta", "spacing")
    num_classes: int | None = None
    max_steps: int | None = None
    scale: str | None = None
    note: str | None = None

    def check(self, request: SampleRequest, owner: str = "this model") -> None:
        """Raise a ValueError naming what of ``request`` ``owner`` cannot take."""
        r = request
        if r.sampler is not None and r.sampler not in self.samplers:
            raise ValueError(
                f"{owner} samples with {', '.join(map(repr, self.samplers))}, not {r.sampler!r}"
            )
        top = self.max_steps
        if r.steps is not None and not 1 <= r.steps <= (top or r.steps):
            bound = f"in [1, {top}] (its T)" if top else ">= 1"
            raise ValueError(f"{owner}: steps must be {bound}, got {r.steps}")
        if r.eta is not None and "eta" in self.options and not 0 <= r.eta <= 1:
            raise ValueError(
                f"{owner}: eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior "
                f"variance), got {r.eta}"
            )
        for name in ("labels", "prompts", "x_T"):
            if getattr(r, name) is not None and name not in self.inputs:
                takes = " or ".join(self.inputs) if self.inputs else "nothing but the number"
                need = "; prompts need a caption-conditioned model" if name == "prompts" else ""
                raise ValueError(f"{owner} takes no {name} (it takes {takes}){need}")
        for name in ("eta", "spacing"):
            if getattr(r, name) is not None and name not in self.options:
                raise ValueError(f"{owner} takes no {name}: its steps are its own")
        if r.scale is not None and self.scale is None:
            raise ValueError(f"{owner} takes no scale (it is not guided)")
        if r.labels is not None:
            values = torch.as_tensor(r.labels)
            k = self.num_classes
            if (
                values.dim() != 1
                or not len(values)
                or (k is not None and (values.min() < 0 or values.max() >= k))
            ):
                raise ValueError(
                    f"labels must be a non-empty list of classes in [0, {k}), got {values.tolist()}"
                )
        if r.prompts is not None and not len(r.prompts):
            raise ValueError("prompts must not be empty")

    def inputs_for(
        self,
        start: int,
        n: int,
        labels: Sequence[int] | torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> dict[str, list]:
        """The inputs of samples start, …, start + n − 1: the given ``labels`` or ``prompts``
        cycled (sample i gets item i mod their number, so batches continue the cycle), by
        default the classes 0, 1, …, K−1 when the method takes labels; {} when it takes
        nothing."""
        if prompts is not None:
            return {"prompts": cycle(list(prompts), n, start)}
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        if labels is None and "labels" in self.inputs and self.num_classes:
            labels = range(self.num_classes)
        return {} if labels is None else {"labels": cycle(list(labels), n, start)}


class Generates:
    """The protocol's call, for a module that declares ``generation`` and implements
    ``generate(num_samples, request)``: :meth:`sample` checks the request first."""

    generation: Generation | None = None

    def sample(self, num_samples: int, **request) -> Tensor:
        """``num_samples`` samples (N, C, H, W) in [−1, 1]; ``request``: the fields of
        :class:`SampleRequest` (another keyword is an error naming it)."""
        unknown = set(request) - {f.name for f in fields(SampleRequest)}
        if unknown:
            raise TypeError(f"sample() takes no {', '.join(sorted(unknown))}")
        if self.generation is None:
            raise ValueError(f"{type(self).__name__} does not generate from nothing")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        asked = SampleRequest(**request)
        self.generation.check(asked, type(self).__name__)
        with torch.no_grad():
            return self.generate(num_samples, asked)

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """The method's samples for a checked ``request``."""
        raise NotImplementedError

    def nfe(self, sampler: str, steps: int) -> int:
        """Network evaluations per sample of ``sampler`` with ``steps`` steps: one per step."""
        return steps


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


def sample_instead(module: Any) -> str:
    """A module that does not generate: its ``sample_instead`` line, what to sample instead."""
    return getattr(module, "sample_instead", "")


def autoencoding_of(module: Any) -> Autoencoding | None:
    """The module's :class:`Autoencoding`, None when it does not autoencode."""
    return getattr(module, "autoencoding", None)


def has_stochastic_code(module: Any) -> bool:
    """Whether the module is a diffusion autoencoder (DiffAE, PDAE): its ``autoencoding``
    declares a stochastic code x_T."""
    autoencoding = autoencoding_of(module)
    return autoencoding is not None and autoencoding.stochastic_code


def cycle(items: Sequence, n: int, start: int = 0) -> list:
    """Items start, …, start + n − 1 of ``items`` repeated without end."""
    if not len(items):
        raise ValueError("nothing to cycle through: the labels/prompts are empty")
    return [items[(start + i) % len(items)] for i in range(n)]
