"""``python -m diffusion_apps eval``: every checkpoint scored by its method's protocol, one report.

Generation (a module with ``sample``): for each sampler setting, N samples from the checkpoint's
EMA weights, scored against the cached features of the real training split. Autoencoding (a
module with ``reconstruct``): the val split reconstructed, scored by MSE/PSNR/SSIM (LPIPS when its
weights are local), and a linear probe of its codes (``evaluation.autoencoding``). The report's
first row is always the floor: real val against real train.
"""

from __future__ import annotations

import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from diffusion_apps.distributed import first_images, max_over_ranks, process_group, rank_batches

DEFAULT_SAMPLERS = "ddpm:1000,ddim:100,ddim:50,ddim:20,ddim:10"
TRAIN_HINT = (
    "train one with `python -m diffusion_apps fit --config configs/ddpm.yaml` (or `make demo`), "
    "or name checkpoints with --ckpt_paths"
)
GRID_SIZE = 64  # images in a sample grid
MIN_SAMPLES = 4  # precision/recall with k = 3 neighbours needs k + 1 points


# -- small pieces shared with the training callback ---------------------------------------------


def can_sample(module) -> bool:
    """Whether ``module.sample(n)`` draws images from nothing (an autoencoder's needs a code z)."""
    return callable(getattr(module, "sample", None)) and getattr(
        module, "generates_unconditionally", True
    )


def set_reference(metric, space: str, weights_path: str | None = None) -> None:
    """Give ``metric`` (a FeatureStats) the cached features of the real training split."""
    from diffusion_apps.evaluation import mean_cov, reference_features

    feats = reference_features(space, "train", feature_extractor_weights_path=weights_path)
    metric.set_reference(*mean_cov(feats), feats)  # feats: (N, d)


class SamplerSetting(NamedTuple):
    """One ``sampler:steps[:spacing]`` item of ``--samplers``."""

    name: str
    steps: int
    spacing: str | None = None  # the timestep subsequence; None: the checkpoint's

    @property
    def label(self) -> str:
        """How the report names it: ``ddim``, or ``dpmpp_2m (logsnr)``."""
        return self.name if self.spacing is None else f"{self.name} ({self.spacing})"


def parse_samplers(spec: str | Sequence[str]) -> list[SamplerSetting]:
    """``"ddpm:1000,dpmpp_2m:10:logsnr"`` (or the items as a list) → ``[("ddpm", 1000, None),
    ("dpmpp_2m", 10, "logsnr")]``.

    Whitespace around items is ignored; each item must be ``name:steps`` with steps >= 1,
    optionally followed by ``:spacing`` (a ``timestep_spacing`` of DDPM-based modules).
    """
    items = spec.split(",") if isinstance(spec, str) else [s for x in spec for s in x.split(",")]
    settings = []
    for item in (i.strip() for i in items):
        name, steps, *rest = item.split(":") + [""]
        spacing = rest[0] if len(rest) == 2 else None
        if not name or not steps.isdigit() or int(steps) < 1 or len(rest) > 2 or spacing == "":
            raise ValueError(
                f"--samplers: {item!r} is not 'sampler:steps' or 'sampler:steps:spacing' "
                "(e.g. 'ddim:50', 'dpmpp_2m:10:logsnr')"
            )
        settings.append(SamplerSetting(name, int(steps), spacing))
    if not settings:
        raise ValueError("--samplers: no sampler setting given (e.g. 'ddim:50')")
    return settings


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """One checkpoint per run version under ``run_dir``: its ``last.ckpt`` when there is one, else
    its newest ``*.ckpt``. Sorted by path."""
    by_run: dict[Path, list[Path]] = {}
    for path in Path(run_dir).rglob("*.ckpt"):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        by_run.setdefault(run, []).append(path)
    chosen = []
    for paths in by_run.values():
        lasts = sorted(p for p in paths if p.name.startswith("last"))
        chosen.append(lasts[0] if lasts else max(paths, key=lambda p: (p.stat().st_mtime, p)))
    return sorted(chosen)


def _sampler_names(module) -> tuple[str, ...] | None:
    """The values ``sample(sampler=...)`` accepts, read from its (or ``draw``'s) ``Literal``
    annotation."""
    cls = type(module)
    try:
        hint = typing.get_type_hints(cls.sample).get("sampler")
        if hint is None and hasattr(cls, "draw"):  # sample(*args) forwarding to draw(...)
            hint = typing.get_type_hints(cls.draw).get("sampler")
    except Exception:  # unresolvable annotations: let sample() judge
        return None
    names, stack = [], [hint]
    while stack:
        h = stack.pop()
        if typing.get_origin(h) is Literal:
            names += [a for a in typing.get_args(h) if isinstance(a, str)]
        else:
            stack += list(typing.get_args(h))
    return tuple(names) or None


def plain_metrics(values: dict) -> dict[str, float | int]:
    """Metric values as Python numbers: counts (``n``, ``n_real``, ``n_fake``) as int."""
    return {k: int(v) if k == "n" or k.startswith("n_") else float(v) for k, v in values.items()}


def _nfe(module, sampler: str, steps: int) -> int:
    """Network evaluations per sample: one per step, at most T. DDPM and DDIM call the network
    once a step, and so does DPM-Solver++(2M): its second order is multistep, reusing the
    previous step's x̂_0."""
    if callable(getattr(module, "nfe", None)):
        return int(module.nfe(sampler, steps))
    schedule = getattr(module, "schedule", None)
    return min(steps, schedule.num_timesteps) if schedule is not None else steps


# -- the protocols ------------------------------------------------------------------------------


def _floor(space: str, weights_path: str | None):
    """The floor row: real val against real train (see ``real_floor``)."""
    from diffusion_apps.evaluation import real_floor
    from diffusion_apps.evaluation.report import Row

    metrics = plain_metrics(real_floor(space, feature_extractor_weights_path=weights_path))
    return Row(
        "FLOOR: real val vs real train", "FLOOR", None, "–", None, metrics["n_fake"], metrics, None
    )


def _check_samplers(settings: list[SamplerSetting], modules: list) -> None:
    """Every setting must be a sampler of at least one of the generating ``modules``."""
    offered = [_sampler_names(m) for m in modules]
    if not modules or None in offered:
        return
    names = list(dict.fromkeys(n for names in offered for n in names))
    for setting in settings:
        if setting.name not in names:
            raise ValueError(
                f"--samplers: no checkpoint has a sampler {setting.name!r} "
                f"(they have {', '.join(names)})"
            )


def _generation_rows(module, name, step, settings, metric, args, rank, world, out_dir):
    """One row per sampler setting. Every setting draws its batches with the same seeds, so the
    samplers are compared on the same x_T (common random numbers), and the samples are the
    same whatever the number of processes (:func:`~diffusion_apps.distributed.rank_batches`)."""
    from tqdm.auto import tqdm

    from diffusion_apps.evaluation.report import Row
    from diffusion_apps.images import save_grid
    from diffusion_apps.precision import autocast

    allowed = _sampler_names(module)
    own = [s for s in settings if allowed is None or s.name in allowed]
    if len(own) < len(settings) and rank == 0:
        skipped = ", ".join(f"{s.name}:{s.steps}" for s in settings if s not in own)
        print(f"eval: {name}: {type(module).__name__} has no sampler of {skipped}; not run")
    if not own:  # e.g. a consistency model among DDPMs: its own default
        own = [SamplerSetting(module.sampler, module.sample_steps)]
    metric = metric.to(module.device)
    batches = rank_batches(args["num_samples"], args["batch_size"], args["seed"], rank, world)
    asked = getattr(module, "class_conditional", False)
    rows = []
    for setting in own:
        sampler, steps = setting.name, setting.steps
        extra = {} if setting.spacing is None else {"spacing": setting.spacing}
        kept, seconds = [], 0.0  # kept: (start, images) of the grid's batches
        bar = tqdm(
            total=sum(size for _, size, _ in batches), desc=f"{name} {sampler}-{steps}",
            unit="img", disable=rank != 0, leave=False,
        )  # fmt: skip
        for start, size, seed in batches:
            generator = torch.Generator(module.device).manual_seed(seed)
            # A class-conditional model is asked for the classes 0, 1, …, 9 in turn.
            labels = torch.arange(start, start + size, device=module.device) % 10 if asked else None
            kw = {"labels": labels.tolist()} if asked else {}
            kw.update(extra)
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            tic = time.perf_counter()
            with autocast(module.device, args["precision"]):
                x = module.sample(
                    size, sampler=sampler, steps=steps, generator=generator, **kw
                ).float()  # (B, C, H, W) in [-1, 1]
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            seconds += time.perf_counter() - tic
            metric.update(x, real=False, labels=labels if args["space"] == "digits" else None)
            if start < GRID_SIZE:
                kept.append((start, x[: GRID_SIZE - start].cpu()))
            bar.update(len(x))
        bar.close()
        grid = first_images(kept, world)
        metrics = plain_metrics(metric.compute())
        metric.reset()
        seconds = max_over_ranks(seconds, world)
        if rank == 0:
            save_grid(
                grid,
                out_dir / "grids" / f"{_slug(name)}_{_slug(setting.label)}{steps}.png",
            )
        nfe = _nfe(module, sampler, steps)
        method = type(module).__name__
        n_total = args["num_samples"]
        rows.append(Row(name, method, step, setting.label, nfe, n_total, metrics, seconds))
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


# -- the command --------------------------------------------------------------------------------


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
) -> Path:
    """Evaluate checkpoints and write ``<out_dir>/eval.md``, ``eval.json`` and sample grids.

    Each checkpoint is rebuilt from the config inside it (``weights_only=True``) with its EMA
    weights, and scored by its method's protocol: generation metrics for each sampler setting
    (modules with ``sample``), reconstruction metrics on the val split (modules with
    ``reconstruct``). Under ``torchrun`` (or an initialised process group) the ranks take the
    sample batches in turn, each batch with its own seed drawn from ``seed`` (the same samples as
    one process draws); rank 0 writes the report.

    Args:
        run_dir: searched recursively for ``*.ckpt`` (one per run version, ``last.ckpt`` first).
        ckpt_paths: checkpoints to evaluate instead of searching ``run_dir`` (a list, or one
            path, or comma-separated paths).
        num_samples: N, samples per checkpoint and sampler setting.
        samplers: ``"sampler:steps[:spacing]"`` settings, comma-separated or as a list (spacing:
            default "logsnr" for dpmpp_2m, else the checkpoint's).
        space: feature space: "digits" (the offline digit classifier; ``fd_digits``) or
            "inception" (FID, KID, IS, P&R).
        out_dir: where the report and the grids go.
        seed: seed of the batch seeds (:func:`~diffusion_apps.distributed.rank_batches`).
        batch_size: samples per forward pass.
        device: "auto" (CUDA when available), "cpu", "cuda", …
        precision: "bf16" runs the network under bfloat16 autocast (the sampler stays fp32);
            "auto": bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX, a
            bf16 GPU), else fp32. The choice is printed and written in the report.
        feature_extractor_weights_path: local Inception weights for ``space="inception"`` offline.

    Returns:
        The path of ``eval.md``.
    """
    from diffusion_apps.checkpoint import (
        CheckpointError,
        load_module,
        read_checkpoint,
        resolve_device,
    )
    from diffusion_apps.evaluation import FeatureStats
    from diffusion_apps.evaluation.autoencoding import (
        checkpoint_data,
        probe_row,
        reconstruction_rows,
    )
    from diffusion_apps.evaluation.report import Row, write_report
    from diffusion_apps.precision import sampling_precision

    if num_samples < MIN_SAMPLES or batch_size < 1:
        raise ValueError(
            f"eval: num_samples must be >= {MIN_SAMPLES} and batch_size >= 1, "
            f"got {num_samples}, {batch_size}"
        )
    settings = parse_samplers(samplers)
    if isinstance(ckpt_paths, str):
        ckpt_paths = [p.strip() for p in ckpt_paths.split(",") if p.strip()]
    if ckpt_paths:  # as named, each file once
        named = {Path(p).resolve(): Path(p) for p in reversed(ckpt_paths)}
        paths = list(reversed(named.values()))
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            sys.exit(f"eval: checkpoint not found: {', '.join(missing)}; {TRAIN_HINT}")
    else:
        paths = find_checkpoints(run_dir)
        if not paths:
            sys.exit(f"eval: no checkpoint (*.ckpt) under {run_dir}/: {TRAIN_HINT}")

    rank, world = process_group()
    if -(-num_samples // batch_size) < world:  # every rank needs a batch of samples
        raise ValueError(
            f"num_samples={num_samples} in batches of {batch_size} are fewer batches than the "
            f"{world} processes: lower --batch_size"
        )
    dev = resolve_device(device)
    precision = sampling_precision(precision, dev)
    out = Path(out_dir)
    args = dict(
        space=space,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        precision=precision,
        weights=feature_extractor_weights_path,
    )

    # Rank 0 fills the on-disk caches first (the digit classifier may need training).
    floor = _floor(space, feature_extractor_weights_path) if rank == 0 else None
    if world > 1:
        torch.distributed.barrier()
    rows: list[Row] = [floor or _floor(space, feature_extractor_weights_path)]
    loaded = []
    for path in paths:
        try:
            loaded.append((path, read_checkpoint(path), load_module(path).to(dev)))
        except CheckpointError as err:
            print(f"eval: skipped {path}: {err}", file=sys.stderr)
    _check_samplers(settings, [m for _, _, m in loaded if can_sample(m)])
    metric = None
    for path, ckpt, module in loaded:
        name = str(path) if ckpt_paths else os.path.relpath(path, run_dir)
        method, step = type(module).__name__, int(ckpt.get("global_step", 0))
        new: list[Row] = []
        if metric is None and (
            can_sample(module) or callable(getattr(module, "reconstruct", None))
        ):
            metric = FeatureStats(space, feature_extractor_weights_path=args["weights"])
            set_reference(metric, space, args["weights"])
        if can_sample(module):
            new += _generation_rows(module, name, step, settings, metric, args, rank, world, out)
        if callable(getattr(module, "reconstruct", None)):
            data = checkpoint_data(ckpt, module)
            metric = metric.to(module.device)
            new += reconstruction_rows(module, data, name, step, rank, world, seed, metric)
            new += [row for row in [probe_row(module, data, name, step)] if row is not None]
        if not new and rank == 0:
            print(f"eval: {path}: {method} has neither sample() nor reconstruct(); skipped")
        rows += new
    if len(rows) == 1:
        sys.exit(f"eval: none of the {len(paths)} checkpoint(s) could be evaluated")

    n_real = int(rows[0].metrics.get("n_real", 0))
    features, note = "Inception-v3 pool features (torch-fidelity): FID, KID, IS", ""
    if space == "digits":
        from diffusion_apps.evaluation import digit_classifier

        accuracy = digit_classifier(progress=False).val_accuracy
        features = f"the digit classifier's features (its val accuracy: {accuracy:.2%})"
        note = " fd_digits is a Fréchet distance in those features, not FID."
    header = [
        f"Reference: the real **train** split of the embedded digits ({n_real} images, 32 px), "
        f"in {features}; every generation row compares its N samples against it.{note}",
        f"FLOOR row: the real val split ({rows[0].num_samples} images) against the same reference.",
        f"Samples from the checkpoints' EMA weights, batch seeds drawn from seed {seed}, the "
        "same x_T for every sampler; KID as mean ± std over 100 subsets; precision/recall with "
        f"k = 3 nearest neighbours; seconds: sampling wall time ({precision} network "
        f"precision on {dev}).",
    ]
    if any(row.sampler.startswith("reconstruct") for row in rows):
        header.append(
            "Reconstruction rows: the val split through the EMA weights in fp32, images on [0, 1] "
            "(MSE per pixel value, PSNR from it); DiffAE, PDAE: x_T by DDIM inversion (NFE counts "
            "inversion and decoding) or x_T ~ N(0, I), encode_s/invert_s/decode_s seconds per val "
            "batch. Linear probe: val accuracy of one-vs-rest logistic regression fitted on the "
            "train split's codes (probe_acc) and on its raw pixels (probe_acc_pixels). "
            "fd_digits and accuracy of a reconstruction row score the reconstructions as if "
            "generated: accuracy is the share classified as their input's label."
        )
    if any(row.method == "LatentDiffusion" for row in rows):
        header.append(
            "Class-conditional rows (LatentDiffusion): asked for the classes 0, 1, …, 9 in turn, "
            "at the checkpoint's guidance scale; accuracy is the share classified as asked."
        )
    if any(row.method == "ConsistencyDistillation" for row in rows):
        header.append(
            "Consistency rows: the student's EMA weights, in fp32 whatever the network precision "
            "(x̂_0 = x̄ − σ ε̂ would multiply bf16 rounding by σ); NFE = consistency steps."
        )
    md = out / "eval.md"
    if rank == 0:
        md, js = write_report(rows, header, out)
        print(f"wrote {md}, {js} and sample grids under {out / 'grids'}")
    return md
