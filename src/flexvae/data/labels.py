"""Class labels of a folder's images (``data.labels``): none, sub-folder names, or a CSV file.

- ``folders``: an image's class is the first folder of its path under the data folder
  (``root/<class>/.../image.png``); images directly in the root are unlabelled.
- a CSV file: rows ``relative path,label`` (paths relative to the data folder, with '/'); a
  first row ``path,label`` is a header. Images the file does not list are unlabelled; a row
  naming an image that is not in the folder is an error (file and line).

Classes are sorted (as numbers when every name is a whole number); a class's index is its
position, which the model's embeddings and class latent use, so the checkpoint stores the
names. A model's stored classes map another folder's names to the same indices.

``label_fraction`` keeps the labels of that share of each class's labelled images (at least
one each), chosen by a seeded permutation; the rest become unlabelled (-1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from ..errors import DataError

UNLABELLED = -1
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class Labels:
    classes: tuple[str, ...]
    indices: torch.Tensor  # (N,) int64, one per image, -1 = unlabelled

    @property
    def labelled(self) -> int:
        return int((self.indices >= 0).sum())

    def describe(self) -> str:
        names = ", ".join(self.classes[:10]) + (", ..." if len(self.classes) > 10 else "")
        return f"{self.labelled:,} of {len(self.indices):,} images labelled, {len(self.classes)} classes ({names})"


def sort_classes(names) -> tuple[str, ...]:
    names = set(names)
    if all(n.isdigit() for n in names):
        return tuple(sorted(names, key=lambda n: (int(n), n)))
    return tuple(sorted(names))


def folder_names(relpaths) -> list[str | None]:
    """Each image's first folder under the root, None for images in the root itself."""
    return [rel.split("/")[0] if "/" in rel else None for rel in relpaths]


def csv_names(csv_path: Path, relpaths) -> list[str | None]:
    """Each image's label in the CSV file, None for images it does not list."""
    position = {PurePosixPath(rel).as_posix(): i for i, rel in enumerate(relpaths)}
    names: list[str | None] = [None] * len(relpaths)
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"data.labels: label file not found: {csv_path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data.labels: cannot read {csv_path}: {exc}") from None
    for line, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if line == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{csv_path}:{line}: expected 'relative path,label', found {','.join(row)[:120]!r}")
        rel = PurePosixPath(row[0].strip().replace("\\", "/")).as_posix()
        rel = rel[2:] if rel.startswith("./") else rel
        if rel not in position:
            raise DataError(f"{csv_path}:{line}: {row[0].strip()!r} is not an image of the data folder "
                            f"(paths are relative to it, e.g. {next(iter(position), 'class/image.png')!r})")
        index, label = position[rel], row[1].strip()
        if names[index] is not None and names[index] != label:
            raise DataError(f"{csv_path}:{line}: {rel} is labelled twice ({names[index]!r} and {label!r})")
        names[index] = label
    return names


def read_labels(spec: str, relpaths, root, *, csv_path: Path | None = None, classes=None,
                fraction: float = 1.0, seed: int = 0) -> Labels | None:
    """The labels of images ``relpaths`` (relative to ``root``) for ``data.labels = spec``; None for
    "none". ``classes``: a model's class names (other names are an error); else from the data."""
    if spec == "none":
        return None
    if spec == "folders":
        names = folder_names(relpaths)
        if relpaths and all(n is None for n in names):
            raise DataError(f"data.labels = 'folders': no image of {root} is in a sub-folder; a labelled folder "
                            "holds one sub-folder per class (root/<class>/image.png)")
    else:
        names = csv_names(csv_path if csv_path is not None else Path(spec), relpaths)
    found = sort_classes(n for n in names if n is not None)
    if classes is None:
        if len(found) < 2:
            raise DataError(f"data.labels = {spec!r}: the labels of {root} name {len(found)} class"
                            f"{'' if len(found) == 1 else 'es'}; conditioning needs at least 2")
        if len(found) > MAX_CLASSES:
            raise DataError(f"data.labels = {spec!r}: {len(found):,} classes, more than {MAX_CLASSES:,}")
        classes = found
    classes = tuple(classes)
    index_of = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in found if n not in index_of]
    if unknown:
        shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise DataError(f"{root}: class {unknown[0]!r} is not one of the model's {len(classes)} classes ({shown})")
    indices = torch.tensor([UNLABELLED if n is None else index_of[n] for n in names], dtype=torch.long)
    if fraction < 1.0:
        indices = keep_fraction(indices, fraction, seed)
    return Labels(classes, indices)


def keep_fraction(indices: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``indices`` with the labels of all but ``fraction`` of each class's images removed."""
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    kept = torch.full_like(indices, UNLABELLED)
    for c in indices[indices >= 0].unique().tolist():
        rows = (indices == c).nonzero().flatten()
        count = max(1, round(fraction * len(rows)))
        chosen = rows[torch.randperm(len(rows), generator=generator)[:count]]
        kept[chosen] = c
    return kept


def input_labels(spec: str, relpaths, root, classes) -> tuple[Labels | None, str]:
    """Labels of an input folder for a conditional model with ``classes`` (``--labels``), and a
    line saying where they came from. ``auto``: the sub-folder names when every image lies in
    a sub-folder named after one of the classes, else none (the "no label" embedding)."""
    if spec == "auto":
        names = folder_names(relpaths)
        known = set(classes)
        if relpaths and all(n is not None and n in known for n in names):
            spec = "folders"
        else:
            return None, (f"labels: none (not every image of {root} is in a sub-folder named after one of the "
                          f"model's {len(classes)} classes); give --labels FILE.csv or --labels folders")
    if spec == "none":
        return None, "labels: none (--labels none)"
    csv_path = None if spec == "folders" else Path(spec)
    labels = read_labels(spec, relpaths, root, csv_path=csv_path, classes=classes)
    return labels, f"labels ({spec}): {labels.describe()}"
