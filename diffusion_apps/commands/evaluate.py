"""``python -m diffusion_apps eval``: every checkpoint scored by its method's protocol, one report.

Generation (a module that declares a ``generation``): for each sampler setting, N samples from
the checkpoint's EMA weights, scored against the cached features of the real training split of
the checkpoint's own data (:mod:`diffusion_apps.evaluation.protocol`,
:mod:`diffusion_apps.evaluation.reference`), or of ``--reference DIR|file.npz``. Autoencoding
(one that declares an ``autoencoding``): the val split reconstructed, scored by MSE/PSNR/SSIM
(LPIPS when its weights are local), and a linear probe of its codes
(:mod:`diffusion_apps.evaluation.autoencoding`). ``--samples DIR|file.npz`` scores images made
elsewhere; ``--samples_out DIR`` keeps the drawn ones, for ``--samples`` to score again. Each
reference's rows follow its floor row: that data's real val against its real train.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Literal

import torch

DEFAULT_SAMPLERS = "ddpm:1000,ddim:100,ddim:50,ddim:20,ddim:10"


def evaluate(
    run_dir: str = "runs",
    ckpt_paths: list[str] | str | None = None,
    num_samples: int = 1000,
    samplers: list[str] | str = DEFAULT_SAMPLERS,
    space: Literal["digits", "inception"] = "digits",
    out_dir: str = "reports",
    seed: int = 0,
    batch_size: int = 250,
    device: str = "auto",
    precision: Literal["auto", "32", "bf16"] = "auto",
    feature_extractor_weights_path: str | None = None,
    reference: str | None = None,
    samples: str | None = None,
    samples_out: str | None = None,
    inversions: list[Literal["ddim", "edict"]] | None = None,
) -> Path:
    """Evaluate checkpoints (or samples) and write ``<out_dir>/eval.md``, ``eval.json`` and grids.

    Each checkpoint is rebuilt from the config inside it (``weights_only=True``) with its EMA
    weights, and scored by what its method declares: generation metrics for each sampler setting
    (a ``generation``), reconstruction metrics on the val split (an ``autoencoding``), against
    the train split of the checkpoint's own data module, beside that data's floor row (its val
    split against its train split). Under ``torchrun`` (or an initialised process group) each
    rank draws a contiguous run of the sample batches, each batch with its own seed drawn from
    ``seed`` (the same samples as one process draws), and the metric gathers every rank's
    features, in sample order, before the statistics are computed; rank 0 writes the report.

    Args:
        run_dir: searched recursively for ``*.ckpt`` (one per run version, ``last.ckpt`` first).
        ckpt_paths: checkpoints to evaluate instead of searching ``run_dir`` (a list, or one
            path, or comma-separated paths).
        num_samples: N, samples per checkpoint and sampler setting.
        samplers: ``"sampler:steps[:spacing]"`` settings, comma-separated or as a list (spacing:
            default "logsnr" for dpmpp_2m, else the checkpoint's).
        space: feature space: "digits" (the offline digit classifier; ``fd_digits``, meant for
            grayscale digits) or "inception" (FID, KID, IS, P&R).
        out_dir: where the report and the grids go.
        seed: seed of the batch seeds (:func:`~diffusion_apps.distributed.rank_batches`).
        batch_size: samples per forward pass.
        device: "auto" (CUDA when available), "cpu", "cuda", …
        precision: "bf16" runs the network under bfloat16 autocast (the sampler stays fp32);
            "auto": bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX, a
            bf16 GPU), else fp32. The choice is printed and written in the report.
        feature_extractor_weights_path: local Inception weights for ``space="inception"`` offline.
        reference: a folder of images (read at the samples' size and channels) or an npz
            (``arr_0``: uint8 N x H x W x C, as stored) to score against instead of each
            checkpoint's data; it has no floor row.
        samples: a folder or npz of images made elsewhere, scored against ``reference`` (then
            ``run_dir`` is not searched; checkpoints named by ``ckpt_paths`` still are).
        samples_out: keep the samples: each rank writes its batches as they are drawn into
            ``<samples_out>/<checkpoint>_<sampler><steps>_<precision>_n<N>_seed<seed>/`` (one
            folder per checkpoint and sampler setting), as ``sample`` does: ``000000.png``…
            named by sample index, each whole or absent, and ``samples.npz`` (the ADM
            evaluator's layout) once the setting is done. Stopped (SIGTERM, Ctrl-C), the PNGs
            written stay; ``--samples`` scores a folder or npz again.
        inversions: a diffusion autoencoder's inferred-x_T rows, one per inversion: "ddim"
            (default) and/or "edict" (exact, p = 0.93:
            :mod:`diffusion_apps.diffusion.exact_inversion`).

    Returns:
        The path of ``eval.md``.
    """
    from diffusion_apps.checkpoint import CheckpointError, load_module, read_checkpoint
    from diffusion_apps.commands.common import (
        check_disk_room,
        checkpoint_data,
        checkpoint_paths,
        device_and_precision,
        parse_samplers,
        writable_folder,
    )
    from diffusion_apps.commands.sample import SampleFiles, disk_need, probe
    from diffusion_apps.diffusion import Inversion
    from diffusion_apps.distributed import process_group
    from diffusion_apps.evaluation import FeatureStats
    from diffusion_apps.evaluation.autoencoding import probe_row, reconstruction_rows
    from diffusion_apps.evaluation.protocol import (
        MIN_SAMPLES,
        check_samplers,
        floor_row,
        generation_rows,
        plain_metrics,
    )
    from diffusion_apps.evaluation.reference import (
        data_reference,
        describe,
        image_set,
        reference_of,
        samples_set,
        score,
    )
    from diffusion_apps.evaluation.report import Row, eval_header, slug, write_report
    from diffusion_apps.images import save_grid
    from diffusion_apps.methods.protocol import autoencoding_of, generation_of

    if num_samples < MIN_SAMPLES or batch_size < 1:
        raise ValueError(
            f"eval: num_samples must be >= {MIN_SAMPLES} and batch_size >= 1, "
            f"got {num_samples}, {batch_size}"
        )
    if samples is not None and reference is None:
        raise ValueError(
            f"eval --samples {samples}: give --reference DIR|file.npz, the real images to score "
            "them against"
        )
    settings = parse_samplers(samplers)
    paths = [] if samples and not ckpt_paths else checkpoint_paths(run_dir, ckpt_paths, "eval")
    rank, world = process_group()
    if -(-num_samples // batch_size) < world:  # every rank needs a batch of samples
        raise ValueError(
            f"num_samples={num_samples} in batches of {batch_size} are fewer batches than the "
            f"{world} processes: lower --batch_size"
        )
    dev, precision = device_and_precision(device, precision)
    out = writable_folder(out_dir) if rank == 0 else Path(out_dir)
    if samples_out is not None and rank == 0:
        writable_folder(samples_out, "--samples_out")
    args = dict(space=space, num_samples=num_samples, seed=seed, batch_size=batch_size,
                precision=precision)  # fmt: skip
    given = samples_set(samples, "--samples") if samples is not None else None
    # Rank 0 fills the on-disk caches first (the digit classifier may need training).
    weights = feature_extractor_weights_path
    metric = rank_zero_first(lambda: FeatureStats(space, feature_extractor_weights_path=weights),
                             rank, world).to(dev)  # fmt: skip
    references, groups, notes = {}, {}, []  # source -> Reference; Reference.key -> rows

    def use_reference(source, make):
        """The Reference of ``source`` (made once by ``make``, its floor row first in its
        group), set as ``metric``'s."""
        if source not in references:
            references[source] = ref = rank_zero_first(make, rank, world)
            if ref.key not in groups:
                held_out = ref.held_out is not None
                groups[ref.key] = [floor_row(ref, metric)] if held_out else []
                warning = ref.digits_warning(space)
                notes.extend([] if warning is None else [f"Warning: {warning}."])
                if warning is not None and rank == 0:
                    print(f"eval: warning: {warning}", file=sys.stderr)
        references[source].use(metric)
        return references[source]

    def user_reference(channels: int, size: int):
        real = image_set(reference, "--reference", size, channels)
        if real.channels != channels:
            raise ValueError(
                f"--reference {reference}: {real.channels} channel(s), but the samples have "
                f"{channels}; give a reference of {channels} channel(s)"
            )
        if real.size != (size, size) and rank == 0:
            print(f"eval: warning: --reference {reference} is {real.size[0]}x{real.size[1]} px, "
                  f"the samples {size}x{size} px; each is used as it is")  # fmt: skip
        return reference_of(metric, real, progress=rank == 0)

    def checkpoint_reference(name, ckpt, module, data):
        if reference is not None:
            c, s, _ = module.sample_shape
            return use_reference((c, s), lambda: user_reference(c, s))
        hparams = ckpt.get("datamodule_hyper_parameters")
        if not hparams and rank == 0:
            print(f"eval: {name} names no data; scored against {describe(data)}; give "
                  "--reference for its own")  # fmt: skip
        source = repr(sorted(hparams.items())) if hparams else module.sample_shape
        return use_reference(source, lambda: data_reference(metric, data, progress=rank == 0))

    written: list[Path] = []  # the folders of samples_out

    def sample_files(name, module):
        """``files(setting)`` for :func:`generation_rows`: the setting's folder under
        ``samples_out``, made and checked for room, and its :class:`SampleFiles`."""
        inputs = generation_of(module).inputs_for(0, 1, None, None)

        def files(setting):
            stem = f"{slug(setting.label)}{setting.steps}_{precision}_n{num_samples}_seed{seed}"
            folder = writable_folder(Path(samples_out) / f"{slug(name)}_{stem}", "--samples_out")
            spacing = {} if setting.spacing is None else {"spacing": setting.spacing}
            shape, labelled = probe(module, inputs, {"sampler": setting.name, **spacing})
            if rank == 0:
                check_disk_room(folder, *disk_need(num_samples, shape, True, True, labelled))
            written.append(folder)
            return SampleFiles(folder, num_samples, shape, labelled, rank=rank, world=world)

        return None if samples_out is None else files

    if given is not None:
        c, s = given.channels, min(given.size)
        ref = use_reference((c, s), lambda: user_reference(c, s))
        metrics = plain_metrics(score(metric, given))
        groups[ref.key].append(
            Row(str(samples), "samples", None, "–", None, given.num, metrics, None, ref.line())
        )
    loaded = []
    for path in paths:
        try:
            loaded.append((path, read_checkpoint(path), load_module(path).to(dev)))
        except CheckpointError as err:
            print(f"eval: skipped {path}: {err}", file=sys.stderr)
    check_samplers(settings, [g for *_, m in loaded if (g := generation_of(m)) is not None])
    for path, ckpt, module in loaded:
        name = str(path) if ckpt_paths else os.path.relpath(path, run_dir)
        method, step = type(module).__name__, int(ckpt.get("global_step", 0))
        generation, autoencoding = generation_of(module), autoencoding_of(module)
        if not (generation or autoencoding):
            if rank == 0:
                print(f"eval: {path}: {method} declares neither a generation nor an "
                      "autoencoding; skipped")  # fmt: skip
            continue
        data = checkpoint_data(ckpt, module)
        ref = checkpoint_reference(name, ckpt, module, data)
        new: list[Row] = []
        if generation is not None:
            files = sample_files(name, module)
            drawn, grids = generation_rows(
                module, name, step, settings, metric, args, rank, world, files
            )
            new += drawn
            notes += [generation.note] if generation.note else []
            for stem, grid in grids if rank == 0 else ():
                save_grid(grid, out / "grids" / f"{slug(name)}_{slug(stem)}.png")
        if autoencoding is not None:
            asked = [Inversion(kind) for kind in inversions or ["ddim"]]
            new += reconstruction_rows(module, data, name, step, rank, world, seed, metric, asked)
            new += [row for row in [probe_row(module, data, name, step)] if row is not None]
        groups[ref.key] += [dataclasses.replace(row, reference=ref.line()) for row in new]
    rows = [row for group in groups.values() for row in group]
    if not any(row.method != "FLOOR" for row in rows):
        sys.exit(f"eval: none of the {len(paths)} checkpoint(s) could be evaluated")
    if written:
        notes.append(f"Samples kept under {samples_out}: {len(written)} folder(s) of PNGs and "
                     "samples.npz, one per checkpoint and sampler setting.")  # fmt: skip
    md = out / "eval.md"
    if rank == 0:
        for folder in written:
            print(f"eval: wrote {num_samples} samples (PNGs, samples.npz) to {folder}")
        network = f"{precision} network precision on {dev}" if loaded else "no checkpoint sampled"
        header = eval_header(rows, space, seed, network, notes)
        md, js = write_report(rows, header, out)
        print(f"wrote {md}, {js} and sample grids under {out / 'grids'}")
    return md


def rank_zero_first(make, rank: int, world: int):
    """``make()`` on rank 0, then (after a barrier) on the other ranks: rank 0 fills the on-disk
    caches that they then read."""
    value = make() if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    return value if rank == 0 else make()
