"""Image input for training, inference and encoding.

Every source (a folder of image files or a torchvision dataset) goes through
one PIL -> tensor pipeline, so a model sees the same channel conversion and
resizing whatever it is trained or evaluated on. Tensors are float32 in
[-1, 1], shaped (channels, image_size, image_size).

Unreadable files do not stop a run: datasets report them in the item dict,
``collate`` moves them to ``Batch.failures`` and ``SkipLog`` warns once per
file, so a single broken file in a large folder costs one warning, not a
crashed epoch.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError
from .utils import did_you_mean

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")

RESIZE_FILTERS = MappingProxyType({
    name: getattr(Image.Resampling, name.upper())
    for name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
})

CHANNEL_MODES = MappingProxyType({1: "L", 3: "RGB", 4: "RGBA"})


# --------------------------------------------------------------------------- files

def find_images(root: PathLike) -> list[Path]:
    """All image files under ``root`` at any depth, sorted so runs are repeatable.

    Hidden files and folders (name starting with '.') are skipped: they are
    editor, OS or version-control clutter, never training data.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected a folder of images")
    suffixes = {f".{ext}" for ext in IMAGE_EXTENSIONS}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        folder = Path(dirpath)
        found.extend(folder / name for name in filenames
                     if not name.startswith(".") and Path(name).suffix.lower() in suffixes)
    if not found:
        looked_for = ", ".join(f".{ext}" for ext in IMAGE_EXTENSIONS)
        raise DataError(f"no image files found in {root} (looked for {looked_for}, "
                        "in any letter case, in all subfolders)")
    return sorted(found)


# ------------------------------------------------------------------ PIL -> tensor

def _check_options(channels: int, image_size: int, resize_filter: str) -> None:
    """Reject bad settings up front, so they are not mistaken for unreadable files."""
    if channels not in CHANNEL_MODES:
        raise DataError(f"channels must be 1 (grey), 3 (RGB) or 4 (RGBA), not {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, not {image_size!r}")
    if resize_filter not in RESIZE_FILTERS:
        raise DataError(f"unknown resize filter {resize_filter!r}; valid filters are "
                        f"{', '.join(RESIZE_FILTERS)}.{did_you_mean(str(resize_filter), RESIZE_FILTERS)}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to L, LA, RGB or RGBA with 8 bits per channel.

    16-bit modes are scaled (65535 -> 255), not clipped, so 16-bit scans keep
    their contrast. Mode "I" (32-bit) is read as 16-bit when its values fit,
    which is how Pillow opens many 16-bit files; otherwise as the full
    positive int32 range. Negative values become black.
    """
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.float64)
        full = 65535.0 if mode != "I" or values.max(initial=0) <= 65535 else float(2**31 - 1)
        scaled = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    if mode in ("1", "F"):
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, HSV, RGBX, ...


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert an L/LA/RGB/RGBA image to the model's channel count.

    When alpha is dropped (1 or 3 channels) the image is composited on black
    rather than having alpha discarded: colours under fully transparent
    pixels are often arbitrary, and black makes them consistent.
    """
    if channels == 4:
        return img.convert("RGBA")
    if img.mode in ("LA", "RGBA"):
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return img.convert(CHANNEL_MODES[channels])


def _resize_square(img: Image.Image, image_size: int, resample: int, pad_to_square: bool) -> Image.Image:
    """Scale the shorter side to ``image_size`` and keep the central square.

    Cropping and scaling happen in one ``resize`` call (the ``box`` argument),
    which is exact to the sub-pixel and avoids resampling twice. With
    ``pad_to_square`` the image is first centred on a black square (transparent
    for RGBA) so nothing is cut off.
    """
    width, height = img.size
    if pad_to_square and width != height:
        side = max(width, height)
        fill = (0, 0, 0, 0) if img.mode == "RGBA" else 0
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, ((side - width) // 2, (side - height) // 2))
        img, width, height = canvas, side, side
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((image_size, image_size), resample, box=(left, top, left + side, top + side))


def pil_to_tensor(img: Image.Image, channels: int, image_size: int,
                  resize_filter: str = "bilinear", pad_to_square: bool = False) -> torch.Tensor:
    """The one PIL -> tensor pipeline shared by every data source.

    Returns float32 (channels, image_size, image_size) in [-1, 1].
    """
    _check_options(channels, image_size, resize_filter)
    img = _to_channels(_to_8bit(img), channels)
    img = _resize_square(img, image_size, RESIZE_FILTERS[resize_filter], pad_to_square)
    array = np.array(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def _open(path: PathLike) -> Image.Image:
    """Decode a file completely (``load`` makes truncated files fail here) and
    apply its EXIF orientation, so phone photos are upright."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def _reason(exc: BaseException, limit: int = 200) -> str:
    """A one-line reason for a failure, short enough for a warning."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_image(path: PathLike, channels: int, image_size: int,
               resize_filter: str = "bilinear", pad_to_square: bool = False) -> torch.Tensor:
    """Read one image file as a (channels, image_size, image_size) tensor in [-1, 1].

    Raises DataError naming the file when it cannot be read or decoded.
    """
    _check_options(channels, image_size, resize_filter)
    try:
        img = _open(path)
        return pil_to_tensor(img, channels, image_size, resize_filter, pad_to_square)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def _maybe_flip(image: torch.Tensor, flip: bool) -> torch.Tensor:
    """Random horizontal flip drawn from torch's RNG, so ``torch.manual_seed``
    (and DataLoader worker seeding) makes it reproducible."""
    if flip and bool(torch.rand(()) < 0.5):
        return image.flip(-1)
    return image


# -------------------------------------------------------------------- datasets

class _PipelineDataset(Dataset):
    """Item building shared by every source: a PIL image in, an item dict out.

    Subclasses say how to read item ``index`` (``_read``) and name it
    (``_relpath``). Any failure to read or decode becomes ``image=None`` plus
    an ``error``, never an exception, so one bad file cannot stop an epoch.
    """

    def _configure(self, channels: int, image_size: int, resize_filter: str,
                   pad_to_square: bool, flip: bool) -> None:
        _check_options(channels, image_size, resize_filter)
        self.channels, self.image_size = channels, image_size
        self.resize_filter, self.pad_to_square, self.flip = resize_filter, pad_to_square, flip

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        raise NotImplementedError

    def _relpath(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        relpath = self._relpath(index)
        try:
            picture, extra = self._read(index)
            image = pil_to_tensor(picture, self.channels, self.image_size,
                                  self.resize_filter, self.pad_to_square)
        except Exception as exc:  # truncated, not an image, permission, ...
            return {"image": None, "path": relpath, "index": index, "error": _reason(exc)}
        return {"image": _maybe_flip(image, self.flip), "path": relpath, "index": index, **extra}


class ImageFolder(_PipelineDataset):
    """Images found under a folder at any depth (or an explicit list of them).
    Item paths are relative to ``root``, in POSIX form."""

    def __init__(self, root: PathLike, channels: int, image_size: int,
                 resize_filter: str = "bilinear", pad_to_square: bool = False,
                 flip: bool = False, paths: Optional[Iterable[PathLike]] = None) -> None:
        self._configure(channels, image_size, resize_filter, pad_to_square, flip)
        self.root = Path(root).absolute()
        if paths is None:
            self.paths = find_images(self.root)
        else:
            self.paths = [p if p.is_absolute() else self.root / p for p in map(Path, paths)]
        self.relpaths = [_relative(p, self.root) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _relpath(self, index: int) -> str:
        return self.relpaths[index]

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        return _open(self.paths[index]), {}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # an explicit path outside root: show it whole
        return path.as_posix()


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to build one torchvision dataset and where its files must live."""

    class_name: str
    split_arg: str  # "train": takes train=bool; "split": takes split="train"/"test"
    folder: str  # where under root torchvision looks for the files
    files: str  # what the user must place there when there is no internet


_MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (uncompressed)")

TORCHVISION_DATASETS = MappingProxyType({
    "mnist": TorchvisionSpec("MNIST", "train", "MNIST/raw", _MNIST_FILES),
    "fashion-mnist": TorchvisionSpec("FashionMNIST", "train", "FashionMNIST/raw", _MNIST_FILES),
    "kmnist": TorchvisionSpec("KMNIST", "train", "KMNIST/raw", _MNIST_FILES),
    "cifar10": TorchvisionSpec("CIFAR10", "train", "cifar-10-batches-py",
                               "the files unpacked from cifar-10-python.tar.gz"),
    "cifar100": TorchvisionSpec("CIFAR100", "train", "cifar-100-python",
                                "the files unpacked from cifar-100-python.tar.gz"),
    "svhn": TorchvisionSpec("SVHN", "split", ".", "train_32x32.mat and test_32x32.mat"),
})


def _source_key(name: str, choices: Sequence[str], what: str) -> str:
    """Match a user-written source name ("MNIST", "fashion_mnist") to a known one."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in choices:
        raise DataError(f"unknown {what} {name!r}; use one of {', '.join(choices)}."
                        f"{did_you_mean(key, choices)}")
    return key


class TorchvisionImages(_PipelineDataset):
    """A torchvision dataset through the same pipeline and item format as
    ImageFolder; items also carry the dataset's ``label``. Item paths look
    like "mnist/train/000123"."""

    def __init__(self, name: str, root: PathLike, train: bool, channels: int, image_size: int,
                 resize_filter: str = "bilinear", flip: bool = False, download: bool = True,
                 pad_to_square: bool = False) -> None:
        self.name = _source_key(name, list(TORCHVISION_DATASETS), "dataset")
        self._configure(channels, image_size, resize_filter, pad_to_square, flip)
        self.root = Path(root).absolute()
        self.split = "train" if train else "test"
        self.dataset = self._build(train, download)

    def _build(self, train: bool, download: bool) -> Dataset:
        spec = TORCHVISION_DATASETS[self.name]
        kwargs = {"split": self.split} if spec.split_arg == "split" else {"train": train}
        try:
            import torchvision.datasets

            cls = getattr(torchvision.datasets, spec.class_name)
            return cls(str(self.root), download=download, **kwargs)
        except Exception as exc:  # offline, partial download, corrupt files, missing scipy, ...
            # torchvision's own advice ("use download=True") would mislead when download is off
            problem = (f"could not be downloaded to {self.root}: {_reason(exc).rstrip('.')}"
                       if download else f"was not found in {self.root}")
        # raised outside the except block: the user gets one message, no chained traceback
        raise DataError(f"dataset {self.name!r} ({self.split}) {problem}. Without internet "
                        f"access, put the dataset files in {self.root / spec.folder} yourself: "
                        f"{spec.files}.")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def relpaths(self) -> list[str]:
        return [self._relpath(i) for i in range(len(self))]

    def _relpath(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index:06d}"

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        picture, label = self.dataset[index]
        return picture, {"label": int(label)}


def open_dataset(source: str, path_or_root: PathLike, *, train: bool, channels: int,
                 image_size: int, resize_filter: str = "bilinear", pad_to_square: bool = False,
                 flip: bool = False) -> Dataset:
    """``source`` "folder" reads images under ``path_or_root``; a torchvision
    name (see TORCHVISION_DATASETS) loads or downloads that dataset there."""
    options = dict(channels=channels, image_size=image_size, resize_filter=resize_filter,
                   pad_to_square=pad_to_square, flip=flip)
    key = _source_key(source, ["folder", *TORCHVISION_DATASETS], "data source")
    if key == "folder":
        return ImageFolder(path_or_root, **options)
    return TorchvisionImages(key, path_or_root, train, **options)


# ------------------------------------------------------------------- batching

@dataclass
class Batch:
    """Readable items stacked, unreadable ones listed in ``failures``.

    ``images`` is None when every item of the batch failed. ``labels`` is set
    only for sources that have labels (torchvision datasets).
    """

    images: Optional[torch.Tensor]
    paths: list[str]
    indices: list[int]
    failures: list[tuple[str, str]]
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> Batch:
        """Called by DataLoader when pin_memory=True (it does not know dataclasses)."""
        return replace(self, images=_pinned(self.images), labels=_pinned(self.labels))


def _pinned(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.pin_memory()


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack the readable items; move the failed ones to ``failures``."""
    good = [item for item in items if item.get("image") is not None]
    failures = [(item["path"], item.get("error", "unknown error"))
                for item in items if item.get("image") is None]
    images = torch.stack([item["image"] for item in good]) if good else None
    labels = None
    if good and all("label" in item for item in good):
        labels = torch.tensor([item["label"] for item in good], dtype=torch.long)
    return Batch(images, [item["path"] for item in good], [int(item["index"]) for item in good],
                 failures, labels)


class SkipLog:
    """Remembers unreadable files across epochs and warns once per file."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, failures: Iterable[tuple[str, str]]) -> int:
        """Record failures; warn for each path not seen before. Returns how many were new."""
        new = 0
        for path, reason in failures:
            if path in self._reasons:
                continue
            self._reasons[path] = reason
            new += 1
            warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=2)
        return new

    @property
    def count(self) -> int:
        return len(self._reasons)

    @property
    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)

    def summary(self) -> str:
        n = self.count
        return f"skipped {n} unreadable file{'' if n == 1 else 's'}" if n else ""


def first_images(dataset: Dataset, n: int) -> Optional[torch.Tensor]:
    """The first ``n`` readable images of a dataset, stacked; None when none is readable."""
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item.get("image") is not None:
            images.append(item["image"])
        if len(images) == n:
            break
    return torch.stack(images) if images else None


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                device_type: str = "cpu", drop_last: bool = False,
                sampler: Optional[Sampler] = None, seed: Optional[int] = None) -> DataLoader:
    """A DataLoader yielding ``Batch`` objects.

    ``seed`` fixes the shuffle order and the workers' RNG (hence random flips).
    A given ``sampler`` decides the order itself, so ``shuffle`` is ignored.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=device_type == "cuda", drop_last=drop_last,
                      persistent_workers=workers, prefetch_factor=2 if workers else None,
                      generator=generator)


# -------------------------------------------------------------------- writing

def _tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    t = tensor.detach().to("cpu", torch.float32)
    if t.dim() != 3 or t.shape[0] not in CHANNEL_MODES:
        raise ValueError(f"expected a (C, H, W) tensor with C in 1, 3, 4; got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t, nan=0.0).clamp(-1.0, 1.0)
    array = t.add(1.0).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if t.shape[0] == 1 else array)


def _save_atomic(img: Image.Image, path: PathLike) -> None:
    """Write next to the target, then rename: readers never see half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            img.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_image(tensor: torch.Tensor, path: PathLike) -> None:
    """Save a (C, H, W) tensor in [-1, 1] (values outside are clamped) as PNG."""
    _save_atomic(_tensor_to_pil(tensor), path)


def save_grid(rows: Sequence[torch.Tensor], path: PathLike, padding: int = 2) -> None:
    """Save rows of (B, C, H, W) images as one PNG grid, one tensor per row.

    Rows may hold different numbers of images (short rows leave blank cells);
    gaps are opaque black.
    """
    rows = [r.detach().to("cpu", torch.float32) for r in rows]
    if not rows or any(r.dim() != 4 for r in rows) or max(r.shape[0] for r in rows) == 0:
        raise ValueError("save_grid needs a list of (B, C, H, W) tensors holding at least one image")
    c, h, w = rows[0].shape[1:]
    for r in rows:
        if tuple(r.shape[1:]) != (c, h, w):
            raise ValueError(f"every row must be (B, {c}, {h}, {w}); got {tuple(r.shape)}")
    cols = max(r.shape[0] for r in rows)
    grid = torch.full((c, padding + len(rows) * (h + padding), padding + cols * (w + padding)), -1.0)
    if c == 4:
        grid[3] = 1.0
    for i, row in enumerate(rows):
        top = padding + i * (h + padding)
        for j, image in enumerate(row):
            left = padding + j * (w + padding)
            grid[:, top:top + h, left:left + w] = image
    save_image(grid, path)
