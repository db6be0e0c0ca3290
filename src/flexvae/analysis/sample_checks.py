"""What -eval says of a model's prior samples on an unlabelled folder: a classifier two-sample
test of prior samples against reconstructions of the folder (judge.two_sample_test), and with
``--fid`` (an Inception loaded before any work) the FID of prior samples and of reconstructions
against the folder's images (fid.py)."""

from __future__ import annotations

import torch

from .judge import two_sample_test

MAX_IMAGES = 500
MIN_TWO_SAMPLE = 20


@torch.no_grad()
def gather(vae, batches, device, limit: int = MAX_IMAGES):
    """(images, reconstructions from posterior means), at most ``limit`` of each, on the CPU."""
    images, recons = [], []
    count = 0
    for batch in batches:
        x = batch if isinstance(batch, torch.Tensor) else batch.images
        if x is None:
            continue
        labels = None if isinstance(batch, torch.Tensor) or not vae.takes_labels else batch.labels
        x = x[: limit - count].to(device)
        images.append(x.float().cpu())
        recons.append(vae.reconstruct(x, labels=None if labels is None else labels[: len(x)].to(device)).float().cpu())
        count += len(x)
        if count >= limit:
            break
    if not images:
        return None, None
    return torch.cat(images), torch.cat(recons)


@torch.no_grad()
def prior_samples(vae, n: int, seed: int, device, batch: int = 100) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([vae.sample_prior(min(batch, n - s), generator=generator).float().cpu() for s in range(0, n, batch)])


def checks_apply(vae) -> bool:
    """Whether the checks apply: a continuous latent, no labels."""
    return vae.latent.kind in ("gaussian", "deterministic") and not vae.takes_labels


def sample_checks(vae, batches, device, seed: int = 0, inception=None) -> dict:
    """{"two_sample": ..., "fid": ...} for the folder's images (each where it applies; the FIDs
    with ``inception``, a fid.Inception)."""
    images, recons = gather(vae, batches, device)
    if images is None:
        return {}
    prior = "fitted" if vae.fitted_prior is not None else "model's"
    samples = prior_samples(vae, len(images), seed, device)
    result = {}
    if images.dim() == 4 and len(images) >= MIN_TWO_SAMPLE:
        result["two_sample"] = {"images": len(images), "prior": prior,
                                "accuracy": two_sample_test(samples, recons, seed=seed)}
    if inception is not None:
        from .fid import fid as distance

        real = inception.features(images)
        result["fid"] = {"prior": prior, "samples": distance(real, inception.features(samples)),
                         "reconstructions": distance(real, inception.features(recons)),
                         "protocol": inception.protocol(len(images), images.shape[1:],
                                                        "posterior means (reconstructions)")}
    return result


def report_rows(result: dict) -> list:
    """The -eval table's rows of ``sample_checks``'s results."""
    rows = []
    two = result.get("two_sample")
    if two:
        rows.append((f"{two['prior']} prior samples told from reconstructions ({two['images']} a side; 0.5: "
                     "indistinguishable)", two["accuracy"]))
    fid = result.get("fid")
    if fid:
        rows.append((f"FID of {fid['prior']} prior samples ({fid['protocol']['images']} images)", fid["samples"]))
        rows.append(("reconstruction FID (posterior means)", fid["reconstructions"]))
    return rows
