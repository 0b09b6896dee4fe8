"""The evaluation report: ``eval.md`` (a table) and ``eval.json`` (the same rows), and PNG grids."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Column order of the metrics; a metric not listed here comes after them, alphabetically.
METRIC_ORDER = (
    "fd_digits",
    "kid_digits",
    "precision_digits",
    "recall_digits",
    "accuracy",
    "confidence",
    "class_entropy",
    "fid",
    "kid",
    "precision",
    "recall",
    "inception_score",
    "mse",
    "psnr",
    "ssim",
    "lpips",
    "encode_s",
    "invert_s",
    "decode_s",
    "probe_acc",
    "probe_acc_pixels",
)
# Shown as "mean ± std" in the mean's column.
STD_OF = {
    "kid_digits": "kid_digits_std",
    "kid": "kid_std",
    "inception_score": "inception_score_std",
}
# Already in their own columns (N) or in the header (the reference size).
NOT_COLUMNS = {"n", "n_real", "n_fake", *STD_OF.values()}


@dataclass
class Row:
    """One line of the report: a checkpoint under one sampler setting, or the real-data floor;
    ``reference``: the line naming the real set it is scored against (its table's heading)."""

    checkpoint: str
    method: str
    steps_trained: int | None
    sampler: str
    nfe: int | None
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    reference: str = ""


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    value += 0.0  # no "-0"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def metric_columns(rows: list[Row]) -> list[str]:
    """The metrics any row has, in :data:`METRIC_ORDER`, std and counts folded away."""
    present = {k for row in rows for k in row.metrics} - NOT_COLUMNS
    known = [k for k in METRIC_ORDER if k in present]
    return known + sorted(present - set(known))


def table(rows: list[Row], columns: list[str]) -> list[str]:
    """The markdown table of ``rows`` with the metric ``columns``."""
    names = ["checkpoint", "method", "steps", "sampler", "NFE", "N", *columns, "seconds"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [
            f"`{row.checkpoint}`" if row.method != "FLOOR" else f"**{row.checkpoint}**",
            row.method,
            _fmt(row.steps_trained),
            row.sampler,
            _fmt(row.nfe),
            _fmt(row.num_samples),
        ]
        for key in columns:
            value = row.metrics.get(key)
            cell = _fmt(value)
            if value is not None and STD_OF.get(key) in row.metrics:
                cell += f" ± {_fmt(row.metrics[STD_OF[key]])}"
            cells.append(cell)
        cells.append("–" if row.seconds is None else f"{row.seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[Row], header: list[str]) -> str:
    """The report as markdown: title, the protocol lines, then one table row per :class:`Row`;
    rows scored against different references get a table each, headed by the reference."""
    columns = metric_columns(rows)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.reference, []).append(row)
    lines = ["# Evaluation", "", *header, ""]
    for reference, members in groups.items():
        if len(groups) > 1:
            lines += [f"## {reference[0].upper()}{reference[1:]}", ""]
        lines += [*table(members, columns), ""]
    return "\n".join(lines[:-1]) + "\n"


def write_report(rows: list[Row], header: list[str], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``eval.md`` and ``eval.json`` (``{"header": [...], "rows": [...]}``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    md.write_text(markdown(rows, header))
    payload = {"header": header, "rows": [asdict(row) for row in rows]}
    js.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return md, js


def slug(name: str) -> str:
    """``name`` as a file name: characters other than letters, digits, ``-`` and ``.`` → ``_``."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


def eval_header(
    rows: list[Row], space: str, seed: int, network: str, notes: list[str]
) -> list[str]:
    """The lines above ``eval``'s tables: each reference and its floor (the ``reference`` of the
    rows), the feature space, how samples were drawn (``network``: the precision and device),
    what reconstruction rows mean when there are some, and ``notes`` (each method's own, and
    warnings; once each)."""
    features, note = "Inception-v3 pool features (torch-fidelity): FID, KID, IS", ""
    if space == "digits":
        from diffusion_apps.evaluation import digit_classifier

        accuracy = digit_classifier(progress=False).val_accuracy
        features = f"the digit classifier's features (its val accuracy: {accuracy:.2%})"
        note = " fd_digits is a Fréchet distance in those features, not FID."
    references = list(dict.fromkeys(row.reference for row in rows))
    which = "it" if len(references) == 1 else "the reference its table is headed by"
    header = [f"{r[0].upper()}{r[1:]}." for r in references] + [
        f"Features: {features}; every row compares its N images against {which}; a FLOOR row "
        f"scores the real val split against the real train split of the same data.{note}",
        f"Samples from the checkpoints' EMA weights, batch seeds drawn from seed {seed}, the "
        "same x_T for every sampler; KID as mean ± std over 100 subsets; precision/recall with "
        f"k = 3 nearest neighbours; seconds: sampling wall time ({network}).",
    ]
    if any(row.sampler.startswith("reconstruct") for row in rows):
        header.append(
            "Reconstruction rows: the val split through the EMA weights in fp32, images on [0, 1] "
            "(MSE per pixel value, PSNR from it); DiffAE, PDAE: x_T by DDIM inversion, or by "
            "EDICT's exact inversion and EDICT decoding where the row says so (two network calls "
            "a step; NFE counts inversion and decoding), or x_T ~ N(0, I) decoded by DDIM; "
            "encode_s/invert_s/decode_s seconds per val batch. Linear probe: val accuracy of "
            "one-vs-rest logistic regression fitted on the "
            "train split's codes (probe_acc) and on its raw pixels (probe_acc_pixels). "
            "fd_digits and accuracy of a reconstruction row score the reconstructions as if "
            "generated: accuracy is the share classified as their input's label."
        )
    return header + list(dict.fromkeys(notes))
