"""A prior fitted after training: a Gaussian mixture (or a RealNVP flow) over the posterior means
of the training images (ex-post density estimation, as in the RAE paper and the two-stage VAE).

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
from .priors.flow import MAX_HIDDEN, MAX_LAYERS, FlowNetwork

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

    @property
    def density(self) -> str:
        return self.meta.get("density", "mixture")

    def describe(self) -> str:
        m = self.meta
        part = f", one per class ({len(self.mixtures)})" if self.per_class else ""
        what = (f"a RealNVP flow of {m['layers']} couplings ({m['hidden']} hidden units)" if self.density == "flow"
                else f"a {m['components']}-component {m['covariance']} Gaussian mixture")
        return f"fitted prior: {what}{part}, fitted on {m['images']} images of {m['data']}"

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
    def _draw(mixture, n: int, generator, device, temperature: float) -> torch.Tensor:
        if isinstance(mixture, FlowNetwork):
            return mixture.to(device).sample(n, generator, device, temperature)
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
            if isinstance(mixture, FlowNetwork):
                prefix, mixture = prefix + "flow.", mixture.state_dict()
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
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                meta, stored_shape = _read_meta(path, header)
                if stored_shape != tuple(latent_shape):
                    raise CheckpointError(f"{path}: a prior for latents of shape {stored_shape}, the model's are "
                                          f"{tuple(latent_shape)}")
                flow = _flow_size(path, meta) if meta.get("density", "mixture") == "flow" else None
                allowed = ({1: MAX_COMPONENTS, 2: MAX_COMPONENTS * dims, 3: MAX_COMPONENTS * min(dims, MAX_FULL_DIMS) ** 2}
                           if flow is None else {1: max(2 * dims, flow[1]), 2: max(dims, flow[1]) * max(2 * dims, flow[1])})
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
        groups = {}
        for key, value in tensors.items():
            head, _, rest = key.partition(".")
            if head == "class":
                index, _, rest = rest.partition(".")
                label = int(index) if index.isdigit() else "bad"
            else:
                label = None if head == "all" else "bad"
            if label == "bad":
                raise CheckpointError(f"{path}: unexpected tensor {key!r}")
            groups.setdefault(label, {})[rest] = value.float()
        if not groups or (None in groups and len(groups) > 1):
            raise CheckpointError(f"{path}: no density, or both a shared and per-class ones")
        if flow is not None:
            mixtures = {label: _load_flow(path, label, part, dims, *flow) for label, part in groups.items()}
        else:
            mixtures = {label: _check_mixture(path, label, part, dims) for label, part in groups.items()}
        return cls(mixtures, stored_shape, meta)


def _read_meta(path, header: dict):
    try:
        meta = json.loads(header["flexvae_prior"])
        return meta, tuple(int(v) for v in meta["latent_shape"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: no fitted-prior metadata") from None


def _flow_size(path, meta: dict) -> tuple[int, int]:
    layers, hidden = meta.get("layers"), meta.get("hidden")
    if not (isinstance(layers, int) and isinstance(hidden, int) and 1 <= layers <= MAX_LAYERS
            and 1 <= hidden <= MAX_HIDDEN):
        raise CheckpointError(f"{path}: a fitted flow's layers and hidden units must be whole numbers in [1, "
                              f"{MAX_LAYERS}] and [1, {MAX_HIDDEN}], found {layers!r} and {hidden!r}")
    return layers, hidden


def _load_flow(path, label, part: dict, dims: int, layers: int, hidden: int) -> FlowNetwork:
    flow = FlowNetwork(dims, layers, hidden)
    if any(not k.startswith("flow.") for k in part):
        raise CheckpointError(f"{path}: a fitted flow holds flow.* tensors only")
    state = {k[len("flow."):]: v for k, v in part.items()}
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: flow {label if label is not None else 'all'} does not have the tensors of "
                              f"{layers} couplings of {hidden} units over {dims} values") from None
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise CheckpointError(f"{path}: flow {label if label is not None else 'all'} holds values that are not finite")
    return flow.eval()


def _check_mixture(path, label, mixture: dict, dims: int) -> dict:
    for name in mixture:
        if name not in ("weights", "means", "factor"):
            prefix = "all." if label is None else f"class.{label}."
            raise CheckpointError(f"{path}: unexpected tensor {prefix + name!r}")
    weights, means, factor = (mixture.get(k) for k in ("weights", "means", "factor"))
    k = None if weights is None else weights.shape[0]
    ok = (set(mixture) == {"weights", "means", "factor"} and weights.dim() == 1
          and 0 < k <= MAX_COMPONENTS and tuple(means.shape) == (k, dims)
          and tuple(factor.shape) in ((k, dims), (k, dims, dims))
          and bool(torch.isfinite(weights).all()) and bool((weights >= 0).all()) and float(weights.sum()) > 0)
    if not ok:
        raise CheckpointError(f"{path}: mixture {label if label is not None else 'all'} is malformed")
    return mixture


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


def fit_mixture(latents: torch.Tensor, components: int, covariance: str, seed: int, pooled=None) -> dict:
    """scikit-learn's GaussianMixture fitted to ``latents`` (N, D): weights, means, factors. A
    single latent (a class with one image) is one component at it, with the ``pooled`` latents'
    covariance (unit variances when there are not two of them either)."""
    if len(latents) < 2:
        pooled = pooled if pooled is not None and len(pooled) >= 2 else None
        dims = latents.shape[1]
        if covariance == "full":
            cov = torch.eye(dims, dtype=torch.float64) if pooled is None else torch.cov(pooled.double().T).reshape(dims, dims)
            factor = torch.linalg.cholesky(cov + 1e-6 * torch.eye(dims, dtype=torch.float64)).unsqueeze(0)
        else:
            var = torch.ones(dims, dtype=torch.float64) if pooled is None else pooled.double().var(0)
            factor = (var + 1e-6).sqrt().unsqueeze(0)
        return {"weights": torch.ones(1, dtype=torch.float64), "means": latents.double().cpu()[:1].contiguous(),
                "factor": factor.contiguous()}
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


FLOW_LAYERS, FLOW_HIDDEN, FLOW_STEPS = 4, 128, 2000
DENSITIES = ("mixture", "flow")


@torch.enable_grad()
def fit_flow(latents: torch.Tensor, seed: int, layers: int = FLOW_LAYERS, hidden: int = FLOW_HIDDEN,
             steps: int = FLOW_STEPS) -> FlowNetwork:
    """A RealNVP flow (priors/flow.py) fitted to ``latents`` (N, D) by maximum likelihood: AdamW,
    batches of 256, a cosine schedule, seeded."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = latents.float().cpu()
    flow = FlowNetwork(data.shape[1], layers, hidden)
    optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        rows = torch.randint(0, len(data), (min(256, len(data)),), generator=generator)
        loss = -flow.log_prob(data[rows]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        optimizer.step()
        schedule.step()
    return flow.eval()


@torch.no_grad()
def fit_prior(loaded, folder=None, components: int = 10, covariance: str = "auto", seed: int = 0, batch_size: int = 64,
              device="cpu", progress: bool = False, density: str = "mixture") -> FittedPrior:
    """Encode the images of ``folder`` (default: the run's training data) with ``loaded``'s model
    (posterior means, raw) and fit a density to them (``density``: a Gaussian mixture, or a
    RealNVP flow): one per class when the model takes labels (from the folder's sub-folders)."""
    if density not in DENSITIES:
        raise ConfigError(f"a fitted prior's density is one of {', '.join(DENSITIES)}, got {density!r}")
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
    meta = {"checkpoint": str(loaded.path), "checkpoint_sha256": loaded.provenance()["sha256"], "step": loaded.step,
            "data": str(folder), "images": int(len(latents)), "seed": seed, "density": density}
    if density == "flow":
        mixtures = {label: fit_flow(group, seed) for label, group in groups.items()}
        meta.update(layers=FLOW_LAYERS, hidden=FLOW_HIDDEN, steps=FLOW_STEPS,
                    method="RealNVP flow (priors/flow.py) fitted by maximum likelihood to posterior means (raw latents)")
    else:
        chosen = choose_covariance(covariance, min(len(g) for g in groups.values()), dims, components)
        mixtures = {label: fit_mixture(group, components, chosen, seed, pooled=latents)
                    for label, group in groups.items()}
        meta.update(components=components, covariance=chosen,
                    method="sklearn.mixture.GaussianMixture on posterior means (raw latents)")
    return FittedPrior(mixtures, vae.latent_shape, meta)


def fit_run_prior(loaded, cfg, device="cpu") -> str:
    """``train.fit_prior`` at the end of a run: the prior of ``loaded``'s checkpoint fitted to the
    run's training images, saved beside it and attached; a line saying so (or why none was fitted)."""
    if loaded.vae.latent.kind not in FITTED_LATENTS:
        return f"note: train.fit_prior: a {loaded.vae.latent.kind} latent has no fitted prior; none fitted"
    prior = fit_prior(loaded, None, components=cfg.train.fit_prior, seed=cfg.train.seed,
                      batch_size=cfg.encode.batch_size, device=device, density=cfg.train.fit_prior_density)
    path = prior.save(prior_path(loaded.path))
    loaded.vae.fitted_prior = prior
    return f"{prior.describe()}: {path}; the last sample grid shows samples from it"
