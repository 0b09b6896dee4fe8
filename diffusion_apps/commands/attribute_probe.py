"""The attribute probe of ``autoencode --mode manipulate``, fitted on the labels the user has.

Labels come from, in this order: an attribute table (``--attributes``: CelebA's
``list_attr_celeba.txt`` layout or a CSV) for the images of ``--probe_images``; the sub-folders
of ``--probe_images DIR``; else the checkpoint's own labelled data (its train split to fit, its
val split to score). The probe (:class:`~diffusion_apps.methods.probe.LinearProbe`, one logistic
regression per attribute on normalised z) is fitted on 80% of the user's images, and its val
accuracy per attribute (the share of held-out images whose logit sign is their label) is
printed and written to ``probe.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_apps.methods.probe import LinearProbe

PROBE_VAL_FRACTION = 0.2


@dataclass
class AttributeProbe:
    """A fitted probe, the names of its outputs, their val accuracies and what always
    answering the val split's majority scores (``majority``); ``class_accuracy``, for
    one-label-per-image data (classes), the share whose largest logit is their class."""

    probe: LinearProbe
    names: tuple[str, ...]
    accuracy: dict[str, float]
    majority: dict[str, float]
    n_train: int
    n_val: int
    source: str
    class_accuracy: float | None = None

    def index(self, attribute: str) -> int:
        """The output ``attribute`` names (a name, else an index)."""
        from diffusion_apps.data.attributes import attribute_index

        try:
            return attribute_index(self.names, attribute)
        except ValueError as err:
            raise ValueError(f"--attribute: {err}") from None

    def report(self, path: Path) -> None:
        """Print the accuracies and write them, with the counts, to ``path`` (JSON)."""
        print(f"probe: fitted on {self.n_train} and scored on {self.n_val} images of {self.source}")
        for name, acc in self.accuracy.items():
            print(
                f"  {name:<24} val accuracy {acc:.3f} (majority answer {self.majority[name]:.3f})"
            )
        if self.class_accuracy is not None:
            print(f"  class (largest logit)    val accuracy {self.class_accuracy:.3f}")
        record = {"source": self.source, "n_train": self.n_train, "n_val": self.n_val,
                  "val_accuracy": self.accuracy, "val_majority": self.majority,
                  "val_class_accuracy": self.class_accuracy}  # fmt: skip
        path.write_text(json.dumps(record, indent=2) + "\n")


def fit_on(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], names, source: str
) -> AttributeProbe:
    """Fit on the ``train`` (codes (N, D), 0/1 targets (N, K)) pair, score on ``val``."""
    (z_train, y_train), (z_val, y_val) = train, val
    probe = LinearProbe.fit(z_train, y_train)
    scores = dict(zip(names, probe.attribute_accuracy(z_val, y_val).tolist(), strict=True))
    share = y_val.float().mean(0)
    majority = dict(zip(names, torch.maximum(share, 1 - share).tolist(), strict=True))
    one_label = bool((y_train.sum(1) == 1).all() and (y_val.sum(1) == 1).all())
    classes = probe.accuracy(z_val, y_val.argmax(1)) if one_label else None
    return AttributeProbe(probe, tuple(names), scores, majority, len(z_train), len(z_val),
                          source, classes)  # fmt: skip


def probe_from_images(module, specs: list[str], table: str | None, batch_size: int,
                      bad_images: str = "stop") -> AttributeProbe:  # fmt: skip
    """The probe of the user's labelled images: ``table``'s attributes, else sub-folder classes."""
    from diffusion_apps.data.attributes import (
        folder_attributes,
        match_attributes,
        read_attribute_table,
    )
    from diffusion_apps.data.files import find_images
    from diffusion_apps.data.sources import split_indices

    files, root = find_images(specs, "--probe_images")
    z, files = encode_files(module, files, batch_size, bad_images)
    if table is not None:
        attributes = read_attribute_table(table)
        targets, names = match_attributes(attributes, files, root), attributes.names
        source = str(table)
    elif files.class_names is not None:
        attributes = folder_attributes(files.labels, files.class_names)
        targets, names, source = attributes.values, attributes.names, f"the sub-folders of {root}"
    else:
        raise ValueError(
            "--probe_images: no labels: put the images in one sub-folder per class, or give an "
            "attribute table with --attributes"
        )
    if len(z) < 5:
        raise ValueError(f"--probe_images: {len(z)} images are too few to fit and score a probe")
    train, val = split_indices(len(z), PROBE_VAL_FRACTION, seed=0)
    pairs = [(z[ix], targets[ix]) for ix in (train, val)]
    return fit_on(*pairs, names, f"{source} ({len(z)} images)")


def probe_from_data(module, data, batch_size: int) -> AttributeProbe:
    """The probe of the checkpoint's own labelled data: its classes, one-hot."""
    from torch.utils.data import DataLoader

    from diffusion_apps.methods.probe import encode_all

    if not data.num_classes:
        raise ValueError(
            "manipulate: the checkpoint's data has no labels; give labelled images with "
            "--probe_images DIR (one sub-folder per class) or --probe_images and --attributes TABLE"
        )
    k = data.num_classes
    pairs = []
    for split in (data.train_set, data.val_set):
        z, labels = encode_all(
            module.encode, DataLoader(split, batch_size=batch_size), module.device
        )
        pairs.append((z, torch.nn.functional.one_hot(labels, k).float()))
    names = data.class_names or [str(i) for i in range(k)]
    return fit_on(*pairs, names, "the checkpoint's data (train split, scored on val)")


def encode_files(module, files, batch_size: int, bad_images: str = "stop"):
    """(z (N, D) on the CPU, the files read): the files loaded and encoded a batch at a time,
    so memory holds one batch of images."""
    from diffusion_apps.data.files import ImageFiles, load_images

    c, s, _ = module.sample_shape
    codes, kept = [], []
    for i in range(0, len(files), batch_size):
        images, _, read = load_images(files[i : i + batch_size], s, c, bad_images)
        codes.append(module.encode(images.to(module.device)).float().cpu())
        kept.append(read)
    paths = tuple(p for k in kept for p in k.paths)
    labels = tuple(y for k in kept for y in k.labels)
    return torch.cat(codes), ImageFiles(paths, labels, files.class_names)
