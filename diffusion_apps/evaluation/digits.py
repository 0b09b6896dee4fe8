"""A small CNN that classifies the embedded digits: the offline feature space of ``fd_digits``.

Trained once, deterministically, on the embedded training split with the ImageDataModule defaults
(32 px, 1 channel, val_fraction 0.1, seed 0) and cached on disk under a hash of the data and the
training recipe, so every run on every machine scores samples with the same network. Its
penultimate activations play the role of Inception's pool features; its softmax judges whether a
class-conditional sample shows the digit it was asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.data import sources
from diffusion_apps.data.index import cache_root

# The split every metric's reference set comes from: the ImageDataModule defaults.
IMAGE_SIZE, VAL_FRACTION, SPLIT_SEED = 32, 0.1, 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the classifier is trained. Its repr is part of the cache key: change ``version`` when
    the architecture or the training loop changes."""

    version: int = 1
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: float = 2.0  # px, uniform in [-max_shift, max_shift] per axis
    max_rotation: float = 10.0  # degrees, uniform in [-max_rotation, max_rotation]
    seed: int = 0


RECIPE = Recipe()


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $DIFFUSION_APPS_CACHE, else ~/.cache/diffusion_apps (created)."""
    path = cache_root() if cache_dir is None else Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_split(split: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 32, 32) in [-1, 1] and labels (N,) of the embedded "train" or "val" split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train, val = sources.embedded_digits(IMAGE_SIZE, 1, VAL_FRACTION, SPLIT_SEED)
    data = train if split == "train" else val
    return data.images, data.labels


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: concurrent ranks never read half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class DigitClassifier(nn.Module):
    """Small CNN on (B, 1, 32, 32) images in [-1, 1]: three conv blocks (conv, batch norm, ReLU,
    2x2 max-pool; 16, 32, 64 channels) → a 128-d penultimate layer → 10 logits.

    ``val_accuracy`` is the share of the 500 embedded val digits it classifies correctly (nan
    until trained or loaded).
    """

    def __init__(self, feature_dim: int = 128):
        super().__init__()
        blocks, c_in = [], 1
        for c_out in (16, 32, 64):  # 32 → 16 → 8 → 4 px
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.body = nn.Sequential(*blocks)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, 10))
        self.val_accuracy = float("nan")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, 128) of images (B, 1, 32, 32) in [-1, 1]."""
        if x.dim() != 4 or x.shape[1:] != (1, 32, 32):
            raise ValueError(f"DigitClassifier takes (B, 1, 32, 32) images, got {tuple(x.shape)}")
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10)."""
        return self.head(self.features(x))


def augment(x: Tensor, recipe: Recipe) -> Tensor:
    """One random affine warp per image: rotation and shift (uniform within the recipe's bounds).

    Generated digits are rarely centred and upright like MNIST's; a classifier that has seen
    small shifts and rotations judges them on shape, not position.
    """
    b, size = x.shape[0], x.shape[-1]
    angle = (torch.rand(b) * 2 - 1) * math.radians(recipe.max_rotation)
    shift = (torch.rand(b, 2) * 2 - 1) * recipe.max_shift * 2 / size  # px → [-1, 1] grid units
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift to [0, 2] so that zero padding brings in background (-1), then back.
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Share of ``images`` whose arg-max logit is their label (model in eval mode)."""
    hits = sum(
        int((model(x).argmax(1) == y).sum())
        for x, y in zip(images.split(batch), labels.split(batch), strict=True)
    )
    return hits / len(images)


def train_digit_classifier(recipe: Recipe = RECIPE, progress: bool = True) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on the embedded train split; reproducible for a recipe.

    AdamW with a one-cycle learning rate, cross-entropy on augmented batches. All randomness
    (initialisation, shuffling, augmentation, dropout) comes from the global RNG seeded with
    ``recipe.seed`` inside ``fork_rng``, so the caller's RNG state is left untouched; training
    runs on one CPU thread with deterministic algorithms, so the weights do not depend on the
    machine's core count (about 25 s on one core).
    """
    from tqdm.auto import tqdm

    images, labels = embedded_split("train")
    steps_per_epoch = len(images) // recipe.batch_size
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # fork_rng keeps the caller's RNG; grad is forced on so callers in no-grad code may train it.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)  # CPU reductions split by thread count: same weights everywhere
        try:
            model = DigitClassifier()
            opt = torch.optim.AdamW(
                model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
            )
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
            )
            bar = tqdm(
                total=recipe.epochs * steps_per_epoch,
                desc="training the digit classifier (once, then cached)",
                disable=not progress,
            )
            model.train()
            for _ in range(recipe.epochs):
                order = torch.randperm(len(images))[: steps_per_epoch * recipe.batch_size]
                for idx in order.view(steps_per_epoch, recipe.batch_size):
                    loss = F.cross_entropy(model(augment(images[idx], recipe)), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.close()
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
    model.eval()
    model.val_accuracy = accuracy(model, *embedded_split("val"))
    return model


def cache_key(recipe: Recipe = RECIPE) -> str:
    """sha256 (first 16 hex digits) of the embedded digits (pixels and labels) and the recipe."""
    images, labels = sources.load_embedded_digits()
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(repr(recipe).encode())
    return h.hexdigest()[:16]


def digit_classifier(cache_dir: str | Path | None = None, progress: bool = True) -> DigitClassifier:
    """The embedded-digits classifier: loaded from the cache, trained (about 25 s) when missing.

    The file ``<cache_dir>/digit_classifier-<hash>.pt`` holds a plain dict ``{state_dict,
    val_accuracy, recipe}`` and is read with ``weights_only=True``; the hash covers the data and
    the recipe, so a change of either trains a new classifier.

    Args:
        cache_dir: where the file lives; default $DIFFUSION_APPS_CACHE or ~/.cache/diffusion_apps.
        progress: show a progress bar while training.

    Returns:
        The classifier in eval mode with ``requires_grad`` off and ``val_accuracy`` set.
    """
    path = resolve_cache_dir(cache_dir) / f"digit_classifier-{cache_key()}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "state_dict" not in saved:
            raise RuntimeError(
                f"{path} is not a digit-classifier cache file (expected a dict with state_dict, "
                "val_accuracy, recipe); delete it to retrain"
            )
        model = DigitClassifier()
        model.load_state_dict(saved["state_dict"])
        model.val_accuracy = float(saved["val_accuracy"])
    else:
        model = train_digit_classifier(RECIPE, progress)
        state = {
            "state_dict": model.state_dict(),
            "val_accuracy": model.val_accuracy,
            "recipe": repr(RECIPE),
        }
        save_atomic(state, path)
    return model.eval().requires_grad_(False)
