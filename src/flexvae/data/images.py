"""Image files: finding them, decoding any PIL mode to a tensor, and writing PNGs.

Every source goes through one PIL -> tensor pipeline (``pil_to_tensor``), so a model sees
the same channel conversion and resizing whatever it is trained or evaluated on. Tensors
are float32 in [-1, 1], shaped (channels, image_size, image_size).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..files import atomic_open
from ..utils import did_you_mean

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff")

RESIZE_FILTERS = MappingProxyType({
    name: getattr(Image.Resampling, name.upper())
    for name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
})

CHANNEL_MODES = MappingProxyType({1: "L", 3: "RGB", 4: "RGBA"})
MAX_IMAGE_PIXELS = 64 * 2**20  # 64 megapixels: larger files are reported as unreadable


def find_images(root: PathLike, excluded: list | None = None) -> list[Path]:
    """All image files under ``root`` at any depth, sorted so runs are repeatable.

    Hidden files and folders (name starting with '.') are skipped: they are
    editor, OS or version-control clutter, never training data. Names with an image
    extension that are not regular files (FIFOs, sockets, devices, broken links) are
    never opened: reading a FIFO blocks forever. They are appended to ``excluded`` as
    (relative path, reason) when a list is given.
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
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            path = folder / name
            why = _not_regular(path)
            if why is None:
                found.append(path)
            elif excluded is not None:
                excluded.append((path.relative_to(root).as_posix(), why))
    if not found and excluded:
        raise DataError(f"no readable image file in {root}: the {len(excluded)} file(s) named like images are "
                        f"not regular files (first: {excluded[0][0]}, {excluded[0][1]})")
    if not found:
        looked_for = ", ".join(f".{ext}" for ext in IMAGE_EXTENSIONS)
        raise DataError(f"no image files found in {root} (looked for {looked_for}, "
                        "in any letter case, in all subfolders)")
    return sorted(found)


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is not a regular file (following links), or None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode) else "special"
    return f"not a regular file ({kind}); not opened"


def check_options(channels: int, image_size: int, resize_filter: str) -> None:
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
    return uint8_to_float(pil_to_uint8(img, channels, image_size, resize_filter, pad_to_square))


def pil_to_uint8(img: Image.Image, channels: int, image_size: int,
                 resize_filter: str = "bilinear", pad_to_square: bool = False) -> torch.Tensor:
    """The pipeline up to 8-bit values: uint8 (channels, image_size, image_size)."""
    check_options(channels, image_size, resize_filter)
    img = _to_channels(_to_8bit(img), channels)
    img = _resize_square(img, image_size, RESIZE_FILTERS[resize_filter], pad_to_square)
    array = np.array(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def uint8_to_float(values: torch.Tensor) -> torch.Tensor:
    """8-bit values -> float32 in [-1, 1] (v / 127.5 - 1)."""
    return values.float().div(127.5).sub(1.0).contiguous()


def open_image(path: PathLike) -> Image.Image:
    """Decode a file completely (``load`` makes truncated files fail here) and
    apply its EXIF orientation, so phone photos are upright. An image of more than
    ``MAX_IMAGE_PIXELS`` pixels (a decompression bomb) fails before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(
                        f"{img.width} x {img.height} pixels, more than the {MAX_IMAGE_PIXELS:,} flexvae decodes")
                img.load()
                return ImageOps.exif_transpose(img)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def reason(exc: BaseException, limit: int = 200) -> str:
    """A one-line reason for a failure, short enough for a warning."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_native(path: PathLike, channels: int) -> torch.Tensor:
    """One image file at its own size, (channels, H, W) in [-1, 1] (no resizing or cropping)."""
    try:
        img = _to_channels(_to_8bit(open_image(path)), channels)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {reason(exc)}") from exc
    array = np.array(img, dtype=np.uint8).reshape(img.height, img.width, channels)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def load_image(path: PathLike, channels: int, image_size: int,
               resize_filter: str = "bilinear", pad_to_square: bool = False) -> torch.Tensor:
    """Read one image file as a (channels, image_size, image_size) tensor in [-1, 1].

    Raises DataError naming the file when it cannot be read or decoded.
    """
    check_options(channels, image_size, resize_filter)
    try:
        img = open_image(path)
        return pil_to_tensor(img, channels, image_size, resize_filter, pad_to_square)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {reason(exc)}") from exc



def _tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    t = tensor.detach().to("cpu", torch.float32)
    if t.dim() != 3 or t.shape[0] not in CHANNEL_MODES:
        raise ValueError(f"expected a (C, H, W) tensor with C in 1, 3, 4; got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t, nan=0.0).clamp(-1.0, 1.0)
    array = t.add(1.0).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if t.shape[0] == 1 else array)


def save_image(tensor: torch.Tensor, path: PathLike) -> None:
    """Save a (C, H, W) tensor in [-1, 1] (values outside are clamped) as PNG."""
    with atomic_open(path, "wb") as fh:
        _tensor_to_pil(tensor).save(fh, format="PNG")


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
