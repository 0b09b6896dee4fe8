"""``make eval``'s autoencoding protocol: val reconstructions, and a linear probe of the codes.

For a module that declares an ``autoencoding``: MSE, PSNR, SSIM (LPIPS when local) of the val
split's ``reconstruct(x)``. One with a stochastic code (DiffAE's ``encode`` /
``encode_stochastic`` / ``decode``) gets a row of x_T inferred by each asked inversion (DDIM's,
EDICT's exact pair) and one of x_T ~ N(0, I), each stage timed per batch, and with labelled data
a linear-probe row: the accuracy of a one-vs-rest logistic probe fitted on the train split's
codes, scored on val, next to the same probe on raw pixels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from diffusion_apps.diffusion.exact_inversion import Inversion
from diffusion_apps.distributed import batch_seeds, max_over_ranks
from diffusion_apps.evaluation.protocol import plain_metrics
from diffusion_apps.evaluation.reconstruction import ReconstructionMetrics
from diffusion_apps.evaluation.report import Row
from diffusion_apps.methods.probe import LinearProbe, encode_all
from diffusion_apps.methods.protocol import has_stochastic_code


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _timed_reconstruction(module, x, inferred: bool, generator, times: dict) -> torch.Tensor:
    """decode(encode(x), x_T) stage by stage, adding each stage's seconds to ``times``."""
    tic = _synced(x.device)
    z_sem = module.encode(x)
    times["encode_s"] += (toc := _synced(x.device)) - tic
    if inferred:
        x_T = module.encode_stochastic(x, z_sem)
        times["invert_s"] += (tic := _synced(x.device)) - toc
    else:
        x_T = module.inversion.noise(x, generator)
        tic = toc
    x_hat = module.decode(z_sem, x_T)
    times["decode_s"] += _synced(x.device) - tic
    return x_hat


def reconstruction_rows(
    module, data, name, step, rank, world, seed: int = 0, features=None,
    inversions: Sequence[Inversion] = (Inversion(),),
) -> list[Row]:  # fmt: skip
    """One row per x_T mode (inferred by each of ``inversions``, then random, DDIM-decoded) for
    DiffAE-like modules, else one row of ``reconstruct(x)``. Batches are split across ranks;
    seconds are each rank's wall time, the slowest rank's reported; ``*_s`` metrics are seconds
    per val batch of that stage.

    ``features``, a FeatureStats holding the train split's reference, adds the generation metrics
    of the reconstructions (fd_digits, and in the digits space the share still classified as
    their input's label: ``accuracy``)."""
    from tqdm.auto import tqdm

    staged = has_stochastic_code(module)
    inferred_modes = [(_inferred_label(inv), True, inv) for inv in inversions]
    modes = [*inferred_modes, ("random x_T", False, Inversion())] if staged else [("", None, None)]
    method = type(module).__name__
    rows = []
    kept = getattr(module, "inversion", None)
    for label, inferred, inversion in modes:
        if staged:
            module.inversion = inversion
        metric = ReconstructionMetrics().to(module.device)
        stages = ("encode_s", "invert_s", "decode_s") if inferred else ("encode_s", "decode_s")
        times = dict.fromkeys(stages, 0.0) if staged else {}
        loader, batches, seconds = data.val_dataloader(), 0, 0.0
        seeds = batch_seeds(seed, len(loader))  # random x_T: the same whatever the ranks
        desc = f"{name} reconstruct {label}".strip()
        for i, batch in enumerate(tqdm(loader, desc=desc, disable=rank != 0, leave=False)):
            if i % world != rank:
                continue
            x, y = batch[0], batch[1]  # a captioned batch has a third element
            generator = torch.Generator(module.device).manual_seed(seeds[i])
            x = x.to(module.device)
            tic = _synced(module.device)
            with torch.no_grad():
                if staged:
                    x_hat = _timed_reconstruction(module, x, inferred, generator, times)
                else:
                    x_hat = module.reconstruct(x)
            seconds += _synced(module.device) - tic
            batches += 1
            metric.update(x_hat.float(), x)
            if features is not None:
                labelled = features.space == "digits" and bool(((y >= 0) & (y <= 9)).all())
                labels = y.to(module.device) if labelled else None
                features.update(x_hat.float(), real=False, labels=labels)
        metrics = plain_metrics(metric.compute())
        if features is not None:
            metrics.update(plain_metrics(features.compute()))
            features.reset()
        metrics.update({k: max_over_ranks(v, world) / max(batches, 1) for k, v in times.items()})
        sampler = f"reconstruct, {label}" if label else "reconstruct"
        nfe = _reconstruction_nfe(module, inferred, inversion) if staged else None
        seconds = max_over_ranks(seconds, world)
        rows.append(Row(name, method, step, sampler, nfe, int(metrics["n"]), metrics, seconds))
    if staged:
        module.inversion = kept
    return rows


def _inferred_label(inversion: Inversion) -> str:
    """ "inferred x_T" (DDIM, the rows' old name), "inferred x_T, EDICT p = 0.93"."""
    if inversion.kind == "ddim":
        return "inferred x_T"
    return f"inferred x_T, EDICT p = {inversion.mix:g}"


def _reconstruction_nfe(module, inferred: bool, inversion: Inversion) -> int:
    """Network evaluations per image: the decoder's steps, plus the inversion's (EDICT: two a
    step each way)."""
    steps = len(module.timesteps(module.sample_steps))
    encode = len(module.timesteps(module.encode_steps)) if inferred else 0
    return inversion.nfe(steps + encode)


def probe_row(module, data, name, step, batch_size: int = 250) -> Row | None:
    """Val accuracy of a linear probe on the codes ``module.encode(x)`` of a DiffAE-like module
    against one on the raw pixels, both fitted on the train split; None for other modules or
    without labels."""
    if not has_stochastic_code(module) or not data.num_classes:
        return None
    loaders = [DataLoader(s, batch_size=batch_size) for s in (data.train_set, data.val_set)]
    tic = time.perf_counter()
    (z_train, y_train), (z_val, y_val) = (
        encode_all(module.encode, b, module.device) for b in loaders
    )
    (p_train, _), (p_val, _) = (encode_all(lambda x: x, b) for b in loaders)
    k = data.num_classes
    metrics = {
        "probe_acc": LinearProbe.fit(z_train, y_train, k).accuracy(z_val, y_val),
        "probe_acc_pixels": LinearProbe.fit(p_train, y_train, k).accuracy(p_val, y_val),
        "n": len(y_val),
    }
    seconds = time.perf_counter() - tic
    return Row(
        name, type(module).__name__, step, "linear probe", None, len(y_val), metrics, seconds
    )
