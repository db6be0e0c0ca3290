"""hVAE's analysis tools, for any model (flat: one group, "top"; hierarchical: "top" and the
decoder's groups), written by ``-analyze`` into <run>/analysis:

- divergence statistics (divergence.json, divergence.png): per group, the KL in nats per
  image (mean, standard deviation, quartiles over the images) and per channel;
- decodability (decodability.json, decodability.png): a linear probe per group, logistic
  regression on the group's posterior means, on a labelled folder (stratified split);
- latent steps (latent_steps.png): for each group, its most divergent channel stepped from
  -3 to +3 of its spread around a reference image's posterior, every other group held at the
  reference's posterior means;
- white-noise receptive fields (receptive_fields.png): for the units chosen per group (the
  most divergent channels, at their centre position), the average of white-noise input
  images weighted by the unit's centred response to them;
- most exciting inputs (most_exciting.png): for the same units, gradient ascent on an input
  started from noise, maximising the unit's posterior mean, each step projected back into
  the image range [-1, 1] and onto an L2 ball of the data's mean image norm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import save_grid
from ..forward_state import ForwardState

UNITS_PER_GROUP = 4


def group_means(vae, x: torch.Tensor, labels=None) -> dict[str, torch.Tensor]:
    """Posterior means of every group, the top latent first ("top"), (B, *group shape) each."""
    state = ForwardState(labels=labels, sample=False)
    posterior = vae._encode(x, labels=labels, state=state)[0]
    top = posterior.mode()
    if vae.groups:
        vae.decode(top, state=state)
    return {"top": top, **state.values}


@torch.no_grad()
def group_divergences(vae, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL per image and channel of every group: (N, channels) each."""
    _, posterior, state = vae.reconstruct_raw(images)
    found = {"top": posterior.kl_groups().float()}
    found.update({name: group.kl_groups().float() for name, group in state.posteriors.items()})
    return found


def divergence_statistics(vae, images: torch.Tensor) -> dict:
    out = {}
    for name, kl in group_divergences(vae, images).items():
        per_image = kl.sum(1)
        q = torch.quantile(per_image, torch.tensor([0.25, 0.5, 0.75]))
        out[name] = {"mean": float(per_image.mean()), "std": float(per_image.std()) if len(per_image) > 1 else 0.0,
                     "quartiles": [float(v) for v in q], "per_channel": [float(v) for v in kl.mean(0)]}
    return out


def chosen_units(vae, images: torch.Tensor, per_group: int = UNITS_PER_GROUP) -> list[tuple[str, int, tuple]]:
    """(group, channel, position) of the most divergent channels of each group, at their centre."""
    units = []
    means = group_means(vae, images[:1])
    for name, kl in group_divergences(vae, images).items():
        order = torch.argsort(kl.mean(0), descending=True)[:per_group].tolist()
        spatial = tuple(means[name].shape[2:])
        centre = tuple(s // 2 for s in spatial)
        units += [(name, c, centre) for c in order]
    return units


def _unit(values: dict, unit) -> torch.Tensor:
    name, channel, position = unit
    return values[name][(slice(None), channel, *position)]


@torch.no_grad()
def latent_steps(vae, reference: torch.Tensor, images: torch.Tensor, steps: int = 9, span: float = 3.0):
    """Rows per group: the reference, then its most divergent channel stepped over ±span spreads."""
    kl = group_divergences(vae, images)
    means = group_means(vae, images)
    ref = group_means(vae, reference[:1])
    rows, described = [], []
    for name in ref:
        channel = int(torch.argmax(kl[name].mean(0)))
        spread = float(means[name][:, channel].std()) or 1.0
        columns = [reference[:1]]
        for v in torch.linspace(-span, span, steps).tolist():
            given = {k: t.clone() for k, t in ref.items()}
            given[name][:, channel] += v * spread
            state = ForwardState(given={k: t for k, t in given.items() if k != "top"})
            columns.append(vae.to_image(vae.decode(given["top"], state=state)))
        rows.append(torch.cat(columns))
        described.append({"group": name, "channel": channel, "spread": spread})
    return rows, described


@torch.no_grad()
def receptive_fields(vae, units, shape, count: int = 512, seed: int = 0, batch: int = 128) -> torch.Tensor:
    """(units, *shape): white-noise inputs averaged with weights = each unit's centred response."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    noises, responses = [], []
    for start in range(0, count, batch):
        noise = torch.rand((min(batch, count - start), *shape), generator=generator, device=device) * 2 - 1
        values = group_means(vae, noise)
        responses.append(torch.stack([_unit(values, u) for u in units], dim=1).double())
        noises.append(noise.double())
    noise, response = torch.cat(noises), torch.cat(responses)
    response = response - response.mean(0)
    weights = response / response.abs().sum(0).clamp_min(1e-12)
    fields = torch.einsum("nu,n...->u...", weights, noise - noise.mean(0))
    return fields.float()


def most_exciting(vae, units, shape, norm: float, steps: int = 60, step_size: float = 0.1,
                  seed: int = 0) -> torch.Tensor:
    """(units, *shape): inputs that maximise each unit's posterior mean, from faint noise, by
    projected gradient ascent: each step moves ``step_size x norm`` along the normalised
    gradient, then clamps to [-1, 1] and scales back into the L2 ball of radius ``norm``."""
    device = next(vae.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    x = (torch.rand((len(units), *shape), generator=generator, device=device) * 2 - 1) * 0.01
    index = torch.arange(len(units), device=device)
    view = (-1, *([1] * len(shape)))
    was_training = vae.training
    vae.eval()
    for _ in range(steps):
        x.requires_grad_(True)
        values = group_means(vae, x)
        response = torch.stack([_unit(values, u) for u in units], dim=1)[index, index]
        (grad,) = torch.autograd.grad(response.sum(), x)
        with torch.no_grad():
            x = x + step_size * norm * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            x = x.clamp(-1, 1)
            x = x * (norm / x.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(view)
    vae.train(was_training)
    return x.detach()


def _spread_to_image(fields: torch.Tensor) -> torch.Tensor:
    """Each field scaled to [-1, 1] by its largest absolute value (zero stays mid-grey)."""
    peak = fields.flatten(1).abs().max(1).values.clamp_min(1e-12)
    return fields / peak.view(-1, *([1] * (fields.dim() - 1)))


def decodability(vae, latents_by_group: dict, labels: np.ndarray, seed: int = 0, test_fraction: float = 0.25) -> dict:
    """Held-out accuracy of a logistic regression per group (posterior means flattened)."""
    from sklearn.model_selection import train_test_split

    from .probe import _fit_score

    counts = np.unique(labels, return_counts=True)[1]
    out = {"chance": float(counts.max() / counts.sum()), "images": int(len(labels))}
    for name, values in latents_by_group.items():
        train_x, test_x, train_y, test_y = train_test_split(values, labels, test_size=test_fraction, stratify=labels,
                                                            random_state=seed)
        out[name] = _fit_score(train_x, train_y, test_x, test_y, seed)
    return out


def unit_grid(vae, units, images: torch.Tensor, path, kind: str, seed: int = 0) -> Path:
    """receptive_fields.png or most_exciting.png: one row per group, one tile per unit."""
    shape = tuple(images.shape[1:])
    if kind == "receptive":
        tiles = _spread_to_image(receptive_fields(vae, units, shape, seed=seed))
    else:
        norm = float(images.flatten(1).norm(dim=1).mean())
        tiles = most_exciting(vae, units, shape, norm, seed=seed)
    rows, current, names = [], [], []
    for tile, (name, _, _) in zip(tiles, units):
        if names and name != names[-1]:
            rows.append(torch.stack(current))
            current = []
        if not names or name != names[-1]:
            names.append(name)
        current.append(tile)
    rows.append(torch.stack(current))
    save_grid(rows, path)
    return Path(path)


def plot_divergence(stats: dict, path) -> Path:
    """divergence.png: KL per channel of each group (bars), the per-image spread in the title."""
    from .pictures import _figure, _save

    fig, axes = _figure(1, len(stats))
    for ax, (name, s) in zip(axes, stats.items()):
        ax.bar(range(len(s["per_channel"])), s["per_channel"], color="C0")
        ax.set_title(f"{name}: {s['mean']:.1f} ± {s['std']:.1f} nats")
        ax.set_xlabel("channel")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("KL per image (nats)")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_decodability(result: dict, path) -> Path:
    from .pictures import _figure, _save

    names = [k for k in result if k not in ("chance", "images", "labelled")]
    fig, (ax,) = _figure(1, 1, size=(max(3.0, 1.2 * len(names) + 1), 3.2))
    ax.bar(names, [result[n] for n in names], color="C2")
    ax.axhline(result["chance"], color="0.4", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("linear probe per group")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


__all__ = ["divergence_statistics", "chosen_units", "latent_steps", "receptive_fields", "most_exciting",
           "decodability", "unit_grid", "plot_divergence", "plot_decodability", "group_means"]
