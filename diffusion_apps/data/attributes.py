"""Binary attributes of the user's images, for the attribute probe: a table (CelebA's
``list_attr_celeba.txt`` layout or a CSV), or one-hot classes from a folder's sub-folders.

``list_attr_celeba.txt``: an optional first line holding the number of images, a line of
attribute names, then one row per image, ``file  1 -1 …``, split on any whitespace. A CSV: a
header with a ``file`` (or CelebA's ``image_id``) column and one column per attribute. Values are
1 (has it) and −1 or 0 (has it not), read as 1 and 0.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from diffusion_apps.data.files import ImageFiles
from diffusion_apps.data.sources import listing

FILE_COLUMNS = ("file", "image_id")
VALUES = {"1": 1.0, "-1": 0.0, "0": 0.0}


@dataclass(frozen=True)
class Attributes:
    """``values`` (N, K) float 0/1: attribute k of image ``files[n]`` is ``names[k]``."""

    names: tuple[str, ...]
    files: tuple[str, ...]
    values: Tensor


def _celeba_lines(path: Path) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """(the line of the names, the names, (line, cells) of each row) of a whitespace table,
    checking the count line when there is one."""
    lines = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, cells) for n, cells in lines if cells]
    if not lines:
        raise ValueError(f"{path} is empty: expected attribute names, then rows 'file 1 -1 …'")
    count = None
    if len(lines[0][1]) == 1 and lines[0][1][0].isdigit():
        (_, (count,)), lines = lines[0], lines[1:]
    if not lines:
        raise ValueError(f"{path}: no line of attribute names after the count line")
    (header, names), rows = lines[0], lines[1:]
    if count is not None and int(count) != len(rows):
        raise ValueError(
            f"{path}, line 1: the count line says {count} images, but the table has "
            f"{len(rows)} rows"
        )
    return header, names, rows


def _csv_lines(path: Path) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """The same of a CSV, its file column moved first."""
    with open(path, newline="") as f:
        lines = [(n, [c.strip() for c in cells]) for n, cells in enumerate(csv.reader(f), 1)]
    lines = [(n, cells) for n, cells in lines if any(cells)]
    if not lines:
        raise ValueError(f"{path} is empty: expected a header with a 'file' column")
    (header, columns), rows = lines[0], lines[1:]
    lowered = [c.lower() for c in columns]
    found = [c for c in FILE_COLUMNS if c in lowered]
    if not found:
        raise ValueError(
            f"{path}, line {header}: no 'file' (or 'image_id') column among {', '.join(columns)}"
        )
    at = lowered.index(found[0])

    def first(cells: list[str]) -> list[str]:
        return [cells[at], *cells[:at], *cells[at + 1 :]] if len(cells) == len(columns) else cells

    return header, first(columns)[1:], [(n, first(cells)) for n, cells in rows]


def read_attribute_table(path: str | Path) -> Attributes:
    """The attributes in ``path``: CelebA's ``list_attr_celeba.txt`` layout, or a ``.csv``.

    Raises:
        ValueError: naming the file and line: a row with the wrong number of values, a value
            other than 1, −1 or 0, a file listed twice, no attribute columns, a count line that
            disagrees with the rows, no rows.
    """
    path = Path(path)
    read = _csv_lines if path.suffix.lower() == ".csv" else _celeba_lines
    header, names, rows = read(path)
    if not names:
        raise ValueError(f"{path}, line {header}: no attribute columns")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path}, line {header}: attributes named twice: {', '.join(twice)}")
    if not rows:
        raise ValueError(f"{path}: no rows after the attribute names")
    files, values, seen = [], [], {}
    for line, (file, *cells) in rows:
        if len(cells) != len(names):
            raise ValueError(
                f"{path}, line {line}: {len(cells)} values for {len(names)} attributes"
            )
        bad = [(name, c) for name, c in zip(names, cells, strict=True) if c not in VALUES]
        if bad:
            name, cell = bad[0]
            raise ValueError(f"{path}, line {line}: {name} is {cell!r}, not 1, -1 or 0")
        if file in seen:
            raise ValueError(
                f"{path}, line {line}: {file} is listed again (first on line {seen[file]})"
            )
        seen[file] = line
        files.append(file)
        values.append([VALUES[c] for c in cells])
    return Attributes(tuple(names), tuple(files), torch.tensor(values))


def folder_attributes(
    labels: Sequence[int], class_names: Sequence[str] | None, files: Sequence[str] = ()
) -> Attributes:
    """One-hot attributes of a folder's sub-folder classes (:func:`~diffusion_apps.data.files.
    find_images`): attribute k is "in sub-folder ``class_names[k]``"; ``files`` the images'
    names, for the record."""
    if not class_names:
        raise ValueError("the images have no sub-folder classes to use as attributes")
    index = torch.as_tensor(list(labels), dtype=torch.long)
    if ((index < 0) | (index >= len(class_names))).any():
        raise ValueError(f"labels must be classes in [0, {len(class_names)}), got {index.tolist()}")
    values = torch.nn.functional.one_hot(index, len(class_names)).float()
    return Attributes(tuple(class_names), tuple(files), values)


def match_attributes(table: Attributes, files: ImageFiles, root: Path | None) -> Tensor:
    """The rows (N, K) of ``table`` for ``files``, in their order: each image's row by its path
    relative to ``root`` (the path given, without a root), else by its file name alone (CelebA's
    rows are bare names).

    Raises:
        ValueError: images without a row (up to 5 named, and how many), or whose file name
            matches several rows or is shared by several of the images.
    """
    row_of = {PurePosixPath(f).as_posix(): i for i, f in enumerate(table.files)}
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(table.files):
        by_name.setdefault(PurePosixPath(f).name, []).append(i)
    names = [Path(n).as_posix() for n in files.names(root)]
    image_names = [PurePosixPath(n).name for n in names]
    rows, missing, ambiguous = [], [], []
    for name, base in zip(names, image_names, strict=True):
        if name in row_of:
            rows.append(row_of[name])
        elif len(by_name.get(base, ())) == 1 and image_names.count(base) == 1:
            rows.append(by_name[base][0])
        elif base in by_name:
            ambiguous.append(name)
        else:
            missing.append(name)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(names)} images have no row in the attribute table: "
            f"{listing(missing)}"
        )
    if ambiguous:
        raise ValueError(
            f"{len(ambiguous)} images match attribute rows by file name alone, but that name is "
            f"on several rows or several images: {listing(ambiguous)}; list them in the table "
            "by their path relative to the folder"
        )
    return table.values[rows]


def attribute_index(names: Sequence[str], attribute: str | int) -> int:
    """The index of ``attribute`` among ``names``: a name (case-insensitive) or an index."""
    lowered = [n.lower() for n in names]
    if isinstance(attribute, str) and attribute.lower() in lowered:
        return lowered.index(attribute.lower())
    number = isinstance(attribute, int) or attribute.strip().isdigit()
    if number and 0 <= int(attribute) < len(names):
        return int(attribute)
    raise ValueError(
        f"no attribute {attribute!r}: give a name or an index in [0, {len(names)}) of "
        f"{', '.join(names)}"
    )
