"""Pictures of a trained model: latent traversals, prior samples and training-history plots.

- Traversal grid: the latent channels (or dimensions, for a flat latent) with the largest
  mean KL over the images, one row each. Row c starts with the reference image, then
  decodes the reference's posterior mean with channel c shifted by v * s_c for
  v in [-3, 3], every other channel fixed. s_c is the channel's aggregate-posterior
  standard deviation over the images, sqrt(Var_x(E_q[z]) + E_x[Var_q(z)]) averaged over
  its spatial positions; for a unit the KL ignores it is about 1, the prior's.
- Prior grid: raw latents z ~ N(0, I), the prior of the KL term, decoded
  (``VAE.sample_prior``). Scaled latents (what ``-e`` writes) follow N(0, s^2 I) with s
  the scaling factor, so they are never decoded without dividing by s first.
- History plots (matplotlib, optional extra ``plots``) from the run's ``metrics.csv``:
  total loss and each loss term, learning rate and KL weight, gradient norm, and the KL
  per latent channel at each checkpoint still in the run directory.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from ..data import save_grid
from ..files import atomic_open, write_text
from . import require

# Not plotted as loss terms; the class diagnostics have their own plot (conditional.py).
NOT_LOSS_TERMS = ("step", "kl_weight", "lr", "grad_norm", "images_per_s", "stage", "skipped", "skip_threshold",
                  "kl_style", "kl_class", "tau", "label_acc", "label_purity")


# ------------------------------------------------------------------ traversal
@torch.no_grad()
def channel_statistics(vae, images: torch.Tensor) -> dict:
    """Mean KL per channel (summed over positions) and aggregate-posterior std per channel."""
    posterior = vae.encode(images)
    mean = posterior.mode().double()
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t.unsqueeze(-1)  # noqa: E731
    m = flat(mean)
    between = m.var(0, unbiased=images.shape[0] > 1) if images.shape[0] > 1 else torch.zeros_like(m[0])
    within = flat(posterior.variance().double()).mean(0)
    spread = (between + within).mean(-1).sqrt()
    kl = flat(posterior.kl_elements().double()).sum(-1).mean(0)
    return {"kl": kl.float(), "spread": spread.float()}


@torch.no_grad()
def traversal(vae, reference: torch.Tensor, images: torch.Tensor, top_k: int = 8, steps: int = 9,
              span: float = 3.0):
    """Rows of decoded images for the ``top_k`` channels with the largest KL.

    Returns (rows, channels, stats): rows[i] is (1 + steps, C, H, W), the reference
    followed by the traversal of channel channels[i].
    """
    stats = channel_statistics(vae, images)
    order = torch.argsort(stats["kl"], descending=True)[:top_k].tolist()
    z_ref = vae.encode(reference[:1]).mode()
    offsets = torch.linspace(-span, span, steps)
    rows = []
    for channel in order:
        z = z_ref.repeat(steps, *([1] * (z_ref.dim() - 1)))
        shift = (offsets * stats["spread"][channel]).to(z)
        z[:, channel] += shift.view(-1, *([1] * (z.dim() - 2)))
        rows.append(torch.cat([reference[:1], vae.to_image(vae.decode(z))]))
    return rows, order, stats


def traversal_grid(vae, reference, images, path, top_k: int = 8, steps: int = 9, span: float = 3.0) -> dict:
    rows, channels, stats = traversal(vae, reference, images, top_k, steps, span)
    save_grid(rows, path)
    lines = [f"row {i}: channel {c}, mean KL {stats['kl'][c]:.4g} nats, step s_c = {stats['spread'][c]:.4g}"
             for i, c in enumerate(channels)]
    write_text(Path(path).with_suffix(".txt"),
        f"first column: reference image; then the channel shifted by v * s_c, v = {-span:g} .. {span:g} "
        f"in {steps} steps\n" + "\n".join(lines) + "\n")
    return {"channels": channels, "kl": [float(stats["kl"][c]) for c in channels]}


@torch.no_grad()
def prior_grid(vae, path, n: int = 64, seed: int = 0, columns: int | None = None) -> Path:
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = vae.sample_prior(n, generator=generator)
    columns = columns or max(1, round(math.sqrt(n)))
    save_grid([samples[i:i + columns] for i in range(0, n, columns)], path)
    return Path(path)


# -------------------------------------------------------------------- history
def loss_columns(columns: dict) -> list[str]:
    return [c for c in columns if c not in NOT_LOSS_TERMS]


def _smooth(values, window: int):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [a for a in acc if math.isfinite(a)]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out


def _figure(rows: int, cols: int, size=(4.2, 2.8)):
    require("matplotlib", "plotting the training history")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * cols, size[1] * rows), dpi=90)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]


def plot_history(columns: dict, out_dir, kl_history: dict | None = None) -> list[Path]:
    """Write history_losses.png, history_schedule.png and (given KL per channel) history_kl_channels.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = columns["step"]
    written = []
    terms = loss_columns(columns)
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig, axes = _figure(rows, cols)
    window = max(1, len(steps) // 20)
    for ax, name in zip(axes, terms):
        values = columns[name]
        ax.plot(steps, values, color="0.75", lw=0.8, label="logged")
        ax.plot(steps, _smooth(values, window), color="C0", lw=1.4, label=f"mean of {window}")
        if all(v > 0 for v in values if math.isfinite(v)) and any(math.isfinite(v) for v in values):
            ax.set_yscale("log")
        ax.set_title("total loss" if name == "loss" else name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "history_losses.png"))

    present = [c for c in ("lr", "kl_weight", "grad_norm") if c in columns]
    if present:
        fig, axes = _figure(1, len(present))
        titles = {"lr": "learning rate", "kl_weight": "KL weight", "grad_norm": "gradient norm (before clipping)"}
        for ax, name in zip(axes, present):
            values = [v for v in columns[name] if math.isfinite(v)]
            ax.plot(steps, columns[name], color="C1")
            if values and max(values) == min(values):  # a constant: centre it instead of zooming into rounding
                ax.set_ylim(min(values) - abs(min(values)) - 1e-12, max(values) + abs(max(values)) + 1e-12)
            ax.set_title(titles[name])
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "history_schedule.png"))

    if kl_history and kl_history["steps"]:
        fig, (ax,) = _figure(1, 1, size=(6.0, 3.6))
        per_channel = list(zip(*kl_history["kl"]))  # channel -> values over checkpoints
        style = "o-" if len(kl_history["steps"]) < 20 else "-"
        for c, values in enumerate(per_channel):
            ax.plot(kl_history["steps"], values, style, ms=3, lw=1, label=f"ch {c}" if len(per_channel) <= 16 else None)
        ax.set_title(f"KL per latent channel (nats, mean over {kl_history['images']} images)")
        ax.set_xlabel("step (checkpoints in the run)")
        ax.grid(alpha=0.3)
        if len(per_channel) <= 16:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        written.append(_save(fig, out / "history_kl_channels.png"))
    return written


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=Path(path).suffix.lstrip(".") or "png")
    return path


@torch.no_grad()
def kl_per_channel_history(run_dir, images: torch.Tensor, device="cpu") -> dict:
    """KL per channel (mean over ``images``) at every checkpoint kept in the run directory."""
    from ..checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint

    steps, kl = [], []
    for path in list_checkpoints(run_dir):
        ckpt = load_checkpoint(path, with_train_state=False)
        model, _, _ = model_from_checkpoint(ckpt, device=device)
        posterior = model.encode(images.to(device))
        elements = posterior.kl_elements().double().mean(0)
        per = elements.reshape(elements.shape[0], -1).sum(1) if elements.dim() > 1 else elements
        steps.append(ckpt.step)
        kl.append([float(v) for v in per])
    return {"steps": steps, "kl": kl, "images": int(images.shape[0])}


def write_kl_history(history: dict, path) -> Path:
    path = Path(path)
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        channels = len(history["kl"][0]) if history["kl"] else 0
        writer.writerow(["step", *[f"kl_c{c}" for c in range(channels)]])
        for step, values in zip(history["steps"], history["kl"]):
            writer.writerow([step, *[f"{v:.6g}" for v in values]])
    return path
