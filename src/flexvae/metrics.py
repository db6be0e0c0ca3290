"""Image quality metrics and the run's metrics file: the one PSNR, SSIM and MS-SSIM.

Images live in [-1, 1]; SSIM and MS-SSIM are computed by pytorch-msssim on [0, 1] with
``data_range = 1`` (fixed by that range, never guessed from a batch), Gaussian window
sigma 1.5 and K = (0.01, 0.03). MS-SSIM uses as many of the standard 5 scales as the
image holds (the coarsest scale must still hold one window), their weights renormalised to
sum to 1; with all 5 scales this is pytorch-msssim's ``ms_ssim``.

``metrics.csv`` of a run: one row per logged step, the columns fixed by the first row
(``step`` first); ``MetricsLog`` writes it, ``read_metrics`` reads it.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import torch

from .errors import ConfigError, DataError

SSIM_WINDOW = 11
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
METRICS_FILE = "metrics.csv"


def psnr(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak range 2)."""
    mse = (image.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim_window(spatial: tuple[int, ...]) -> int:
    """Largest odd window up to 11 that fits the smallest spatial size."""
    side = min(spatial)
    return min(SSIM_WINDOW, side if side % 2 else side - 1)


def ms_ssim_scales(side: int, window: int) -> int:
    """How many of the 5 standard scales fit: the coarsest must still hold one window."""
    scales = 0
    while scales < len(MS_SSIM_WEIGHTS) and side >= window:
        scales += 1
        side = (side + 1) // 2
    return scales


def pick_ssim_kind(kind: str, spatial: tuple[int, ...]) -> str:
    """For the SSIM loss: 'auto' uses MS-SSIM when all 5 scales hold a full window."""
    needed = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1)
    if kind == "auto":
        return "ms-ssim" if min(spatial) > needed else "ssim"
    if kind == "ms-ssim" and min(spatial) <= needed:
        raise ConfigError(
            f"loss.ssim_kind = 'ms-ssim' needs images larger than {needed} px on every side "
            f"(5 scales of an 11-px window); these are {'x'.join(map(str, spatial))}. Use 'ssim' or 'auto'"
        )
    return kind


def _unit(image: torch.Tensor) -> torch.Tensor:
    return (image.float() + 1) / 2


def ssim(image: torch.Tensor, target: torch.Tensor, per_image: bool = True) -> torch.Tensor:
    """SSIM of (B, C, H, W) or (B, C, D, H, W) images in [-1, 1]: (B,) or the batch mean."""
    from pytorch_msssim import ssim as library_ssim

    return library_ssim(_unit(image), _unit(target), data_range=1.0, win_size=ssim_window(tuple(image.shape[2:])),
                        size_average=not per_image)


def ms_ssim(image: torch.Tensor, target: torch.Tensor, per_image: bool = True) -> torch.Tensor | None:
    """MS-SSIM over as many scales as fit (see the module doc); None below two scales."""
    from pytorch_msssim import ms_ssim as library_ms_ssim

    spatial = tuple(image.shape[2:])
    window = ssim_window(spatial)
    scales = ms_ssim_scales(min(spatial), window)
    if scales < 2:
        return None
    if scales == len(MS_SSIM_WEIGHTS) and min(spatial) > (SSIM_WINDOW - 1) * 2 ** (scales - 1):
        return library_ms_ssim(_unit(image), _unit(target), data_range=1.0, win_size=window,
                               size_average=not per_image)
    values = ms_ssim_over_scales(image, target, scales)
    return values if per_image else values.mean()


def _gaussian_taps(size: int, sigma: float = 1.5) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``size`` taps around the middle one (SSIM's window)."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    taps = torch.exp(-offsets.pow(2) / (2 * sigma * sigma))
    return taps / taps.sum()


def _local_means(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted means of every full window of (B, C, *spatial): one 1-D pass per
    spatial axis, each channel on its own; an axis shorter than the window is not filtered
    (pytorch-msssim's convention, so the two agree)."""
    channels, dims = x.shape[1], x.dim() - 2
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    for axis in range(dims):
        if x.shape[2 + axis] < len(taps):
            continue
        shape = [1] * dims
        shape[axis] = len(taps)
        kernel = taps.to(x).view(1, 1, *shape).repeat(channels, 1, *([1] * dims))
        x = conv(x, kernel, groups=channels)
    return x


def ssim_terms(a: torch.Tensor, b: torch.Tensor, window: int, data_range: float = 1.0):
    """SSIM (Wang et al. 2004, constants K1 = 0.01, K2 = 0.03) of images ``a`` and ``b`` with a
    Gaussian window of ``window`` taps (sigma 1.5): per image and channel, the mean SSIM and the
    mean contrast-structure term that MS-SSIM multiplies over its coarser scales."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    channels = a.shape[1]
    # the five local means in one filtering pass: of a, b, a^2, b^2 and ab
    means = _local_means(torch.cat([a, b, a * a, b * b, a * b], dim=1), _gaussian_taps(window))
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = means.split(channels, dim=1)
    var_a, var_b = mean_aa - mean_a.pow(2), mean_bb - mean_b.pow(2)
    covariance = mean_ab - mean_a * mean_b
    contrast = (2 * covariance + c2) / (var_a + var_b + c2)
    luminance = (2 * mean_a * mean_b + c1) / (mean_a.pow(2) + mean_b.pow(2) + c1)
    return (luminance * contrast).flatten(2).mean(-1), contrast.flatten(2).mean(-1)


def ms_ssim_over_scales(image: torch.Tensor, target: torch.Tensor, scales: int) -> torch.Tensor:
    """Per-image MS-SSIM over the first ``scales`` standard scales (weights renormalised); at all
    five it is pytorch-msssim's ``ms_ssim`` (tested against it)."""
    a, b = _unit(image), _unit(target)
    weights = a.new_tensor(MS_SSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    window = ssim_window(tuple(a.shape[2:]))
    pool = torch.nn.functional.avg_pool2d if a.dim() == 4 else torch.nn.functional.avg_pool3d
    factors = []
    for level in range(scales):
        per_channel, contrast = ssim_terms(a, b, window)
        if level < scales - 1:
            factors.append(torch.relu(contrast))
            padding = [n % 2 for n in a.shape[2:]]
            a, b = pool(a, kernel_size=2, padding=padding), pool(b, kernel_size=2, padding=padding)
    factors.append(torch.relu(per_channel))
    return torch.prod(torch.stack(factors) ** weights.view(-1, 1, 1), dim=0).mean(1)


def similarity_loss_value(image: torch.Tensor, target: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """The batch-mean SSIM or MS-SSIM that the SSIM loss term uses (``loss.ssim_kind``)."""
    if pick_ssim_kind(kind, tuple(image.shape[2:])) == "ms-ssim":
        return ms_ssim(image, target, per_image=False)
    return ssim(image, target, per_image=False)


# ------------------------------------------------------------------ metrics.csv
def current_column(name: str) -> str:
    """A metrics.csv column's name now: runs before KL had one spelling logged ``kld``,
    ``kld_weight``, ``kld_top``, ``kld_<group>``, ``balance_kld``...; they are ``kl``,
    ``kl_weight``... now."""
    return re.sub(r"(^|_)kld(?=_|$)", r"\1kl", name)


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


class MetricsLog:
    """Appends rows to a run's metrics.csv (columns fixed by the first row) and to TensorBoard
    when it is installed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.columns = None
        if self.path.exists():
            with open(self.path, newline="") as fh:
                self.columns = next(csv.reader(fh), None)
        self.board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional
            pass

    def write(self, row: dict) -> None:
        import io

        text = io.StringIO(newline="")
        if self.columns is None:  # a new (or empty) file: the header first
            self.columns = list(row)
            csv.writer(text).writerow(self.columns)
        # a resumed run of an older version keeps its header: its old column names take the new values
        csv.writer(text).writerow([_fmt(row.get(c, row.get(current_column(c), ""))) for c in self.columns])
        self._append(text.getvalue().encode("utf-8"))
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["step"])

    def _append(self, data: bytes) -> None:
        """Append to metrics.csv; in an open output folder (a run directory) only to a file of ours."""
        from .outputs import folder_for

        output = folder_for(self.path)
        if output is not None:
            output.append(self.path, data, durable=False)
            return
        with open(self.path, "ab") as fh:
            fh.write(data)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(path) -> dict[str, list[float]]:
    """A metrics.csv as columns of floats (blank or unreadable cells become NaN), rows sorted
    by step, columns under their current names; DataError when the file is missing or has no rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no training history: {path} not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"{path} holds no rows yet")

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    columns = {current_column(name): [number(row.get(name)) for row in rows] for name in rows[0] if name is not None}
    order = sorted(range(len(rows)), key=lambda i: columns["step"][i])
    return {name: [values[i] for i in order] for name, values in columns.items()}
