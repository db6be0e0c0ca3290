"""Evaluating hierarchical VAEs: KL and active units per latent group, the importance-sampled
likelihood of the whole hierarchy, and the partial-posterior picture.

Importance sampling draws every group from the posterior (top-down, each group's q given the
groups above), so with K draws z^(k) = (z_top, z_1, ..., z_L):

    log w_k = log p(x | z) + log p(z_top) + sum_i log p(z_i | z_<i)
              - log q(z_top | x) - sum_i log q(z_i | x, z_<i)

and -log p(x) ~ -(logsumexp_k log w_k - log K), as for a flat model.
"""

from __future__ import annotations

import torch

from ..data import save_grid
from ..forward_state import ForwardState, gaussian_log_density
from .measures import ACTIVE_THRESHOLD, _Moments, _per_channel, model_log_likelihood


class GroupStatistics:
    """Per group (the top latent as "top", then the decoder's groups): the mean KL per image
    and the activity of each unit, Var_x(E_q[z_u]) > ACTIVE_THRESHOLD."""

    def __init__(self):
        self.kl: dict[str, _Moments] = {}
        self.means: dict[str, _Moments] = {}

    def add(self, posterior, state: ForwardState) -> None:
        parts = {"top": (posterior.kl_elements(), posterior.mode())}
        for name, group in state.posteriors.items():
            parts[name] = (group.kl_elements(), group.mean)
        for name, (kl, mean) in parts.items():
            self.kl.setdefault(name, _Moments()).add(kl)
            self.means.setdefault(name, _Moments()).add(mean)

    def merge(self, parts) -> None:
        """Become the statistics of every process's part (split.py)."""
        from .split import merge_moments

        names = list(dict.fromkeys(name for part in parts for name in part.kl))
        self.kl = {name: merge_moments(p.kl[name] for p in parts if name in p.kl) for name in names}
        self.means = {name: merge_moments(p.means[name] for p in parts if name in p.means) for name in names}

    def result(self) -> dict:
        out = {}
        for name, kl in self.kl.items():
            variance = self.means[name].variance()
            channels = _per_channel(variance, "mean")
            out[name] = {"kl_nats": float(kl.mean().sum()), "shape": list(variance.shape),
                         "active_units": int((variance > ACTIVE_THRESHOLD).sum()), "units": int(variance.numel()),
                         "active_channels": int((channels > ACTIVE_THRESHOLD).sum()),
                         "channels": int(channels.numel())}
        return out


@torch.no_grad()
def hierarchical_log_weights(vae, x: torch.Tensor, num_samples: int = 100, sigma: float = 0.1,
                             generator: torch.Generator | None = None, max_batch: int = 256,
                             labels=None) -> torch.Tensor:
    """log w_k of every image for K draws of the whole hierarchy from its posterior; (K, B)."""
    batch = x.shape[0]
    chunk = max(1, min(num_samples, max_batch // max(1, batch)))
    out = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        xs = x.repeat(k, *([1] * (x.dim() - 1)))
        ys = None if labels is None else labels.repeat(k)
        state = ForwardState(labels=ys, sample=True, generator=generator, record=True)
        posterior = vae._encode(xs, labels=ys, state=state)[0]
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
        recon = vae.decode(z.to(xs.dtype), state=state)
        log_w = model_log_likelihood(vae, recon, xs, sigma).double()
        log_w = log_w + (gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
                         - gaussian_log_density(z, mean, logvar)).double()
        for name in state.log_q:
            log_w = log_w + (state.log_p[name] - state.log_q[name]).double()
        out.append(log_w.view(k, batch))
    return torch.cat(out, dim=0)


@torch.no_grad()
def partial_posterior_grid(vae, images: torch.Tensor, path, seed: int = 0, temperature: float = 1.0) -> dict:
    """partial_posterior.png: row k = 0 .. groups holds the images decoded with their first k
    groups (top latent first) from the posterior and the rest drawn from the prior; the first
    row is the inputs. A column keeps its prior draws across rows."""
    groups = 1 + len(vae.groups)
    rows = [images]
    for k in range(groups + 1):
        generator = torch.Generator(device=images.device).manual_seed(seed)
        rows.append(vae.partial_posterior(images, k, generator=generator, temperature=temperature))
    save_grid(rows, path)
    return {"rows": ["inputs"] + [f"k = {k}" for k in range(groups + 1)], "groups": ["top", *vae.groups],
            "temperature": temperature}
