"""SampleQuality: sample-quality metrics of the model in training, logged to TensorBoard.

Configured in YAML like any callback::

    trainer:
      callbacks:
        - class_path: diffusion_apps.evaluation.callback.SampleQuality
          init_args: {every_n_val_epochs: 4, num_samples: 1000, sampler: ddim, steps: 50}
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from diffusion_apps.distributed import rank_share
from diffusion_apps.evaluation.protocol import GRID_SIZE, MIN_SAMPLES
from diffusion_apps.methods.protocol import SampleRequest, generation_of


class SampleQuality(L.Callback):
    """Every N validations, M samples of the module's ``sample()`` scored against real data
    (a module that declares a :class:`~diffusion_apps.methods.protocol.Generation`; others are
    skipped, with a note).

    When: at the start of the first validation batch. By then every callback's
    ``on_validation_epoch_start`` has run, so an EMA (WeightAveraging) callback has swapped its
    averaged weights in, whatever the order of the callbacks (it swaps them back only in
    ``on_validation_epoch_end``): the samples come from the EMA weights, like the checkpoint's.
    Sanity-check validations do not count.

    What: :class:`~diffusion_apps.evaluation.FeatureStats` of the samples against the cached
    features of the real *training* split of the trainer's data module
    (:mod:`~diffusion_apps.evaluation.reference`; ``space="digits"``: the digit classifier's
    features, reported as ``fd_digits``, never FID, with a warning when the data is not grayscale
    digits; ``"inception"``: FID/KID/IS/P&R). Logged as
    ``quality/<metric>@<M>`` (e.g. ``quality/fd_digits@1000``), ``quality/n_fake`` and
    ``quality/n_real`` (samples and reference images actually used), a grid
    ``quality/samples``, and once a text ``quality/protocol`` naming sampler, seed and reference.

    DDP: rank r draws its share of M (``M // world`` plus one for the first ``M % world`` ranks)
    with the generator seed ``seed + r``, so no two ranks draw the same noise; the metric gathers
    every rank's features when computing, each rank logs the same numbers and the loggers write
    them from rank 0. The metric (and the cached reference features, and on first use the digit
    classifier) is built in ``setup``, on rank 0 first.

    Args:
        every_n_val_epochs: evaluate at every N-th validation run.
        num_samples: M, samples in total over all ranks.
        batch_size: samples per ``sample()`` call.
        sampler: one of the module's samplers (checked at setup); default: the module's.
        steps: sampler steps; default: the module's.
        space: feature space of the metrics.
        feature_extractor_weights_path: local Inception weights (``space="inception"`` offline).
        seed: base seed of the sampling generator (the same every evaluation, so the curve
            shows the model changing, not the noise).
    """

    def __init__(
        self,
        every_n_val_epochs: int = 1,
        num_samples: int = 1000,
        batch_size: int = 250,
        sampler: str | None = None,
        steps: int | None = None,
        space: Literal["digits", "inception"] = "digits",
        feature_extractor_weights_path: str | None = None,
        seed: int = 0,
    ) -> None:
        checks = [
            ("every_n_val_epochs", every_n_val_epochs, every_n_val_epochs >= 1),
            ("num_samples", num_samples, num_samples >= MIN_SAMPLES),
            ("batch_size", batch_size, batch_size >= 1),
            ("steps", steps, steps is None or steps >= 1),
        ]
        for option, value, ok in checks:
            if not ok:
                raise ValueError(f"SampleQuality: invalid {option}={value!r}")
        self.every_n_val_epochs, self.num_samples, self.batch_size = (
            every_n_val_epochs,
            num_samples,
            batch_size,
        )
        self.sampler, self.steps, self.space, self.seed = sampler, steps, space, seed
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.last_samples: Tensor | None = None  # this rank's first samples of the last run (CPU)
        self._metric = None
        self._reference = None  # the Reference the metric holds
        self._val_runs = 0
        self._due = False
        self._results: dict[str, float] | None = None
        self._told_no_sample = False
        self._told_protocol = False

    # -- state: the cadence survives a resume --------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self._val_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_runs = int(state_dict.get("val_runs", 0))

    # -- hooks ---------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num_samples < trainer.world_size:
            raise ValueError(
                f"SampleQuality: num_samples={self.num_samples} is fewer than the "
                f"{trainer.world_size} processes; every rank must draw at least one sample"
            )
        # Here, not in a validation hook: building the metric may train the digit classifier,
        # which validation's inference mode forbids. Rank 0 fills the on-disk caches first,
        # then the other ranks read them.
        generation = generation_of(pl_module)
        if generation is not None:
            asked = SampleRequest(self.sampler, self.steps)
            generation.check(asked, f"SampleQuality: {type(pl_module).__name__}")
        if stage in ("fit", "validate") and self._metric is None and generation is not None:
            if trainer.is_global_zero:
                self._build_metric(trainer)
                warning = self._reference.digits_warning(self.space)
                if warning is not None:
                    rank_zero_warn(f"SampleQuality: {warning}")
            trainer.strategy.barrier("SampleQuality.setup")
            if not trainer.is_global_zero:
                self._build_metric(trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._due = False
        if trainer.sanity_checking:
            return
        self._val_runs += 1
        if self._val_runs % self.every_n_val_epochs:
            return
        if generation_of(pl_module) is None:
            if not self._told_no_sample:
                rank_zero_info(
                    f"SampleQuality: {type(pl_module).__name__} does not sample unconditionally "
                    "(it declares no generation: e.g. an autoencoder, which needs codes); skipped"
                )
                self._told_no_sample = True
            return
        self._due = True

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due:  # the first batch of a due validation: EMA weights are in
            self._due = False
            self._results = self._evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._due = False
        results, self._results = self._results, None
        if results is None:
            return
        for name, value in results.items():
            # Identical on every rank after the metric's sync; the mean keeps them so.
            pl_module.log(name, value, sync_dist=True)
        if trainer.is_global_zero:
            self._log_images(trainer, pl_module, results)

    # -- work ----------------------------------------------------------------------------------

    def _sample_kwargs(self) -> dict[str, Any]:
        return {
            k: v for k, v in (("sampler", self.sampler), ("steps", self.steps)) if v is not None
        }

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        metric = self._metric.to(pl_module.device)
        n = rank_share(self.num_samples, trainer.global_rank, trainer.world_size)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed + trainer.global_rank)
        # Sample under the same autocast as validation_step; extract features outside it.
        precision = getattr(trainer, "precision_plugin", None)
        autocast = precision.val_step_context if precision is not None else contextlib.nullcontext
        kept: list[Tensor] = []
        generation = generation_of(pl_module)
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            with autocast():
                x = pl_module.sample(
                    size, generator=generator, **generation.inputs_for(start, size),
                    **self._sample_kwargs(),
                )  # fmt: skip
            x = x.float()  # (B, C, H, W) in [-1, 1]
            metric.update(x, real=False)
            room = GRID_SIZE - sum(len(k) for k in kept)
            if room > 0:
                kept.append(x[:room].cpu())
        self.last_samples = torch.cat(kept)
        values = metric.compute()
        metric.reset()
        results = {}
        for key, value in values.items():
            suffix = "" if key in ("n_real", "n_fake") else f"@{self.num_samples}"
            results[f"quality/{key}{suffix}"] = float(value)
        return results

    def _build_metric(self, trainer: L.Trainer) -> None:
        """The metric, holding the train split of the trainer's data module as its reference."""
        from diffusion_apps.evaluation import FeatureStats
        from diffusion_apps.evaluation.reference import reference_of, split_set

        data = trainer.datamodule
        if data is None:
            raise ValueError(
                "SampleQuality: the trainer has no data module, whose train split is the "
                "reference the samples are scored against"
            )
        metric = FeatureStats(
            space=self.space, feature_extractor_weights_path=self.feature_extractor_weights_path
        )
        progress = trainer.is_global_zero
        self._reference = reference_of(metric, split_set(data, "train"), progress=progress)
        self._metric = metric

    def _log_images(
        self, trainer: L.Trainer, pl_module: L.LightningModule, results: dict[str, float]
    ) -> None:
        from diffusion_apps.images import grid

        image = grid(self.last_samples)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("quality/samples", image, trainer.global_step)
            if not self._told_protocol and hasattr(experiment, "add_text"):
                experiment.add_text("quality/protocol", self._protocol(pl_module, results))
        self._told_protocol = True

    def _protocol(self, pl_module: L.LightningModule, results: dict[str, float]) -> str:
        generation = generation_of(pl_module)
        sampler, steps = self.sampler or generation.sampler, self.steps or generation.steps
        n_real = int(results.get("quality/n_real", 0))
        warning = self._reference.digits_warning(self.space)
        return (
            f"quality/*@{self.num_samples}: {self.num_samples} samples ({sampler}, {steps} steps, "
            f"generator seed {self.seed} + rank) from the weights validation uses (EMA when the "
            f"EMA callback is on), against {n_real} real images of the "
            f"{self._reference.real.name}, in the {self.space} feature space. fd_digits is a "
            "Fréchet distance in the digit classifier's features, not FID."
            + ("" if warning is None else f" Warning: {warning}.")
        )
