"""Where the outputs of -i, -e and -d go: refused locations, names that never collide,
paths that never leave the output folder."""

from __future__ import annotations

import sys

from collections import Counter
from pathlib import Path, PurePosixPath

import torch

from ..data import ImageFolder, make_loader
from ..errors import DataError, shown_path


LATENT_SUFFIXES = {"safetensors": ".safetensors", "npy": ".npy", "webdataset": ".safetensors"}
CODES_SUFFIX = ".codes.npy"  # npy format: a discrete latent's integer codes beside its latent file
MANIFEST = "manifest.jsonl"


def safe_output_path(out_root: Path, relpath: str, suffix: str | None = None) -> Path:
    """``out_root / relpath`` (suffix replaced), refusing anything that would land outside."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"refusing output path outside {out_root}: {relpath}")
    target = out_root.joinpath(*rel.parts)
    if suffix is not None:
        target = target.with_suffix(suffix)
    root = out_root.resolve()
    if root not in target.resolve().parents:
        raise DataError(f"refusing output path outside {out_root}: {relpath}")
    return target


class OutputPaths:
    """``safe_output_path`` for many files under one root: each directory is resolved once
    (the check costs a dozen system calls per path otherwise), a file itself only when it is
    a symbolic link."""

    def __init__(self, out_root: Path):
        self.out_root = out_root
        self.root = out_root.resolve()
        self._inside: dict[Path, bool] = {}

    def __call__(self, relpath: str, suffix: str | None = None) -> Path:
        rel = PurePosixPath(relpath)
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"refusing output path outside {self.out_root}: {relpath}")
        target = self.out_root.joinpath(*rel.parts)
        if suffix is not None:
            target = target.with_suffix(suffix)
        parent = target.parent
        if parent not in self._inside:
            resolved = parent.resolve()
            self._inside[parent] = resolved == self.root or self.root in resolved.parents
        inside = self._inside[parent]
        if inside and target.is_symlink():
            inside = self.root in target.resolve().parents
        if not inside:
            raise DataError(f"refusing output path outside {self.out_root}: {relpath}")
        return target


def input_root(input_path) -> tuple[Path, list[Path] | None]:
    """(folder, None) for a folder of inputs; (its folder, [the file]) for one input file."""
    path = Path(input_path)
    if path.is_file():
        path = path.resolve()
        return path.parent, [path]
    return path, None


def check_folders(input_dir, output_dir, flag: str = "--output") -> Path:
    """The output folder, refused when it would overwrite or re-read the user's files: the
    input folder (or the folder of an input file) itself, a folder inside it (the next run
    would read its own outputs), a folder holding it, or an existing file. A path no file can
    have (a name too long, a NUL character) is a DataError naming it."""
    try:
        return _check_folders(input_dir, output_dir, flag)
    except (OSError, ValueError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a usable path"
        raise DataError(f"{shown_path(getattr(exc, 'filename', None) or output_dir)}: {cause}") from None


def _check_folders(input_dir, output_dir, flag: str) -> Path:
    source, out = input_root(input_dir)[0].resolve(), Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {output_dir} is an existing file; name a folder for the outputs")
    if out == source:
        raise DataError(f"{flag} {output_dir} is the input folder: its files would be overwritten; "
                        f"choose another output folder")
    if source in out.parents:
        raise DataError(f"{flag} {output_dir} is inside the input folder {input_dir}: a later run would read "
                        f"its own outputs as inputs; choose a folder outside it")
    if source.is_dir() and out in source.parents:
        raise DataError(f"{flag} {output_dir} holds the input folder {input_dir}: outputs could overwrite "
                        f"inputs; choose a folder beside it")
    return Path(output_dir)


def in_output_folder(work, ctx, input_dir, output_dir, overwrite: bool, options: dict):
    """``work(ctx, input_dir, out_root, folder, **options)`` with the checked output folder
    opened (outputs.py): only files flexvae wrote there are replaced, unless ``overwrite``."""
    from ..outputs import writing_into

    out_root = check_folders(input_dir, output_dir)
    with writing_into(out_root, overwrite) as folder:
        return work(ctx, input_dir, out_root, folder, **options)


def output_names(relpaths, suffix: str) -> dict[str, str]:
    """Relative output path for each input: its suffix replaced by ``suffix``, except where two
    inputs would share that name (``x.png`` and ``x.jpg``): those keep their own suffix and get
    ``suffix`` appended (``x.png.png``, ``x.jpg.png``), so no output overwrites another."""
    plain = {rel: PurePosixPath(rel).with_suffix(suffix).as_posix() for rel in relpaths}
    counts = Counter(plain.values())
    return {rel: name if counts[name] == 1 else rel + suffix for rel, name in plain.items()}


def folder_loader(ctx, input_dir, batch_size, num_workers, device, paths=None):
    """The images under ``input_dir`` (or ``paths`` relative to it) preprocessed as the model's
    training data; a model that takes labels gets them attached (``ctx.label_spec``, see
    data/labels.input_labels), saying once on stderr where they came from."""
    dataset = ImageFolder(input_dir, channels=ctx.data_shape[0], image_size=ctx.data_shape[1],
                          resize_filter=ctx.resize_filter, pad_to_square=ctx.pad_to_square, paths=paths)
    if ctx.vae.takes_labels and ctx.vae.class_names:
        from ..data.labels import input_labels

        labels, note = input_labels(ctx.label_spec, dataset.relpaths, input_dir, ctx.vae.class_names)
        dataset.set_labels(labels)
        if ctx.label_note != note:
            print(f"note: {note}", file=sys.stderr)
            ctx.label_note = note
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers,
                         device_type=torch.device(device).type)
    return dataset, loader


def native_batches(ctx, dataset, crop_size):
    """Batches of one image each at its own size, centre-cropped to ``crop_size(h, w)``: a
    (height, width), or a string saying why the image cannot be used (reported as a failure)."""
    from ..data import Batch, load_native

    for index, (path, rel) in enumerate(zip(dataset.paths, dataset.relpaths)):
        try:
            image = load_native(path, ctx.data_shape[0])
        except DataError as exc:
            yield Batch(None, [], [], [(rel, str(exc).split(": ", 1)[-1])])
            continue
        h, w = image.shape[1:]
        size = crop_size(h, w)
        if isinstance(size, str):
            yield Batch(None, [], [], [(rel, size)])
            continue
        th, tw = size
        top, left = (h - th) // 2, (w - tw) // 2
        yield Batch(image[None, :, top:top + th, left:left + tw], [rel], [index], [])
