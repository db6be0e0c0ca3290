"""A prior fitted after training: a Gaussian mixture over the posterior means of the training
images (ex-post density estimation, as in the RAE paper and the two-stage VAE).

A VAE's decoder is trained on what the encoder produces, not on N(0, I): where the aggregate
posterior leaves holes in the prior, samples from N(0, I) decode to images that look like
none of the data. A mixture fitted to the encoded training set samples where the decoder was
trained. ``fit_prior`` encodes a folder (the run's training data by default), fits
scikit-learn's ``GaussianMixture`` to the flattened raw latents (one mixture per class for a
conditional model) and returns a ``FittedPrior``; ``save``/``load`` keep it in a safetensors
file beside the run's checkpoints (``<run>/priors/step_XXXXXXXX.safetensors``, no pickle),
with the checkpoint's SHA-256, the folder, the image count and the settings in its metadata.
``load_run`` attaches the prior of its checkpoint, and every sampling path then uses it
(``VAE.sample_prior(prior="auto")``; ``prior="model"`` asks for the model's own).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, FlexVAEError

PRIOR_DIR = "priors"
COVARIANCES = ("auto", "full", "diag")
FITTED_LATENTS = ("gaussian", "deterministic")  # continuous latents a mixture can stand in for
MAX_COMPONENTS = 1024
MAX_FULL_DIMS = 4096  # a full covariance is D x D per component: beyond this, diagonal ones


class FittedPrior:
    """Gaussian mixtures over flattened raw latents: one for all images, or one per class
    (``mixtures[c]``); each holds weights (K,), means (K, D) and the Cholesky factors of the
    covariances (K, D, D), or standard deviations (K, D) for diagonal ones."""

    def __init__(self, mixtures: dict, latent_shape, meta: dict):
        self.mixtures, self.latent_shape, self.meta = mixtures, tuple(latent_shape), meta

    @property
    def per_class(self) -> bool:
        return set(self.mixtures) != {None}

    def describe(self) -> str:
        m = self.meta
        part = f", one per class ({len(self.mixtures)})" if self.per_class else ""
        return (f"fitted prior: a {m['components']}-component {m['covariance']} Gaussian mixture{part}, "
                f"fitted on {m['images']} images of {m['data']}")

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator=None, device=None, labels=None, temperature: float = 1.0) -> torch.Tensor:
        """``n`` raw latents; ``labels`` (n class indices) pick each sample's class mixture."""
        device = torch.device(device or "cpu")
        if self.per_class:
            if labels is None:
                raise FlexVAEError("this fitted prior has one mixture per class: give the samples' classes")
            out = torch.empty((n, math.prod(self.latent_shape)), device=device)
            for label in labels.unique().tolist():
                rows = (labels == label).nonzero().flatten()
                if label not in self.mixtures:
                    raise FlexVAEError(f"the fitted prior has no mixture for class index {label} (no training "
                                       "image of that class was encoded)")
                out[rows] = self._draw(self.mixtures[label], len(rows), generator, device, temperature)
        else:
            out = self._draw(self.mixtures[None], n, generator, device, temperature)
        return out.view(n, *self.latent_shape)

    @staticmethod
    def _draw(mixture: dict, n: int, generator, device, temperature: float) -> torch.Tensor:
        weights, means, factor = (mixture[k].to(device, torch.float32) for k in ("weights", "means", "factor"))
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, means.shape[1]), generator=generator, device=device) * temperature
        if factor.dim() == 3:  # full covariance: L @ noise
            return means[component] + torch.einsum("nij,nj->ni", factor[component], noise)
        return means[component] + factor[component] * noise

    # ------------------------------------------------------------------ storage
    def save(self, path) -> Path:
        from safetensors.torch import save_file

        from .files import atomic_path

        tensors = {}
        for label, mixture in self.mixtures.items():
            prefix = "all." if label is None else f"class.{label}."
            tensors.update({prefix + k: v.float().cpu().clone() for k, v in mixture.items()})
        header = {"flexvae_prior": json.dumps({**self.meta, "latent_shape": list(self.latent_shape)})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return Path(path)

    @classmethod
    def load(cls, path, latent_shape) -> "FittedPrior":
        """A saved prior, checked as untrusted input against the model's ``latent_shape``."""
        from safetensors import safe_open

        dims = math.prod(latent_shape)
        allowed = {1: MAX_COMPONENTS, 2: MAX_COMPONENTS * dims, 3: MAX_COMPONENTS * min(dims, MAX_FULL_DIMS) ** 2}
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                for key in fh.keys():  # sizes checked before anything is read: a file never sets them
                    shape = fh.get_slice(key).get_shape()
                    if len(shape) not in allowed or math.prod(shape) > allowed[len(shape)]:
                        raise CheckpointError(f"{path}: tensor {key!r} of shape {tuple(shape)} is not part of a "
                                              f"prior for {dims} latent dimensions")
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except CheckpointError:
            raise
        except Exception as exc:  # not a safetensors file, truncated, ...
            raise CheckpointError(f"{path}: not a readable fitted prior ({exc})") from None
        try:
            meta = json.loads(header["flexvae_prior"])
            stored_shape = tuple(int(v) for v in meta["latent_shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: no fitted-prior metadata") from None
        if stored_shape != tuple(latent_shape):
            raise CheckpointError(f"{path}: a prior for latents of shape {stored_shape}, the model's are "
                                  f"{tuple(latent_shape)}")
        dims = math.prod(stored_shape)
        mixtures = {}
        for key, value in tensors.items():
            head, _, name = key.rpartition(".")
            label = None if head == "all" else int(head.split(".")[1]) if head.startswith("class.") else "bad"
            if label == "bad" or name not in ("weights", "means", "factor"):
                raise CheckpointError(f"{path}: unexpected tensor {key!r}")
            mixtures.setdefault(label, {})[name] = value.float()
        for label, mixture in mixtures.items():
            weights, means, factor = (mixture.get(k) for k in ("weights", "means", "factor"))
            k = None if weights is None else weights.shape[0]
            ok = (weights is not None and means is not None and factor is not None and weights.dim() == 1
                  and 0 < k <= MAX_COMPONENTS and tuple(means.shape) == (k, dims)
                  and tuple(factor.shape) in ((k, dims), (k, dims, dims))
                  and bool(torch.isfinite(weights).all()) and bool((weights >= 0).all()) and float(weights.sum()) > 0)
            if not ok:
                raise CheckpointError(f"{path}: mixture {label if label is not None else 'all'} is malformed")
        if not mixtures or (None in mixtures and len(mixtures) > 1):
            raise CheckpointError(f"{path}: no mixture, or both a shared and per-class mixtures")
        return cls(mixtures, stored_shape, meta)


# ---------------------------------------------------------------------- where it lives
def prior_path(checkpoint: Path) -> Path:
    """``<run>/priors/<checkpoint name>``: the prior fitted to that checkpoint."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run / PRIOR_DIR / checkpoint.name


def attach_saved_prior(loaded) -> str | None:
    """Attach the prior fitted to ``loaded``'s checkpoint (its file's SHA-256 must match), if
    there is one; a line saying what was attached or why not, or None when there is none."""
    if loaded.path is None:
        return None
    path = prior_path(loaded.path)
    if not path.is_file():
        return None
    prior = FittedPrior.load(path, loaded.vae.latent_shape)
    if prior.meta.get("checkpoint_sha256") != loaded.provenance()["sha256"]:
        return f"{path} was fitted to another version of {loaded.path.name}; not used (fit it again: fit-prior)"
    loaded.vae.fitted_prior = prior
    return prior.describe()


# ---------------------------------------------------------------------- fitting
def choose_covariance(covariance: str, images: int, dims: int, components: int) -> str:
    """'auto': full covariances when there are at least ten images per covariance parameter of
    a component's share, else diagonal ones (a full D x D covariance from a few images is singular)."""
    if covariance not in COVARIANCES:
        raise ConfigError(f"the covariance of a fitted prior must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    if covariance == "full" and dims > MAX_FULL_DIMS:
        raise ConfigError(f"a full covariance over {dims:,} latent dimensions is {dims:,} x {dims:,} per component; "
                          f"full covariances take at most {MAX_FULL_DIMS:,} dimensions: use --covariance diag")
    if covariance != "auto":
        return covariance
    return "full" if images / components >= 10 * dims and dims <= MAX_FULL_DIMS else "diag"


def require_sklearn(what: str = "fitting a prior"):
    """scikit-learn's GaussianMixture, or one error line saying how to install it."""
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise FlexVAEError(f"{what} needs scikit-learn: pip install -e '.[priors]' (or pip install "
                           "scikit-learn)") from None
    return GaussianMixture


def fit_mixture(latents: torch.Tensor, components: int, covariance: str, seed: int) -> dict:
    """scikit-learn's GaussianMixture fitted to ``latents`` (N, D): weights, means, factors."""
    GaussianMixture = require_sklearn()
    data = latents.double().cpu().numpy()
    components = max(1, min(components, len(data)))
    mixture = GaussianMixture(n_components=components, covariance_type=covariance, random_state=seed,
                              reg_covar=1e-6, max_iter=200).fit(data)
    factor = torch.from_numpy(mixture.covariances_)
    factor = torch.linalg.cholesky(factor) if covariance == "full" else factor.sqrt()
    # contiguous: scikit-learn's arrays and a batched Cholesky factor may be column-major
    return {"weights": torch.from_numpy(mixture.weights_).contiguous(),
            "means": torch.from_numpy(mixture.means_).contiguous(), "factor": factor.contiguous()}


@torch.no_grad()
def fit_prior(loaded, folder=None, components: int = 10, covariance: str = "auto", seed: int = 0, batch_size: int = 64,
              device="cpu", progress: bool = False) -> FittedPrior:
    """Encode the images of ``folder`` (default: the run's training data) with ``loaded``'s model
    (posterior means, raw) and fit a mixture to them: one per class when the model takes labels
    (from the folder's sub-folders)."""
    from .analysis.common import image_dataset, image_loader

    vae = loaded.vae
    if vae.latent.kind not in FITTED_LATENTS:
        raise FlexVAEError(f"a fitted prior stands in for a continuous latent ({', '.join(FITTED_LATENTS)}); this "
                           f"model's is {vae.latent.kind}")
    if not 1 <= components <= MAX_COMPONENTS:
        raise ConfigError(f"a fitted prior takes 1 to {MAX_COMPONENTS} components, got {components}")
    vae.eval()
    dataset = image_dataset(loaded, None if folder is None else str(folder), loaded.cfg, train=True)
    folder = folder if folder is not None else loaded.cfg.data.path
    latents, labels = [], []
    for batch in image_loader(dataset, batch_size, device, 0):
        images = batch if isinstance(batch, torch.Tensor) else batch.images
        if images is None:
            continue
        batch_labels = None if isinstance(batch, torch.Tensor) else batch.labels
        inputs = {} if batch_labels is None or not vae.takes_labels else {"labels": batch_labels.to(device)}
        latents.append(vae.encode(images.to(device), **inputs).mode().flatten(1).float().cpu())
        if vae.takes_labels:
            labels.append(batch_labels if batch_labels is not None else torch.full((len(images),), -1))
    if not latents:
        raise FlexVAEError(f"no image of {folder} could be encoded to fit a prior")
    latents = torch.cat(latents)
    dims = latents.shape[1]
    if vae.takes_labels:
        labels = torch.cat(labels)
        groups = {int(c): latents[labels == c] for c in labels.unique().tolist() if c >= 0}
        if not groups:
            raise FlexVAEError(f"{folder}: a conditional model's prior is fitted per class, and no image has a label")
    else:
        groups = {None: latents}
    chosen = choose_covariance(covariance, min(len(g) for g in groups.values()), dims, components)
    mixtures = {label: fit_mixture(group, components, chosen, seed) for label, group in groups.items()}
    meta = {"checkpoint": str(loaded.path), "checkpoint_sha256": loaded.provenance()["sha256"], "step": loaded.step,
            "data": str(folder), "images": int(len(latents)), "components": components, "covariance": chosen,
            "seed": seed, "method": "sklearn.mixture.GaussianMixture on posterior means (raw latents)"}
    return FittedPrior(mixtures, vae.latent_shape, meta)


def fit_run_prior(loaded, cfg, device="cpu") -> str:
    """``train.fit_prior`` at the end of a run: the prior of ``loaded``'s checkpoint fitted to the
    run's training images, saved beside it and attached; a line saying so (or why none was fitted)."""
    if loaded.vae.latent.kind not in FITTED_LATENTS:
        return f"note: train.fit_prior: a {loaded.vae.latent.kind} latent has no fitted prior; none fitted"
    prior = fit_prior(loaded, None, components=cfg.train.fit_prior, seed=cfg.train.seed,
                      batch_size=cfg.encode.batch_size, device=device)
    path = prior.save(prior_path(loaded.path))
    loaded.vae.fitted_prior = prior
    return f"{prior.describe()}: {path}; the last sample grid shows samples from it"
