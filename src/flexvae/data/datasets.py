"""Datasets: a folder of images at any depth, or a torchvision dataset, through one pipeline.

Any failure to read or decode an item becomes ``image=None`` plus an ``error`` in its item
dict, never an exception, so one bad file cannot stop an epoch (see ``batching``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..utils import did_you_mean
from .cache import make_cache
from .shards import ShardDataset
from .images import PathLike, check_options, find_images, open_image, pil_to_uint8, reason, uint8_to_float


class _PipelineDataset(Dataset):
    """Item building shared by every source: a PIL image in, an item dict out.

    Subclasses say how to read item ``index`` (``_read``) and name it
    (``_relpath``). Any failure to read or decode becomes ``image=None`` plus
    an ``error``, never an exception, so one bad file cannot stop an epoch.
    """

    excluded: list[tuple[str, str]] = []  # files found but never opened (special files), with reasons
    cache = None  # a DecodedCache once enable_cache has made one
    labels = None  # a labels.Labels once set_labels has attached them: every item then has a "label"

    def set_labels(self, labels) -> None:
        """Attach class labels (``data/labels.py``); item ``i`` gets ``label = labels.indices[i]`` (-1: none)."""
        if labels is not None and len(labels.indices) != len(self):
            raise ValueError(f"{len(labels.indices)} labels for {len(self)} images")
        self.labels = labels

    def enable_cache(self, mode: str, processes: int = 1) -> str | None:
        """Keep decoded images in shared memory (``data.cache``); returns a note when it does not."""
        self.cache, note = make_cache(mode, len(self), (self.channels, self.image_size, self.image_size),
                                      processes=processes)
        return note

    def _configure(self, channels: int, image_size: int, resize_filter: str, pad_to_square: bool) -> None:
        check_options(channels, image_size, resize_filter)
        self.channels, self.image_size = channels, image_size
        self.resize_filter, self.pad_to_square = resize_filter, pad_to_square

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        raise NotImplementedError

    def _relpath(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._item(index)
        if self.labels is not None:
            item["label"] = int(self.labels.indices[index])
        return item

    def _item(self, index: int) -> dict[str, Any]:
        relpath = self._relpath(index)
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            values, extra = cached
            return {"image": uint8_to_float(values), "path": relpath, "index": index, **extra}
        try:
            picture, extra = self._read(index)
            values = pil_to_uint8(picture, self.channels, self.image_size, self.resize_filter, self.pad_to_square)
        except Exception as exc:  # truncated, not an image, permission, ...
            return {"image": None, "path": relpath, "index": index, "error": reason(exc)}
        if self.cache is not None:
            self.cache.put(index, values, extra)
        return {"image": uint8_to_float(values), "path": relpath, "index": index, **extra}


class ImageFolder(_PipelineDataset):
    """Images found under a folder at any depth (or an explicit list of them).
    Item paths are relative to ``root``, in POSIX form."""

    def __init__(self, root: PathLike, channels: int, image_size: int,
                 resize_filter: str = "bilinear", pad_to_square: bool = False,
                 paths: Optional[Iterable[PathLike]] = None) -> None:
        self._configure(channels, image_size, resize_filter, pad_to_square)
        self.root = Path(root).absolute()
        self.excluded: list[tuple[str, str]] = []  # (relative path, reason): found but never opened
        if paths is None:
            self.paths = find_images(self.root, self.excluded)
        else:
            self.paths = [p if p.is_absolute() else self.root / p for p in map(Path, paths)]
        self.relpaths = [_relative(p, self.root) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _relpath(self, index: int) -> str:
        return self.relpaths[index]

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        return open_image(self.paths[index]), {}


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
                 resize_filter: str = "bilinear", download: bool = True,
                 pad_to_square: bool = False) -> None:
        self.name = _source_key(name, list(TORCHVISION_DATASETS), "dataset")
        self._configure(channels, image_size, resize_filter, pad_to_square)
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
            problem = (f"could not be downloaded to {self.root}: {reason(exc).rstrip('.')}"
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


class WebDatasetImages(ShardDataset, _PipelineDataset):
    """The samples of webdataset-layout tar shards (see shards.py); item paths are
    ``<shard file>/<key>.<image extension>``."""

    def __init__(self, path_or_pattern, channels: int, image_size: int,
                 resize_filter: str = "bilinear", pad_to_square: bool = False) -> None:
        self._configure(channels, image_size, resize_filter, pad_to_square)
        self._index(path_or_pattern)

    def __len__(self) -> int:
        return len(self.samples)

    def _relpath(self, index: int) -> str:
        return self.relpaths[index]

    def _read(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        return self._read_sample(index)


def open_dataset(source: str, path_or_root: PathLike, *, train: bool, channels: int,
                 image_size: int, resize_filter: str = "bilinear", pad_to_square: bool = False) -> Dataset:
    """``source`` "folder" reads images under ``path_or_root``, "webdataset" the tar shards
    it names (a file, a folder of them or a brace pattern); a torchvision name (see
    TORCHVISION_DATASETS) loads or downloads that dataset there."""
    options = dict(channels=channels, image_size=image_size, resize_filter=resize_filter,
                   pad_to_square=pad_to_square)
    key = _source_key(source, ["folder", "webdataset", *TORCHVISION_DATASETS], "data source")
    if key == "folder":
        return ImageFolder(path_or_root, **options)
    if key == "webdataset":
        return WebDatasetImages(path_or_root, **options)
    return TorchvisionImages(key, path_or_root, train, **options)
