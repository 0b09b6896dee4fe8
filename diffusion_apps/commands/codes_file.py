"""``codes.pt``: a diffusion autoencoder's codes of the user's images, to edit many times.

A plain dict that ``torch.load(weights_only=True)`` reads (tensors, strings, numbers, lists)::

    format       "diffusion_apps.codes/1"
    z_sem        float32 (N, D)        the semantic codes z = Enc(x_0)
    x_T          float32 (N, C, H, W)  the stochastic codes, DDIM inversion of x_0 given z
                                       (EDICT: the x of its pair)
    inversion    str                   "ddim" or "edict" (a file without it: "ddim")
    y_T, mix     float32 (N, C, H, W), float   EDICT only: the y of its pair, its mixing p
    images       uint8 (N, C, H, W)    the inputs as the model saw them (for the grids)
    files        list of N str         where each image came from
    encode_steps int                   inversion steps; timesteps: int64, their subsequence
    steps        int                   the decoding steps that reproduce the reconstruction
    spacing      str                   the checkpoint's timestep spacing
    recipe       str                   how the files became inputs (data.files.recipe)
    checkpoint   str                   the checkpoint's path; weights_sha256: its weights' hash
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion_apps.diffusion.exact_inversion import CoupledCode, Inversion
from diffusion_apps.methods.diffusion_autoencoder import Codes

FORMAT = "diffusion_apps.codes/1"


@dataclass
class CodesFile:
    """What ``codes.pt`` holds (see the module docstring)."""

    codes: Codes
    images: Tensor
    files: list[str]
    encode_steps: int
    timesteps: Tensor
    steps: int
    spacing: str
    recipe: str
    checkpoint: str
    weights_sha256: str

    def save(self, path: Path) -> Path:
        """Write it whole or not at all (a temporary file renamed over ``path``)."""
        record = {k: v for k, v in vars(self).items() if k != "codes"}
        x_T = self.codes.x_T.float().cpu()
        record.update(format=FORMAT, z_sem=self.codes.z.float().cpu(), inversion="ddim", x_T=x_T)
        if isinstance(x_T, CoupledCode):
            record.update(inversion="edict", x_T=x_T.x, y_T=x_T.y, mix=x_T.mix)
        partial = path.with_name(f".{path.name}.partial")
        torch.save(record, partial)
        partial.replace(path)
        return path


def read_codes(path: str | Path) -> CodesFile:
    """``codes.pt`` read with ``weights_only=True``; a ValueError names the file and what is
    wrong (not a codes file, a missing entry, shapes that disagree)."""
    from diffusion_apps.checkpoint import CheckpointError, read_tensors

    try:
        record = read_tensors(path)
    except CheckpointError as err:
        raise ValueError(f"--codes: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"--codes: {path} is not a codes file of `autoencode --mode encode`")
    fields = [f for f in CodesFile.__dataclass_fields__ if f != "codes"]
    missing = [k for k in ("z_sem", "x_T", *fields) if k not in record]
    if missing:
        raise ValueError(f"--codes: {path} lacks {', '.join(missing)}")
    z, x_T, images = record["z_sem"], record["x_T"], record["images"]
    n = len(record["files"])
    ok = (
        isinstance(z, Tensor) and z.dim() == 2 and isinstance(x_T, Tensor) and x_T.dim() == 4
        and isinstance(images, Tensor) and images.shape == x_T.shape
        and len(z) == len(x_T) == n > 0
    )  # fmt: skip
    if not ok:
        shapes = [tuple(getattr(record[k], "shape", ())) for k in ("z_sem", "x_T", "images")]
        raise ValueError(
            f"--codes: {path}: z_sem (N, D), x_T and images (N, C, H, W) for its {n} files "
            f"disagree: {shapes}"
        )
    kind = record.get("inversion", "ddim")
    if kind == "edict":
        y_T, mix = record.get("y_T"), record.get("mix")
        if not isinstance(y_T, Tensor) or y_T.shape != x_T.shape or not isinstance(mix, float):
            raise ValueError(
                f"--codes: {path} holds EDICT codes but no y_T shaped like its x_T "
                f"{tuple(x_T.shape)} and float mix p"
            )
        x_T = CoupledCode(x_T.float(), y_T.float(), mix)
    elif kind != "ddim":
        raise ValueError(f"--codes: {path}: unknown inversion {kind!r} (ddim or edict)")
    return CodesFile(Codes(z.float(), x_T.float()), **{k: record[k] for k in fields})


def inversion_of(codes: CodesFile) -> Inversion:
    """How the codes were inverted: EDICT with their p, or DDIM."""
    x_T = codes.codes.x_T
    return Inversion("edict", x_T.mix) if isinstance(x_T, CoupledCode) else Inversion()


def check_codes_match(
    codes: CodesFile, path: str | Path, module, weights_sha256: str, asked: Inversion | None = None
) -> None:
    """Codes decode only with the weights that made them (the same hash, z width, x_T shape)
    and by the inversion that made them: ``asked``, when given, must be theirs."""
    made = inversion_of(codes)
    if asked is not None and asked != made:
        how = made.kind + (f" (p = {made.mix})" if made.kind == "edict" else "")
        raise ValueError(
            f"--codes: {path} holds codes of {how} inversion, not of --inversion {asked.kind}"
            + (f" (p = {asked.mix})" if asked.kind == "edict" else "")
            + ": encode again with that inversion, or drop --inversion to decode them as made"
        )
    if codes.weights_sha256 != weights_sha256:
        raise ValueError(
            f"--codes: {path} was encoded by other weights ({codes.checkpoint}); decode it with "
            "that checkpoint"
        )
    shape = tuple(module.sample_shape)
    if tuple(codes.codes.x_T.shape[1:]) != shape:
        raise ValueError(
            f"--codes: {path} holds x_T of {tuple(codes.codes.x_T.shape[1:])}, the model {shape}"
        )
