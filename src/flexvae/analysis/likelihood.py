"""The importance-sampled likelihood of a model on images (``-eval``'s NLL; see evaluate.py)."""

from __future__ import annotations

import math

import torch

from ..latents import DiagonalGaussian
from .measures import LOG_2PI, has_likelihood, model_log_likelihood
from .split import batch_generator, gather, indexed


def is_gaussian(posterior) -> bool:
    """The importance-sampled likelihood is implemented for diagonal Gaussian posteriors."""
    return isinstance(posterior, DiagonalGaussian)


def model_bits_per_dim(vae, nll_nats: float, dims: int) -> float:
    if has_likelihood(vae):
        return vae.likelihood.bits_per_dim(nll_nats, dims)
    return bits_per_dim(nll_nats, dims, vae.output)


@torch.no_grad()
def importance_log_weights(vae, x: torch.Tensor, num_samples: int = 100, sigma: float = 0.1,
                           generator: torch.Generator | None = None, max_batch: int = 256,
                           labels=None, discrete: bool = True) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K draws z_k ~ q(z|x), (K, B); p(z):
    N(0, I) or the model's learned prior.
    ``labels``: the images' classes, for a conditional model (log p(x | y)). p(x|z) is the mass
    of x's 8-bit levels (``discrete=False``: a continuous decoder's density)."""
    posterior = vae.encode(x, labels)
    if not is_gaussian(posterior):
        raise ValueError("the importance-sampled likelihood needs a Gaussian posterior")
    mean, logvar = posterior.mean.double(), posterior.logvar.double()
    std = torch.exp(0.5 * logvar)
    batch = x.shape[0]
    chunk = max(1, min(num_samples, max_batch // max(1, batch)))
    out = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        eps = torch.randn((k, *mean.shape), generator=generator, device=mean.device, dtype=torch.float32).double()
        z = mean + std * eps
        recon = vae.decode(z.reshape(k * batch, *mean.shape[1:]).to(x.dtype),
                           None if labels is None else labels.repeat(k))
        repeated = x.unsqueeze(0).expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
        log_px_z = model_log_likelihood(vae, recon, repeated, sigma, discrete).view(k, batch)
        if vae.prior is not None:  # a learned prior's density (priors/)
            log_pz = vae.prior.log_prob(z.reshape(k * batch, *mean.shape[1:]), vae).double().view(k, batch)
        else:
            log_pz = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).flatten(2).sum(2)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * LOG_2PI).flatten(2).sum(2)
        out.append(log_px_z + log_pz - log_qz)
    return torch.cat(out, dim=0)


def importance_nll(vae, x: torch.Tensor, num_samples: int = 100, sigma: float = 0.1,
                   generator: torch.Generator | None = None, max_batch: int = 256,
                   discrete: bool = True) -> torch.Tensor:
    """-log p(x) per sample in nats, estimated with ``num_samples`` importance samples."""
    log_w = importance_log_weights(vae, x, num_samples, sigma, generator, max_batch, discrete=discrete)
    return -(torch.logsumexp(log_w, dim=0) - math.log(num_samples))


def bits_per_dim(nll_nats: float, dims: int, output: str = "value") -> float:
    """NLL per dimension in bits; the NLL is of a mass over 8-bit levels (measures.py) for every
    ``output``, so no unit conversion is needed."""
    return nll_nats / (dims * math.log(2))


def default_nll_samples(data_shape) -> int:
    """100 importance samples up to 64x64 pixels, fewer for larger images (at least 8)."""
    pixels = math.prod(data_shape[1:])
    return 100 if pixels <= 64 * 64 else max(8, 100 * 64 * 64 // pixels)


def _images(batch):
    return batch if isinstance(batch, torch.Tensor) else batch.images


def _labels(batch, device):
    labels = None if isinstance(batch, torch.Tensor) else batch.labels
    return None if labels is None else labels.to(device)


def likelihood_estimate(vae, batches, samples, sigma, limit, raw_mse, data_shape, device, seed, progress) -> dict:
    from tqdm import tqdm

    probe = torch.zeros((1, *data_shape), device=device)
    if not is_gaussian(vae.encode(probe)):
        return {"skipped": "the importance-sampled likelihood needs a Gaussian posterior"}
    if has_likelihood(vae):
        scale = vae.likelihood.metrics().get("scale")
        likelihood, sigma = f"the model's own: {vae.likelihood.name}", scale
    elif vae.output == "logits":
        likelihood, sigma = "bernoulli", None
    else:
        if sigma == "auto":
            sigma = max(math.sqrt(raw_mse), 1e-3)
            likelihood = "gaussian, sigma = sqrt(MSE) of the decoder mean (auto)"
        else:
            sigma = float(sigma)
            likelihood = "gaussian, fixed sigma"
    nll, neg_elbo, done = [], [], 0
    for index, batch in tqdm(indexed(batches), disable=not progress, desc=f"NLL ({samples} samples)",
                             total=len(batches) if hasattr(batches, "__len__") else None):
        x = _images(batch)
        if x is None:
            continue
        start = index * batches.batch_size if hasattr(batches, "batch_size") else done  # its first image's place
        if start >= limit:
            break
        generator = batch_generator(device, seed, index)
        labels = _labels(batch, device)
        x = x[: limit - start].to(device)
        labels = None if labels is None else labels[: x.shape[0]]
        if vae.groups:
            from .latent_groups import hierarchical_log_weights

            log_w = hierarchical_log_weights(vae, x, samples, sigma if sigma is not None else 1.0, generator,
                                             labels=labels)
        else:
            log_w = importance_log_weights(vae, x, samples, sigma if sigma is not None else 1.0, generator,
                                           labels=labels)
        nll.append((index, -(torch.logsumexp(log_w, 0) - math.log(samples)).cpu()))
        neg_elbo.append((index, -log_w.mean(0).cpu()))
        done += x.shape[0]
    parts = gather(batches, (nll, neg_elbo))  # every process's batches, put back in the global order
    nll = [value for _, value in sorted((pair for part in parts for pair in part[0]), key=lambda p: p[0])]
    neg_elbo = [value for _, value in sorted((pair for part in parts for pair in part[1]), key=lambda p: p[0])]
    nll, neg_elbo = torch.cat(nll), torch.cat(neg_elbo)
    dims = math.prod(data_shape)
    mean_nll = float(nll.mean())
    return {
        "likelihood": likelihood,
        "sigma": sigma,
        "samples": samples,
        "images": int(nll.numel()),
        "nats": mean_nll,
        "nats_std_error": float(nll.std() / math.sqrt(nll.numel())) if nll.numel() > 1 else None,
        "bits_per_dim": model_bits_per_dim(vae, mean_nll, dims),
        "neg_elbo_nats": float(neg_elbo.mean()),
        "neg_elbo_bits_per_dim": model_bits_per_dim(vae, float(neg_elbo.mean()), dims),
        "dims": dims,
    }


